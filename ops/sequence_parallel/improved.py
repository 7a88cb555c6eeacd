"""Improved-clustered (i-clustered) attention over a ring.

As `clustered.py` (with the clustering of `common/clusters.py`), each ring rank clusters its
ring block's queries into C clusters (the attention metric's key statistics all-reduced over
the ring; queries at padded positions in a spare cluster C of their own, as on one process)
with centroids Q^c_j. The single-process definition (`ops/clustered/reference.py`): T_j =
the top-k keys of row j of s·Q^c Kᵀ + β over all S keys, m̂_j = Σ_{l∈T_j} A^c_jl, and for
query i of cluster j::

    out_i = m̂_j Σ_{l∈T_j} softmax_{T_j}(s·q_i·k_l + β_l) v_l + Σ_{l∉T_j} A^c_jl v_l

Since A^c_jl = m̂_j softmax_{T_j}(s·Q^c_j·k_l + β_l) on T_j, this is::

    out_i = O^c_j + m̂_j (O^q_{T,i} - O^c_{T,j}),   m̂_j = exp(lse^c_{T,j} - lse^c_j)

with (O^c, lse^c) the centroid's attention over all keys (ring attention), (O^c_T, lse^c_T)
over T_j only, and O^q_T query i's over T_j. Every term is a convex combination of values,
so the subtraction costs at most ε·max|v| absolutely (the form with the attention over the
keys outside T_j divides by 1 - m̂ instead). fp16/bf16 inputs compute in fp32.

Forward, one turn of the ring (the K/V rotation of ring attention; nothing else is sent): at
each step the centroids' scores against the block held (C × S/r per head, materialised, as
the top-k needs them) fold into (O^c, lse^c) by the log-sum-exp merge, and the block's top
candidates merge with the running top-k: scores, global positions and copies of the k and v
rows. At the end every rank holds k_T, v_T (B, H, C, k, ·) and computes the exact part
locally, on tiles of `TILE` same-cluster queries (each cluster's k_T, v_T read once per tile).

Backward, with the assignments and T held fixed (as the single-process op): the local part
G = m̂ (O^q_T - O^c_T) is differentiated with `torch.func.vjp` → dq, dQ^c, dk_T, dv_T and
g = ∂/∂lse^c; the ring backward of the centroids takes dO^c_j = Σ_{a(i)=j} dout_i and g
(ds = p ⊙ (dp - (δ - g))), and while each ring block's dK/dV accumulators pass by, the
dk_T, dv_T rows of that block's keys are added to them (global position → block, offset),
so they reach their owners with the rest. dq_i = ∂G/∂q_i + (dQ^c_{a(i)}) / n_{a(i)}.

Shapes: q (B, H, Nb, D), k (B, Hk, Nb, D), v (B, Hk, Nb, Dv) (Nb = S/r), keep (B, S) bool
or None → out (B, H, Nb, Dv); T positions (B, H, C, min(topk, S)) int64.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel.common import clusters as ring_clusters
from clusterfx.ops.sequence_parallel.common import comm
from clusterfx.ops.sequence_parallel.common.blocks import (
    additive_bias,
    block_scores,
    merge,
    scores_forward,
)
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout
from clusterfx.ops.sequence_parallel.common.ring import ring_backward


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, E), index (B, H, R, n) into N → (B, H, R, n, E)."""
    B, H, R, n = index.shape
    flat = index.reshape(B, H, R * n, 1).expand(B, H, R * n, x.shape[-1])
    return torch.gather(x, 2, flat).view(B, H, R, n, x.shape[-1])


def _kv_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hk, N, E) of kv heads, index (B, H, R, n) of query heads → (B, H, R, n, E)
    (query head h reads kv head h // (H/Hk); the query heads of one kv head are adjacent, so
    their indices gather from it together, without copying x per query head)."""
    B, H, R, n = index.shape
    Hk = x.shape[1]
    rows = _rows(x, index.reshape(B, Hk, 1, (H // Hk) * R * n))
    return rows.view(B, H, R, n, x.shape[-1])


def ring_topk_attention(qc, k, v, keep, scale: float, topk: int, layout: SeqLayout,
                        groups: comm.Groups, tag: str = ""):
    """The centroids' attention over all S keys and their top-k keys, in one ring turn.

    qc (B, H, C, D) in the compute dtype → (O^c (B, H, C, Dv), lse^c (B, H, C) in the
    compute dtype, T positions (B, H, C, kk) int64, k_T (B, H, C, kk, D), v_T (B, H, C,
    kk, Dv) copies in k's and v's dtypes), kk = min(topk, S)."""
    cd = compute_dtype(qc)
    B, H, C, _ = qc.shape
    r, i = groups.ring, groups.ring_rank()
    kk = min(topk, layout.seq_len)
    out = qc.new_zeros(B, H, C, v.shape[-1], dtype=cd)
    lse = qc.new_full((B, H, C), float("-inf"), dtype=cd)
    best = qc.new_empty(B, H, C, 0, dtype=cd)
    pos = torch.empty(B, H, C, 0, dtype=torch.int64, device=qc.device)
    kt = k.new_empty(B, H, C, 0, k.shape[-1])
    vt = v.new_empty(B, H, C, 0, v.shape[-1])
    for s in range(r):
        j = (i - s) % r
        shift = None
        if s < r - 1:
            shift = comm.RingShift(groups.ring_pg(), r, groups.timeout, tag, "fwd", "k,v")
            shift.start([k, v])
        positions = layout.block_positions(j, qc.device)
        bias = None if keep is None else additive_bias(
            keep.index_select(1, positions)[:, None, None, :], cd)
        scores = block_scores(qc, k, bias, scale, False)  # (B, H, C, Nb)
        out, lse = merge(out, lse, *scores_forward(scores, v))
        # the running top-k: the block's best candidates against the kept ones
        top, index = scores.topk(min(kk, scores.shape[-1]), dim=-1)
        best, pick = torch.cat([best, top], -1).topk(min(kk, best.shape[-1] + top.shape[-1]),
                                                     dim=-1)
        pos = torch.cat([pos, positions[index]], -1).gather(-1, pick)
        kt = _pick(torch.cat([kt, _kv_rows(k, index)], 3), pick)
        vt = _pick(torch.cat([vt, _kv_rows(v, index)], 3), pick)
        if shift is not None:
            k, v = shift.finish()
    if tag:
        comm.traffic[tag]["pairs"] += B * H * C * layout.seq_len
    return out, lse, pos, kt, vt


def _pick(x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """x (B, H, C, n, E), pick (B, H, C, m) into n → (B, H, C, m, E)."""
    return torch.gather(x, 3, pick[..., None].expand(*pick.shape, x.shape[-1]))


def selected_keep(keep, pos: torch.Tensor) -> torch.Tensor:
    """Which selected keys are not padding: (B, H, C, kk) bool."""
    if keep is None:
        return torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
    B = pos.shape[0]
    return keep.gather(1, pos.reshape(B, -1)).view(pos.shape)


TILE = 16  # queries of one cluster per tile: its k_T, v_T rows are read once per tile


def cluster_tiles(assignments: torch.Tensor, clusters: int):
    """Queries grouped by cluster into tiles of `TILE` (the last tile of a cluster padded):
    (lane (B·H·N,) of each query, tile_slot (P,) the cluster slot b·H·C + h·C + j of each
    tile, P). P ≤ B·H·(N/TILE + C), so the gathered k_T, v_T rows are about k/TILE times q."""
    B, H, N = assignments.shape
    device = assignments.device
    slots = (assignments + torch.arange(B * H, device=device).view(B, H, 1) * clusters)
    slots = slots.reshape(-1)
    order = torch.argsort(slots, stable=True)
    counts = torch.bincount(slots, minlength=B * H * clusters)
    tiles = (counts + TILE - 1) // TILE
    sorted_slots = slots[order]
    rank = torch.arange(slots.numel(), device=device) - (counts.cumsum(0) - counts)[sorted_slots]
    tile_id = (tiles.cumsum(0) - tiles)[sorted_slots] + rank // TILE
    lane = torch.empty_like(slots)
    lane[order] = tile_id * TILE + rank % TILE
    P = int(tiles.sum())
    tile_slot = torch.zeros(P, dtype=torch.int64, device=device).scatter_(0, tile_id,
                                                                            sorted_slots)
    return lane, tile_slot, P


def exact_part(q, qc, kt, vt, lse_c, valid, assignments, scale: float, tiles) -> torch.Tensor:
    """G = m̂ (O^q_T - O^c_T) per query, (B, H, N, Dv), differentiable in q, qc, kt, vt and
    lse_c (all in the compute dtype); `tiles` from `cluster_tiles`. A centroid whose T holds
    no valid key (every key of its batch element padded) gets G = 0 with finite
    intermediates (so gradients stay finite)."""
    B, H, N, D = q.shape
    kk, Dv = kt.shape[3], vt.shape[-1]
    has = valid.any(-1)  # (B, H, C)
    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(
        ~valid & has[..., None], float("-inf"))
    sc = (kt @ qc[..., None]).squeeze(-1) * scale + bias  # (B, H, C, kk)
    lse_t = torch.logsumexp(sc, -1)
    oct_ = (torch.softmax(sc, -1)[..., None, :] @ vt).squeeze(-2)  # (B, H, C, Dv)
    mass = torch.where(has, torch.exp(lse_t - torch.where(has, lse_c, lse_t)),
                       torch.zeros_like(lse_t))
    # each query against its cluster's T, a tile of same-cluster queries at a time
    lane, tile_slot, P = tiles
    qt = q.new_zeros(P * TILE, D).index_copy(0, lane, q.reshape(-1, D)).view(P, TILE, D)
    st = qt @ kt.reshape(-1, kk, D).index_select(0, tile_slot).transpose(1, 2) * scale
    st = st + bias.reshape(-1, 1, kk).index_select(0, tile_slot)
    ot = torch.softmax(st, -1) @ vt.reshape(-1, kk, Dv).index_select(0, tile_slot)
    oqt = ot.view(P * TILE, Dv).index_select(0, lane).view(B, H, N, Dv)
    return ring_clusters.broadcast(mass[..., None], assignments) * (
        oqt - ring_clusters.broadcast(oct_, assignments))


def forward(q, k, v, keep, scale: float, spec, topk: int, layout: SeqLayout,
            groups: comm.Groups, impl: str, tag: str):
    """(out, assignments (B, H, Nb) in [0, C], O^c, lse^c, T positions, k_T, v_T) with
    C + 1 clusters (`common.clusters.with_spare`)."""
    cd = compute_dtype(q)
    clusters = ring_clusters.with_spare(spec.clusters)
    assignments = ring_clusters.assign(q, k, keep, spec, layout, groups, impl, tag,
                                        spare=True)
    qc, _ = ring_clusters.centroids(q, assignments, clusters)
    oc, lse, pos, kt, vt = ring_topk_attention(qc, k, v, keep, scale, topk, layout, groups,
                                               tag)
    g = exact_part(q.to(cd), qc, kt.to(cd), vt.to(cd), lse, selected_keep(keep, pos),
                   assignments, scale, cluster_tiles(assignments, clusters))
    out = ring_clusters.broadcast(oc, assignments) + g
    return out.to(q.dtype), assignments, oc, lse, pos, kt, vt


def _owners(gkt, gvt, pos, layout: SeqLayout, kv_heads: int):
    """`add_key_grads` for the ring backward: adds dk_T, dv_T (B, H, C, kk, ·) into ring block
    j's accumulators (B, Hk, S/r, ·) at the rows of the selected keys it holds."""
    B, H, C, kk = pos.shape
    Nb = layout.block_len
    slot = layout.inverse_order(pos.device)[pos]  # layout order: block · Nb + offset
    block, offset = slot // Nb, slot % Nb
    kv_head = (torch.arange(H, device=pos.device) // (H // kv_heads)).view(1, H, 1, 1)
    batch = torch.arange(B, device=pos.device).view(B, 1, 1, 1)
    row = ((batch * kv_heads + kv_head) * Nb + offset).reshape(-1)
    block = block.reshape(-1)
    gk, gv = gkt.reshape(-1, gkt.shape[-1]), gvt.reshape(-1, gvt.shape[-1])

    def add(j: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        here = block == j
        dk.view(-1, dk.shape[-1]).index_add_(0, row[here], gk[here].to(dk.dtype))
        dv.view(-1, dv.shape[-1]).index_add_(0, row[here], gv[here].to(dv.dtype))

    return add


def backward(dout, q, k, v, keep, assignments, oc, lse, pos, kt, vt, scale: float,
             clusters: int, layout: SeqLayout, groups: comm.Groups, kernels, tag: str):
    """(dq, dk, dv) of `forward` with the assignments and T held fixed; `clusters`
    counts the spare one."""
    B, H, N, Dv = dout.shape
    cd = compute_dtype(q)
    qc, counts = ring_clusters.centroids(q, assignments, clusters)
    valid, tiles = selected_keep(keep, pos), cluster_tiles(assignments, clusters)

    def part(q_, qc_, kt_, vt_, lse_):
        return exact_part(q_, qc_, kt_, vt_, lse_, valid, assignments, scale, tiles)

    _, pullback = torch.func.vjp(part, q.to(cd), qc, kt.to(cd), vt.to(cd), lse)
    gq, gqc, gkt, gvt, glse = pullback(dout.to(cd))
    slots = assignments + torch.arange(B * H, device=q.device).view(B, H, 1) * clusters
    doc = dout.new_zeros(B * H * clusters, Dv, dtype=cd).index_add_(
        0, slots.reshape(-1), dout.reshape(-1, Dv).to(cd)).view(B, H, clusters, Dv)
    mask = None if keep is None else keep[:, None, None, :]
    dqc, dk, dv = ring_backward(doc, qc, k, v, oc, lse, mask, False, scale, layout, groups,
                                kernels, tag, grad_lse=glse,
                                add_key_grads=_owners(gkt, gvt, pos, layout, k.shape[1]))
    dq = gq + ring_clusters.broadcast((dqc + gqc) / counts.clamp_min(1)[..., None],
                                        assignments)
    return dq.to(q.dtype), dk, dv
