"""The oracle for `clusterfx::attention`: explicit softmax attention in plain torch.

    out = dropout(softmax(q kᵀ · scale + mask)) v

Shapes: q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv) -> (..., Nq, Dv). Batch dims broadcast;
with `enable_gqa` the head dim (-3) of k/v is repeated to match q's.
`attn_mask` is a boolean keep-mask (True = attend) or an additive float mask; `is_causal` keeps
key j for query i iff j <= i (top-left aligned, as SDPA). Both may be given: they combine.
"""

from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., Hk, N, D) -> (..., Hk * groups, N, D), each kv head repeated `groups` times."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def attention_reference(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: float = 1.0, enable_gqa: bool = False) -> torch.Tensor:
    if enable_gqa:
        groups = q.shape[-3] // k.shape[-3]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Nq, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    acc = torch.promote_types(scores.dtype, torch.float32)  # fp16/bf16 softmax in fp32
    probs = torch.softmax(scores.to(acc), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return probs @ v
