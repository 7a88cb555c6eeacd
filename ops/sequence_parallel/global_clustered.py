"""Global clustered attention over the ring: one process's clustered attention, K/V never move.

The queries of all S positions are clustered as one process clusters them with the same seed
(`global_clustered_clustering.cluster_global`: C clusters per (batch, head) over the whole
sequence).
The C centroids are then the same on every ring rank::

    Q^c_j = (Σ_ring Σ_{a(i)=j} q_i) / (Σ_ring n_j)                    (one all-reduce)

and each rank attends them to its *local* keys and values only (key padding: the columns of
its ring block), giving (O_r, lse_r) per centroid. The log-sum-exp merge over the ring is two
all-reduces (compute dtype: fp32 for fp16/bf16/fp32, fp64 for fp64)::

    m = max_r lse_r,   Z = Σ_r e^{lse_r - m},   O^c = Σ_r e^{lse_r - m} O_r / Z,
    lse = m + log Z,   out_i = O^c_{a(i)}

A (batch, head) row without any valid key anywhere has m = -inf: O^c = 0, lse = -inf (as one
process: zero output). Backward, with the assignments held fixed (no gradient through the
clustering, as the single-process op)::

    dO^c_j = Σ_ring Σ_{a(i)=j} dout_i                                   (all-reduce)
    dQ^c_r, dK_r, dV_r = block backward of (Q^c, K_r, V_r) given O^c and the global lse
                         (so p = e^{s - lse} is the global softmax; Δ = rowsum(dO^c ∘ O^c))
    dQ^c = Σ_ring dQ^c_r,   dq_i = dQ^c_{a(i)} / n_{a(i)}                (all-reduce)

dK, dV of a rank's keys stay on it. Per layer and head a rank sends O(C·(D + Dv)) numbers
(plus the clustering's O(iterations·C·bits)) instead of rotating its K/V around the ring.

Shapes: q (B, h, Nb, D), k (B, hk, Nb, D), v (B, hk, Nb, Dv) (Nb = S/r, ring-block order),
keep (B, S) bool over token positions or None → out (B, h, Nb, Dv), assignments (B, h, Nb),
Q^c (B, h, C+1, D), O^c (B, h, C+1, Dv), lse (B, h, C+1), counts (B, h, C+1) (compute dtype;
row C: the spare cluster of the queries one process keeps out of the clustering — padded
positions when C < S, non-finite queries — whose rows take its centroid, as on one process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel.common import comm
from clusterfx.ops.sequence_parallel.common.blocks import additive_bias
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout
from clusterfx.ops.sequence_parallel.global_clustered_clustering import cluster_global, ring_sum

# k (B, hk, Nb, D) → the attention metric (B, h, D, D) of all S valid keys (the caller's:
# `attention_metric` when r = 1, `clustered.ring_metric` over a ring)
MetricOf = Callable[[torch.Tensor], torch.Tensor]


def local_keep(keep: torch.Tensor | None, layout: SeqLayout, groups: comm.Groups):
    """The keep-mask of this ring block's positions, (B, Nb), or None."""
    if keep is None:
        return None
    return keep.index_select(1, layout.block_positions(groups.ring_rank(), keep.device))


def assign(q, k, spec: ClusteringSpec, layout: SeqLayout, groups: comm.Groups, tag: str,
           metric_of: MetricOf, centre: torch.Tensor | None = None,
           impl: str = "reference") -> torch.Tensor:
    """Assignments (B, h, Nb): this rank's part of one process's clustering of all queries
    (metric: the covariance of all valid keys; `centre` (B, Nb) or (B, h, Nb): the queries
    that count towards the hash's centre, None: all)."""
    metric = None
    if spec.metric == "attention":
        metric = metric_of(k)
    else:
        centre = None
    return cluster_global(q, spec, metric, centre, layout, groups, tag, impl)


def _slots(assignments: torch.Tensor, clusters: int) -> torch.Tensor:
    B, H, _ = assignments.shape
    offsets = torch.arange(B * H, device=assignments.device).view(B, H, 1) * clusters
    return (assignments + offsets).reshape(-1)


def _cluster_sums(x: torch.Tensor, assignments: torch.Tensor, clusters: int, extra_count: bool,
                  cd: torch.dtype) -> torch.Tensor:
    """Σ_{a(i)=j} x_i per cluster (B, H, C, E) in `cd`, with the member count as a last
    column when `extra_count`."""
    B, H, N, E = x.shape
    rows = x.reshape(-1, E).to(cd)
    if extra_count:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    out = rows.new_zeros(B * H * clusters, rows.shape[1])
    return out.index_add_(0, _slots(assignments, clusters), rows).view(B, H, clusters, -1)


def broadcast(xc: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """Each query's cluster row: xc (B, H, C, E), assignments (B, H, N) → (B, H, N, E)."""
    return torch.gather(xc, 2, assignments[..., None].expand(*assignments.shape, xc.shape[-1]))


def _bias(keep, layout: SeqLayout, groups: comm.Groups, cd: torch.dtype):
    kb = local_keep(keep, layout, groups)
    return None if kb is None else additive_bias(kb[:, None, None, :], cd)


def _guard(q, k, v, keep, clusters: int, layout: SeqLayout, groups: comm.Groups):
    """One process's rules for padding and non-finite values (`ops/clustered/nonfinite.py`),
    on this rank's part: (q for the clustering, q for the centroids, k, v, excluded (B, h, Nb)
    bool or None, bad queries or None, local count of non-finite kept keys/values).

    Excluded (in the spare cluster C, zero for the clustering): in self-attention with key
    padding and fewer clusters than queries, the padded positions' queries; and non-finite
    queries (their output rows become NaN). Masked keys/values holding a non-finite value are
    zeroed (padding never influences anything)."""
    kb = local_keep(keep, layout, groups)
    B, h, Nb, _ = q.shape
    excluded = None
    if kb is not None and clusters < layout.seq_len and not bool(keep.all()):
        excluded = ~kb[:, None, :].expand(B, h, Nb)
    finite_q = torch.isfinite(q).all(-1)
    bad = None if bool(finite_q.all()) else ~finite_q
    if bad is not None:
        excluded = bad if excluded is None else excluded | bad
    kv_ok = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)  # (B, hk, Nb)
    kept_bad = 0
    if not bool(kv_ok.all()):
        kept_bad = int((~kv_ok if kb is None else ~kv_ok & kb[:, None, :]).sum())
        if kb is not None:
            drop = ~kb[:, None, :, None]
            k, v = k.masked_fill(drop, 0.0), v.masked_fill(drop, 0.0)
    q_cluster = q if excluded is None else q.masked_fill(excluded[..., None], 0.0)
    q_attend = q if bad is None else q.masked_fill(bad[..., None], 0.0)
    return q_cluster, q_attend, k, v, excluded, bad, kept_bad


def forward(q, k, v, keep, scale: float, spec: ClusteringSpec, layout: SeqLayout,
            groups: comm.Groups, kernels, tag: str, metric_of: MetricOf,
            clustering_impl: str = "reference"):
    """(out, assignments, Q^c, O^c, lse, counts) with C + 1 centroid rows (the last one: the
    spare cluster of excluded queries, see `_guard`), or None when a kept key or value is not
    finite somewhere on the ring (one process then runs exact attention: so does the caller).
    `spec.clusters` ≤ S (clamped by the caller)."""
    C = spec.clusters
    cd = compute_dtype(q)
    q_cluster, q_attend, k, v, excluded, bad, kept_bad = _guard(q, k, v, keep, C, layout,
                                                                groups)
    centre = None
    if spec.metric == "attention":
        centre = local_keep(keep, layout, groups)
        if bad is not None:
            centre = ~bad if centre is None else centre[:, None, :] & ~bad
    assignments = assign(q_cluster, k, spec, layout, groups, tag, metric_of, centre,
                         clustering_impl)
    if excluded is not None:
        assignments = assignments.masked_fill(excluded, C)
    sums = _cluster_sums(q_attend, assignments, C + 1, True, cd)
    flag = sums.new_full((1,), float(kept_bad))
    stats = ring_sum(torch.cat([sums.reshape(-1), flag]), groups, tag)
    if float(stats[-1]) > 0:
        return None
    stats = stats[:-1].view(sums.shape)
    counts = stats[..., -1]
    qc = stats[..., :-1] / counts.clamp_min(1)[..., None]
    o, lse_r = kernels.block_forward(qc, k, v, _bias(keep, layout, groups, cd), scale, False)
    o, lse_r = o.to(cd), lse_r.to(cd)
    top = ring_sum(lse_r, groups, tag, op="max")
    none = torch.isneginf(top)  # no valid key in the whole sequence
    w = torch.exp(lse_r - top.masked_fill(none, 0.0)).masked_fill(none, 0.0)
    merged = ring_sum(torch.cat([o * w[..., None], w[..., None]], -1), groups, tag)
    z = merged[..., -1]
    tiny = torch.finfo(cd).tiny
    oc = torch.where(none[..., None], torch.zeros_like(o),
                     merged[..., :-1] / z.clamp_min(tiny)[..., None])
    lse = torch.where(none, top, top + torch.log(z.clamp_min(tiny)))
    out = broadcast(oc, assignments)
    if bad is not None:  # a non-finite query's row is NaN (0 without any kept key)
        nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
        if keep is not None:
            nan = torch.where(keep.any(-1)[:, None, None, None], nan, torch.zeros_like(nan))
        out = torch.where(bad[..., None], nan, out)
    return out.to(q.dtype), assignments, qc, oc, lse, counts


def backward(dout, k, v, keep, assignments, qc, oc, lse, counts, scale: float,
             layout: SeqLayout, groups: comm.Groups, kernels, q_dtype, tag: str):
    """(dq, dk, dv) of `forward` with the assignments held fixed."""
    C = qc.shape[2]
    cd = qc.dtype
    doc = ring_sum(_cluster_sums(dout, assignments, C, False, cd), groups, tag, "bwd")
    dqc, dk, dv = kernels.block_backward(doc, qc, k, v, oc, lse, _bias(keep, layout, groups, cd),
                                         scale, False)
    dqc = ring_sum(dqc.to(cd), groups, tag, "bwd")
    dq = broadcast(dqc / counts.clamp_min(1)[..., None], assignments)
    return dq.to(q_dtype), dk.to(k.dtype), dv.to(v.dtype)
