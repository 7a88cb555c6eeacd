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
- ``"cpu"``: ``fused.py``, the fused C++ kernels of ``csrc/topk.cpp`` (CPU tensors): the
  scores stream by in blocks and each query keeps its k best, so only k columns of P V are
  computed; memory O(N·k).
- ``"torch"``: ``cpu.py``, chunks of ``chunk_size`` queries; vectorised torch (any device).
- ``"triton"``: ``triton.py``, host-side chunked ``torch.topk`` + a Triton kernel for the
  gathered softmax and weighted sum. On CPU tensors it needs TRITON_INTERPRET=1, else it raises.
- ``"auto"``: triton on CUDA, cpu elsewhere (torch, with a warning, where the C++ kernels
  cannot be built).

Backward: the selection is discrete and held fixed; impl "cpu" re-runs the fused selection
and a fused per-query backward (``fused.py``); otherwise (and whenever a floating mask needs
its gradient) the op re-runs the chunked torch selection and differentiates the softmax over
the selected keys (``backward.py``), giving gradients for q, k, v and a floating
``attn_mask``. No double backward. Every forward counts its implementation in ``counters``
(``"topk_attention.cpu"``, ...).

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), attn_mask broadcastable to
(B, H, Nq, Nk) -> out (B, H, Nq, Dv).
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.telemetry import counters
from clusterfx.ops.topk import registration  # noqa: F401 - registers the ops
from clusterfx.ops.topk.checks import validate
from clusterfx.ops.topk.fused import LIB as NATIVE_LIBRARY  # the fused kernels
from clusterfx.ops.topk.reference import topk_attention_reference

__all__ = ["NATIVE_LIBRARY", "topk_attention", "topk_attention_reference", "counters"]


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
        chunk_size: queries per chunk (>= 1) for "torch" and "triton"; peak extra memory is
            about chunk_size * Nk scores per (batch, head). Results do not depend on it.
        impl: "auto" | "reference" | "cpu" | "torch" | "triton" (module docstring).

    Returns:
        (B, H, Nq, Dv) in q's dtype; zeros for queries with every key masked.

    Raises:
        TypeError / ValueError for bad arguments, before any work; RuntimeError when
        impl="triton" cannot run (triton missing, or CPU tensors without TRITON_INTERPRET=1).
    """
    validate(q, k, v, topk, attn_mask, is_causal, scale, chunk_size, impl)
    return torch.ops.clusterfx.topk_attention(q, k, v, topk, attn_mask, is_causal, scale,
                                              chunk_size, impl)
