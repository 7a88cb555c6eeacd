"""Global clustered attention at a sequence-parallel site (`SequenceParallel(ring_clustering=
"global")`, the default): the lowered clustered `conditional_attention` node becomes
`sp_global_clustered_attention` (ops/sequence_parallel/global_clustered.py), whose clustering
equals one process's with the same seed and whose centroids attend to each rank's local keys
(log-sum-exp merged by all-reduces; K/V never rotate).

Before:
    r = torch.ops.clusterfx.conditional_attention(q, k, v, mask, 0.125, 'clustered', 100, 5,
            63, 7, 'hamming', 1, 'attention', 1, 0, 'auto', 'c0/frame0/0#0')
After (q, k, v after the Ulysses all-to-all when u > 1; mask over all key positions), over a
ring (r > 1) and over Ulysses alone (u > 1, r = 1: there the op draws the clustering's random
numbers for all H heads, as one process does, where the plain op would draw them for H/u):
    r = torch.ops.clusterfx.sp_global_clustered_attention(q, k, v, mask, 0.125, 100, 5, 63,
            7, 'hamming', 1, 'attention', 0, *mesh, 'auto', tag, 'c0/frame0/0#0')

Improved clustered attention under Ulysses alone becomes `sp_ulysses_conditional_attention`
(ops/sequence_parallel/conditional.py): `conditional_attention` with the random draw
of all H heads, each rank keeping its heads' rows (no communication); over a ring it keeps
`conditional_ring` (per-rank clusters), whose clustering is no one process's anyway.
The causal clustered op (decoders) under Ulysses alone becomes
`sp_ulysses_causal_conditional_attention` alike (`causal_ulysses`).
"local" keeps `sequence_parallel_clustered.conditional_ring` (per-rank clusters, K/V rotate)
and the plain ops under Ulysses alone.

The site's planned collectives (`global_volumes`) replace the K/V rotation of a ring; every
all-reduce of the op is counted, so the report's bytes equal what is sent.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from clusterfx.ops import sequence_parallel as sp
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.passes.analysis.sequence_shards import gshape, gval
from clusterfx.passes.sequence_parallel_clustered import conditional_ring

# conditional_attention(q, k, v, mask, scale, method, *spec (7), topk, min_length, impl, site)
_SCALE, _METHOD, _SPEC, _MIN_LENGTH, _IMPL, _SITE = 4, 5, slice(6, 13), 14, 15, 16
COLLECTIVES, DETAIL = "sp_collectives", "sp_detail"  # node meta read by the pass's plan


def uses_global(node: fx.Node, mesh) -> bool:
    """Whether the site runs global clustered attention on `mesh`."""
    return node.args[_METHOD] == "clustered" and mesh.ring_clustering == "global"


def _emit(b, node: fx.Node, q, k, v, mask) -> fx.Node:
    args = node.args
    result = b.call(torch.ops.clusterfx.sp_global_clustered_attention.default,
                    (q, k, v, mask, args[_SCALE], *args[_SPEC], args[_MIN_LENGTH],
                     *b.mesh_args, b.impl, b.tag, args[_SITE]))
    out = b.call(operator.getitem, (result, 0))
    S = b.layout.seq_len
    if S < args[_MIN_LENGTH]:
        out.meta[DETAIL] = f"exact ring attention (S={S} < min_length)"
        return out  # the exact ring path: K/V rotate, the default volumes
    C = min(args[_SPEC][0], S)
    out.meta[DETAIL] = (f"global clustering: {C} clusters of all {S} queries as one process, "
                        f"centroids attend local K/V, log-sum-exp merged by all-reduce")
    out.meta[COLLECTIVES] = global_volumes(node, b.mesh, S)
    return out


def global_ring(b, node: fx.Node, q, k, v, mask) -> fx.Node:
    """The ring version of a `conditional_attention` site: global or local clustering."""
    if uses_global(node, b.mesh):
        return _emit(b, node, q, k, v, mask)
    out = conditional_ring(b, node, q, k, v, mask)
    if node.args[_METHOD] == "clustered":
        out.meta[DETAIL] = "local clustering: each ring rank clusters its block, K/V rotate"
    return out


def global_ulysses(b, node: fx.Node, q, k, v, mask) -> fx.Node | None:
    """Under Ulysses alone: the global op for clustered attention, `conditional_attention`
    with one process's random draw for improved clustered attention (None, "local": the op
    as it is, drawing for its H/u heads only)."""
    if b.mesh.ring_clustering != "global":
        return None
    if uses_global(node, b.mesh):
        return _emit(b, node, q, k, v, mask)
    args = node.args
    result = b.call(torch.ops.clusterfx.sp_ulysses_conditional_attention.default,
                    (q, k, v, mask, *args[_SCALE:_IMPL], *b.mesh_args, args[_IMPL],
                     args[_SITE]))
    out = b.call(operator.getitem, (result, 0))
    S, u = b.layout.seq_len, b.mesh.ulysses
    out.meta[DETAIL] = (f"exact attention (S={S} < min_length)" if S < args[_MIN_LENGTH] else
                        f"one process's clustering: {u} head groups, each clustering its "
                        f"heads with the random draw of all heads, no extra communication")
    return out


def causal_ulysses(b, node: fx.Node, q, k, v, mask) -> fx.Node | None:
    """Under Ulysses alone: `causal_conditional_attention` (what decoders lower to) with one
    process's random draw (None, "local": the op as it is, drawing for its H/u heads)."""
    if b.mesh.ring_clustering != "global":
        return None
    # causal_conditional_attention(q, k, v, mask, scale, method, *spec, topk, block,
    #                              is_causal, causal_queries, min_length, impl, site)
    args = node.args
    result = b.call(torch.ops.clusterfx.sp_ulysses_causal_conditional_attention.default,
                    (q, k, v, mask, *args[4:18], gshape(args[1])[1], *b.mesh_args, args[18],
                     args[19]))
    out = b.call(operator.getitem, (result, 0))
    out.meta[DETAIL] = (f"one process's clustering: {b.mesh.ulysses} head groups, each "
                        f"clustering its heads with the random draw of all heads, no extra "
                        f"communication")
    return out


def global_volumes(node: fx.Node, mesh, seq_len: int) -> list[tuple[str, str, str, int, int]]:
    """(collective, group, phase, count, bytes) of the op per step on the clustered path: all
    all-reduces over the ring (2(r-1)/r of each buffer), in the order the op issues them.

    forward: the keys' statistics (attention metric: n, Σk, Σkkᵀ in float64 per kv head); the
    SimHash centre (Hamming in the attention metric: Σy and the count per row); the init and
    reseed codes (int64) or vectors, with a checksum of the random draw; per k-means round the
    sign sums and counts (int32) or the sums and counts; per refine step the float32 sums and
    counts; the centroids' sums and counts (C+1 rows: the spare cluster) plus a flag; the lse
    maximum; the weighted outputs and weights. backward: dO^c and dQ^c. Nothing when r = 1."""
    r, u = mesh.ring, mesh.ulysses
    if r == 1:
        return []
    B, H, S, D = gshape(node.args[0])
    Hk, Dv = gshape(node.args[1])[1], gshape(node.args[2])[3]
    dtype = gval(node.args[0]).dtype
    spec = ClusteringSpec(*node.args[_SPEC])
    C = min(spec.clusters, seq_len)
    h, hk = H // u, Hk * sp.kv_replication(Hk, u) // u
    rows = B * h
    cd = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    hd = 8 if dtype == torch.float64 else 4  # hashing and k-means dtype
    hamming = spec.clustering == "hamming"
    fwd = []
    if spec.metric == "attention":
        fwd.append(B * hk * (1 + D + D * D) * 8)
        if hamming:
            fwd.append(rows * (D + 1) * hd)
    fwd.append((spec.iterations * rows * C * (1 if hamming else D) + 1) * (8 if hamming else hd))
    fwd += [rows * C * ((spec.bits + 1) * 4 if hamming else (D + 1) * hd)] * (
        spec.iterations - 1)
    fwd += [rows * C * (D + 1) * 4] * spec.refine
    fwd += [(rows * (C + 1) * (D + 1) + 1) * cd, rows * (C + 1) * cd,
            rows * (C + 1) * (Dv + 1) * cd]
    bwd = [rows * (C + 1) * Dv * cd, rows * (C + 1) * D * cd]
    sent = lambda sizes: sum(2 * (r - 1) * n // r for n in sizes)  # noqa: E731
    return [("all_reduce", "ring", "fwd", len(fwd), sent(fwd)),
            ("all_reduce", "ring", "bwd", len(bwd), sent(bwd))]
