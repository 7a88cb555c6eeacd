"""torch.library registration of ``clusterfx::topk_attention`` and its backward op: schema,
fake kernels, autograd, and dispatch to the implementations: "reference" (``reference.py``),
"cpu" (``fused.py``, the C++ kernels), "torch" (``cpu.py``, vectorised torch), "triton"
(``triton.py``). The backward runs the fused kernels for impl "cpu" (unless a floating mask
needs its gradient) and ``backward.py`` (torch) otherwise. See the family's ``__init__`` for
the math. ``site``: a telemetry tag (a rewritten site's op counts its calls and implementation
for its compile's report)."""

from __future__ import annotations

import torch

from clusterfx.ops.common import telemetry
from clusterfx.ops.common.checks import NATIVE_IMPLS
from clusterfx.ops.common.degenerate import degenerate_attention, is_degenerate
from clusterfx.ops.common.dispatch import resolve_impl
from clusterfx.ops.topk import fused
from clusterfx.ops.topk.backward import topk_attention_backward
from clusterfx.ops.topk.checks import validate
from clusterfx.ops.topk.cpu import topk_attention_cpu
from clusterfx.ops.topk.reference import topk_attention_reference


def _rank4(mask: torch.Tensor | None) -> torch.Tensor | None:
    """View a broadcastable mask as rank 4 by prepending size-1 dims."""
    if mask is None:
        return None
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def resolve(impl: str, device: torch.device) -> str:
    """The implementation that runs for ``impl`` (explicit ones never fall back)."""
    return resolve_impl(impl, device, NATIVE_IMPLS, fused.LIB)


def _finite(*tensors: torch.Tensor) -> bool:
    """Every entry finite (three reductions; memory-bound, small next to top-k's GEMMs)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is not None:
        return scale
    return 1.0 if q.shape[-1] == 0 else q.shape[-1] ** -0.5  # D = 0: every score is 0


@torch.library.custom_op("clusterfx::topk_attention", mutates_args=())
def _topk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       scale: float | None = None, chunk_size: int = 256,
                       impl: str = "auto", site: str = "") -> torch.Tensor:
    validate(q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl)
    name = resolve(impl, q.device)
    if is_degenerate(q, k, v):  # a zero-size dim: exact attention's answer (empty / zeros)
        telemetry.record("topk_attention", "dense", site=site, path="exact: empty input")
        return degenerate_attention(q, k, v, _rank4(attn_mask), is_causal, scale).contiguous()
    path = f"top-k [{name}]"
    if name == "cpu" and not _finite(q, k, v):
        # the fused kernel's running top-k compares scores, and NaN compares false: it would
        # return finite rows where exact attention has NaN. The vectorised path spreads NaN
        # and inf exactly as dense attention's scores do (tests/ops/test_robust_inputs.py).
        name, path = "torch", "top-k [torch: non-finite input]"
    telemetry.record("topk_attention", name, site=site, path=path)
    args = dict(topk=topk, attn_mask=_rank4(attn_mask), is_causal=is_causal,
                scale=_scale(q, scale))
    if name == "reference":
        out = topk_attention_reference(q, k, v, **args)
    elif name == "cpu":
        out = fused.topk_attention_cpu(q, k, v, **args)
    elif name == "torch":
        out = topk_attention_cpu(q, k, v, chunk_size=chunk_size, **args)
    else:  # imported when used, so that this module imports without Triton
        from clusterfx.ops.topk.triton import topk_attention_triton

        out = topk_attention_triton(q, k, v, chunk_size=chunk_size, **args)
    return out.contiguous()  # the fake kernel's layout


@_topk_attention_op.register_fake
def _topk_attention_fake(q, k, v, topk, attn_mask=None, is_causal=False, scale=None,
                         chunk_size=256, impl="auto", site=""):
    validate(q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("clusterfx::topk_attention_backward", mutates_args=())
def _topk_attention_backward_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: torch.Tensor | None, topk: int, is_causal: bool, scale: float,
    chunk_size: int, mask_grad: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask); dmask is an empty tensor unless ``mask_grad`` (opaque to compile)."""
    if is_degenerate(q, k, v):
        dq, dk, dv, dmask = _degenerate_backward(grad, q, k, v, attn_mask, is_causal, scale,
                                                 mask_grad)
        return dq, dk, dv, dmask
    if not mask_grad and resolve(impl, q.device) == "cpu" and _finite(q, k, v):
        dq, dk, dv = fused.topk_attention_backward(grad, q, k, v, _rank4(attn_mask), topk=topk,
                                                   is_causal=is_causal, scale=scale)
        dmask = None
    else:
        dq, dk, dv, dmask = topk_attention_backward(
            grad, q, k, v, _rank4(attn_mask), topk=topk, is_causal=is_causal, scale=scale,
            chunk_size=chunk_size, mask_grad=mask_grad)
    dmask = q.new_empty(0) if dmask is None else dmask.reshape(attn_mask.shape)
    # contiguous, as the fake kernel promises whatever the inputs' layouts
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous()


def _degenerate_backward(grad, q, k, v, attn_mask, is_causal, scale, mask_grad):
    """Gradients of exact attention on degenerate inputs (fresh tensors: no aliasing)."""
    mask = _rank4(attn_mask)
    fresh = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
    if mask_grad:
        fn = lambda q_, k_, v_, m_: degenerate_attention(q_, k_, v_, m_, is_causal, scale)  # noqa
        _, vjp = torch.func.vjp(fn, q, k, v, mask)
        dq, dk, dv, dmask = vjp(grad.contiguous())
        return fresh(dq), fresh(dk), fresh(dv), fresh(dmask.reshape(attn_mask.shape))
    fn = lambda q_, k_, v_: degenerate_attention(q_, k_, v_, mask, is_causal, scale)  # noqa
    _, vjp = torch.func.vjp(fn, q, k, v)
    dq, dk, dv = vjp(grad.contiguous())
    return fresh(dq), fresh(dk), fresh(dv), q.new_empty(0)


@_topk_attention_backward_op.register_fake
def _topk_attention_backward_fake(grad, q, k, v, attn_mask, topk, is_causal, scale, chunk_size,
                                  mask_grad, impl):
    contiguous = torch.contiguous_format
    dmask = (torch.empty_like(attn_mask, memory_format=contiguous)
             if mask_grad and attn_mask is not None else q.new_empty(0))
    return (torch.empty_like(q, memory_format=contiguous),
            torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous), dmask)


def _setup_context(ctx, inputs, output):
    q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl, _site = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.params = (topk, is_causal, _scale(q, scale), chunk_size)
    ctx.impl = impl


def _backward(ctx, grad):
    q, k, v, attn_mask = ctx.saved_tensors
    topk, is_causal, scale, chunk_size = ctx.params
    mask_grad = (attn_mask is not None and attn_mask.is_floating_point()
                 and ctx.needs_input_grad[4])
    dq, dk, dv, dmask = torch.ops.clusterfx.topk_attention_backward(
        grad, q, k, v, attn_mask, topk, is_causal, scale, chunk_size, mask_grad, ctx.impl)
    return dq, dk, dv, None, (dmask if mask_grad else None), None, None, None, None, None


_topk_attention_op.register_autograd(_backward, setup_context=_setup_context)
