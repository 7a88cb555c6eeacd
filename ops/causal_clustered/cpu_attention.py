"""The attention step of the fast path (``cpu``): causal (i-)clustered attention for given
discrete choices, vectorised torch, O(N·(block + C + k)) memory, no Nq×Nk matrix.

* far field: per block, the cluster sums of its keys and values and the counts by one
  ``index_add``; block β reads their exclusive prefix sum over blocks (``cumsum``);
* local: one (G·b × b) GEMM per block, masked to the causal triangle;
* selected keys (i-clustered): the queries that share a (block, cluster) share their k keys, so
  they are laid out in tiles of ``_TILE`` lanes of one (block, cluster) each; a tile gathers its
  k keys and values once and multiplies them as a small GEMM;
* one log-sum-exp merges the three parts; blocks run in chunks so memory stays bounded.

Plain differentiable torch on any device; the registration differentiates it (choices fixed).
"""

from __future__ import annotations

import torch

from clusterfx.ops.causal_clustered.common import (
    blocks,
    epoch_of,
    epochs,
    exclusive_cumsum,
    flag_blocks,
    nblocks,
)
from clusterfx.ops.common.checks import compute_dtype

_CHUNK_ELEMENTS = 2**24  # bound on the per-chunk intermediates (elements)
_TILE = 8  # query lanes per tile of the selected-key GEMMs


def _block_sums(k, v, key_valid, assign, clusters, block, nbk):
    """Per key block and cluster: Σ k, Σ v, count of the valid keys (under ``assign``
    (B,Hk,Nk)). → (B,Hk,nbk,C,D), (…,Dv), (B,Hk,nbk,C)."""
    B, Hk, Nk, D = k.shape
    rows = torch.arange(B * Hk, device=k.device)[:, None] * nbk
    slot = ((rows + torch.arange(Nk, device=k.device)[None] // block) * clusters
            + assign.reshape(B * Hk, Nk)).reshape(-1)
    w = key_valid[:, None, :, None]
    size = B * Hk * nbk * clusters
    ks = k.new_zeros(size, D).index_add(0, slot, torch.where(w, k, 0).reshape(-1, D))
    vs = v.new_zeros(size, v.shape[-1]).index_add(
        0, slot, torch.where(w, v, 0).reshape(-1, v.shape[-1]))
    ns = k.new_zeros(size).index_add(0, slot, w.expand(B, Hk, Nk, 1).reshape(-1).to(k.dtype))
    return (ks.view(B, Hk, nbk, clusters, D), vs.view(B, Hk, nbk, clusters, -1),
            ns.view(B, Hk, nbk, clusters))


def _key_stats(k, v, key_valid, key_assign, clusters, block, causal, nb):
    """Far-field statistics per query block β: cluster sums of the keys and values, and
    counts, of the valid keys before the block under the assignment of β's epoch (causal), or
    of all keys. → (B,Hk,nb|1,C,D), (…,Dv), (B,Hk,nb|1,C)."""
    if not causal:
        stats = _block_sums(k, v, key_valid, key_assign[:, :, 0], clusters, block,
                            nblocks(k.shape[2], block))
        return tuple(t.sum(2, keepdim=True) for t in stats)
    B, Hk, _, D = k.shape
    C = clusters
    parts = [(k.new_zeros(B, Hk, 1, C, D), v.new_zeros(B, Hk, 1, C, v.shape[-1]),
              k.new_zeros(B, Hk, 1, C))]  # block 0 sees no far key
    for e, (r, end) in enumerate(epochs(nb), start=1):
        n = min(k.shape[2], (end - 1) * block)  # the keys the epoch's queries may see
        stats = _block_sums(k[:, :, :n], v[:, :, :n], key_valid[:, :n],
                            key_assign[:, :, e, :n], clusters, block, end)
        parts.append(tuple(exclusive_cumsum(t, 2)[:, :, r:end] for t in stats))
    return tuple(torch.cat(ts, 2) for ts in zip(*parts, strict=True))


def _per_query(x: torch.Tensor, hk: int, block: int, nb: int) -> torch.Tensor:
    """(B,H,Nq,E) → (B,Hk,nb,G·block,E): a block's queries of one kv head as GEMM rows."""
    B, H = x.shape[:2]
    xb = blocks(x, block, nb).unflatten(1, (hk, H // hk))  # (B,Hk,G,nb,b,E)
    return xb.transpose(2, 3).reshape(B, hk, nb, -1, x.shape[-1])


def _from_per_query(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``_per_query`` (without the padding cut): (B,Hk,nb,G·b,E) → (B,H,nb·b,E)."""
    B, Hk, nb, gb, E = x.shape
    G = heads // Hk
    x = x.view(B, Hk, nb, G, gb // G, E).transpose(2, 3)
    return x.reshape(B, heads, nb * (gb // G), E)


class _Selected:
    """The selected keys of i-clustered attention, served tile by tile.

    Queries that share a (row, block, cluster) slot share their k keys; they are laid out in
    tiles of ``_TILE`` lanes, each tile serving one slot: a tile gathers its k keys and values
    once and multiplies them with its queries as a small GEMM. Per query (in the
    ``_per_query`` layout (B,Hk,nb,G·b,k)): ``logits`` (exact, -inf where unusable), ``ok``
    (a valid far key of the block), ``clusters`` (the key's cluster)."""

    def __init__(self, q, k, v, key_valid, key_assign, query_assign, topk_idx, clusters,
                 scale, block, causal, nb):
        B, H, _, D = q.shape
        Hk, Nk = k.shape[1], k.shape[2]
        kk, dev = topk_idx.shape[-1], q.device
        aq = blocks(query_assign[..., None], block, nb)[..., 0]  # (B,H,nb,b)
        slot = (torch.arange(B * H * nb, device=dev).view(B, H, nb, 1) * clusters
                + aq).reshape(-1)
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=B * H * nb * clusters)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=dev)
        rank = rank - (counts.cumsum(0) - counts)[slot]  # place of the query in its slot
        per_slot = (counts + _TILE - 1) // _TILE
        tile = (per_slot.cumsum(0) - per_slot)[slot] + rank // _TILE
        self.lane, self.count, self.heads = tile * _TILE + rank % _TILE, int(per_slot.sum()), H
        tile_slot = torch.zeros(self.count, dtype=torch.int64, device=dev).scatter(
            0, tile, slot)
        # per tile: its keys (rows of the (B·Hk·Nk) key table) and whether each is usable
        idx = topk_idx.reshape(-1, kk).index_select(0, tile_slot)  # (tiles, k)
        beta = (tile_slot // clusters) % nb
        bh = tile_slot // (clusters * nb)
        rows = ((bh // H) * Hk + (bh % H) // (H // Hk))[:, None] * Nk + idx.clamp(min=0)
        ok = (idx >= 0) & key_valid.reshape(-1).index_select(
            0, ((bh // H)[:, None] * Nk + idx.clamp(min=0)).reshape(-1)).view_as(idx)
        if causal:
            ok = ok & (idx < beta[:, None] * block)
        rows = rows.reshape(-1)
        self.values = v.reshape(-1, v.shape[-1]).index_select(0, rows).view(*idx.shape, -1)
        keys = k.reshape(-1, D).index_select(0, rows).view(*idx.shape, D)
        q_lanes = self._to_lanes(blocks(q * scale, block, nb).reshape(-1, D))
        logits = self._from_lanes(q_lanes @ keys.transpose(1, 2))  # (n, k)
        of_query = self.lane // _TILE
        ok_q = ok.index_select(0, of_query)
        self.ok = _per_query(ok_q.view(B, H, -1, kk), Hk, block, nb)
        self.logits = _per_query(logits.masked_fill(~ok_q, float("-inf")).view(B, H, -1, kk),
                                 Hk, block, nb)
        E = key_assign.shape[2]
        epoch = torch.tensor([epoch_of(b) if causal else 0 for b in range(nb)], device=dev)
        ka_rows = ((((bh // H) * Hk + (bh % H) // (H // Hk)) * E + epoch[beta])[:, None] * Nk
                   + idx.clamp(min=0)).reshape(-1)
        cl = key_assign.reshape(-1).index_select(0, ka_rows).view_as(idx).index_select(
            0, of_query)
        self.clusters = _per_query(cl.view(B, H, -1, kk), Hk, block, nb)

    def _to_lanes(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.count * _TILE, x.shape[-1]).index_add(0, self.lane, x)
        return out.view(self.count, _TILE, x.shape[-1])

    def _from_lanes(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.lane)

    def weighted_values(self, w: torch.Tensor) -> torch.Tensor:
        """Σ_t w_t v_t per query: w (B,Hk,nb,G·b,k) → (B,Hk,nb,G·b,Dv)."""
        B, Hk, nb = w.shape[:3]
        lanes = self._to_lanes(_from_per_query(w, self.heads).reshape(-1, w.shape[-1]))
        out = self._from_lanes(lanes @ self.values).view(B, self.heads, -1, self.values.shape[-1])
        return _per_query(out, Hk, out.shape[2] // nb, nb)


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_blocks(q, k, v, scale, block, nb, mask=None, causal=False):
    """The flash kernel on per-block batches: q (B,H,Nq,D) in blocks against k, v
    (B·nb, H, n, ·). → out (B·nb,H,b,Dv), lse (B·nb,H,b) in q's dtype."""
    B, H, _, D = q.shape
    qb = blocks(q, block, nb).transpose(1, 2).reshape(B * nb, H, block, D)
    out, lse = _FLASH(qb, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return out, lse.to(q.dtype)


def _per_block_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B,Hk,nb,n,E) → (B·nb,H,n,E), each kv head repeated for its query heads."""
    B, Hk, nb, n, E = x.shape
    x = x.transpose(1, 2).repeat_interleave(heads // Hk, dim=2)
    return x.reshape(B * nb, heads, n, E)


def _local_flash(q, k, v, key_valid, scale, block, nb):
    """Exact causal attention inside each block by the fused flash kernel, with its
    log-sum-exp (-inf for a query without a valid local key). Not differentiable through the
    log-sum-exp, so only the inference forward uses it. → (B·nb,H,b,Dv), (B·nb,H,b)."""
    B, H = q.shape[:2]
    kb = _per_block_heads(blocks(k, block, nb), H)
    vb = _per_block_heads(blocks(v, block, nb), H)
    if bool(key_valid.all()):
        return _flash_blocks(q, kb, vb, scale, block, nb, causal=True)
    valid = flag_blocks(key_valid, block, nb)  # (B,nb,b)
    tri = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    keep = (tri & valid[..., None, :]).reshape(B * nb, 1, block, block)
    mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(
        ~keep, float("-inf"))
    out, lse = _flash_blocks(q, kb, vb, scale, block, nb, mask=mask)
    has = (valid.to(torch.int8).cumsum(-1) > 0).reshape(B * nb, 1, block)
    return out, lse.masked_fill(~has, float("-inf"))


def _far_flash(q, pk, pv, pn, scale, block, nb):
    """Clustered far field by the flash kernel: the cluster means as keys and values, with
    the bias log n (the mass of n keys sharing one logit). → (B·nb,H,b,Dv), (B·nb,H,b)."""
    B, H = q.shape[:2]
    n = pn.expand(-1, -1, nb, -1)
    kc = _per_block_heads((pk / pn.clamp(min=1)[..., None]).expand(-1, -1, nb, -1, -1), H)
    vc = _per_block_heads((pv / pn.clamp(min=1)[..., None]).expand(-1, -1, nb, -1, -1), H)
    bias = torch.where(n > 0, n.clamp(min=1).log(), float("-inf"))[..., None, :]
    mask = _per_block_heads(bias, H).expand(-1, -1, block, -1).contiguous()
    out, lse = _flash_blocks(q, kc, vc, scale, block, nb, mask=mask)
    has = _per_block_heads((n > 0).any(-1)[..., None, None].to(torch.int8), H)[..., 0] > 0
    return out, lse.masked_fill(~has, float("-inf"))


def _merge(parts, batch: int, nq: int) -> torch.Tensor:
    """Merge softmax parts (out (B·nb,H,b,Dv), lse (B·nb,H,b)) by log-sum-exp; a row with no
    key in any part is zero. → (B,H,Nq,Dv)."""
    lse = torch.stack([p[1] for p in parts])
    m = lse.amax(0)
    w = torch.exp(lse - torch.where(torch.isfinite(m), m, 0))  # (parts, B·nb, H, b)
    total = w.sum(0)
    out = sum(wi[..., None] * p[0] for wi, p in zip(w, parts, strict=True))
    out = out / torch.where(total > 0, total, 1)[..., None]
    Bnb, H, b, Dv = out.shape
    out = out.view(batch, Bnb // batch, H, b, Dv).transpose(1, 2)
    return out.reshape(batch, H, -1, Dv)[:, :, :nq]


def _to_per_query(x: torch.Tensor, batch: int, hk: int) -> torch.Tensor:
    """(B·nb,H,b,·) → (B,Hk,nb,G·b,·) (the chunk loop's layout)."""
    Bnb, H, b = x.shape[:3]
    x = x.reshape(batch, Bnb // batch, hk, H // hk, b, *x.shape[3:]).transpose(1, 2)
    return x.reshape(batch, hk, Bnb // batch, (H // hk) * b, *x.shape[5:])


def attention_from_choices(q, k, v, key_valid, key_assign, query_assign, topk_idx, clusters,
                           scale, block, causal, differentiable=True):
    """Causal (i-)clustered attention for given choices (``reference.attention_from_choices``).

    For query i of block β with local keys L, selected keys T (their clusters c_t) and far
    cluster statistics (sums K_c, V_c, counts n_c) of the earlier blocks, with m_c selected
    keys in cluster c, ``ℓ̄_c = (s·q·K_c - Σ_{t∈c} ℓ_t) / (n_c - m_c)`` and the max M::

        num = Σ_L e^{ℓ_j-M} v_j + Σ_c e^{ℓ̄_c-M} V_c + Σ_T (e^{ℓ_t-M} - e^{ℓ̄_{c_t}-M}) v_t
        den = Σ_L e^{ℓ_j-M} + Σ_c (n_c - m_c) e^{ℓ̄_c-M} + Σ_T e^{ℓ_t-M},   out = num / den

    (a cluster whose far keys are all selected contributes nothing). ``differentiable=False``
    (inference, CPU) computes the local part with the fused flash kernel (when Dv = D).

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), key_valid (B,Nk), key_assign
    (B,Hk,E,Nk), query_assign (B,H,Nq), topk_idx (B,H,nb,C,kk) → (B,H,Nq,Dv) in q's dtype.
    """
    cdt, dtype = compute_dtype(q), q.dtype
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    G, C, nb, kk = H // Hk, clusters, nblocks(Nq, block), topk_idx.shape[-1]
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    pk, pv, pn = _key_stats(k, v, key_valid, key_assign, C, block, causal, nb)
    qb = _per_query(q * scale, Hk, block, nb)  # (B,Hk,nb,G·b,D)
    sel = _Selected(q, k, v, key_valid, key_assign, query_assign, topk_idx, C, scale, block,
                    causal, nb) if kk else None
    # the fused kernel is CPU's flash attention and wants Dv = D
    fused = causal and not differentiable and D == v.shape[-1] and q.device.type == "cpu"
    if fused and not kk:  # clustered: two flash calls, local and far, merged
        return _merge([_local_flash(q, k, v, key_valid, scale, block, nb),
                       _far_flash(q, pk, pv, pn, scale, block, nb)], B, Nq).to(dtype)
    if fused:
        out_loc, lse_loc = (_to_per_query(t, B, Hk) for t in _local_flash(
            q, k, v, key_valid, scale, block, nb))
    elif causal:
        kb, vb = blocks(k, block, nb), blocks(v, block, nb)  # (B,Hk,nb,b,·)
        kvalid_b = flag_blocks(key_valid, block, nb)[:, None, :, None, :]  # (B,1,nb,1,b)
        tri = torch.ones(block, block, dtype=torch.bool, device=q.device).tril().repeat(G, 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * block * (block + C + 2 * kk)))
    nums, dens, ws = [], [], []
    for s in range(0, nb, chunk):
        e = min(nb, s + chunk)
        qc = qb[:, :, s:e]
        fs = slice(s, e) if causal else slice(0, 1)
        n = pn[:, :, fs, None, :]  # (B,Hk,c|1,1,C)
        g = qc @ pk[:, :, fs].transpose(-1, -2)  # (B,Hk,c,G·b,C)
        logits = []
        if causal and not fused:
            loc = qc @ kb[:, :, s:e].transpose(-1, -2)  # (B,Hk,c,G·b,b)
            logits.append(loc.masked_fill(~(tri & kvalid_b[:, :, s:e]), float("-inf")))
        if kk:
            l_sel, ok, csel = (t[:, :, s:e] for t in (sel.logits, sel.ok, sel.clusters))
            n = n - torch.zeros_like(g).scatter_add(-1, csel, ok.to(cdt))
            g = g - torch.zeros_like(g).scatter_add(-1, csel, torch.where(ok, l_sel, 0))
            logits.append(l_sel)
        has = n > 0
        far = torch.where(has, g / torch.where(has, n, 1), float("-inf"))
        maxima = [t.amax(-1) for t in [far, *logits]] + ([lse_loc[:, :, s:e]] if fused else [])
        mx = torch.stack(maxima).amax(0)
        mx = torch.where(torch.isfinite(mx), mx, 0).detach()[..., None]
        u = torch.exp(far - mx)
        den = (u * n).sum(-1)
        num = u @ pv[:, :, fs]
        if fused:
            p = torch.exp(lse_loc[:, :, s:e, :, None] - mx)
            den = den + p[..., 0]
            num = num + p * out_loc[:, :, s:e]
        elif causal:
            p = torch.exp(logits[0] - mx)
            den = den + p.sum(-1)
            num = num + p @ vb[:, :, s:e]
        if kk:
            p = torch.exp(l_sel - mx)
            den = den + p.sum(-1)
            ws.append(p - u.gather(-1, csel) * ok)
        nums.append(num)
        dens.append(den)
    num, den = torch.cat(nums, 2), torch.cat(dens, 2)
    if kk:
        num = num + sel.weighted_values(torch.cat(ws, 2))
    out = _from_per_query(num / torch.where(den > 0, den, 1)[..., None], H)
    return out[:, :, :Nq].to(dtype)
