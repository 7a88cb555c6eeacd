"""The implementation of `clusterfx::attention`: exact attention through SDPA on any device
(SDPA itself picks the fused kernel), combining a mask with causality when both are given."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfx.ops.attention.checks import check_qkv


def causal_keep(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """(Nq, Nk) bool, True where key j <= query i (top-left aligned, as SDPA)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def dense_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=1.0,
                    enable_gqa=False):
    """Exact attention through SDPA, combining a mask with causality when both are given."""
    check_qkv(q, k, v)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        # SDPA wants the mask in q's dtype; clamp so finfo(float32).min does not become -inf.
        attn_mask = attn_mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
    if is_causal and attn_mask is not None:
        keep = causal_keep(q.shape[-2], k.shape[-2], q.device)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
        is_causal = False
    if not enable_gqa and k.shape[:-2] != q.shape[:-2]:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        q = q.expand(*batch, *q.shape[-2:])
        k = k.expand(*batch, *k.shape[-2:])
        v = v.expand(*batch, *v.shape[-2:])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )
