"""`clusterfx::paca_attention`: patch-to-cluster attention (PaCa-ViT, Grainger et al., CVPR
2023), O(N·M·D) per head instead of O(N²·D).

N tokens = P prefix tokens (class / register tokens, kept exact) followed by Np = N - P
patches. Cluster logits L (B, M, Np) come from a clustering module (``clustering.py``). Then::

    z       = softmax over the patches of L                (B, M, Np); each row sums to 1
    Kc, Vc  = z · K[P:], z · V[P:]                          (B, H, M, D): M cluster tokens
    out[i]  = softmax_j(scale q_i · K'_j) V'_j   for patches i >= P, K' = [K[:P]; Kc],
                                                             V' = [V[:P]; Vc]
    out[i]  = softmax_j(scale q_i · K_j) V_j     for prefix tokens i < P (dense, exact)

Because the rows of z are convex weights, pooling keys equals projecting pooled patches:
z·(x Wk + b) = (z·x) Wk + b, which is the paper's "cluster tokens z·x, then k(·), v(·)"
(without its optional LayerNorm on the cluster tokens). With M = Np and z the identity, the
op is exactly dense attention; with M = 1 every patch gets the same output.

Implementations (``impl``), none falling back silently to another:

- ``"reference"``: ``reference.py``, every step written out, the float64 oracle.
- ``"cpu"``: ``cpu.py``, one shared softmax, two GEMMs, fused SDPA; any device.
- ``"triton"``: ``triton.py``, a pooling kernel (online softmax over the patches) and a
  flash-attention kernel; CUDA, or CPU under TRITON_INTERPRET=1; fp16, bf16, fp32.
- ``"auto"``: triton on CUDA, cpu elsewhere.

Backward (all impls): ``backward.py``, gradients for q, k, v and the logits (so the clustering
module learns from the task loss alone, as in the paper). No double backward. Every forward
counts its implementation in ``counters`` (``"paca_attention.cpu"``, ...). The op has a FLOP
formula for ``torch.utils.flop_counter``.

Shapes: q, k (B, H, N, D), v (B, H, N, Dv), logits (B, M, N - prefix) -> out (B, H, N, Dv).
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.telemetry import counters
from clusterfx.ops.paca import registration  # noqa: F401 - registers the ops
from clusterfx.ops.paca.checks import validate
from clusterfx.ops.paca.clustering import (
    CLUSTERINGS,
    PatchClustering,
    depthwise_on_grid,
)
from clusterfx.ops.paca.reference import paca_attention_reference

__all__ = ["CLUSTERINGS", "PatchClustering", "counters",
           "depthwise_on_grid", "paca_attention", "paca_attention_reference"]


def paca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor, *,
                   prefix: int = 0, scale: float | None = None,
                   impl: str = "auto") -> torch.Tensor:
    """Patch-to-cluster attention through the ``clusterfx::paca_attention`` custom op.

    Args:
        q, k, v: (B, H, N, D), (B, H, N, D), (B, H, N, Dv); fp16, bf16, fp32 or fp64 (one
            dtype, one device). Self-attention: q, k and v describe the same N tokens.
        logits: (B, M, N - prefix) cluster logits over the patches (any float dtype); the
            softmax over the patches is taken inside the op, in fp32 (fp64 for fp64 q).
        prefix: the number of leading class/register tokens (0 <= prefix < N), kept exact.
        scale: score scale, default D ** -0.5.
        impl: "auto" | "reference" | "cpu" | "triton" (see the module docstring).

    Returns:
        (B, H, N, Dv) in q's dtype.

    Raises:
        ValueError for bad arguments, before any work; RuntimeError when impl="triton" cannot
        run (triton missing, or CPU tensors without TRITON_INTERPRET=1).
    """
    validate(q, k, v, logits, prefix, scale, impl)
    return torch.ops.clusterfx.paca_attention(q, k, v, logits, prefix, scale, impl)
