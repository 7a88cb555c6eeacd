"""Reference (oracle) causal clustered and i-clustered attention: the approximation written
for obviousness — Python loops over rows, blocks and clusters for the discrete choices, and one
materialised Nq×Nk matrix of effective logits for the attention. Float64 for float64 inputs,
float32 otherwise; differentiable by ordinary autograd (the choices are integers).

The approximation (the package docstring has the design and its proof of causality): query i
of block β = i // b sees its *local* keys (block start ≤ j ≤ i, exact logits ``s·q_i·k_j``),
its *selected* keys T_i (i-clustered: exact logits too), and every other *far* key j (j before
the block start; every key when ``causal=False``) through its cluster: the logit of j becomes
``s·q_i·k̄`` where k̄ is the mean key of the far, unselected members of j's cluster. So a
cluster of n such keys carries softmax mass ``n·exp(s·q_i·k̄)`` and the mean of their values.
Padded keys take part in nothing; a query with no visible key gets a zero output.
"""

from __future__ import annotations

import torch

from clusterfx.ops.causal_clustered.common import (
    Plan,
    epoch_of,
    epochs,
    hash_projection,
    key_epochs,
    nblocks,
)
from clusterfx.ops.clustering import ClusteringSpec
from clusterfx.ops.common.checks import compute_dtype


def safe_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row that is entirely -inf gives zeros, not NaN."""
    m = logits.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


# --------------------------------------------------------------------------- geometry


def _second_moment(x: torch.Tensor) -> torch.Tensor | None:
    """Σ x xᵀ / n over the rows of x (n, D); None without rows."""
    return None if x.shape[0] == 0 else x.T @ x / x.shape[0]


def _covariance(x: torch.Tensor) -> torch.Tensor | None:
    """Covariance of the rows of x (n, D); None with fewer than two rows."""
    if x.shape[0] < 2:
        return None
    c = x - x.mean(0)
    return c.T @ c / x.shape[0]


def _codes(x, centre, metric, planes) -> torch.Tensor:
    """±1 SimHash codes of the rows of x in the metric's geometry. (n, D) → (n, bits)."""
    proj = hash_projection(metric, planes, x.shape[-1], x.dtype)
    return torch.where((x - centre) @ proj > 0, 1.0, -1.0).to(x.dtype)


def _nearest(x, codes, sums, counts, votes, metric, hamming: bool) -> torch.Tensor:
    """The nearest existing cluster of each row of x (ties: the lowest index). Hamming: the
    most bits in common with the cluster's majority code (tie vote → bit 0); otherwise
    ``(x - c)ᵀ M (x - c)`` with c the cluster mean (M = I without a metric)."""
    exists = counts > 0
    out = torch.zeros(x.shape[0], dtype=torch.int64)
    for i in range(x.shape[0]):
        best, best_c = None, 0
        for c in range(counts.shape[0]):
            if not exists[c]:
                continue
            if hamming:
                major = torch.where(votes[c] > 0, 1.0, -1.0).to(x.dtype)
                d = -(codes[i] * major).sum()
            else:
                diff = x[i] - sums[c] / counts[c]
                d = diff @ diff if metric is None else diff @ metric @ diff
            if best is None or d < best:
                best, best_c = d, c
        out[i] = best_c
    return out


def _contributions(x, codes, a, clusters):
    """Sums, counts and code votes of the rows of each cluster (rows with a = -1: none)."""
    sums = torch.zeros(clusters, x.shape[-1], dtype=x.dtype)
    counts = torch.zeros(clusters, dtype=x.dtype)
    votes = torch.zeros(clusters, codes.shape[-1], dtype=x.dtype)
    for i in range(x.shape[0]):
        if a[i] >= 0:
            sums[a[i]] += x[i]
            counts[a[i]] += 1
            votes[a[i]] += codes[i]
    return sums, counts, votes


# --------------------------------------------------------------------------- clustering


def _lloyd(x, codes, init, new_rows, priority, spec, metric, clusters):
    """Update a codebook with the rows x (n, D) (mini-batch k-means): start from the
    assignment ``init`` (-1: none), give the empty clusters (in index order) to the
    ``new_rows`` by increasing priority, then ``iterations`` rounds (Hamming or metric, per
    ``spec.clustering``) and ``refine`` metric rounds of (cluster means / majority codes from
    every row's assignment; reassign the new rows to the nearest), each kind stopping early at
    a fixed point. The other rows keep their assignment. → assignment (n,), (sums, counts,
    votes), and whether later rows are assigned by Hamming distance."""
    a = init.clone()
    counts = torch.bincount(a[a >= 0], minlength=clusters)
    empty = [c for c in range(clusters) if counts[c] == 0]
    order = sorted(new_rows, key=lambda i: (float(priority[i]), i))
    for c, i in zip(empty, order, strict=False):
        a[i] = c
    hamming = spec.clustering == "hamming"
    for kind, rounds in ((hamming, spec.iterations), (False, spec.refine)):
        previous = None
        for _ in range(rounds):
            stats = _contributions(x, codes, a, clusters)
            a = a.clone()
            a[list(new_rows)] = _nearest(x[list(new_rows)], codes[list(new_rows)], *stats,
                                         metric, kind)
            if previous is not None and torch.equal(a, previous):
                break
            previous = a
    return a, _contributions(x, codes, a, clusters), hamming and spec.refine == 0


def cluster_keys(q, k, key_valid, spec: ClusteringSpec, block: int, causal: bool,
                 plan: Plan) -> torch.Tensor:
    """The key clusters each epoch uses (the package docstring, "Clustering").

    Causal: at the start of epoch e (blocks [r, 2r)), the codebook is updated with the keys
    before block r (``_lloyd``: the keys new since the last epoch are reassigned, the older
    keep theirs; metric: the second moment of the queries before block r), then each key of
    the epoch's blocks joins the nearest of those clusters — except that clusters still empty
    are given to the epoch's keys in (block, priority) order. ``causal=False``: one clustering
    of every key (Euclidean).

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), key_valid (B,Nk) bool → (B,Hk,E,Nk) int64, E =
    ``key_epochs`` (0 for padded keys and keys an epoch does not use).
    """
    cdt = compute_dtype(q)
    B, H, Nq, D = q.shape
    Hk, Nk, C = k.shape[1], k.shape[2], spec.clusters
    G, nb = H // Hk, nblocks(Nk, block)
    planes = plan.planes.cpu()
    out = torch.zeros(B, Hk, key_epochs(nb, causal), Nk, dtype=torch.int64)
    for bi in range(B):
        valid = [j for j in range(Nk) if key_valid[bi, j]]
        for hk in range(Hk):
            keys = k[bi, hk].detach().cpu().to(cdt)
            prio = plan.key_priority[bi * Hk + hk].cpu()
            if not causal:
                x = keys[valid]
                codes = _codes(x, x.mean(0) if valid else 0, None, planes)
                a, _, _ = _lloyd(x, codes, torch.full((len(valid),), -1), range(len(valid)),
                                 prio[valid], spec, None, C)
                out[bi, hk, 0, valid] = a
                continue
            state = torch.full((Nk,), -1, dtype=torch.int64)
            for e, (r, end) in enumerate(epochs(nb), start=1):
                pre = [j for j in valid if j < r * block]
                ep = [j for j in valid if r * block <= j < end * block]
                metric = None
                if spec.metric == "attention":
                    qs = [q[bi, hk * G + g, i] for g in range(G) for i in range(min(r * block,
                                                                                      Nq))
                          if key_valid[bi, i]]
                    metric = _second_moment(torch.stack(qs).detach().cpu().to(cdt)) if qs \
                        else None
                x = keys[pre]
                centre = x.mean(0) if pre else torch.zeros(D, dtype=cdt)
                codes = _codes(keys, centre, metric, planes)
                new = [n for n, j in enumerate(pre) if j >= (r // 2) * block]
                a, stats, hamming = _lloyd(x, codes[pre], state[pre], new, prio[pre], spec,
                                           metric, C)
                state[pre] = a
                free = [c for c in range(C) if stats[1][c] == 0]
                order = sorted(ep, key=lambda j: (j // block, float(prio[j]), j))
                seeded = dict(zip(order, free, strict=False))
                if ep:
                    near = _nearest(keys[ep], codes[ep], *stats, metric, hamming)
                    state[ep] = torch.tensor([seeded.get(j, int(n)) for j, n in zip(ep, near)])
                out[bi, hk, e, pre + ep] = state[pre + ep]
    return out.to(q.device)


def cluster_queries(q, k, query_valid, key_valid, spec: ClusteringSpec, block: int,
                    causal: bool, plan: Plan):
    """Causal query clustering for the i-clustered selection: at the start of epoch e (blocks
    [r, 2r)) the codebook is updated with the queries before block r (``_lloyd``; metric: the
    covariance of the keys before block r, or of all keys when ``causal=False``), and every
    query of the epoch is assigned to the nearest of those clusters (never seeding one: a
    centroid must not be a later query).

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), query_valid (B,Nq), key_valid (B,Nk) →
    assignments (B,H,Nq) int64 (0 in block 0), centroids (B,H,nb,C,D) and exists (B,H,nb,C)
    bool: the codebook each block was assigned with.
    """
    cdt = compute_dtype(q)
    B, H, Nq, D = q.shape
    Hk, C = k.shape[1], spec.clusters
    G, nb = H // Hk, nblocks(Nq, block)
    planes = plan.planes.cpu()
    assign = torch.zeros(B, H, Nq, dtype=torch.int64)
    cents = torch.zeros(B, H, nb, C, D, dtype=cdt)
    exists = torch.zeros(B, H, nb, C, dtype=torch.bool)
    for bi in range(B):
        valid = [i for i in range(Nq) if query_valid[bi, i]]
        for h in range(H):
            xs = q[bi, h].detach().cpu().to(cdt)
            keys = k[bi, h // G].detach().cpu().to(cdt)
            prio = plan.query_priority[bi * H + h].cpu()
            state = torch.full((Nq,), -1, dtype=torch.int64)
            for r, end in epochs(nb):
                pre = [i for i in valid if i < r * block]
                seen = [j for j in range(keys.shape[0])
                        if key_valid[bi, j] and (not causal or j < r * block)]
                metric = _covariance(keys[seen]) if spec.metric == "attention" else None
                centre = xs[pre].mean(0) if pre else torch.zeros(D, dtype=cdt)
                codes = _codes(xs, centre, metric, planes)
                new = [n for n, i in enumerate(pre) if i >= (r // 2) * block]
                a, stats, hamming = _lloyd(xs[pre], codes[pre], state[pre], new, prio[pre],
                                           spec, metric, C)
                state[pre] = a
                sums, counts = stats[0], stats[1]
                exists[bi, h, r:end] = counts > 0
                cents[bi, h, r:end] = sums / counts.clamp(min=1)[:, None]
                lo, hi = r * block, min(Nq, end * block)
                assign[bi, h, lo:hi] = _nearest(xs[lo:hi], codes[lo:hi], *stats, metric,
                                                hamming)
                ep = [i for i in valid if lo <= i < hi]
                state[ep] = assign[bi, h, ep]
    dev = q.device
    return assign.to(dev), cents.to(dev), exists.to(dev)


def select_topk(k, key_valid, centroids, exists, topk: int, scale: float, block: int,
                causal: bool) -> torch.Tensor:
    """For each block β and query cluster c: the ``topk`` far keys (j < β·block, or every key
    when ``causal=False``) with the highest ``s·Q̄_βc·k_j``; -1 where there are fewer.

    Shapes: k (B,Hk,Nk,D), key_valid (B,Nk), centroids (B,H,nb,C,D), exists (B,H,nb,C)
    → (B,H,nb,C,min(topk, Nk)) int64.
    """
    B, H, nb, C, _ = centroids.shape
    Hk, Nk = k.shape[1], k.shape[2]
    kk = min(topk, Nk)
    out = torch.full((B, H, nb, C, kk), -1, dtype=torch.int64)
    for bi in range(B):
        for h in range(H):
            keys = k[bi, h // (H // Hk)].detach().cpu().to(centroids.dtype)
            for beta in range(nb):
                far = [j for j in range(Nk) if key_valid[bi, j] and (
                    not causal or j < beta * block)]
                for c in range(C):
                    if not exists[bi, h, beta, c] or not far:
                        continue
                    scores = scale * (keys[far] @ centroids[bi, h, beta, c].cpu())
                    top = scores.topk(min(kk, len(far))).indices
                    out[bi, h, beta, c, :len(top)] = torch.tensor(far)[top]
    return out.to(k.device)


# --------------------------------------------------------------------------- attention


def effective_logits(q, k, key_valid, key_assign, query_assign, topk_idx, clusters, scale,
                     block, causal):
    """The Nq×Nk logits the approximation gives (module docstring): exact on local and
    selected keys, the cluster-mean logit on the other far keys, -inf on the rest.

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), key_valid (B,Nk), key_assign (B,Hk,E,Nk) (query
    block β reads epoch ``epoch_of(β)``, or 0 when ``causal=False``), query_assign (B,H,Nq),
    topk_idx (B,H,nb,C,kk) → (B,H,Nq,Nk) in the compute dtype.
    """
    cdt = compute_dtype(q)
    B, H, Nq, D = q.shape
    G, Nk = H // k.shape[1], k.shape[2]
    q, k = q.to(cdt), k.to(cdt).repeat_interleave(G, dim=1)
    i = torch.arange(Nq, device=q.device)[:, None]
    j = torch.arange(Nk, device=q.device)[None, :]
    start = (i // block) * block
    valid = key_valid[:, None, None, :]
    local = ((j >= start) & (j <= i) if causal else torch.zeros_like(j >= i)) & valid
    far = ((j < start) if causal else torch.ones_like(j >= i)) & valid
    selected = torch.zeros(B, H, Nq, Nk + 1, dtype=torch.bool, device=q.device)
    if topk_idx.shape[-1]:
        rows = topk_idx[torch.arange(B)[:, None, None], torch.arange(H)[None, :, None],
                        (i[:, 0] // block)[None, None, :], query_assign]  # (B,H,Nq,kk)
        selected.scatter_(-1, torch.where(rows < 0, Nk, rows), True)
    selected = selected[..., :-1] & far
    rem = (far & ~selected).to(cdt)
    per_key = torch.full((B, H, Nq, Nk), float("-inf"), dtype=cdt, device=q.device)
    epoch = torch.tensor([epoch_of(int(x)) if causal else 0 for x in i[:, 0] // block])
    for e in range(key_assign.shape[2]):
        rows_e = (epoch == e).nonzero()[:, 0].to(q.device)  # the queries of epoch e
        ak = key_assign[:, :, e].repeat_interleave(G, dim=1)  # (B,H,Nk)
        one_hot = torch.nn.functional.one_hot(ak, clusters).to(cdt)  # (B,H,Nk,C)
        r = rem[:, :, rows_e]
        counts = r @ one_hot  # (B,H,n_e,C): far unselected members per cluster
        sums = (r @ (one_hot[..., None] * k[..., None, :]).flatten(-2)).unflatten(
            -1, (clusters, D))  # (B,H,n_e,C,D)
        means = sums / counts.clamp(min=1)[..., None]
        mean_logit = scale * torch.einsum("bhid,bhicd->bhic", q[:, :, rows_e], means)
        per_key[:, :, rows_e] = mean_logit.gather(-1, ak[:, :, None, :].expand(
            B, H, rows_e.numel(), Nk))
    exact = scale * q @ k.transpose(-1, -2)
    return torch.where(local | selected, exact,
                       torch.where(rem > 0, per_key, torch.full_like(exact, float("-inf"))))


def attention_from_choices(q, k, v, key_valid, key_assign, query_assign, topk_idx, clusters,
                           scale, block, causal, differentiable=True):
    """``softmax(effective_logits) V`` (always differentiable: ``differentiable`` is accepted
    for the implementations' common signature). Shapes: as ``effective_logits``,
    v (B,Hk,Nk,Dv) → (B,H,Nq,Dv) in q's dtype."""
    logits = effective_logits(q, k, key_valid, key_assign, query_assign, topk_idx, clusters,
                              scale, block, causal)
    G = q.shape[1] // k.shape[1]
    v = v.to(logits.dtype).repeat_interleave(G, dim=1)
    return (safe_softmax(logits) @ v).to(q.dtype)
