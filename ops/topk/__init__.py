"""`clusterfx::topk_attention`: exact top-k attention (Gupta et al. 2021), memory O(N*k).

For each query i, with kv head h // (H // Hk) (GQA)::

    s_ij  = scale * <q_i, k_j> + mask_ij       (-inf where a bool mask is False, or where
                                                is_causal and j > i: top-left aligned, like SDPA)
    T_i   = the min(topk, Nk) keys with the largest s_ij
    out_i = sum_{j in T_i} softmax_{T_i}(s_i)_j v_j

- ``topk >= Nk`` is dense attention; ``topk = 1`` returns the value of the best key.
- A query whose keys are all masked gets **zeros** (as SDPA in torch 2.13 does), not NaN.
- ``attn_mask`` and ``is_causal`` may be given together; they combine.
- Scores and softmax run in fp32 (fp64 for fp64 inputs); the output has the input dtype.
  Accepted dtypes: fp16, bf16, fp32, and fp64 (for the float64 oracle and gradcheck).

Implementations (``impl``), none falling back silently to another:

- ``"reference"``: ``reference.py``, full score matrix, the oracle.
- ``"cpu"``: ``cpu.py``, chunks of ``chunk_size`` queries; vectorised torch (any device).
- ``"triton"``: ``triton.py``, host-side chunked ``torch.topk`` + a Triton kernel for the
  gathered softmax and weighted sum. On CPU tensors it needs TRITON_INTERPRET=1, else it raises.
- ``"auto"``: triton on CUDA, cpu elsewhere.

Backward (all impls): the selection is discrete and held fixed; the op re-runs the chunked
selection and differentiates the softmax over the selected keys (``backward.py``), giving
gradients for q, k, v and a floating ``attn_mask``. No double backward. Every forward counts
its implementation in ``counters`` (``"impl.cpu"``, ...).

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), attn_mask broadcastable to
(B, H, Nq, Nk) -> out (B, H, Nq, Dv).
"""

from collections import Counter

import torch

from .backward import topk_attention_backward
from .cpu import topk_attention_cpu
from .reference import topk_attention_reference
from .validation import IMPLS, validate

__all__ = ["topk_attention", "topk_attention_reference", "counters", "IMPLS"]

counters: Counter = Counter()


def _rank4(mask: torch.Tensor | None) -> torch.Tensor | None:
    """View a broadcastable mask as rank 4 by prepending size-1 dims."""
    if mask is None:
        return None
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that will run; raises rather than substituting another."""
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "cpu"
    if impl == "triton":
        try:
            from . import triton as triton_impl
        except ImportError as e:
            raise RuntimeError("impl='triton' needs the triton package, which failed to import; "
                               "install triton or pass impl='cpu'") from e
        if device.type == "cpu" and not triton_impl.interpret_enabled():
            raise RuntimeError("impl='triton' got CPU tensors but TRITON_INTERPRET is not set; "
                               "set TRITON_INTERPRET=1 before the call to run the kernel in "
                               "Triton's interpreter, or pass impl='cpu'")
    return impl


@torch.library.custom_op("clusterfx::topk_attention", mutates_args=())
def _topk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       scale: float | None = None, chunk_size: int = 256,
                       impl: str = "auto") -> torch.Tensor:
    validate(q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl)
    name = _resolve_impl(impl, q.device)
    counters[f"impl.{name}"] += 1
    args = dict(topk=topk, attn_mask=_rank4(attn_mask), is_causal=is_causal,
                scale=_scale(q, scale))
    if name == "reference":
        out = topk_attention_reference(q, k, v, **args)
    elif name == "cpu":
        out = topk_attention_cpu(q, k, v, chunk_size=chunk_size, **args)
    else:
        from .triton import topk_attention_triton

        out = topk_attention_triton(q, k, v, chunk_size=chunk_size, **args)
    return out.contiguous()  # the fake kernel's layout


@_topk_attention_op.register_fake
def _topk_attention_fake(q, k, v, topk, attn_mask=None, is_causal=False, scale=None,
                         chunk_size=256, impl="auto"):
    validate(q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("clusterfx::topk_attention_backward", mutates_args=())
def _topk_attention_backward_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: torch.Tensor | None, topk: int, is_causal: bool, scale: float,
    chunk_size: int, mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask); dmask is an empty tensor unless ``mask_grad`` (opaque to compile)."""
    dq, dk, dv, dmask = topk_attention_backward(
        grad, q, k, v, _rank4(attn_mask), topk=topk, is_causal=is_causal, scale=scale,
        chunk_size=chunk_size, mask_grad=mask_grad)
    dmask = q.new_empty(0) if dmask is None else dmask.reshape(attn_mask.shape)
    # contiguous, as the fake kernel promises whatever the inputs' layouts
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous()


@_topk_attention_backward_op.register_fake
def _topk_attention_backward_fake(grad, q, k, v, attn_mask, topk, is_causal, scale, chunk_size,
                                  mask_grad):
    contiguous = torch.contiguous_format
    dmask = (torch.empty_like(attn_mask, memory_format=contiguous)
             if mask_grad and attn_mask is not None else q.new_empty(0))
    return (torch.empty_like(q, memory_format=contiguous),
            torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous), dmask)


def _setup_context(ctx, inputs, output):
    q, k, v, topk, attn_mask, is_causal, scale, chunk_size, _impl = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.params = (topk, is_causal, _scale(q, scale), chunk_size)


def _backward(ctx, grad):
    q, k, v, attn_mask = ctx.saved_tensors
    topk, is_causal, scale, chunk_size = ctx.params
    mask_grad = (attn_mask is not None and attn_mask.is_floating_point()
                 and ctx.needs_input_grad[4])
    dq, dk, dv, dmask = torch.ops.clusterfx.topk_attention_backward(
        grad, q, k, v, attn_mask, topk, is_causal, scale, chunk_size, mask_grad)
    return dq, dk, dv, None, (dmask if mask_grad else None), None, None, None, None


_topk_attention_op.register_autograd(_backward, setup_context=_setup_context)


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                   attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                   scale: float | None = None, chunk_size: int = 256,
                   impl: str = "auto") -> torch.Tensor:
    """Top-k attention through the ``clusterfx::topk_attention`` custom op.

    Args:
        q, k, v: (B, H, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv); H a multiple of Hk;
            fp16, bf16, fp32 or fp64, all the same dtype and device.
        topk: keys kept per query (>= 1); values >= Nk give dense attention.
        attn_mask: None, a bool keep-mask (True = attend) or an additive float mask,
            broadcastable to (B, H, Nq, Nk).
        is_causal: query i sees keys j <= i (top-left aligned); combines with attn_mask.
        scale: score scale, default D ** -0.5.
        chunk_size: queries per chunk (>= 1) for "cpu" and "triton"; peak extra memory is
            about chunk_size * Nk scores per (batch, head). Results do not depend on it.
        impl: "auto" | "reference" | "cpu" | "triton" (see the module docstring).

    Returns:
        (B, H, Nq, Dv) in q's dtype; zeros for queries with every key masked.

    Raises:
        TypeError / ValueError for bad arguments, before any work; RuntimeError when
        impl="triton" cannot run (triton missing, or CPU tensors without TRITON_INTERPRET=1).
    """
    validate(q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl)
    return torch.ops.clusterfx.topk_attention(q, k, v, topk, attn_mask, is_causal, scale,
                                              chunk_size, impl)
