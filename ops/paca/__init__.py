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

``paca_layer``: the whole PaCa-ViT attention layer from the patches (clustering head, z, the
LayerNorm'd cluster tokens, k/v/q projections, attention, output projection), "reference"
(``reference.py``, torch, differentiable) or "cpu" (``fused.py`` on ``csrc/paca.cpp``: the
fused forward for inference). See its docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clusterfx.ops.common import native
from clusterfx.ops.common.telemetry import counters, record
from clusterfx.ops.paca import (
    fused,
    registration,  # noqa: F401 - registers the ops
)
from clusterfx.ops.paca.checks import validate, validate_layer
from clusterfx.ops.paca.clustering import PatchClustering
from clusterfx.ops.paca.common import CLUSTERINGS, depthwise_on_grid
from clusterfx.ops.paca.fused import LIB as NATIVE_LIBRARY  # the fused layer kernels
from clusterfx.ops.paca.reference import paca_attention_reference, paca_layer_reference

__all__ = ["CLUSTERINGS", "NATIVE_LIBRARY", "PatchClustering", "counters", "depthwise_on_grid",
           "paca_attention", "paca_attention_reference", "paca_layer", "paca_layer_reference"]


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


def paca_layer(x: torch.Tensor, grid: tuple[int, int], kind: str,
               head: Sequence[torch.Tensor], q: tuple, kv: tuple, proj: tuple, heads: int, *,
               norm: tuple | None = None, prior: torch.Tensor | None = None,
               impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A whole patch-to-cluster attention layer from the patches (the op family as PaCa-ViT
    computes it; ``models.paca_vit.PaCaAttention`` takes the same parameters)::

        z      = softmax over the patches of clustering(x) (+ prior)   (B, M, N)
        tokens = LayerNorm(z x)                                        (B, M, C), norm optional
        k, v   = the halves of tokens Wkvᵀ + bkv                       (B, M, C) each
        out    = proj(MHA(q = x Wqᵀ + bq, k, v))                       (B, N, C)

    Implementations (``impl``): "reference" (``reference.py``, torch, differentiable, any
    device and dtype); "cpu" (``fused.py``: the C++ kernels, forward only, for inference on CPU
    float32 / float64 with no gradient wanted; an error otherwise); "auto": "cpu" where it can
    run, else "reference". Each call counts the one that ran in
    ``counters["paca_layer.<impl>"]``.

    Args:
        x: (B, N, C) patches on ``grid`` = (H, W), H·W = N.
        kind, head: the clustering head and its parameters in ``cluster_logits`` order
            (conv: dw weight, dw bias, pw weight, pw bias, out weight; mlp: w1, b1, w2, b2;
            linear: w).
        q, kv, proj: (weight, bias) of the query (C, C), key-value (2C, C; keys first) and
            output (C, C) projections.
        heads: attention heads (dividing C); the score scale is (C / heads) ** -0.5.
        norm: (weight, bias, eps) of the LayerNorm on the cluster tokens, or None.
        prior: (M, N) added to the cluster logits, or None.
        impl: "auto" | "reference" | "cpu".

    Returns:
        (out (B, N, C), z (B, M, N)).

    Raises:
        ValueError for bad arguments, before any work; for impl="cpu" also where it cannot
        run (a gradient wanted, not CPU float32/float64); RuntimeError when impl="cpu" and the
        fused kernels cannot be built here.
    """
    validate_layer(x, grid, kind, head, q, kv, proj, heads, norm, prior, impl)
    tensors = [x, *head, *q, *kv, *proj, prior, *(norm[:2] if norm else ())]
    if impl == "cpu" and not fused.available_for(*tensors):
        if not fused.LIB.available():
            raise RuntimeError(f"paca_layer(impl='cpu'): "
                               f"{native.unavailable_message(fused.LIB)}")
        raise ValueError("paca_layer(impl='cpu') is the fused forward for inference: it needs "
                         "CPU tensors of one dtype, float32 or float64, and no gradient "
                         "(run under torch.no_grad()); use impl='reference' or 'auto'")
    run = impl if impl != "auto" else ("cpu" if fused.available_for(*tensors) else "reference")
    record("paca_layer", run)
    if run == "cpu":
        return fused.layer_forward(x, grid, kind, head, q, kv, proj, heads, norm, prior)
    return paca_layer_reference(x, grid, kind, head, q, kv, proj, heads, norm, prior)
