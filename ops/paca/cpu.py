"""Patch-to-cluster attention in vectorised torch: the fast CPU path (device-agnostic).

Per call, with P prefix tokens, Np patches, M clusters, H heads of width D::

    z      = softmax(logits)                 one (B, M, Np) softmax, shared by all heads
    Kc, Vc = z @ K[P:], z @ V[P:]            two batched GEMMs, O(B·H·M·Np·D)
    O[P:]  = SDPA(Q[P:], [K[:P]; Kc], [V[:P]; Vc])    fused attention over P + M keys
    O[:P]  = SDPA(Q[:P], K, V)                         the prefix tokens, exact

so time and memory are O(N·M·D) per head (plus O(P·N·D) for the prefix), never O(N²): the
(Np, P + M) scores live inside SDPA's fused kernel. Works in fp32 (fp64 for fp64 inputs) and
returns q's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfx.ops.paca.common import compute_dtype


def paca_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor,
                       *, prefix: int, scale: float) -> torch.Tensor:
    """Shapes: q, k (B, H, N, D), v (B, H, N, Dv), logits (B, M, N - prefix) -> (B, H, N, Dv)."""
    work = compute_dtype(q.dtype)
    b, h, n, _ = q.shape
    z = torch.softmax(logits.to(work), dim=-1).unsqueeze(1)  # (B, 1, M, Np), broadcast over H
    kc = torch.matmul(z, k[:, :, prefix:].to(work))  # (B, H, M, D)
    vc = torch.matmul(z, v[:, :, prefix:].to(work))  # (B, H, M, Dv)
    if prefix:
        kc = torch.cat([k[:, :, :prefix].to(work), kc], dim=2)  # (B, H, P + M, D)
        vc = torch.cat([v[:, :, :prefix].to(work), vc], dim=2)
    if not prefix:  # no rows to stitch together
        return F.scaled_dot_product_attention(q.to(work), kc, vc, scale=scale).to(q.dtype)
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    out[:, :, prefix:] = F.scaled_dot_product_attention(q[:, :, prefix:].to(work), kc, vc,
                                                        scale=scale)
    out[:, :, :prefix] = F.scaled_dot_product_attention(
        q[:, :, :prefix].to(work), k.to(work), v.to(work), scale=scale)
    return out
