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

from clusterfx.ops.causal_clustered.common import (
    Plan,
    blocks,
    epochs,
    exclusive_cumsum,
    flag_blocks,
    hash_projection,
    key_epochs,
    nblocks,
    refreshes,
)
from clusterfx.ops.causal_clustered.cpu_attention import attention_from_choices  # noqa: F401
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.checks import compute_dtype

# --------------------------------------------------------------------------- clustering steps


def _nearest(x, codes, sums, counts, votes, metric, hamming: bool) -> torch.Tensor:
    """Nearest existing cluster per row (ties: lowest index; 0 when none exists), by one
    GEMM whose bias rules out the missing clusters.

    Shapes: x (R,n,D), codes (R,n,bits), sums (R,C,D), counts (R,C), votes (R,C,bits),
    metric (R,D,D) or None → (R,n) int64."""
    exists = counts > 0
    if hamming:
        bits = codes.shape[-1]
        major = torch.where(votes > 0, 1.0, -1.0).to(x.dtype)
        bias = torch.where(exists, 0.0, -4.0 * bits - 4.0).to(x.dtype)[:, None, :]
        best = torch.baddbmm(bias, codes, major.transpose(1, 2)).argmax(-1)  # most bits equal
    else:
        cent = sums / counts.clamp(min=1)[..., None]
        mapped = cent if metric is None else cent @ metric  # M c (M is symmetric)
        const = (mapped * cent).sum(-1).masked_fill(~exists, 1e30)[:, None, :]
        best = torch.baddbmm(const, x, mapped.transpose(1, 2), alpha=-2).argmin(-1)
    return torch.where(exists.any(-1, keepdim=True), best, 0)


def _contributions(x, codes, a, clusters):
    """Per-cluster sums, counts and code votes of the rows with a >= 0 (a = -1: none).
    → (R,C,D), (R,C), (R,C,bits)."""
    R, n, D = x.shape
    bits = codes.shape[-1]
    slots = (torch.where(a >= 0, a, clusters)
             + torch.arange(R, device=x.device)[:, None] * (clusters + 1)).reshape(-1)
    size = R * (clusters + 1)
    sums = x.new_zeros(size, D).index_add(0, slots, x.reshape(-1, D))
    counts = x.new_zeros(size).index_add(0, slots, x.new_ones(R * n))
    votes = x.new_zeros(size, bits).index_add(0, slots, codes.reshape(R * n, bits))
    return (sums.view(R, clusters + 1, D)[:, :clusters],
            counts.view(R, clusters + 1)[:, :clusters],
            votes.view(R, clusters + 1, bits)[:, :clusters])


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _lloyd(x, codes, valid, init, start, priority, spec, metric, clusters):
    """``reference._lloyd`` for every row at once; the new rows are those from ``start`` on
    (the older rows' statistics are summed once). x (R,n,D), codes (R,n,bits), valid (R,n)
    bool, init (R,n) (-1: none), priority (R,n) → (R,n) (-1 where invalid), the final
    (sums, counts, votes), and whether later rows are assigned by Hamming distance."""
    R, n, _ = x.shape
    a = torch.where(valid, init, -1)
    old = _contributions(x[:, :start], codes[:, :start], a[:, :start], clusters)
    new_x, new_codes, new_valid = x[:, start:], codes[:, start:], valid[:, start:]
    stats = _add(old, _contributions(new_x, new_codes, a[:, start:], clusters))
    empty = stats[1] == 0
    rank = empty.long().cumsum(-1) - 1
    m = n - start
    order = torch.argsort(priority[:, start:].masked_fill(~new_valid, 2.0), dim=-1, stable=True)
    seeded = empty & (rank < new_valid.sum(-1, keepdim=True))
    pos = torch.where(seeded, order.gather(1, rank.clamp(0, max(m - 1, 0))), m)  # m: dummy
    fresh = torch.cat([a[:, start:], a.new_zeros(R, 1)], 1).scatter(
        1, pos, torch.arange(clusters, device=x.device).expand(R, clusters))[:, :m]
    hamming = spec.clustering == "hamming"
    for kind, rounds in ((hamming, spec.iterations), (False, spec.refine)):
        previous = None
        for _ in range(rounds):
            stats = _add(old, _contributions(new_x, new_codes, fresh, clusters))
            near = _nearest(new_x, new_codes, *stats, metric, kind)
            fresh = torch.where(new_valid, near, -1)
            if previous is not None and torch.equal(fresh, previous):
                break  # a fixed point: further rounds of this kind change nothing
            previous = fresh
    stats = _add(old, _contributions(new_x, new_codes, fresh, clusters))
    return torch.cat([a[:, :start], fresh], 1), stats, hamming and spec.refine == 0


def _codes(x, centre, metric, planes) -> torch.Tensor:
    """±1 SimHash codes of x (R,n,D) around centre (R,D) in the metric's (R,D,D) geometry."""
    proj = hash_projection(metric, planes, x.shape[-1], x.dtype)
    proj = proj if metric is not None else proj.expand(x.shape[0], *proj.shape)
    return torch.where((x - centre[:, None, :]) @ proj > 0, 1.0, -1.0).to(x.dtype)


# --------------------------------------------------------------------------- clustering


def _key_geometry(q, k, key_valid, spec, block, causal, cdt, nb):
    """Per key block: the metric (second moment of the queries of blocks ≤ β) and the hash
    centre (mean of the valid keys of blocks ≤ β). → (R,nb,D,D) or None, (R,nb,D)."""
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    kw = flag_blocks(key_valid, block, nb)[:, None, :, :, None].to(cdt)  # (B,1,nb,b,1)
    ksum = (blocks(k, block, nb) * kw).sum(3).cumsum(2)  # (B,Hk,nb,D)
    kcount = kw.sum((3, 4)).cumsum(2)  # (B,1,nb)
    centre = (ksum / kcount.clamp(min=1)[..., None]).reshape(B * Hk, nb, D)
    if not (causal and spec.metric == "attention"):
        return None, centre
    qb = blocks(q, block, nb).unflatten(1, (Hk, H // Hk)) * kw[:, :, None]  # (B,Hk,G,nb,b,D)
    moment = torch.einsum("bhgnid,bhgnie->bhnde", qb, qb).cumsum(2)
    count = (kcount * (H // Hk))[..., None, None]  # queries share the keys' positions
    eye = torch.eye(D, dtype=cdt, device=q.device)
    metric = torch.where(count > 0, moment / count.clamp(min=1), eye)
    return metric.reshape(B * Hk, nb, D, D), centre


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, Hx, N, E) → (B·Hx, N, E) in the compute dtype's detached copy."""
    return x.reshape(-1, *x.shape[2:])


def cluster_keys(q, k, key_valid, spec: ClusteringSpec, block: int, causal: bool,
                 plan: Plan) -> torch.Tensor:
    """The key clusters of each epoch (``reference.cluster_keys``): per epoch one batched
    Lloyd on the keys before it and one nearest-cluster assignment of its keys, for every row
    at once. → (B,Hk,E,Nk) int64."""
    cdt = compute_dtype(q)
    q, k = q.detach().to(cdt), k.detach().to(cdt)
    B, Hk, Nk, D = k.shape
    C, nb = spec.clusters, nblocks(Nk, block)
    R = B * Hk
    x = _rows(k)
    valid = key_valid[:, None].expand(B, Hk, Nk).reshape(R, Nk)
    prio = plan.key_priority.to(cdt)
    out = torch.zeros(R, key_epochs(nb, causal), Nk, dtype=torch.int64, device=k.device)
    if not causal:
        w = valid[..., None].to(cdt)
        centre = (x * w).sum(1) / w.sum(1).clamp(min=1)
        codes = _codes(x, centre, None, plan.planes)
        a, _, _ = _lloyd(x, codes, valid, torch.full_like(valid, -1, dtype=torch.int64), 0,
                         prio, spec, None, C)
        out[:, 0] = a.clamp(min=0)
        return out.view(B, Hk, 1, Nk)
    metric, centre = _key_geometry(q, k, key_valid, spec, block, causal, cdt, nb)
    state = torch.full((R, Nk), -1, dtype=torch.int64, device=k.device)
    blk = torch.arange(Nk, device=k.device) // block
    for e, (r, end) in enumerate(epochs(nb), start=1):
        lo, hi = r * block, min(Nk, end * block)
        m = None if metric is None else metric[:, r - 1]
        codes = _codes(x[:, :hi], centre[:, r - 1], m, plan.planes)
        a, stats, hamming = _lloyd(x[:, :lo], codes[:, :lo], valid[:, :lo], state[:, :lo],
                                   (r // 2) * block, prio[:, :lo], spec, m, C)
        near = _nearest(x[:, lo:hi], codes[:, lo:hi], *stats, m, hamming)
        # clusters still empty go to the epoch's keys in (block, priority) order
        ev = valid[:, lo:hi]
        free = stats[1] == 0
        rank = free.long().cumsum(-1) - 1
        order = torch.argsort((blk[lo:hi] + prio[:, lo:hi]).masked_fill(~ev, float("inf")),
                              dim=-1, stable=True)
        seeded = free & (rank < ev.sum(-1, keepdim=True))
        pos = torch.where(seeded, order.gather(1, rank.clamp(0, hi - lo - 1)), hi - lo)
        near = torch.cat([near, near.new_zeros(R, 1)], 1).scatter(
            1, pos, torch.arange(C, device=k.device).expand(R, C))[:, :hi - lo]
        state[:, :lo] = a
        state[:, lo:hi] = torch.where(ev, near, -1)
        out[:, e, :hi] = state[:, :hi].clamp(min=0)
    return out.view(B, Hk, -1, Nk)


def _query_geometry(q, k, query_valid, key_valid, spec, block, causal, cdt, nb):
    """Per query block: the metric (covariance of the keys it may see: blocks < β, or all)
    and the hash centre (mean of the valid queries of blocks < β)."""
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    qw = flag_blocks(query_valid, block, nb)[:, None, :, :, None].to(cdt)
    qsum = exclusive_cumsum((blocks(q, block, nb) * qw).sum(3), 2)  # (B,H,nb,D)
    centre = (qsum / exclusive_cumsum(qw.sum((3, 4)), 2).clamp(min=1)[..., None])
    if spec.metric != "attention":
        return None, centre.reshape(B * H, nb, D)
    nbk = nblocks(k.shape[2], block)
    kw = flag_blocks(key_valid, block, nbk)[:, None, :, :, None].to(cdt)
    kb = blocks(k, block, nbk) * kw
    shift = kb[:, :, :1].sum(3) / kw[:, :, :1].sum((3, 4)).clamp(min=1)[..., None]
    kb = (kb - shift[:, :, :, None]) * kw  # shifted sums avoid cancellation in E[kkᵀ]-μμᵀ
    s1, s2 = kb.sum(3), torch.einsum("bhnid,bhnie->bhnde", kb, kb)
    n = kw.sum((3, 4))
    if causal:
        s1, s2, n = (exclusive_cumsum(t, 2) for t in (s1, s2, n))
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
    """Causal query clustering (``reference.cluster_queries``), per epoch one batched Lloyd
    and one nearest-cluster assignment. → assignments (B,H,Nq), centroids (B,H,nb,C,D),
    exists (B,H,nb,C)."""
    cdt = compute_dtype(q)
    q, k = q.detach().to(cdt), k.detach().to(cdt)
    B, H, Nq, D = q.shape
    C, nb = spec.clusters, nblocks(Nq, block)
    R = B * H
    metric, centre = _query_geometry(q, k, query_valid, key_valid, spec, block, causal, cdt, nb)
    x = _rows(q)
    valid = query_valid[:, None].expand(B, H, Nq).reshape(R, Nq)
    prio = plan.query_priority.to(cdt)
    assign = torch.zeros(R, Nq, dtype=torch.int64, device=q.device)
    cents = q.new_zeros(R, nb, C, D)
    exists = torch.zeros(R, nb, C, dtype=torch.bool, device=q.device)
    state = torch.full((R, Nq), -1, dtype=torch.int64, device=q.device)
    for r, end in epochs(nb):
        lo, hi = r * block, min(Nq, end * block)
        m = None if metric is None else metric[:, r]
        codes = _codes(x[:, :hi], centre[:, r], m, plan.planes)
        a, stats, hamming = _lloyd(x[:, :lo], codes[:, :lo], valid[:, :lo], state[:, :lo],
                                   (r // 2) * block, prio[:, :lo], spec, m, C)
        state[:, :lo] = a
        near = _nearest(x[:, lo:hi], codes[:, lo:hi], *stats, m, hamming)
        assign[:, lo:hi] = near
        state[:, lo:hi] = torch.where(valid[:, lo:hi], near, -1)
        cents[:, r:end] = (stats[0] / stats[1].clamp(min=1)[..., None])[:, None]
        exists[:, r:end] = (stats[1] > 0)[:, None]
    return assign.view(B, H, Nq), cents.view(B, H, nb, C, D), exists.view(B, H, nb, C)


def _scores(cent, k, lo, hi, key_valid, exists, scale):
    """``s·Q̄·k_j`` for keys lo ≤ j < hi (-inf for padded keys and missing clusters).
    cent (B,H,C,D), k (B,Hk,Nk,D) → (B,H,C,hi-lo)."""
    B, H, C, D = cent.shape
    Hk = k.shape[1]
    sc = ((cent * scale).reshape(B, Hk, -1, D) @ k[:, :, lo:hi].transpose(-1, -2))
    keep = exists[..., None] & key_valid[:, None, None, lo:hi]
    return sc.view(B, H, C, hi - lo).masked_fill(~keep, float("-inf"))


def _top(scores, idx, kk):
    """The kk best of scores (B,H,C,n) with their key indices idx (…, n); -1 for -inf."""
    vals, pos = scores.topk(min(kk, scores.shape[-1]), dim=-1)
    return vals, torch.where(vals > float("-inf"), idx.gather(-1, pos), -1)


def select_topk(k, key_valid, centroids, exists, topk: int, scale: float, block: int,
                causal: bool) -> torch.Tensor:
    """``reference.select_topk`` in linear time: the centroids change only at refreshes, so
    between two of them a cluster's top-k over the keys before block β is the top-k of its
    top-k before block β-1 and the keys of block β-1. → (B,H,nb,C,min(topk, Nk))."""
    B, H, nb, C, D = centroids.shape
    Nk = k.shape[2]
    kk = min(topk, Nk)
    k = k.detach().to(centroids.dtype)
    out = torch.full((B, H, nb, C, kk), -1, dtype=torch.int64, device=k.device)
    keys = torch.arange(Nk, device=k.device).expand(B, H, C, Nk)
    vals = idx = None
    for beta in range(1 if causal else 0, nb):
        cent, ex = centroids[:, :, beta], exists[:, :, beta]
        hi = min(beta * block, Nk) if causal else Nk
        if beta == 0 or refreshes(beta):
            vals, idx = _top(_scores(cent, k, 0, hi, key_valid, ex, scale), keys[..., :hi], kk)
        elif causal:
            lo = (beta - 1) * block
            new = _scores(cent, k, lo, hi, key_valid, ex, scale)
            vals, idx = _top(torch.cat([vals, new], -1),
                             torch.cat([idx, keys[..., lo:hi]], -1), kk)
        out[:, :, beta, :, :idx.shape[-1]] = idx
    return out
