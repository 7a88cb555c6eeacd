"""`clusterfx::attention`, the canonical attention node every spelling is reduced to.

    attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=1.0,
              enable_gqa=False) -> Tensor

Same meaning as `F.scaled_dot_product_attention` except that `scale` is always explicit and
`attn_mask` and `is_causal` may be given together (they combine). It is registered as a
CompositeImplicitAutograd op that calls SDPA, so a canonicalised graph runs, differentiates and
compiles as it is; the lowering pass replaces it per policy. The reference lives in
`reference.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import attention_reference, causal_keep, repeat_kv

__all__ = ["attention", "attention_reference", "dense_attention", "check_qkv", "causal_keep",
           "repeat_kv"]

_lib = torch.library.Library("clusterfx", "DEF")  # noqa: TOR901 - the project's namespace
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float scale=1.0, bool enable_gqa=False) -> Tensor"
)


def check_qkv(q, k, v) -> None:
    """q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv), rank >= 3: else a ValueError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() < 3:
            raise ValueError(f"{name} has rank {x.dim()} (shape {tuple(x.shape)}); attention "
                             f"takes rank >= 3: (..., N, D)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim ({q.shape[-1]}) must equal k head dim ({k.shape[-1]})")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k length ({k.shape[-2]}) must equal v length ({v.shape[-2]})")


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


_lib.impl("attention", dense_attention, "CompositeImplicitAutograd")
attention = torch.ops.clusterfx.attention.default
