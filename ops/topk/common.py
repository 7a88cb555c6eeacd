"""Chunked top-k key selection shared by the cpu and triton implementations and the backward.

Not a backend: it holds the masked score of one chunk of queries and the gather/softmax helpers
that the cpu forward, the triton host side and the backward all need, so that the three select
exactly the same keys. The reference does not use it (it is the independent oracle).

For the queries ``i`` in ``[start, end)`` of one chunk, with kv head ``h // G`` (GQA)::

    s[b, h, i, j] = scale * <q[b, h, i], k[b, h // G, j]> + mask[b, h, i, j]   (additive mask)
    s[b, h, i, j] = -inf   where a bool mask is False, or (is_causal and j > i)

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), mask broadcastable to (B, H, Nq, Nk) and already of
rank 4; one chunk of scores is (B, H, C, Nk) with C = end - start.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from clusterfx.ops.common.checks import compute_dtype

__all__ = ["chunk_scores", "compute_dtype", "gather_rows", "mask_rows", "query_chunks",
           "scatter_rows_add_", "select_topk", "softmax_selected"]


def query_chunks(nq: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive query chunks of at most ``chunk_size`` rows."""
    for start in range(0, nq, chunk_size):
        yield start, min(start + chunk_size, nq)


def mask_rows(mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """The rows ``[start, end)`` of a rank-4 broadcastable mask (a view; size-1 rows stay)."""
    if mask is None or mask.shape[2] == 1:
        return mask
    return mask[:, :, start:end]


def chunk_scores(q: torch.Tensor, k_c: torch.Tensor, mask: torch.Tensor | None, start: int,
                 end: int, is_causal: bool, scale: float) -> torch.Tensor:
    """Masked, scaled scores of queries ``[start, end)`` against every key.

    ``k_c`` is k already cast to the compute dtype (cast once per call, not per chunk).
    Shapes: q (B, H, Nq, D), k_c (B, Hk, Nk, D) -> (B, H, C, Nk) in k_c's dtype.
    """
    b, h, _, d = q.shape
    hk, nk = k_c.shape[1], k_c.shape[2]
    c = end - start
    # (B, H, C, D) -> (B, Hk, G*C, D): the G query heads of one kv head become extra rows, so
    # one batched matmul serves GQA without copying k.
    q_c = q[:, :, start:end].to(k_c.dtype).reshape(b, hk, (h // hk) * c, d)
    scores = torch.matmul(q_c, k_c.transpose(-1, -2)).view(b, h, c, nk)
    scores.mul_(scale)
    m = mask_rows(mask, start, end)
    if m is not None:
        if m.dtype == torch.bool:
            scores.masked_fill_(~m, float("-inf"))
        else:
            scores.add_(m.to(scores.dtype))
    if is_causal:
        rows = torch.arange(start, end, device=q.device).unsqueeze(-1)
        cols = torch.arange(nk, device=q.device)
        scores.masked_fill_(cols > rows, float("-inf"))  # top-left aligned, like SDPA
    return scores


def select_topk(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(topk, Nk)`` largest masked scores of each query and their key indices.

    Masked keys (``-inf``) are only selected when a query has fewer valid keys than k; they get
    weight zero. Shapes: (B, H, C, Nk) -> values (B, H, C, k), indices int64 (B, H, C, k).
    """
    return scores.topk(min(topk, scores.shape[-1]), dim=-1, sorted=False)


def softmax_selected(values: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row whose entries are all ``-inf`` gives all zeros.

    The row max is clamped to the dtype's lowest finite value, so an all-masked row gives
    exp(-inf) = 0 everywhere and a zero denominator, which is then replaced by 1. A row with at
    least one valid entry has denominator >= 1 (its max contributes exp(0)).
    """
    top = values.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).min)
    e = torch.exp(values - top)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of per-kv-head ``x`` picked by per-query-head indices.

    ``out[b, h, i, j] = x[b, h // G, idx[b, h, i, j]]``.
    Shapes: x (B, Hk, N, E), idx (B, H, C, k) -> (B, H, C, k, E).
    """
    b, h, c, kk = idx.shape
    hk, e = x.shape[1], x.shape[-1]
    flat = idx.reshape(b, hk, (h // hk) * c * kk, 1).expand(-1, -1, -1, e)
    return x.gather(2, flat).view(b, h, c, kk, e)


def scatter_rows_add_(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """Adjoint of :func:`gather_rows`: ``dst[b, h // G, idx[b, h, i, j]] += src[b, h, i, j]``.

    Shapes: dst (B, Hk, N, E), idx (B, H, C, k), src (B, H, C, k, E).
    """
    b, h, c, kk = idx.shape
    hk, e = dst.shape[1], dst.shape[-1]
    flat = idx.reshape(b, hk, (h // hk) * c * kk, 1).expand(-1, -1, -1, e)
    dst.scatter_add_(2, flat, src.reshape(b, hk, (h // hk) * c * kk, e))
