"""Clustered attention over a ring: what no other system runs.

Each ring rank holds the queries of its ring block (after the Ulysses all-to-all, for its H/u
heads) and clusters *them* into C clusters (`common/clusters.py`: the clustered family's
`cluster_with`); queries at padded positions go to a spare cluster C of their own when
C < S/r, as on one process (ops/clustered/nonfinite.py, rule 3), so that padding moves no
valid centroid. In the
attention metric, the keys' statistics are those of all S keys: each rank sums Σw, Σw·k and
Σw·k kᵀ over its block's valid keys (every ⌈S/4096⌉-th position, as `attention_metric`
reads them), in float64, and the sums are all-reduced over the ring, so the metric equals
`attention_metric` of the gathered keys. The centroids then attend to all keys by ring
attention (K/V rotate, blocks merged by log-sum-exp), and each query takes its centroid's
row::

    Q^c_j = mean_{a(i)=j} q_i,   O^c = ring_attention(Q^c, K, V, key padding),
    out_i = O^c_{a(i)}

Given the same assignments this is single-process clustered attention with r·(C+1) clusters
(ring rank i's cluster j is global cluster i·(C+1) + j). Backward: dO^c_j = Σ_{a(i)=j} dout_i,
the ring backward gives dQ^c, dK, dV (dK, dV returned to their owners), and
dq_i = dQ^c_{a(i)} / n_{a(i)}; no gradient flows through the clustering.

Shapes: q (B, H, Nb, D), k (B, Hk, Nb, D), v (B, Hk, Nb, Dv) (Nb = S/r), keep (B, S) bool
over token positions or None → out (B, H, Nb, Dv), assignments (B, H, Nb) int64.
"""

from __future__ import annotations

import torch

from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel.common import comm
from clusterfx.ops.sequence_parallel.common.clusters import (
    assign,
    broadcast,
    centroids,
    with_spare,
)
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout
from clusterfx.ops.sequence_parallel.common.ring import ring_backward, ring_forward


def forward(q, k, v, keep, scale: float, spec: ClusteringSpec, layout: SeqLayout,
            groups: comm.Groups, kernels, impl: str, tag: str):
    """(out, assignments (B, H, Nb) in [0, C], centroid out, centroid lse) with C + 1
    clusters (`with_spare`)."""
    assignments = assign(q, k, keep, spec, layout, groups, impl, tag, spare=True)
    qc, _ = centroids(q, assignments, with_spare(spec.clusters))
    mask = None if keep is None else keep[:, None, None, :]
    oc, lse = ring_forward(qc.to(q.dtype), k, v, mask, False, scale, layout, groups, kernels,
                           tag)
    return broadcast(oc, assignments), assignments, oc, lse


def backward(dout, q, k, v, keep, assignments, oc, lse, scale: float, clusters: int,
             layout: SeqLayout, groups: comm.Groups, kernels, tag: str):
    """(dq, dk, dv) of `forward` with the assignments held fixed; `clusters` counts the
    spare one."""
    B, H, N, Dv = dout.shape
    cd = compute_dtype(q)
    qc, counts = centroids(q, assignments, clusters)
    slots = (assignments + torch.arange(B * H, device=q.device).view(B, H, 1) * clusters)
    doc = dout.new_zeros(B * H * clusters, Dv, dtype=cd).index_add_(
        0, slots.reshape(-1), dout.reshape(-1, Dv).to(cd)).view(B, H, clusters, Dv)
    mask = None if keep is None else keep[:, None, None, :]
    dqc, dk, dv = ring_backward(doc.to(q.dtype), qc.to(q.dtype), k, v, oc, lse, mask, False,
                                scale, layout, groups, kernels, tag)
    dq = broadcast(dqc.to(cd) / counts.clamp_min(1)[..., None], assignments)
    return dq.to(q.dtype), dk, dv
