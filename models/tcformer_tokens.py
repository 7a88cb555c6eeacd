"""Dynamic tokens for TCFormer, in plain torch with gather / scatter ops (the original builds
`torch.sparse` matrices, which break torch.compile graphs 49 times per forward).

A token set (`Tokens`) is x (B, N, C) plus, for every cell of the initial H0×W0 grid, the index
of the token that owns it (`idx_token`, B×N0) and the cell's weight inside that token
(`agg_weight`, B×N0×1), the current map size (H, W) the tokens are drawn on, and `layout`: the
tokens are grouped in contiguous, equal blocks for the regions of a (rh, rw) grid in raster
order (stage-1 grid tokens are the (H, W) layout, one token per region; after a global merge
the layout is (1, 1)). Cell (i, j) of the initial grid lies in pixel
(i·H // H0, j·W // W0) of an H×W map.

    token2map:    pixel value = mean over the initial cells inside the pixel of the features
                  of their owning tokens                           (B, N, C) -> (B, C, H, W)
    map2token:    token value = mean over its initial cells of the pixel containing the cell
                                                                    (B, C, H, W) -> (B, N, C)
    token_downup: target token = Σ_cells w · source token of the cell / Σ_cells w, over the
                  cells the target owns, w the source's agg_weight   (multi-stage aggregation)
    merge_tokens: cluster token = Σ_i w_i x_i / Σ_i w_i over its members, w = exp(score);
                  idx_token composes, agg_weight multiplies by the member's share w_i / Σ w
    dpc_knn:      TCFormer's density-peaks clustering (global, or per region of the layout)

Gradients flow through the features; the index bookkeeping is integer and the counts are
constants, as in the original (whose sparse matrix values are detached).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tokens(NamedTuple):
    x: torch.Tensor  # (B, N, C)
    idx_token: torch.Tensor  # (B, N0) int64: the token owning each initial cell
    agg_weight: torch.Tensor  # (B, N0, 1): the cell's share of its token
    map_size: tuple[int, int]  # (H, W) of the map the tokens are drawn on
    init_grid: tuple[int, int]  # (H0, W0)
    layout: tuple[int, int]  # (rh, rw): tokens are region-major for this region grid


def grid_tokens(x: torch.Tensor, size: tuple[int, int]) -> Tokens:
    """Tokens of a (B, H·W, C) raster grid: each cell is its own token."""
    b, n, _ = x.shape
    idx = torch.arange(n, device=x.device).expand(b, n)
    return Tokens(x, idx, x.new_ones(b, n, 1), size, size, size)


def cell_pixels(init_grid: tuple[int, int], size: tuple[int, int],
                device: torch.device) -> torch.Tensor:
    """(N0,) int64: the pixel of an H×W map that each initial cell falls in."""
    h0, w0 = init_grid
    rows = torch.arange(h0, device=device) * size[0] // h0
    cols = torch.arange(w0, device=device) * size[1] // w0
    return (rows[:, None] * size[1] + cols[None, :]).flatten()


def token2map(t: Tokens, x: torch.Tensor | None = None,
              size: tuple[int, int] | None = None) -> torch.Tensor:
    """Draw the tokens (or other features `x` of them, B×N×C) on a map of `size` (default
    t.map_size): (B, C, H, W)."""
    x = t.x if x is None else x
    size = t.map_size if size is None else size
    b, _, c = x.shape
    pix = cell_pixels(t.init_grid, size, x.device)  # (N0,)
    src = x.gather(1, t.idx_token[:, :, None].expand(-1, -1, c))  # (B, N0, C)
    out = x.new_zeros(b, size[0] * size[1], c).index_add_(1, pix, src)
    # cells per pixel (index_add, not bincount: bincount's output size depends on the data)
    count = x.new_zeros(size[0] * size[1]).index_add_(0, pix, x.new_ones(pix.shape))
    count = count.clamp_min(1.0)
    return (out / count[:, None]).transpose(1, 2).reshape(b, c, size[0], size[1])


def map2token(t: Tokens, fmap: torch.Tensor) -> torch.Tensor:
    """Read a (B, C, H, W) map back into the tokens: (B, N, C)."""
    b, c, h, w = fmap.shape
    pix = cell_pixels(t.init_grid, (h, w), fmap.device)
    src = fmap.flatten(2).transpose(1, 2).index_select(1, pix)  # (B, N0, C)
    n = t.x.shape[1]
    out = fmap.new_zeros(b, n, c).scatter_add_(1, t.idx_token[:, :, None].expand(-1, -1, c), src)
    count = fmap.new_zeros(b, n).scatter_add_(1, t.idx_token, fmap.new_ones(t.idx_token.shape))
    return out / count.clamp_min(1.0)[:, :, None]


def token_downup(target: Tokens, source: Tokens, x: torch.Tensor | None = None) -> torch.Tensor:
    """Features of `source` (or `x`, B×Ns×C) carried onto the tokens of `target`: (B, Nt, C),
    each target token the agg_weight-weighted mean of the source tokens over its cells."""
    x = source.x if x is None else x
    c = x.shape[-1]
    w = source.agg_weight  # (B, N0, 1)
    src = x.gather(1, source.idx_token[:, :, None].expand(-1, -1, c)) * w
    nt = target.x.shape[1]
    index = target.idx_token[:, :, None]
    out = x.new_zeros(x.shape[0], nt, c).scatter_add_(1, index.expand(-1, -1, c), src)
    norm = x.new_zeros(x.shape[0], nt, 1).scatter_add_(1, index, w)
    return out / (norm + 1e-6)


def merge_tokens(t: Tokens, labels: torch.Tensor, clusters: int, score: torch.Tensor,
                 size: tuple[int, int], layout: tuple[int, int]) -> Tokens:
    """Merge the tokens of each cluster, weighted by exp(score) (B, N, 1): the new token set
    on a map of `size` with region `layout`."""
    b, n, c = t.x.shape
    weight = torch.exp(score - score.amax(dim=1, keepdim=True))  # shift-free within clusters
    index = labels[:, :, None]
    total = weight.new_zeros(b, clusters, 1).scatter_add_(1, index, weight) + 1e-6
    share = weight / total.gather(1, index)  # (B, N, 1)
    merged = t.x.new_zeros(b, clusters, c).scatter_add_(1, index.expand(-1, -1, c), t.x * share)
    idx_token = labels.gather(1, t.idx_token)  # (B, N0)
    agg_weight = t.agg_weight * share.gather(1, t.idx_token[:, :, None])
    return Tokens(merged, idx_token, agg_weight, size, t.init_grid, layout)


def region_order(layout: tuple[int, int], regions: tuple[int, int], n: int,
                 device: torch.device) -> torch.Tensor:
    """(N,) the permutation putting tokens in `layout` region-major order into `regions`
    region-major order (each region of `regions` a union of layout regions)."""
    lh, lw = layout
    rh, rw = regions
    per = n // (lh * lw)
    i = torch.arange(lh, device=device)[:, None].expand(lh, lw).flatten()
    j = torch.arange(lw, device=device)[None, :].expand(lh, lw).flatten()
    fh, fw = lh // rh, lw // rw  # layout regions per region, down and across
    key = ((i // fh) * rw + (j // fw)) * (fh * fw) + (i % fh) * fw + (j % fw)
    blocks = torch.argsort(key)  # layout regions in the new order
    return (blocks[:, None] * per + torch.arange(per, device=device)[None, :]).flatten()


@torch.no_grad()
def dpc_knn(x: torch.Tensor, clusters: int, k: int = 5, regions: int = 1) -> torch.Tensor:
    """TCFormer's DPC-kNN labels (B, N) int64 of tokens x (B, N, C), per contiguous block of
    N / regions tokens (clusters / regions clusters each, labels offset per block): density
    rho = exp(-mean of the k smallest squared distances / C, self included), delta = distance
    to the nearest denser token (the densest: the largest distance), centres = the top
    rho·delta, every token to its nearest centre. Ties go to the lower index."""
    b, n, c = x.shape
    per, cpr = n // regions, clusters // regions
    xs = x.detach().float().reshape(b * regions, per, c)
    sq = (xs * xs).sum(-1)
    d2 = torch.baddbmm(sq[:, :, None] + sq[:, None, :], xs, xs.transpose(1, 2), alpha=-2.0)
    eye = torch.eye(per, dtype=torch.bool, device=x.device)
    d2 = d2.clamp_min(0.0).masked_fill(eye, 0.0) / c  # (G, n, n) squared distances
    rho = torch.exp(-d2.topk(k, dim=-1, largest=False).values.mean(-1))  # (G, n)
    index = torch.arange(per, device=x.device)
    denser = (rho[:, None, :] > rho[:, :, None]) | (
        (rho[:, None, :] == rho[:, :, None]) & (index[None, :] < index[:, None]))
    delta2 = torch.where(denser, d2, torch.full_like(d2, float("inf"))).amin(-1)
    far = d2.flatten(1).amax(-1, keepdim=True).expand_as(delta2)
    delta = torch.where(torch.isinf(delta2), far, delta2).sqrt()
    centres = torch.sort(rho * delta, dim=-1, descending=True, stable=True).indices[:, :cpr]
    labels = d2.gather(2, centres[:, None, :].expand(-1, per, -1)).argmin(-1)  # (G, n)
    labels = labels.scatter(1, centres, torch.arange(cpr, device=x.device).expand(
        b * regions, cpr))
    offsets = torch.arange(regions, device=x.device).repeat(b)[:, None] * cpr
    return (labels + offsets).reshape(b, n)
