"""Fast clustered and improved-clustered attention: vectorised torch, O(N·C) memory.

Same math as ``reference.py`` (its docstring has the notation), computed without any Nq×Nk
matrix and without Python loops over (batch, head):

* centroid means by one ``index_add`` over the flattened (row, cluster) slots;
* the C×Nk centroid attention as two batched GEMMs; GQA folds the G query heads of a key head
  into the GEMM's row dimension instead of copying K and V;
* the broadcast back to queries by ``index_select`` on the flattened slots;
* improved: the top-k keys and values of every cluster are gathered once (C·k rows), then each
  query attends to its cluster's k keys, in chunks of queries so memory stays bounded.

The code is plain differentiable torch and device-agnostic; the public op also uses it to
recompute gradients for the ``cpu`` and ``triton`` backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterfx.ops.clustered import common
from clusterfx.ops.common.checks import compute_dtype

_CHUNK_ELEMENTS = 2**22  # bound on the (rows × queries × k × dim) gather buffer per chunk


def centroid_attention(qc: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_padding_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``softmax(s·Q^c Kᵀ + β) V`` by the fused SDPA kernel (no C×Nk matrix is kept), β the
    lowest finite value on padded keys; zero rows for batch elements with no valid key.

    Shapes: qc (B,H,C,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), mask (B,Nk) → (B,H,C,Dv).
    """
    bias = None
    if key_padding_mask is not None:
        bias = qc.new_zeros(qc.shape[0], 1, 1, k.shape[2])
        bias = common.mask_logits(bias, key_padding_mask[:, None, None, :])
    out = F.scaled_dot_product_attention(qc, k, v, attn_mask=bias, scale=scale,
                                         enable_gqa=True)
    if key_padding_mask is not None:
        out = out * key_padding_mask.any(-1)[:, None, None, None].to(out.dtype)
    return out


def clustered_attention_from_assignments(q, k, v, assignments, clusters, key_padding_mask=None,
                                         scale=None):
    """Clustered attention ``O = M softmax(s·Q^c Kᵀ + β) V``.

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), assignments (B,H,Nq) int64,
    key_padding_mask (B,Nk) bool (True = keep) → (B,H,Nq,Dv) in q's dtype.
    """
    cdt = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, _ = common.centroid_means(q.to(cdt), assignments, clusters)
    vc = centroid_attention(qc, k.to(cdt), v.to(cdt), key_padding_mask, scale)
    slots = common.cluster_slots(assignments, clusters)
    return common.broadcast(vc, slots, assignments.shape).to(q.dtype)


def _cluster_tiles(slots: torch.Tensor, n_slots: int, rows: int, n: int,
                   tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lay the queries out cluster by cluster in tiles of ``tile`` lanes (each tile holds
    members of one cluster only), so a tile's queries share their top-k keys.

    Shapes are static (tiles per row P = ceil(n/tile) + C bounds Σ_j ceil(n_j/tile)), so this
    also traces with fake tensors. slots (rows·n,) global slot r·C + a(i) →
    lane (rows·n,) position of each query in the (rows·P·tile,) layout, tile_slot (rows·P,)
    the slot served by each tile (0 for unused tiles), P.
    """
    C = n_slots // rows
    P = -(-n // tile) + C
    order = torch.argsort(slots, stable=True)
    rank_sorted = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(),
                                                                          device=slots.device))
    counts = torch.zeros(n_slots, dtype=torch.int64, device=slots.device)
    counts = counts.index_add(0, slots, torch.ones_like(slots))
    first = counts.cumsum(0) - counts  # sorted position of each slot's first member
    rank = rank_sorted - first[slots]  # rank of the query inside its cluster
    tiles = (counts + tile - 1) // tile
    tile_first = (tiles.view(rows, C).cumsum(-1) - tiles.view(rows, C)).reshape(-1)
    row = slots // C
    tile_id = row * P + tile_first[slots] + rank // tile
    lane = tile_id * tile + rank % tile
    tile_slot = torch.zeros(rows * P, dtype=torch.int64, device=slots.device)
    return lane, tile_slot.scatter(0, tile_id, slots), P


def improved_clustered_attention_from_assignments(q, k, v, assignments, clusters,
                                                  key_padding_mask=None, scale=None, topk=32,
                                                  topk_indices=None, tile=16):
    """Improved clustered attention (reference notes §1.2) and the top-k indices used.

    ``O_i = (A^c_j V - Σ_{l∈T_j} A^c_jl v_l) + m̂_j Σ_{l∈T_j} softmax_T(s·q_i·k_l + β_l) v_l``
    for query i in cluster j: the clustered output with the top-k columns removed, plus the
    exact attention of q_i over its cluster's top-k keys, rescaled to their centroid mass m̂_j.
    The second term runs on tiles of ``tile`` same-cluster queries (``_cluster_tiles``), so the
    k gathered keys are read once per tile instead of once per query.

    Shapes: as ``clustered_attention_from_assignments`` → (B,H,Nq,Dv) in q's dtype,
    indices (B,H,C,min(topk, Nk)) int64.
    """
    cdt = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, Nq, D = q.shape
    dtype, R = q.dtype, B * H
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    Dv = v.shape[-1]
    qc, _ = common.centroid_means(q, assignments, clusters)
    logits_c = common.centroid_scores(qc, k, key_padding_mask, scale)  # (B,H,C,Nk)
    a_c = common.centroid_probs(logits_c, key_padding_mask)
    if topk_indices is None:
        topk_indices = logits_c.topk(min(topk, k.shape[2]), dim=-1).indices
    kk = topk_indices.shape[-1]
    a_top = a_c.gather(-1, topk_indices)  # (B,H,C,k)
    k_top = common.gather_keys(k, topk_indices).reshape(R * clusters, kk, D)
    v_top = common.gather_keys(v, topk_indices).reshape(R * clusters, kk, Dv)
    v_bottom = common.attend(a_c, v).reshape(R * clusters, Dv) - (
        a_top.reshape(-1, kk, 1) * v_top).sum(-2)
    mass = a_top.sum(-1).reshape(-1)  # m̂ per slot
    keep_top = None
    if key_padding_mask is not None:  # only matters when k exceeds the valid keys of a row
        keep_top = common.gather_keys(key_padding_mask[:, None, :, None], topk_indices)
        keep_top = keep_top.reshape(R * clusters, 1, kk)
    slots = common.cluster_slots(assignments, clusters)
    lane, tile_slot, P = _cluster_tiles(slots, R * clusters, R, Nq, tile)
    q_tiles = q.new_zeros(R * P * tile, D).index_add(0, lane, q.reshape(-1, D) * scale)
    chunk = max(1, _CHUNK_ELEMENTS // (kk * max(D, Dv, tile)))
    tops = []
    for start in range(0, R * P, chunk):
        ts = tile_slot[start:start + chunk]
        logits = q_tiles[start * tile:(start + chunk) * tile].view(-1, tile, D) @ (
            k_top.index_select(0, ts).transpose(1, 2))  # (tiles, tile, k)
        if keep_top is not None:
            logits = common.mask_logits(logits, keep_top.index_select(0, ts))
        weights = torch.softmax(logits, -1) * mass.index_select(0, ts)[:, None, None]
        tops.append((weights @ v_top.index_select(0, ts)).reshape(-1, Dv))
    out = v_bottom.index_select(0, slots) + torch.cat(tops).index_select(0, lane)
    return out.view(B, H, Nq, Dv).to(dtype), topk_indices
