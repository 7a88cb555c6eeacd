"""The query clustering of the ring's clustered ops (`clustered.py`, `improved.py`), shared by
both: each ring rank clusters its own ring block's queries.

- `ring_metric`: the attention metric's key statistics (Σw, Σw·k, Σw·k kᵀ over every
  ⌈S/4096⌉-th valid key, float64) summed over the ring block and all-reduced over the ring,
  so the metric equals `attention_metric` of the gathered keys.
- `assign`: the cluster assignments of the block's queries; with `spare`, queries at padded
  positions are kept out (replaced by 0 for the clustering) and put in a spare cluster C of
  their own when C < S/r, as on one process (ops/clustered/nonfinite.py, rule 3).
- `centroids`: Q^c_j = mean_{a(i)=j} q_i and the counts; `broadcast`: each query's row.

Shapes: q (B, H, Nb, D), k (B, Hk, Nb, D) (Nb = S/r), keep (B, S) bool over token positions
or None → assignments (B, H, Nb) int64.
"""

from __future__ import annotations

import torch

from clusterfx.ops.clustering import METRIC_KEYS, ClusteringSpec, cluster_with
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel.common import comm
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout


def ring_metric(k: torch.Tensor, heads: int, keep: torch.Tensor | None, layout: SeqLayout,
                groups: comm.Groups, tag: str) -> torch.Tensor:
    """The covariance of all S valid keys (as `attention_metric` of the gathered keys).
    Shapes: k (B, Hk, Nb, D), keep (B, S) → (B, heads, D, D)."""
    B, Hk, Nb, D = k.shape
    positions = layout.block_positions(groups.ring_rank(), k.device)
    step = -(-layout.seq_len // METRIC_KEYS)
    w = (positions % step == 0).to(torch.float64)[None, :].expand(B, Nb)
    if keep is not None:
        w = w * keep.index_select(1, positions).to(torch.float64)
    kf = k.to(torch.float64) * w[:, None, :, None]
    stats = torch.cat([w.sum(1).view(B, 1, 1).expand(B, Hk, 1),  # n
                       kf.sum(2),  # Σ w k  (B, Hk, D)
                       (kf.transpose(-1, -2) @ k.to(torch.float64)).reshape(B, Hk, D * D)],
                      dim=2)
    if groups.ring > 1:
        stats = comm.all_reduce(stats, groups.ring_pg(), groups.ring, groups.timeout, tag,
                                "fwd")
    n = stats[..., :1].clamp_min(1)[..., None]  # (B, Hk, 1, 1)
    mean = stats[..., 1:1 + D, None] / n
    cov = stats[..., 1 + D:].reshape(B, Hk, D, D) / n - mean @ mean.transpose(-1, -2)
    cov = cov.to(torch.float64 if k.dtype == torch.float64 else torch.float32)
    return cov.repeat_interleave(heads // Hk, dim=1) if heads != Hk else cov


def centroids(q: torch.Tensor, assignments: torch.Tensor, clusters: int):
    """Q^c (B, H, C, D) in the compute dtype (0 for an empty cluster) and counts (B, H, C)."""
    B, H, N, D = q.shape
    cd = compute_dtype(q)
    slots = (assignments + torch.arange(B * H, device=q.device).view(B, H, 1) * clusters)
    slots = slots.reshape(-1)
    sums = q.new_zeros(B * H * clusters, D, dtype=cd).index_add_(0, slots,
                                                                 q.reshape(-1, D).to(cd))
    counts = torch.bincount(slots, minlength=B * H * clusters).to(cd)
    qc = sums / counts.clamp_min(1)[:, None]
    return qc.view(B, H, clusters, D), counts.view(B, H, clusters)


def broadcast(xc: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """Each query's cluster row: xc (B, H, C, E), assignments (B, H, N) → (B, H, N, E)."""
    return torch.gather(xc, 2, assignments[..., None].expand(*assignments.shape, xc.shape[-1]))


def with_spare(clusters: int) -> int:
    """Clusters of a ring rank: C and the spare cluster C of its padded queries (empty when
    there are none, or when C >= Nb; always counted, so that shapes do not depend on data)."""
    return clusters + 1


def assign(q, k, keep, spec: ClusteringSpec, layout: SeqLayout, groups: comm.Groups,
           impl: str, tag: str, spare: bool = False) -> torch.Tensor:
    """Cluster assignments (B, H, Nb) of this ring block's queries. `spare`: as the
    single-process ops (ops/clustered/nonfinite.py, rule 3), queries at padded positions are
    kept out of the clustering (replaced by 0 for it) and put in a spare cluster C of their
    own when the clusters pool queries (C < Nb), so padding moves no valid centroid."""
    metric = centre = padded = None
    if keep is not None:
        local = keep.index_select(1, layout.block_positions(groups.ring_rank(), q.device))
        if spare and spec.clusters < q.shape[2] and not bool(local.all()):
            padded = ~local[:, None, :].expand(q.shape[:3])
            q = q.masked_fill(padded[..., None], 0.0)
    if spec.metric == "attention":
        metric = ring_metric(k, q.shape[1], keep, layout, groups, tag)
        if keep is not None:
            centre = local[:, None, :].expand(q.shape[:3])
    assignments, _ = cluster_with(q, spec, metric=metric, centre_mask=centre, impl=impl)
    return assignments if padded is None else assignments.masked_fill(padded, spec.clusters)
