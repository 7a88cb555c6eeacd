"""Top-k attention in vectorised torch, chunked over queries so memory is O(C*Nk + N*k).

For each chunk of C queries (C = ``chunk_size``)::

    S   = scale * Q_c K^T + mask_c                 (B, H, C, Nk), -inf where masked
    T   = topk(S, k)                               values (B, H, C, k), indices (B, H, C, k)
    A   = softmax over the k selected values       (B, H, C, k), rows with no valid key -> 0
    O_c = sum_j A[..., j] * V[T[..., j]]           (B, H, C, Dv)

Only one chunk of scores is alive at a time, so peak extra memory is C * Nk scores plus
C * k gathered V rows per (batch, head), instead of the Nq * Nk of dense attention. FLOPs stay
O(Nq * Nk * D): top-k attention saves memory, not compute. Although named for the CPU, it is
device-agnostic torch and runs on CUDA tensors too when asked for explicitly.
"""

from __future__ import annotations

import torch

from clusterfx.ops.topk.common import (
    chunk_scores,
    compute_dtype,
    gather_rows,
    query_chunks,
    select_topk,
    softmax_selected,
)


def topk_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       scale: float, chunk_size: int = 256) -> torch.Tensor:
    """Chunked top-k attention (arguments already validated by the public op).

    Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), attn_mask None or rank 4 and
    broadcastable to (B, H, Nq, Nk) -> (B, H, Nq, Dv) in q's dtype. Scores and softmax run in
    fp32 (fp64 for fp64 inputs).
    """
    b, h, nq, _ = q.shape
    work = compute_dtype(q.dtype)
    k_c = k.to(work)
    out = q.new_empty(b, h, nq, v.shape[-1])
    for start, end in query_chunks(nq, chunk_size):
        scores = chunk_scores(q, k_c, attn_mask, start, end, is_causal, scale)
        values, idx = select_topk(scores, topk)
        del scores  # free the C x Nk block before gathering
        weights = softmax_selected(values)  # (B, H, C, k)
        v_sel = gather_rows(v, idx).to(work)  # (B, H, C, k, Dv)
        out[:, :, start:end] = (weights.unsqueeze(-2) @ v_sel).squeeze(-2).to(q.dtype)
    return out
