"""Attention on inputs with a zero-size dimension, answered as exact attention answers it.

An empty batch, no heads or no queries give an empty output; no keys give zeros (SDPA's
convention for rows with nothing to attend to); a zero head dim makes every score 0, so each
row is the mean of the values. Every op family routes such inputs here, before any clustering
or top-k selection (which would divide by zero or index into nothing), in its forward and its
backward, so the approximate ops agree with eager attention on them.

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), H a multiple of Hk (or both 0);
mask broadcastable to (B, H, Nq, Nk) → (B, H, Nq, Dv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_degenerate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Does any dimension of the attention have size 0?"""
    return 0 in (*q.shape, k.shape[-2], v.shape[-1])


def degenerate_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None = None, is_causal: bool = False,
                         scale: float | None = None) -> torch.Tensor:
    """Exact attention for degenerate inputs (see the module docstring), differentiable."""
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if 0 in (B, H, Nq, Dv):
        return (q.new_zeros(B, H, Nq, Dv) + 0 * v.sum() + 0 * q.sum() + 0 * k.sum())
    if Nk == 0:  # nothing to attend to: zeros, as SDPA
        return q.new_zeros(B, H, Nq, Dv) + 0 * (q.sum() + k.sum() + v.sum())
    scale = 1.0 if D == 0 else scale  # every score is 0 whatever the scale
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=H != Hk)
