"""Fast causal clustered and i-clustered attention: vectorised torch, O(N·(block + C + k))
memory, no Nq×Nk matrix, no Python loop over queries or positions.

Same math as ``reference.py`` (its docstring has the approximation):

* clustering: one loop over the *blocks* (each step is a few batched GEMMs over all rows and
  the block's positions): the streaming k-means of the keys, and (i-clustered) the causal
  assignment of the queries to the codebook of the earlier blocks;
* the attention: per block, the cluster sums of its keys by one ``index_add``; the far field
  of block β is the exclusive prefix sum over blocks (``cumsum``), so a query's far statistics
  are read, never recomputed; the local block is one (b×b) GEMM per block; the selected keys
  are gathered per query; corrections for the selected keys are scattered per cluster; all
  merged by one log-sum-exp. Blocks are processed in chunks so memory stays bounded.

The code is plain differentiable torch and device-agnostic; the registration also uses it to
recompute gradients with the discrete choices held fixed.
"""

from __future__ import annotations

import torch

from clusterfx.ops.causal_clustered.common import Plan, hash_projection, nblocks
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.checks import compute_dtype

_CHUNK_ELEMENTS = 2**24  # bound on the per-chunk intermediates (elements)


def _blocks(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """(..., N, E) → (..., nb, block, E), zero-padded at the end."""
    pad = nb * block - x.shape[-2]
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], -2)
    return x.unflatten(-2, (nb, block))


def _flag_blocks(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """(..., N) bool → (..., nb, block), False-padded at the end."""
    return _blocks(x[..., None].to(torch.int8), block, nb)[..., 0].bool()


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ over the blocks strictly before each one (exactly: no add-then-subtract)."""
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zero, x.cumsum(dim).narrow(dim, 0, x.shape[dim] - 1)], dim)


# --------------------------------------------------------------------------- clustering steps


def _nearest(x, codes, sums, counts, votes, metric, hamming: bool) -> torch.Tensor:
    """Nearest existing cluster per row (ties: lowest index; 0 when none exists).

    Shapes: x (R,n,D), codes (R,n,bits), sums (R,C,D), counts (R,C), votes (R,C,bits),
    metric (R,D,D) or None → (R,n) int64."""
    exists = (counts > 0)[:, None, :]
    if hamming:
        major = torch.where(votes > 0, 1.0, -1.0).to(x.dtype)
        d = -(codes @ major.transpose(1, 2))
    else:
        cent = sums / counts.clamp(min=1)[..., None]
        mapped = cent if metric is None else cent @ metric  # M c (M symmetric)
        d = (mapped * cent).sum(-1)[:, None, :] - 2 * (x @ mapped.transpose(1, 2))
    return d.masked_fill(~exists, float("inf")).argmin(-1)


def _contributions(x, codes, valid, a, clusters):
    """Per-cluster sums, counts and code votes of the valid rows. → (R,C,D), (R,C), (R,C,b)."""
    w = valid.to(x.dtype)
    sums = x.new_zeros(x.shape[0], clusters, x.shape[-1]).scatter_add(
        1, a[..., None].expand_as(x), x * w[..., None])
    counts = x.new_zeros(x.shape[0], clusters).scatter_add(1, a, w)
    votes = x.new_zeros(x.shape[0], clusters, codes.shape[-1]).scatter_add(
        1, a[..., None].expand_as(codes), codes * w[..., None])
    return sums, counts, votes


def _seeds(x, codes, valid, priority, counts, clusters):
    """Empty clusters, in index order, take the valid rows by increasing priority."""
    R, n, D = x.shape
    empty = counts == 0
    rank = empty.long().cumsum(-1) - 1
    order = torch.argsort(priority.masked_fill(~valid, 2.0), dim=-1, stable=True)
    seeded = empty & (rank < valid.sum(-1, keepdim=True))
    pos = order.gather(1, rank.clamp(0, n - 1))  # (R, C)
    keep = seeded[..., None].to(x.dtype)
    sums = x.gather(1, pos[..., None].expand(R, clusters, D)) * keep
    votes = codes.gather(1, pos[..., None].expand(R, clusters, codes.shape[-1])) * keep
    return sums, seeded.to(x.dtype), votes


def _codes(x, centre, proj) -> torch.Tensor:
    return torch.where((x - centre[:, None, :]) @ proj > 0, 1.0, -1.0).to(x.dtype)


# --------------------------------------------------------------------------- clustering


def _key_geometry(q, k, key_valid, spec, block, causal, cdt, nb):
    """Per key block: the metric (second moment of the queries of blocks ≤ β) and the hash
    centre (mean of the valid keys of blocks ≤ β). → (R,nb,D,D) or None, (R,nb,D)."""
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    kw = _flag_blocks(key_valid, block, nb)[:, None, :, :, None].to(cdt)  # (B,1,nb,b,1)
    ksum = (_blocks(k, block, nb) * kw).sum(3).cumsum(2)  # (B,Hk,nb,D)
    kcount = kw.sum((3, 4)).cumsum(2)  # (B,1,nb)
    centre = (ksum / kcount.clamp(min=1)[..., None]).reshape(B * Hk, nb, D)
    if not (causal and spec.metric == "attention"):
        return None, centre
    qb = _blocks(q, block, nb).unflatten(1, (Hk, H // Hk)) * kw[:, :, None]  # (B,Hk,G,nb,b,D)
    moment = torch.einsum("bhgnid,bhgnie->bhnde", qb, qb).cumsum(2)
    count = (kcount * (H // Hk))[..., None, None]  # queries share the keys' positions
    eye = torch.eye(D, dtype=cdt, device=q.device)
    metric = torch.where(count > 0, moment / count.clamp(min=1), eye)
    return metric.reshape(B * Hk, nb, D, D), centre


def cluster_keys(q, k, key_valid, spec: ClusteringSpec, block: int, causal: bool,
                 plan: Plan) -> torch.Tensor:
    """Streaming k-means of the keys (``reference.cluster_keys``). → (B,Hk,Nk) int64."""
    cdt = compute_dtype(q)
    q, k = q.detach().to(cdt), k.detach().to(cdt)
    B, Hk, Nk, D = k.shape
    C, hamming, nb = spec.clusters, spec.clustering == "hamming", nblocks(Nk, block)
    metric, centre = _key_geometry(q, k, key_valid, spec, block, causal, cdt, nb)
    proj = hash_projection(metric, plan.planes, D, cdt)
    if proj.dim() == 2:
        proj = proj.expand(B * Hk, nb, *proj.shape)
    x_all = _blocks(k, block, nb).reshape(B * Hk, nb, block, D)
    valid = _flag_blocks(key_valid, block, nb)[:, None].expand(B, Hk, nb, block)
    valid = valid.reshape(B * Hk, nb, block)
    prio = _blocks(plan.key_priority.to(cdt)[..., None], block, nb)[..., 0]
    sums, counts = x_all.new_zeros(B * Hk, C, D), x_all.new_zeros(B * Hk, C)
    votes = x_all.new_zeros(B * Hk, C, plan.planes.shape[0])
    out = []
    for beta in range(nb):
        x, w = x_all[:, beta], valid[:, beta]
        m = None if metric is None else metric[:, beta]
        codes = _codes(x, centre[:, beta], proj[:, beta])
        s_b, n_b, v_b = _seeds(x, codes, w, prio[:, beta], counts, C)
        for _ in range(spec.iterations):
            a = _nearest(x, codes, sums + s_b, counts + n_b, votes + v_b, m, hamming)
            s_b, n_b, v_b = _contributions(x, codes, w, a, C)
        for _ in range(spec.refine):
            a = _nearest(x, codes, sums + s_b, counts + n_b, votes + v_b, m, False)
            s_b, n_b, v_b = _contributions(x, codes, w, a, C)
        sums, counts, votes = sums + s_b, counts + n_b, votes + v_b
        out.append(torch.where(w, a, 0))
    return torch.stack(out, 1).reshape(B, Hk, nb * block)[..., :Nk]


def _query_geometry(q, k, query_valid, key_valid, spec, block, causal, cdt, nb):
    """Per query block: the metric (covariance of the keys it may see: blocks < β, or all)
    and the hash centre (mean of the valid queries of blocks < β)."""
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    qw = _flag_blocks(query_valid, block, nb)[:, None, :, :, None].to(cdt)
    qsum = _exclusive_cumsum((_blocks(q, block, nb) * qw).sum(3), 2)  # (B,H,nb,D)
    centre = (qsum / _exclusive_cumsum(qw.sum((3, 4)), 2).clamp(min=1)[..., None])
    if spec.metric != "attention":
        return None, centre.reshape(B * H, nb, D)
    nbk = nblocks(k.shape[2], block)
    kw = _flag_blocks(key_valid, block, nbk)[:, None, :, :, None].to(cdt)
    kb = _blocks(k, block, nbk) * kw
    shift = kb[:, :, :1].sum(3) / kw[:, :, :1].sum((3, 4)).clamp(min=1)[..., None]
    kb = (kb - shift[:, :, :, None]) * kw  # shifted sums avoid cancellation in E[kkᵀ]-μμᵀ
    s1, s2 = kb.sum(3), torch.einsum("bhnid,bhnie->bhnde", kb, kb)
    n = kw.sum((3, 4))
    if causal:
        s1, s2, n = (_exclusive_cumsum(t, 2) for t in (s1, s2, n))
    else:
        s1, s2, n = (t.sum(2, keepdim=True).expand(*t.shape[:2], nb, *t.shape[3:])
                     for t in (s1, s2, n))
    mean = s1 / n.clamp(min=1)[..., None]
    cov = s2 / n.clamp(min=1)[..., None, None] - mean[..., :, None] * mean[..., None, :]
    eye = torch.eye(D, dtype=cdt, device=q.device)
    cov = torch.where((n >= 2)[..., None, None], cov, eye)  # (B,Hk,nb,D,D)
    cov = cov.repeat_interleave(H // Hk, dim=1)
    return cov.reshape(B * H, nb, D, D), centre.reshape(B * H, nb, D)


def cluster_queries(q, k, query_valid, key_valid, spec: ClusteringSpec, block: int,
                    causal: bool, plan: Plan):
    """Causal query clustering (``reference.cluster_queries``). → assignments (B,H,Nq),
    centroids (B,H,nb,C,D), exists (B,H,nb,C)."""
    cdt = compute_dtype(q)
    q, k = q.detach().to(cdt), k.detach().to(cdt)
    B, H, Nq, D = q.shape
    C, hamming, nb = spec.clusters, spec.clustering == "hamming", nblocks(Nq, block)
    metric, centre = _query_geometry(q, k, query_valid, key_valid, spec, block, causal, cdt,
                                     nb)
    proj = hash_projection(metric, plan.planes, D, cdt)
    if proj.dim() == 2:
        proj = proj.expand(B * H, nb, *proj.shape)
    x_all = _blocks(q, block, nb).reshape(B * H, nb, block, D)
    valid = _flag_blocks(query_valid, block, nb)[:, None].expand(B, H, nb, block)
    valid = valid.reshape(B * H, nb, block)
    prio = _blocks(plan.query_priority.to(cdt)[..., None], block, nb)[..., 0]
    sums, counts = x_all.new_zeros(B * H, C, D), x_all.new_zeros(B * H, C)
    votes = x_all.new_zeros(B * H, C, plan.planes.shape[0])
    assign, cents, exists = [], [], []
    for beta in range(nb):
        x, w = x_all[:, beta], valid[:, beta]
        m = None if metric is None else metric[:, beta]
        cents.append(sums / counts.clamp(min=1)[..., None])
        exists.append(counts > 0)
        codes = _codes(x, centre[:, beta], proj[:, beta])
        assign.append(_nearest(x, codes, sums, counts, votes, m, hamming))
        s_b, n_b, v_b = _seeds(x, codes, w, prio[:, beta], counts, C)
        a = _nearest(x, codes, sums + s_b, counts + n_b, votes + v_b, m, hamming)
        s_b, n_b, v_b = _contributions(x, codes, w, a, C)
        sums, counts, votes = sums + s_b, counts + n_b, votes + v_b
    assign = torch.stack(assign, 1).reshape(B, H, nb * block)[..., :Nq]
    return (assign, torch.stack(cents, 1).view(B, H, nb, C, D),
            torch.stack(exists, 1).view(B, H, nb, C))


def select_topk(k, key_valid, centroids, exists, topk: int, scale: float, block: int,
                causal: bool) -> torch.Tensor:
    """``reference.select_topk``, batched over rows and chunks of blocks; in causal mode a
    chunk scores only the keys before its last block's start. → (B,H,nb,C,min(topk,Nk))."""
    B, H, nb, C, D = centroids.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G, kk = H // Hk, min(topk, Nk)
    k = k.detach().to(centroids.dtype)
    out = torch.full((B, H, nb, C, kk), -1, dtype=torch.int64, device=k.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * C * Nk))
    for s in range(0, nb, chunk):
        e = min(nb, s + chunk)
        hi = (e - 1) * block if causal else Nk
        if hi <= 0:
            continue
        cent = (centroids[:, :, s:e] * scale).reshape(B, Hk, G * (e - s) * C, D)
        scores = (cent @ k[:, :, :hi].transpose(-1, -2)).view(B, H, e - s, C, hi)
        j = torch.arange(hi, device=k.device)
        keep = exists[:, :, s:e, :, None] & key_valid[:, None, None, None, :hi]
        if causal:
            starts = torch.arange(s, e, device=k.device) * block
            keep = keep & (j[None, :] < starts[:, None])[None, None, :, None, :]
        vals, top = scores.masked_fill(~keep, float("-inf")).topk(min(kk, hi), dim=-1)
        out[:, :, s:e, :, :top.shape[-1]] = torch.where(vals > float("-inf"), top, -1)
    return out


# --------------------------------------------------------------------------- attention


def _key_stats(k, v, key_valid, key_assign, clusters, block, causal, nb):
    """Far-field statistics per query block: cluster sums of keys and values, and counts, of
    the keys before the block (causal) or of all keys. → (B,Hk,nb|1,C,D), (…,Dv), (…,C)."""
    B, Hk, Nk, D = k.shape
    nbk = nblocks(Nk, block)
    rows = torch.arange(B * Hk, device=k.device)[:, None] * nbk
    slot = ((rows + torch.arange(Nk, device=k.device)[None] // block) * clusters
            + key_assign.reshape(B * Hk, Nk)).reshape(-1)
    w = key_valid[:, None, :, None]
    ks = k.new_zeros(B * Hk * nbk * clusters, D).index_add(
        0, slot, torch.where(w, k, 0).reshape(-1, D)).view(B, Hk, nbk, clusters, D)
    vs = v.new_zeros(B * Hk * nbk * clusters, v.shape[-1]).index_add(
        0, slot, torch.where(w, v, 0).reshape(-1, v.shape[-1])).view(B, Hk, nbk, clusters, -1)
    ns = k.new_zeros(B * Hk * nbk * clusters).index_add(
        0, slot, w.expand(B, Hk, Nk, 1).reshape(-1).to(k.dtype)).view(B, Hk, nbk, clusters)
    if causal:
        return tuple(_exclusive_cumsum(t, 2) for t in (ks, vs, ns))
    return ks.sum(2, keepdim=True), vs.sum(2, keepdim=True), ns.sum(2, keepdim=True)


def _per_query(x: torch.Tensor, hk: int, block: int, nb: int) -> torch.Tensor:
    """(B,H,Nq,E) → (B,Hk,nb,G·block,E): a block's queries of one kv head as GEMM rows."""
    B, H = x.shape[:2]
    xb = _blocks(x, block, nb).unflatten(1, (hk, H // hk))  # (B,Hk,G,nb,b,E)
    return xb.transpose(2, 3).reshape(B, hk, nb, -1, x.shape[-1])


def attention_from_choices(q, k, v, key_valid, key_assign, query_assign, topk_idx, clusters,
                           scale, block, causal):
    """Causal (i-)clustered attention for given choices (``reference.attention_from_choices``).

    For query i of block β with local keys L, selected keys T (their clusters c_t) and far
    cluster statistics (sums K_c, V_c, counts n_c) of the earlier blocks, with m_c selected
    keys in cluster c, ``ℓ̄_c = (s·q·K_c - Σ_{t∈c} ℓ_t) / (n_c - m_c)`` and the max M::

        num = Σ_L e^{ℓ_j-M} v_j + Σ_c e^{ℓ̄_c-M} V_c + Σ_T (e^{ℓ_t-M} - e^{ℓ̄_{c_t}-M}) v_t
        den = Σ_L e^{ℓ_j-M} + Σ_c (n_c - m_c) e^{ℓ̄_c-M} + Σ_T e^{ℓ_t-M},   out = num / den

    (a cluster whose far keys are all selected contributes nothing). Shapes: q (B,H,Nq,D),
    k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), key_valid (B,Nk), key_assign (B,Hk,Nk), query_assign
    (B,H,Nq), topk_idx (B,H,nb,C,kk) → (B,H,Nq,Dv) in q's dtype.
    """
    cdt, dtype = compute_dtype(q), q.dtype
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, C, nb, kk = H // Hk, clusters, nblocks(Nq, block), topk_idx.shape[-1]
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    pk, pv, pn = _key_stats(k, v, key_valid, key_assign, C, block, causal, nb)
    qb = _per_query(q, Hk, block, nb)  # (B,Hk,nb,G·b,D)
    if causal:
        kb, vb = _blocks(k, block, nb), _blocks(v, block, nb)  # (B,Hk,nb,b,·)
        kvalid_b = _flag_blocks(key_valid, block, nb)[:, None, :, None, :]  # (B,1,nb,1,b)
        tri = torch.ones(block, block, dtype=torch.bool, device=q.device).tril().repeat(G, 1)
    if kk:
        aq = _blocks(query_assign[..., None], block, nb)  # (B,H,nb,b,1)
        sel = topk_idx.gather(3, aq.expand(B, H, nb, block, kk))  # (B,H,nb,b,kk)
        sel = _per_query(sel.flatten(2, 3), Hk, block, nb)  # (B,Hk,nb,G·b,kk)
    per_block = B * H * block * (block + C + kk * (D + Dv + 4))
    chunk = max(1, _CHUNK_ELEMENTS // max(1, per_block))
    outs = []
    for s in range(0, nb, chunk):
        e = min(nb, s + chunk)
        qc = qb[:, :, s:e]
        fs = slice(s, e) if causal else slice(0, 1)
        n = pn[:, :, fs, None, :]  # (B,Hk,c|1,1,C)
        g = (qc * scale) @ pk[:, :, fs].transpose(-1, -2)  # (B,Hk,c,G·b,C)
        logits = []
        if causal:
            loc = (qc * scale) @ kb[:, :, s:e].transpose(-1, -2)  # (B,Hk,c,G·b,b)
            logits.append(loc.masked_fill(~(tri & kvalid_b[:, :, s:e]), float("-inf")))
        if kk:
            idx = sel[:, :, s:e]
            starts = torch.arange(s, e, device=q.device)[:, None, None] * block
            ok = (idx >= 0) & (idx < starts if causal else True)
            ii = idx.clamp(min=0)
            flat = ii.reshape(B, Hk, -1)
            ok = ok & key_valid[:, None, :].expand(B, Hk, Nk).gather(2, flat).view_as(ok)
            ksel = k.gather(2, flat[..., None].expand(-1, -1, -1, D)).view(*ii.shape, D)
            l_sel = torch.einsum("bhnid,bhnitd->bhnit", qc * scale, ksel)
            l_sel = l_sel.masked_fill(~ok, float("-inf"))
            csel = key_assign.gather(2, flat).view_as(ii)
            n = n - torch.zeros_like(g).scatter_add(-1, csel, ok.to(cdt))
            g = g - torch.zeros_like(g).scatter_add(-1, csel, torch.where(ok, l_sel, 0))
            logits.append(l_sel)
        has = n > 0
        far = torch.where(has, g / torch.where(has, n, 1), float("-inf"))
        mx = torch.stack([t.amax(-1) for t in [far, *logits]]).amax(0)
        mx = torch.where(torch.isfinite(mx), mx, 0).detach()[..., None]
        u = torch.exp(far - mx)
        den = (u * n).sum(-1)
        num = u @ pv[:, :, fs]
        if causal:
            p = torch.exp(logits[0] - mx)
            den = den + p.sum(-1)
            num = num + p @ vb[:, :, s:e]
        if kk:
            p = torch.exp(l_sel - mx)
            den = den + p.sum(-1)
            vsel = v.gather(2, flat[..., None].expand(-1, -1, -1, Dv)).view(*ii.shape, Dv)
            w = p - u.gather(-1, csel) * ok
            num = num + torch.einsum("bhnit,bhnitd->bhnid", w, vsel)
        outs.append(num / torch.where(den > 0, den, 1)[..., None])
    out = torch.cat(outs, 2).view(B, Hk, nb, G, block, Dv).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(B, H, nb * block, Dv)[:, :, :Nq].to(dtype)
