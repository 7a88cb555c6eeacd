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

from clusterfx.ops.causal_clustered.common import Plan, hash_projection, nblocks
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
    sums = torch.zeros(clusters, x.shape[-1], dtype=x.dtype)
    counts = torch.zeros(clusters, dtype=x.dtype)
    votes = torch.zeros(clusters, codes.shape[-1], dtype=x.dtype)
    for i in range(x.shape[0]):
        sums[a[i]] += x[i]
        counts[a[i]] += 1
        votes[a[i]] += codes[i]
    return sums, counts, votes


def _seeds(x, codes, priority, counts, clusters):
    """Empty clusters, in index order, take the rows of x by increasing priority."""
    sums = torch.zeros(clusters, x.shape[-1], dtype=x.dtype)
    seeded = torch.zeros(clusters, dtype=x.dtype)
    votes = torch.zeros(clusters, codes.shape[-1], dtype=x.dtype)
    order = sorted(range(x.shape[0]), key=lambda i: (float(priority[i]), i))
    empty = [c for c in range(clusters) if counts[c] == 0]
    for c, i in zip(empty, order, strict=False):
        sums[c], seeded[c], votes[c] = x[i], 1, codes[i]
    return sums, seeded, votes


# --------------------------------------------------------------------------- clustering


def cluster_keys(q, k, key_valid, spec: ClusteringSpec, block: int, causal: bool,
                 plan: Plan) -> torch.Tensor:
    """Streaming k-means of the keys, block by block (the package docstring, "Clustering").

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), key_valid (B,Nk) bool → (B,Hk,Nk) int64 (0 for
    padded keys).
    """
    cdt = compute_dtype(q)
    B, H, Nq, D = q.shape
    Hk, Nk, C = k.shape[1], k.shape[2], spec.clusters
    G, hamming = H // Hk, spec.clustering == "hamming"
    planes = plan.planes.cpu()
    out = torch.zeros(B, Hk, Nk, dtype=torch.int64)
    for bi in range(B):
        for hk in range(Hk):
            keys = k[bi, hk].detach().cpu().to(cdt)
            prio = plan.key_priority[bi * Hk + hk].cpu()
            sums, counts = torch.zeros(C, D, dtype=cdt), torch.zeros(C, dtype=cdt)
            votes = torch.zeros(C, planes.shape[0], dtype=cdt)
            for beta in range(nblocks(Nk, block)):
                lo, hi = beta * block, min(Nk, (beta + 1) * block)
                pos = [j for j in range(lo, hi) if key_valid[bi, j]]
                if not pos:
                    continue
                x = keys[pos]
                metric = None
                if causal and spec.metric == "attention":  # queries of blocks <= beta
                    qs = [q[bi, hk * G + g, i] for g in range(G) for i in range(hi)
                          if key_valid[bi, i]]
                    metric = _second_moment(torch.stack(qs).detach().cpu().to(cdt))
                seen = [j for j in range(hi) if key_valid[bi, j]]
                codes = _codes(x, keys[seen].mean(0), metric, planes)
                s_b, n_b, v_b = _seeds(x, codes, prio[pos], counts, C)
                for _ in range(spec.iterations):
                    a = _nearest(x, codes, sums + s_b, counts + n_b, votes + v_b, metric,
                                 hamming)
                    s_b, n_b, v_b = _contributions(x, codes, a, C)
                for _ in range(spec.refine):
                    a = _nearest(x, codes, sums + s_b, counts + n_b, votes + v_b, metric, False)
                    s_b, n_b, v_b = _contributions(x, codes, a, C)
                sums, counts, votes = sums + s_b, counts + n_b, votes + v_b
                out[bi, hk, pos] = a
    return out.to(q.device)


def cluster_queries(q, k, query_valid, key_valid, spec: ClusteringSpec, block: int,
                    causal: bool, plan: Plan):
    """Causal query clustering for the i-clustered selection: block β's queries are assigned
    to the nearest centroid of the clusters of the queries of blocks < β (a frozen codebook),
    then the block joins the codebook (empty clusters seeded by priority).

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), query_valid (B,Nq), key_valid (B,Nk) →
    assignments (B,H,Nq) int64 (0 in the first block), centroids (B,H,nb,C,D) and exists
    (B,H,nb,C) bool: the codebook each block was assigned with.
    """
    cdt = compute_dtype(q)
    B, H, Nq, D = q.shape
    Hk, C = k.shape[1], spec.clusters
    G, hamming, nb = H // Hk, spec.clustering == "hamming", nblocks(Nq, block)
    planes = plan.planes.cpu()
    assign = torch.zeros(B, H, Nq, dtype=torch.int64)
    cents = torch.zeros(B, H, nb, C, D, dtype=cdt)
    exists = torch.zeros(B, H, nb, C, dtype=torch.bool)
    for bi in range(B):
        for h in range(H):
            xs = q[bi, h].detach().cpu().to(cdt)
            keys = k[bi, h // G].detach().cpu().to(cdt)
            prio = plan.query_priority[bi * H + h].cpu()
            sums, counts = torch.zeros(C, D, dtype=cdt), torch.zeros(C, dtype=cdt)
            votes = torch.zeros(C, planes.shape[0], dtype=cdt)
            for beta in range(nb):
                lo, hi = beta * block, min(Nq, (beta + 1) * block)
                exists[bi, h, beta] = counts > 0
                cents[bi, h, beta] = sums / counts.clamp(min=1)[:, None]
                visible = [j for j in range(keys.shape[0])
                           if key_valid[bi, j] and (not causal or j < lo)]
                metric = _covariance(keys[visible]) if spec.metric == "attention" else None
                before = [i for i in range(lo) if query_valid[bi, i]]
                centre = xs[before].mean(0) if before else torch.zeros(D, dtype=cdt)
                x = xs[lo:hi]
                codes = _codes(x, centre, metric, planes)
                if bool((counts > 0).any()):
                    assign[bi, h, lo:hi] = _nearest(x, codes, sums, counts, votes, metric,
                                                    hamming)
                rows = [i - lo for i in range(lo, hi) if query_valid[bi, i]]
                if not rows:
                    continue
                s_b, n_b, v_b = _seeds(x[rows], codes[rows], prio[lo:hi][rows], counts, C)
                a = _nearest(x[rows], codes[rows], sums + s_b, counts + n_b, votes + v_b,
                             metric, hamming)
                s_b, n_b, v_b = _contributions(x[rows], codes[rows], a, C)
                sums, counts, votes = sums + s_b, counts + n_b, votes + v_b
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

    Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), key_valid (B,Nk), key_assign (B,Hk,Nk),
    query_assign (B,H,Nq), topk_idx (B,H,nb,C,kk) → (B,H,Nq,Nk) in the compute dtype.
    """
    cdt = compute_dtype(q)
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    q, k = q.to(cdt), k.to(cdt).repeat_interleave(G, dim=1)
    ak = key_assign.repeat_interleave(G, dim=1)  # (B,H,Nk)
    i = torch.arange(Nq, device=q.device)[:, None]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    start = (i // block) * block
    valid = key_valid[:, None, None, :]
    local = ((j >= start) & (j <= i) if causal else torch.zeros_like(j >= i)) & valid
    far = ((j < start) if causal else torch.ones_like(j >= i)) & valid
    selected = torch.zeros(B, H, Nq, k.shape[2] + 1, dtype=torch.bool, device=q.device)
    if topk_idx.shape[-1]:
        rows = topk_idx[torch.arange(B)[:, None, None], torch.arange(H)[None, :, None],
                        (i[:, 0] // block)[None, None, :], query_assign]  # (B,H,Nq,kk)
        selected.scatter_(-1, torch.where(rows < 0, k.shape[2], rows), True)
    selected = selected[..., :-1] & far
    rem = (far & ~selected).to(cdt)
    one_hot = torch.nn.functional.one_hot(ak, clusters).to(cdt)  # (B,H,Nk,C)
    counts = rem @ one_hot  # (B,H,Nq,C)
    sums = (rem @ (one_hot[..., None] * k[..., None, :]).flatten(-2)).unflatten(-1, (
        clusters, D))  # (B,H,Nq,C,D)
    means = sums / counts.clamp(min=1)[..., None]
    mean_logit = scale * torch.einsum("bhid,bhicd->bhic", q, means)
    per_key = mean_logit.gather(-1, ak[:, :, None, :].expand(B, H, Nq, -1))
    exact = scale * q @ k.transpose(-1, -2)
    ninf = torch.full_like(exact, float("-inf"))
    return torch.where(local | selected, exact, torch.where(rem > 0, per_key, ninf))


def attention_from_choices(q, k, v, key_valid, key_assign, query_assign, topk_idx, clusters,
                           scale, block, causal):
    """``softmax(effective_logits) V``. Shapes: as ``effective_logits``, v (B,Hk,Nk,Dv) →
    (B,H,Nq,Dv) in q's dtype."""
    logits = effective_logits(q, k, key_valid, key_assign, query_assign, topk_idx, clusters,
                              scale, block, causal)
    G = q.shape[1] // k.shape[1]
    v = v.to(logits.dtype).repeat_interleave(G, dim=1)
    return (safe_softmax(logits) @ v).to(q.dtype)
