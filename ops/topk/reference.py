"""Plain-torch top-k attention: the oracle every other implementation is checked against.

For each query i (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention")::

    s_ij  = scale * <q_i, k_j> + mask_ij        (mask_ij = -inf where a bool mask is False,
                                                 or where is_causal and j > i)
    T_i   = the min(topk, Nk) indices j with the largest s_ij
    a_ij  = exp(s_ij) / sum_{l in T_i} exp(s_il)   for j in T_i,  0 otherwise
    out_i = sum_j a_ij v_j

A query whose keys are all masked gets ``out_i = 0``. With ``topk >= Nk`` this is dense attention.

It materialises the full (B, H, Nq, Nk) score matrix, so memory is O(Nq * Nk); it is meant for
tests, float64 included, and is differentiable by ordinary autograd (the top-k selection is a
constant of the forward pass, so gradients flow only through the selected scores).
"""

from __future__ import annotations

import torch


def topk_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                             attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                             scale: float | None = None) -> torch.Tensor:
    """Top-k attention by materialising every score.

    Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) with H a multiple of Hk (query
    head h reads kv head h // (H // Hk)); attn_mask broadcastable to (B, H, Nq, Nk), bool (True =
    attend) or additive float -> (B, H, Nq, Dv) in q's dtype. fp16/bf16 inputs are computed in
    fp32, fp32 and fp64 inputs in their own dtype. No argument checking: the public op does it.
    """
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(work), k.to(work), v.to(work)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, Nk, D)
    v = v.repeat_interleave(groups, dim=1)  # (B, H, Nk, Dv)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nq, nk = q.shape[-2], k.shape[-2]

    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(work)
    if is_causal:
        future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))

    chosen = scores.detach().topk(min(topk, nk), dim=-1).indices  # (B, H, Nq, k)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, chosen, True)
    scores = scores.masked_fill(~keep, float("-inf"))

    # Softmax that returns 0 (not NaN) on rows with no finite score: subtract a finite row max,
    # and divide by 1 where nothing survived.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    return (weights @ v).to(out_dtype)
