"""DPC-kNN in vectorised torch, chunked so that memory is O(chunk · n) per region instead of
O(n²), and the pairwise work is halved where it can be (device-agnostic; the fast CPU path).

Per region of n tokens (the math is the reference's; see ``reference.py``)::

    pass 1  rows in chunks: D² = (|x_i|² + |x_j|² - 2 x_i·x_j) / C (one GEMM per chunk),
            rho_i = exp(-mean of the k smallest D²_ij), and max D² for the densest token
    sort    tokens by (rho descending, index ascending): token r in that order is denser than
            exactly the tokens before it
    pass 2  delta of sorted token r = sqrt(min_{s < r} D²_rs): each chunk of rows only needs
            the columns before it, so this pass costs half a full one; sqrt only on the minima
    pass 3  distances of every token to the centres (n × c GEMM) -> argmin

All regions (and batch elements) are processed together as one batch of B·R blocks, so local
(per-region) clustering costs R times less than global at the same N. Distances come from the
GEMM form, not cdist: equal to the reference to rounding, and ties are broken by index alike.
"""

from __future__ import annotations

import torch

from clusterfx.ops.dpc_knn.common import chunk_rows

_CHUNK_ELEMENTS = 1 << 22  # distance entries alive per chunk, over all blocks


def _sq_dist(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor,
             channels: int) -> torch.Tensor:
    """(||a_i - b_j||² / C) clamped at 0. a (G, r, C), b (G, s, C) -> (G, r, s)."""
    d2 = torch.baddbmm(a_sq[:, :, None] + b_sq[:, None, :], a, b.transpose(1, 2), alpha=-2.0)
    return d2.clamp_min_(0.0).div_(channels)


def dpc_knn_cpu(x: torch.Tensor, clusters: int, *, k: int = 5, regions: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes as ``dpc_knn_reference``: x (B, N, C) -> labels (B, N), centres (B, clusters)."""
    b, n, c = x.shape
    per, cpr, g = n // regions, clusters // regions, b * regions
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.detach().to(work).reshape(g, per, c)
    sq = (xs * xs).sum(dim=-1)  # (G, n)
    rows = chunk_rows(per, g * per, _CHUNK_ELEMENTS)
    rho = torch.empty(g, per, dtype=work, device=x.device)
    far = torch.zeros(g, dtype=work, device=x.device)
    for start, end in rows:
        d2 = _sq_dist(xs[:, start:end], sq[:, start:end], xs, sq, c)  # (G, r, n)
        d2[:, torch.arange(end - start), torch.arange(start, end)] = 0.0  # exact self distance
        rho[:, start:end] = torch.exp(-d2.topk(k, dim=-1, largest=False).values.mean(dim=-1))
        far = torch.maximum(far, d2.flatten(1).amax(dim=-1))
    order = torch.sort(rho, dim=-1, descending=True, stable=True).indices  # (G, n)
    xo = xs.gather(1, order[:, :, None].expand(-1, -1, c))
    sqo = sq.gather(1, order)
    delta_sorted = torch.empty(g, per, dtype=work, device=x.device)
    for start, end in rows:
        d2 = _sq_dist(xo[:, start:end], sqo[:, start:end], xo[:, :end], sqo[:, :end], c)
        before = torch.arange(end, device=x.device)[None, :] < torch.arange(
            start, end, device=x.device)[:, None]  # (r, end): column s precedes row r
        d2 = torch.where(before, d2, torch.full_like(d2, float("inf")))
        delta_sorted[:, start:end] = d2.amin(dim=-1)
    delta_sorted[:, 0] = far  # the densest token
    delta = torch.empty_like(delta_sorted).scatter_(1, order, delta_sorted.sqrt())
    score = rho * delta
    centres = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :cpr]
    xc = xs.gather(1, centres[:, :, None].expand(-1, -1, c))
    labels = _sq_dist(xs, sq, xc, sq.gather(1, centres), c).argmin(dim=-1)  # (G, n)
    labels.scatter_(1, centres, torch.arange(cpr, device=x.device).expand(g, -1))
    offsets = torch.arange(regions, device=x.device).repeat(b)[:, None]
    return ((labels + offsets * cpr).reshape(b, n),
            (centres + offsets * per).reshape(b, clusters))
