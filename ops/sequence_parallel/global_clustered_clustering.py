"""Query clustering of the whole sequence over the ring, equal to one process.

`cluster_global` gives this ring rank's queries (its ring block, for its H/u heads after the
Ulysses all-to-all) the assignments that ``clustering.cluster_with(q_all, spec, metric=M,
centre_mask=keep, impl="reference")`` gives them on the gathered sequence of all H heads, with
the same seed. The k-means contract is that of ``ops/clustering/reference.py``; what makes the
distributed run equal:

* randomness: every rank draws, as the public API does (``clustering.random_draws``), the
  hyperplanes and the k-means plan of all B·H rows over all S positions, and keeps its rows
  (its heads); ``init_idx`` / ``reseed_idx`` are *global* token positions (zigzag included:
  rank i holds ``SeqLayout.block_positions(i)``);
* hash: the same planes on every rank; with the attention metric the root comes from the
  all-reduced key statistics (`clustered.ring_metric`; `attention_metric` when r = 1) and the
  centre of the SimHash is the global mean of the marked queries (Σ y and the count are
  all-reduced);
* seeds: the codes (Hamming) or vectors (Euclidean) of the init and reseed positions come from
  their owners in one all-reduce of a zero-filled (iterations, B·H/u, C[, D]) buffer, up front
  (with a checksum of the draw: ranks that drew differently, ``seed=-1`` with unsynchronised
  global RNGs, raise ValueError together);
* each round assigns locally (Hamming: exact integer GEMM of ±1 signs; Euclidean: the
  reference's Σ_d (x_d - c_d)²) and all-reduces per cluster the per-bit sign sums and member
  counts (majority: Σ signs > 0, a tie gives 0) or the sums and counts (means); an active
  cluster left empty takes its reseed code / vector; clusters beyond S stay inactive;
* ``refine`` Lloyd steps (float32, in the metric, as ``lloyd_refine``) all-reduce the sums and
  counts of each step.

Integers (codes, votes, counts, assignments) are exact. Floating point: the projections are
the reference's arithmetic on the local rows, but the centre, the metric and the Euclidean /
refine means are sums reduced in another order than one process sums them, so they can differ
in the last bits; an assignment can then differ only where a projection or a distance gap is
within that rounding of a tie (measure zero for continuous data; more likely in float32).

Shapes: q (B, h, Nb, D), metric (B, h, D, D) or None, centre (B, Nb) or (B, h, Nb) bool or
None (True = the query counts towards the hash's centre) → assignments (B, h, Nb) int64 in [0, C).
"""

from __future__ import annotations

import torch

from clusterfx.ops.clustering import (
    ClusteringSpec,
    HammingGemm,
    cluster_with,
    metric_root,
    nearest_centroids,
    pack_signs,
    random_draws,
    unpack_signs,
)
from clusterfx.ops.sequence_parallel.common import comm
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout

_DIST_CHUNK = 1 << 22  # elements of one (queries × clusters × D) block of Euclidean distances


def ring_sum(x: torch.Tensor, groups: comm.Groups, tag: str, phase: str = "fwd",
             op: str = "sum") -> torch.Tensor:
    """All-reduce over the ring group (identity when r = 1)."""
    if groups.ring == 1:
        return x
    return comm.all_reduce(x, groups.ring_pg(), groups.ring, groups.timeout, tag, phase, op)


def _hash_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def head_rows(batch: int, heads: int, groups: comm.Groups,
              device: torch.device | None = None) -> tuple[int, torch.Tensor]:
    """(B·H, rows): this Ulysses rank's (batch, head) rows among the B·H of one process, H =
    heads·u. After the all-to-all rank j holds heads [j·heads, (j+1)·heads) of every batch
    element (GQA: its K/V heads are those of these query heads, replicated when Hk < u), so
    row b·H + j·heads + i. Shapes: rows (B·heads,) int64, batch-major."""
    total, head0 = heads * groups.ulysses, heads * groups.ulysses_rank()
    b = torch.arange(batch, device=device)[:, None] * total
    return batch * total, (b + head0 + torch.arange(heads, device=device)).reshape(-1)


class _Rows:
    """This rank's rows of the global draw: heads [head0, head0 + h) of every batch element,
    and where each global position lives locally (-1: on another ring rank)."""

    def __init__(self, q: torch.Tensor, layout: SeqLayout, groups: comm.Groups):
        B, h, Nb, _ = q.shape
        self.heads = h * groups.ulysses
        self.positions = layout.block_positions(groups.ring_rank(), q.device)
        self.local = torch.full((layout.seq_len,), -1, dtype=torch.int64, device=q.device)
        self.local[self.positions] = torch.arange(Nb, device=q.device)
        self.rows = head_rows(B, h, groups, q.device)[1]  # (B·h,)
        self.checksum = 0  # of the whole random draw (see `_seed_values`)

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.to(self.rows.device).index_select(dim, self.rows)


def _seed_values(values: torch.Tensor, idx: torch.Tensor, rows: _Rows, groups: comm.Groups,
                 tag: str) -> torch.Tensor:
    """values (R, Nb, E) of the local queries, idx (T, R, C) global positions → (T, R, C, E)
    the values at those positions, each filled in by its owner and summed over the ring.

    One more element travels with them: a checksum of the whole draw, which every ring rank
    must have drawn alike (``seed=-1`` draws from each process's global RNG); ValueError on
    every rank of the ring otherwise, instead of clusters made of different hashes."""
    T, R, C = idx.shape
    slot = rows.local[idx]  # (T, R, C), -1 elsewhere
    mine = slot >= 0
    r_idx = torch.arange(R, device=idx.device)[None, :, None].expand(T, R, C)
    picked = values[r_idx, slot.clamp_min(0)]  # (T, R, C, E)
    picked = torch.where(mine[..., None], picked, torch.zeros_like(picked))
    flat = torch.cat([picked.reshape(-1), picked.new_full((1,), rows.checksum)])
    flat = ring_sum(flat, groups, tag)
    if int(flat[-1]) != rows.checksum * groups.ring:
        raise ValueError("sequence parallel: the ring ranks drew different clusterings "
                         "(seed=-1 draws from each process's global RNG): seed every process "
                         "alike (torch.manual_seed) or give the policy a seed, e.g. "
                         "Clustered(seed=0)")
    return flat[:-1].view(picked.shape)


def _hash_signs(x: torch.Tensor, planes: torch.Tensor, root: torch.Tensor | None,
                centre: torch.Tensor | None, groups: comm.Groups, tag: str) -> torch.Tensor:
    """±1 int8 signs (R, Nb, bits) with the reference's arithmetic (``reference.lsh_hash``),
    the SimHash centre being the global mean of the marked queries."""
    cdt = x.dtype
    p = planes.to(device=x.device, dtype=cdt)
    if root is None:
        bit = x @ p[:, :-1].T > p[:, -1]
    else:
        y = x @ root.to(cdt)
        w = (torch.ones(y.shape[:-1], dtype=cdt, device=y.device) if centre is None
             else centre.to(cdt))
        stats = torch.cat([(y * w[..., None]).sum(-2), w.sum(-1, keepdim=True)], -1)  # (R, D+1)
        stats = ring_sum(stats, groups, tag)
        n = stats[:, -1:]
        mean = torch.where(n > 0, stats[:, :-1] / n.clamp_min(1), torch.zeros_like(n))
        bit = (y - mean[:, None, :]) @ p[:, :-1].T > 0
    return bit.to(torch.int8) * 2 - 1


def _hamming(signs: torch.Tensor, plan, rows: _Rows, groups: comm.Groups,
             tag: str) -> torch.Tensor:
    init_idx, reseed_idx, active = plan
    R, N, bits = signs.shape
    C = init_idx.shape[-1]
    codes = pack_signs(signs)[..., None]  # (R, Nb, 1) int64
    seeds = _seed_values(codes, torch.cat([init_idx[None], reseed_idx]), rows, groups, tag)
    seed_signs = unpack_signs(seeds[..., 0], bits)  # (iterations, R, C, bits)
    gemm = HammingGemm(signs, torch.ones(R, N, dtype=torch.bool, device=signs.device), C)
    cent = seed_signs[0]
    rounds = reseed_idx.shape[0]
    for t in range(rounds + 1):
        cent = torch.where(active[..., None], cent, cent[:, :1])  # inactive: copies of 0
        assign = gemm.nearest(cent)
        if t == rounds:
            return assign
        sums, counts = gemm.votes(assign)  # Σ member signs (R, C, bits), members (R, C)
        votes = ring_sum(torch.cat([sums, counts[..., None]], -1).to(torch.int32), groups, tag)
        sums, counts = votes[..., :-1], votes[..., -1]
        voted = (sums > 0).to(torch.int8) * 2 - 1  # majority; a tie gives bit 0
        empty = (counts == 0) & active
        cent = torch.where(empty[..., None], seed_signs[t + 1], voted)
    raise AssertionError("unreachable")


def _nearest_euclidean(y: torch.Tensor, cent: torch.Tensor, active: torch.Tensor):
    """argmin_c Σ_d (y_d - c_d)² as the reference computes it, in blocks of queries."""
    R, N, D = y.shape
    C = cent.shape[1]
    step = max(1, _DIST_CHUNK // max(1, R * C * D))
    out = []
    for s in range(0, N, step):
        dist = ((y[:, s:s + step, None, :] - cent[:, None, :, :]) ** 2).sum(-1)  # (R, n, C)
        out.append(dist.masked_fill(~active[:, None, :], float("inf")).argmin(-1))
    return torch.cat(out, 1)


def _sums_counts(x: torch.Tensor, assign: torch.Tensor, C: int) -> torch.Tensor:
    """Per cluster Σ x and the member count as one (R, C, D+1) tensor in x's dtype."""
    R, N, D = x.shape
    slots = (assign + torch.arange(R, device=x.device)[:, None] * C).reshape(-1)
    ext = torch.cat([x, x.new_ones(R, N, 1)], -1).reshape(R * N, D + 1)
    return x.new_zeros(R * C, D + 1).index_add_(0, slots, ext).view(R, C, D + 1)


def _euclidean(y: torch.Tensor, plan, rows: _Rows, groups: comm.Groups,
               tag: str) -> torch.Tensor:
    init_idx, reseed_idx, active = plan
    C = init_idx.shape[-1]
    seeds = _seed_values(y, torch.cat([init_idx[None], reseed_idx]), rows, groups, tag)
    cent = seeds[0]
    rounds = reseed_idx.shape[0]
    for t in range(rounds + 1):
        assign = _nearest_euclidean(y, cent, active)
        if t == rounds:
            return assign
        stats = ring_sum(_sums_counts(y, assign, C), groups, tag)
        counts = stats[..., -1]
        means = stats[..., :-1] / counts.clamp_min(1)[..., None]
        cent = torch.where(((counts == 0) & active)[..., None], seeds[t + 1], means)
    raise AssertionError("unreachable")


def _refine(x: torch.Tensor, assign: torch.Tensor, C: int, steps: int,
            metric: torch.Tensor | None, groups: comm.Groups, tag: str) -> torch.Tensor:
    """``clustering.lloyd_refine`` (float32) with the sums and counts all-reduced."""
    xf = x.float()
    m = None if metric is None else metric.float()
    for _ in range(steps):
        stats = ring_sum(_sums_counts(xf, assign, C), groups, tag)
        counts = stats[..., -1].long()
        means = stats[..., :-1] / counts.clamp_min(1)[..., None]
        mapped = means if m is None else means @ m
        const = (means * mapped).sum(-1).masked_fill_(counts == 0, float("inf"))
        assign = nearest_centroids(xf, mapped, const)
    return assign


def cluster_global(q: torch.Tensor, spec: ClusteringSpec, metric: torch.Tensor | None,
                   centre: torch.Tensor | None, layout: SeqLayout, groups: comm.Groups,
                   tag: str, impl: str = "reference") -> torch.Tensor:
    """This rank's assignments of the clustering of all S queries (module docstring). With
    r = 1 the whole sequence is here: `cluster_with` (``impl``: its fused kernels for "auto",
    as one process runs them) with the random choices of all B·H rows."""
    B, h, Nb, D = q.shape
    rows = _Rows(q, layout, groups)
    if centre is not None and centre.dim() == 2:
        centre = centre[:, None, :]
    if groups.ring == 1:
        marked = None if centre is None else centre.expand(B, h, Nb)
        assign, _ = cluster_with(q, spec, metric=metric, centre_mask=marked, impl=impl,
                                 draw_rows=(B * rows.heads, rows.rows))
        return assign
    planes, plan = random_draws(B * rows.heads, layout.seq_len, D, spec.clusters,
                                iterations=spec.iterations, bits=spec.bits, seed=spec.seed,
                                clustering=spec.clustering)
    # small enough to stay exact in float32 sums over any ring
    rows.checksum = (int(plan[0].sum()) * 31 + int(plan[1].sum())) % 65521
    plan = (rows.take(plan[0], 0), rows.take(plan[1], 1), rows.take(plan[2], 0))
    cdt = _hash_dtype(q)
    x = q.reshape(B * h, Nb, D).to(cdt)
    m = None if metric is None else metric.reshape(B * h, D, D)
    root = None if m is None else metric_root(m.to(cdt))
    if spec.clustering == "kmeans":
        y = x if root is None else x @ root
        assign = _euclidean(y, plan, rows, groups, tag)
    else:
        marked = None if centre is None else centre.expand(B, h, Nb).reshape(B * h, Nb)
        signs = _hash_signs(x, planes, root, marked, groups, tag)
        assign = _hamming(signs, plan, rows, groups, tag)
    if spec.refine:
        assign = _refine(q.reshape(B * h, Nb, D), assign, spec.clusters, spec.refine, m,
                         groups, tag)
    return assign.view(B, h, Nb)
