"""Query clustering for clustered attention: LSH hashing plus Hamming or Euclidean k-means.

The public API validates its arguments, draws *all* randomness, and dispatches to a backend
(``impl``): "reference" (``reference.py``, the oracle), "cpu" (``fused.py``: the fused C++ kernels
of ``csrc/clustering.cpp``, one parallel region per call; CPU tensors), "torch" (``cpu.py``:
vectorised torch, any device), "triton" (CUDA kernels for hashing and Hamming assignment,
imported lazily from ``clusterfx.ops.clustering.triton``), or "auto" (triton on CUDA, else cpu;
torch, with a warning, where the C++ kernels cannot be built). ``popcount`` has no kernel of its
own: every impl but "reference" runs the torch bit tricks. Randomness is drawn
on the CPU from a ``torch.Generator`` seeded with ``seed`` (``seed=-1``: torch's global RNG, so
``torch.manual_seed`` controls it) and handed to the backend as plain positions, so every backend
on every device gives the same clusters for the same seed.

Algorithm (fast-transformers' clustered attention, reference notes §1.1):

* hash: bit b of h(x) is ``[x·a_b[:D] > a_b[D]]`` for hyperplanes ``a_b ~ N(0, I)``;
* Hamming k-means: C centroids initialised from the codes of C distinct random valid queries;
  ``iterations - 1`` rounds of (assign to the nearest centroid by ``popcount(h XOR c)``, ties to
  the lowest index; recompute each centroid bit by majority vote, tie → 0), then a final assign.
  An empty cluster is re-seeded with the code of a random valid query;
* Euclidean k-means: the same loop on vectors, with means instead of votes.

clusterfx's additions (``cluster_queries``): a ``metric`` M — ``attention_metric(k)``, the
covariance of the valid keys, under which ``(x - y)ᵀ M (x - y)`` is the variance over the keys
of two queries' logit gap — in which to cluster instead of the raw query space (the hash becomes
the centred SimHash of ``q M^½``, k-means runs on ``q M^½``), and ``refine`` Lloyd steps after
the clustering (``lloyd_refine``, distances in M).

Padding: queries with ``valid = False`` join no vote, no mean and no count; they get assignment 0.
More clusters than (valid) queries: C is clamped to the number of valid queries with a warning;
the returned counts keep all C columns (the extra clusters stay empty) so shapes are static.
"""

from __future__ import annotations

import warnings

import torch

from clusterfx.ops.clustering import cpu, fused, reference
from clusterfx.ops.clustering.checks import check_clustering, check_hashes, check_planes
from clusterfx.ops.clustering.spec import ClusteringSpec
from clusterfx.ops.common import native, telemetry
from clusterfx.ops.common.checks import (
    NATIVE_IMPLS,
    check_bits,
    check_float,
    check_int,
    check_positive_int,
    check_seed,
    check_valid,
)
from clusterfx.ops.common.dispatch import resolve_impl as _resolve
from clusterfx.ops.common.telemetry import counters

# the exact ±1 GEMMs of Hamming k-means and the blocked nearest-centroid search, for k-means
# that runs split over processes (ops/sequence_parallel's global clustering)
HammingGemm = cpu._HammingGemm
nearest_centroids = cpu.nearest_centroids
pack_signs = cpu.pack_signs
unpack_signs = cpu.unpack_signs

NATIVE_LIBRARY = fused.LIB  # the fused kernels (ops/build.py builds them)

__all__ = ["METRIC_KEYS", "NATIVE_LIBRARY", "ClusteringSpec", "HammingGemm", "attention_metric",
           "cluster_queries", "cluster_with", "counters", "euclidean_kmeans", "hamming_kmeans",
           "lloyd_refine", "lsh_hash", "make_planes", "metric_root", "nearest_centroids",
           "pack_signs", "popcount", "random_draws", "unpack_signs"]

METRIC_KEYS = 4096  # keys per row that attention_metric's covariance reads, at most
IMPLS = NATIVE_IMPLS


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that runs (see the module docstring); explicit ones never fall back."""
    return _resolve(impl, device, IMPLS, fused.LIB)


def _generator(seed: int) -> torch.Generator | None:
    return None if seed == -1 else torch.Generator().manual_seed(seed)


def _draw_planes(bits: int, dim: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randn(bits, dim + 1, generator=gen, dtype=torch.float64)


def make_planes(bits: int, dim: int, seed: int = -1, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random hyperplanes with a bias column, ``planes[b] = (a_b, t_b) ~ N(0, I_{D+1})``.

    Drawn in float64 on the CPU from ``torch.Generator().manual_seed(seed)`` (``seed=-1``: the
    global RNG) and then moved, so the planes do not depend on ``device`` or ``dtype``.

    Shapes: → (bits, dim + 1).
    """
    check_bits(bits)
    check_positive_int("dim", dim)
    check_seed(seed)
    return _draw_planes(bits, dim, _generator(seed)).to(device=device, dtype=dtype)


def popcount(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Number of set bits of each int64 (two's complement). Shapes: (...) → (...) int64."""
    check_hashes(x)
    backend = resolve_impl(impl, x.device)
    return reference.popcount(x) if backend == "reference" else cpu.popcount(x)


def lsh_hash(x: torch.Tensor, planes: torch.Tensor, impl: str = "auto",
             metric: torch.Tensor | None = None,
             centre_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hash each row: bit b is ``[x·planes[b, :D] > planes[b, D]]``; with a ``metric`` M, the
    centred SimHash of ``x M^½`` (see ``cluster_queries``).

    Shapes: x (..., N, D), planes (bits, D+1), metric (..., D, D) or None, centre_mask
    (..., N) bool or None → (..., N) int64 in [0, 2**bits).
    """
    check_float("x", x, 2)
    check_planes(planes, x.shape[-1])
    *batch, N, D = x.shape
    _check_metric(metric, batch, D)
    check_valid(centre_mask, (*batch, N), "centre_mask")
    backend = resolve_impl(impl, x.device)
    telemetry.record("lsh_hash", backend)
    if backend == "cpu":
        root = None if metric is None else _root_for(metric, x)
        return fused.lsh_hash(x, planes, root, centre_mask)
    if metric is not None:
        root = _root_for(metric, x).expand(*batch, D, D)
        return (reference if backend == "reference" else cpu).lsh_hash(x, planes, root,
                                                                       centre_mask)
    if backend == "triton":
        from clusterfx.ops.clustering import triton as _tr

        return _tr.lsh_hash(x, planes.to(device=x.device, dtype=torch.float32))
    return (reference if backend == "reference" else cpu).lsh_hash(x, planes)


def _clamp_warning(clusters: int, n: int, valid: torch.Tensor | None) -> None:
    """Warn (never fail) when there are fewer (valid) queries than clusters."""
    fewest = n if valid is None or valid.numel() == 0 else int(valid.sum(-1).min())
    if clusters > fewest:
        what = "queries" if valid is None else "valid queries in some row"
        telemetry.event("clusters_clamped")
        warnings.warn(f"clusters ({clusters}) exceeds the number of {what} ({fewest}); using "
                      f"at most {fewest} clusters there, the others stay empty", stacklevel=3)


def _kmeans_plan(valid: torch.Tensor, all_valid: bool, clusters: int, iterations: int,
                 gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every random choice k-means will make, drawn up front.

    * init: C distinct valid positions per row (the C smallest of random keys, padded last);
    * reseed: for each of the ``iterations - 1`` rounds and each cluster, a random valid query;
    * active: cluster j of row r exists iff j < (number of valid queries of r).

    Shapes: valid (R, N) → init_idx (R, C), reseed_idx (iterations-1, R, C), active (R, C).
    """
    R, N = valid.shape
    device = valid.device
    keys = torch.rand(R, N, generator=gen, dtype=torch.float64).to(device)
    if not all_valid:
        keys = keys.masked_fill(~valid, 2.0)
    init_idx = keys.topk(min(clusters, N), dim=-1, largest=False, sorted=True).indices
    if clusters > N:
        init_idx = torch.cat([init_idx, init_idx.new_zeros(R, clusters - N)], 1)
    n_valid = valid.sum(-1)
    active = torch.arange(clusters, device=device) < n_valid[:, None]
    u = torch.rand(iterations - 1, R, clusters, generator=gen, dtype=torch.float64).to(device)
    rank = (u * n_valid[:, None]).long().clamp(max=(n_valid - 1).clamp(min=0)[:, None])
    if all_valid:
        return init_idx, rank, active
    valid_first = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    reseed_idx = torch.gather(valid_first.expand(iterations - 1, R, N), -1, rank)
    return init_idx, reseed_idx, active


def _check_kmeans_args(clusters: int, iterations: int, seed: int, n: int) -> None:
    check_positive_int("clusters", clusters)
    check_positive_int("iterations", iterations)
    check_seed(seed)
    if n < 1:
        raise ValueError(f"the number of queries ({n}) must be at least 1 to cluster")


def _triton_assign(hashes: torch.Tensor, bits: int):
    """Nearest-centroid step on the Triton kernel: packs the ±1 centroids into int64 codes."""
    from clusterfx.ops.clustering import triton as _tr

    codes = hashes & ((1 << bits) - 1)
    return lambda cent: _tr.hamming_assign(codes, cpu.pack_signs(cent))


def hamming_kmeans(hashes: torch.Tensor, clusters: int, iterations: int = 10, bits: int = 63,
                   seed: int = -1, valid: torch.Tensor | None = None,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """K-means of hash codes under the Hamming distance (module docstring has the algorithm).

    Only the low ``bits`` bits of each code take part.

    Shapes: hashes (..., N) int64, valid (..., N) bool or None →
    assignments (..., N) int64 in [0, C), counts (..., C) int64 (valid members per cluster).
    """
    check_hashes(hashes)
    check_bits(bits)
    _check_kmeans_args(clusters, iterations, seed, hashes.shape[-1])
    check_valid(valid, hashes.shape)
    backend = resolve_impl(impl, hashes.device)
    *batch, N = hashes.shape
    h = hashes.reshape(-1, N)
    v = torch.ones_like(h, dtype=torch.bool) if valid is None else valid.reshape(-1, N)
    _clamp_warning(clusters, N, valid)
    telemetry.record("hamming_kmeans", backend)
    plan = _kmeans_plan(v, valid is None, clusters, iterations, _generator(seed))
    if backend == "reference":
        a, c = reference.hamming_kmeans(h, *plan, v, bits)
    elif backend == "cpu":
        a, c = fused.hamming_kmeans(h, *plan, v, bits)
    elif backend == "torch":
        a, c = cpu.hamming_kmeans(h, *plan, v, bits)
    else:
        a, c = cpu.hamming_kmeans_signs(cpu.unpack_signs(h, bits), *plan, v,
                                        assign_fn=_triton_assign(h, bits))
    return a.view(*batch, N), c.view(*batch, clusters)


def euclidean_kmeans(x: torch.Tensor, clusters: int, iterations: int = 10, seed: int = -1,
                     valid: torch.Tensor | None = None,
                     impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``x`` (float64 for float64 inputs, float32 otherwise).

    There is no Triton kernel for it: with ``impl="triton"`` the vectorised torch code runs on
    the tensor's device (its distances are one batched GEMM).

    Shapes: x (..., N, D), valid (..., N) bool or None →
    assignments (..., N) int64, counts (..., C) int64.
    """
    check_float("x", x, 2)
    _check_kmeans_args(clusters, iterations, seed, x.shape[-2])
    check_valid(valid, x.shape[:-1])
    backend = resolve_impl(impl, x.device)
    *batch, N, D = x.shape
    xr = x.reshape(-1, N, D)
    v = torch.ones(xr.shape[:2], dtype=torch.bool, device=x.device) if valid is None \
        else valid.reshape(-1, N)
    _clamp_warning(clusters, N, valid)
    telemetry.record("euclidean_kmeans", backend)
    plan = _kmeans_plan(v, valid is None, clusters, iterations, _generator(seed))
    mod = {"reference": reference, "cpu": fused}.get(backend, cpu)
    a, c = mod.euclidean_kmeans(xr, *plan, v)
    return a.view(*batch, N), c.view(*batch, clusters)


def attention_metric(k: torch.Tensor, heads: int | None = None,
                     key_padding_mask: torch.Tensor | None = None,
                     max_keys: int = METRIC_KEYS) -> torch.Tensor:
    """The metric in which two queries are close when their attention rows are: the covariance
    of the (valid) keys, ``M = Cov(k)``.

    Queries x and y give key l the logits x·k_l and y·k_l; softmax ignores a shift shared by
    all keys, so what tells their attention rows apart is the spread over the keys of the
    logit gap (x - y)·k_l, whose variance is ``(x - y)ᵀ M (x - y)``. Clustering under M
    instead of the plain Euclidean distance puts together the queries that attend alike.

    Rows with more than ``max_keys`` keys use every ⌈Nk / max_keys⌉-th key (deterministic).
    A row without valid keys gets M = 0. Computed in float64 for float64 keys, float32
    otherwise; GQA: query head h uses key head ``h // (heads / Hk)``.

    Shapes: k (B, Hk, Nk, D), key_padding_mask (B, Nk) bool (True = keep) →
    (B, heads, D, D) (heads defaults to Hk).
    """
    check_float("k", k, 4, exact_rank=True)
    B, Hk, Nk, D = k.shape
    heads = Hk if heads is None else heads
    check_positive_int("heads", heads)
    if heads % Hk:
        raise ValueError(f"heads ({heads}) must be a multiple of the key heads ({Hk})")
    check_positive_int("max_keys", max_keys)
    check_valid(key_padding_mask, (B, Nk), "key_padding_mask")
    step = -(-Nk // max_keys)
    kf = k[:, :, ::step].to(torch.float64 if k.dtype == torch.float64 else torch.float32)
    if key_padding_mask is None:
        w = kf.new_ones(B, 1, kf.shape[2], 1)
    else:
        w = key_padding_mask[:, None, ::step, None].to(kf.dtype)
    n = w.sum(2, keepdim=True).clamp_min(1)  # (B, 1, 1, 1)
    centred = (kf - (kf * w).sum(2, keepdim=True) / n) * w
    cov = centred.transpose(-1, -2) @ centred / n  # (B, Hk, D, D)
    return cov.repeat_interleave(heads // Hk, dim=1) if heads != Hk else cov


def metric_root(metric: torch.Tensor) -> torch.Tensor:
    """The symmetric square root ``M^½ = V √Λ Vᵀ`` of a symmetric positive semi-definite
    matrix (negative eigenvalues from rounding count as 0). Unique, so it does not depend on
    the eigen-solver's choice of eigenvector signs. Solved in float64 and returned in the
    metric's dtype. A matrix with a NaN or infinite entry (keys that overflowed or hold NaN)
    gets the identity, i.e. the Euclidean geometry, instead of an eigen-solver failure.

    Shapes: (..., D, D) → (..., D, D)."""
    m = metric.to(torch.float64)
    finite = torch.isfinite(m).all(-1).all(-1)[..., None, None]
    m = torch.where(finite, m, torch.eye(m.shape[-1], dtype=m.dtype, device=m.device))
    evals, evecs = torch.linalg.eigh(m)
    root = (evecs * evals.clamp_min(0).sqrt()[..., None, :]) @ evecs.transpose(-1, -2)
    return root.to(metric.dtype)


def _root_for(metric: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``metric_root(metric)`` in x's working dtype (float64 for float64 x, float32 otherwise)."""
    return metric_root(metric.to(torch.float64 if x.dtype == torch.float64 else torch.float32))


def _check_metric(metric: torch.Tensor | None, batch: list[int], dim: int) -> None:
    if metric is None:
        return
    check_float("metric", metric, 2)
    if tuple(metric.shape[-2:]) != (dim, dim):
        raise ValueError(f"metric has shape {tuple(metric.shape)}; expected (..., {dim}, {dim})")
    try:
        torch.broadcast_shapes(tuple(metric.shape[:-2]), tuple(batch))
    except RuntimeError:
        raise ValueError(f"metric's batch shape {tuple(metric.shape[:-2])} does not broadcast "
                         f"to the queries' {tuple(batch)}") from None


def _rows(metric: torch.Tensor | None, batch: list[int], dim: int) -> torch.Tensor | None:
    """metric (..., D, D) broadcast to the queries' batch and flattened to (R, D, D)."""
    if metric is None:
        return None
    return metric.expand(*batch, dim, dim).reshape(-1, dim, dim)


def lloyd_refine(x: torch.Tensor, assignments: torch.Tensor, clusters: int, steps: int,
                 metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` Lloyd iterations started from a given clustering (e.g. Hamming K-means):
    centroid = mean of its members, each query to the nearest centroid (ties to the lowest
    index); empty clusters stay empty. Distances are Euclidean, or ``(x - m)ᵀ M (x - m)``
    with a ``metric`` M (see ``attention_metric``). Costs one N×C×D matmul a step. Plain
    torch (float32), any device.

    Shapes: x (..., N, D), assignments (..., N) int64, metric (..., D, D) or None →
    (assignments, counts (..., C)).
    """
    *batch, n, d = x.shape
    _check_metric(metric, batch, d)
    xf = x.reshape(-1, n, d).float()
    rows = xf.shape[0]
    m = _rows(metric, batch, d)
    m = None if m is None else m.float()
    a = assignments.reshape(rows, n)
    offsets = torch.arange(rows, device=x.device)[:, None] * clusters  # (R, 1)
    flat_x = xf.reshape(rows * n, d)
    for _ in range(steps):
        slots = (a + offsets).reshape(-1)  # (R*N,) row-major cluster slots
        sums = xf.new_zeros(rows * clusters, d).index_add_(0, slots, flat_x)
        counts = torch.bincount(slots, minlength=rows * clusters).view(rows, clusters)
        means = (sums.view(rows, clusters, d) / counts.clamp_min(1)[..., None])
        mapped = means if m is None else means @ m  # M m (M is symmetric)
        # (x - m)ᵀM(x - m) up to the per-query xᵀMx, which does not change the argmin; an
        # empty cluster's constant term is +inf, so no query joins it
        const = (means * mapped).sum(-1).masked_fill_(counts == 0, float("inf"))
        a = cpu.nearest_centroids(xf, mapped, const)
    counts = torch.bincount((a + offsets).reshape(-1), minlength=rows * clusters)
    return a.view(*batch, n), counts.view(*batch, clusters)


def cluster_queries(q: torch.Tensor, clusters: int, *, iterations: int = 10, bits: int = 63,
                    seed: int = -1, clustering: str = "hamming", refine: int = 0,
                    metric: torch.Tensor | None = None, centre_mask: torch.Tensor | None = None,
                    impl: str = "auto",
                    draw_rows: tuple[int, torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the queries of every row, as clustered attention does.

    ``clustering="hamming"``: hash with ``bits`` random hyperplanes, then Hamming k-means;
    ``"kmeans"``: Euclidean k-means on the queries themselves. One generator seeded with
    ``seed`` draws the hyperplanes and then the k-means choices. ``refine`` Lloyd steps
    follow (``lloyd_refine``).

    ``metric`` (..., D, D), e.g. ``attention_metric(k)``: cluster in that geometry instead of
    the Euclidean one — the hash is the SimHash of ``(q - q̄) M^½`` (q̄: the mean of the
    queries ``centre_mask`` marks, default all; ``cpu.lsh_signs``), k-means runs on ``q M^½``,
    and the refinement measures ``(x - m)ᵀ M (x - m)``. None: the paper's method on the raw
    queries (``centre_mask`` is then unused).

    ``draw_rows=(total, rows)``: the rows (batch × heads, flattened) of ``q`` are rows ``rows``
    of a batch of ``total`` rows, and take that batch's random choices (the hyperplanes are
    shared; the k-means plan is per row): sequence parallelism clusters a rank's heads as one
    process clusters them among all heads.

    Shapes: q (..., N, D), metric (..., D, D) or None, centre_mask (..., N) bool or None,
    rows (R,) int64 with R = the product of q's batch dims → assignments (..., N) int64,
    counts (..., C) int64.
    """
    check_float("q", q, 2)
    check_clustering(clustering)
    check_bits(bits)
    _check_kmeans_args(clusters, iterations, seed, q.shape[-2])
    check_int("refine", refine, 0)
    *batch, N, D = q.shape
    _check_metric(metric, batch, D)
    check_valid(centre_mask, (*batch, N), "centre_mask")
    backend = resolve_impl(impl, q.device)
    x = q.reshape(-1, N, D)
    centre = None if centre_mask is None else centre_mask.reshape(-1, N)
    m = _rows(metric, batch, D)
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=q.device)
    _clamp_warning(clusters, N, None)
    telemetry.record(f"cluster_queries.{clustering}", backend)
    total, rows = (x.shape[0], None) if draw_rows is None else draw_rows
    planes, plan = random_draws(total, N, D, clusters, iterations=iterations, bits=bits,
                                seed=seed, clustering=clustering, device=q.device)
    if rows is not None:  # these rows of a larger batch (a rank's heads: sequence parallel)
        rows = rows.to(q.device)
        if rows.shape != (x.shape[0],):
            raise ValueError(f"draw_rows names {tuple(rows.shape)} rows; the queries have "
                             f"{x.shape[0]} rows (batch × heads)")
        plan = (plan[0].index_select(0, rows), plan[1].index_select(1, rows),
                plan[2].index_select(0, rows))
    if backend == "cpu":  # hash + k-means + Lloyd steps in one kernel call
        # the kernel takes the root itself when torch's LAPACK is at hand
        root = None if m is None or native.has_lapack() else _root_for(m, q)
        a, c = fused.cluster_queries(x, clustering, bits, planes, plan, refine, metric=m,
                                     root=root, centre_mask=centre)
        return a.view(*batch, N), c.view(*batch, clusters)
    root = None if m is None else _root_for(m, q)
    if clustering == "kmeans":
        y = x if root is None else x.to(root.dtype) @ root
        a, c = (reference if backend == "reference" else cpu).euclidean_kmeans(y, *plan, valid)
    else:
        if backend == "reference":
            a, c = reference.hamming_kmeans(reference.lsh_hash(x, planes, root, centre), *plan,
                                            valid, bits)
        elif backend == "torch" or root is not None:  # the Triton hash kernel has no metric
            signs = cpu.lsh_signs(x, planes, root, centre)
            assign_fn = None if backend == "torch" else _triton_assign(cpu.pack_signs(signs),
                                                                        bits)
            a, c = cpu.hamming_kmeans_signs(signs, *plan, valid, assign_fn=assign_fn)
        else:
            from clusterfx.ops.clustering import triton as _tr

            h = _tr.lsh_hash(x, planes.to(device=q.device, dtype=torch.float32))
            a, c = cpu.hamming_kmeans_signs(cpu.unpack_signs(h, bits), *plan, valid,
                                            assign_fn=_triton_assign(h, bits))
    if refine:
        a, c = lloyd_refine(x, a, clusters, refine, m)
    return a.view(*batch, N), c.view(*batch, clusters)


def random_draws(rows: int, n: int, dim: int, clusters: int, *, iterations: int = 10,
                 bits: int = 63, seed: int = -1, clustering: str = "hamming",
                 device: torch.device | str | None = None):
    """Every random choice ``cluster_queries`` makes for ``rows`` rows of ``n`` queries of dim
    ``dim``, in the order it draws them from one generator seeded with ``seed``: the
    hyperplanes (``clustering="hamming"`` only; None for "kmeans"), then the k-means plan
    (``_kmeans_plan`` with every query valid). Sequence parallelism draws the same for the
    whole sequence on every rank, so that its distributed clustering equals one process.

    Shapes: → planes (bits, dim + 1) float64 or None, (init_idx (rows, C), reseed_idx
    (iterations - 1, rows, C), active (rows, C)), positions in [0, n).
    """
    gen = _generator(seed)
    planes = _draw_planes(bits, dim, gen) if clustering == "hamming" else None
    valid = torch.ones(rows, n, dtype=torch.bool, device=device)
    return planes, _kmeans_plan(valid, True, clusters, iterations, gen)


def cluster_with(q: torch.Tensor, spec: ClusteringSpec, *, metric: torch.Tensor | None = None,
                 centre_mask: torch.Tensor | None = None, impl: str = "auto",
                 draw_rows: tuple[int, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_queries`` with the knobs of a ``ClusteringSpec``. Shapes: as there."""
    return cluster_queries(q, spec.clusters, iterations=spec.iterations, bits=spec.bits,
                           seed=spec.seed, clustering=spec.clustering, refine=spec.refine,
                           metric=metric, centre_mask=centre_mask, impl=impl,
                           draw_rows=draw_rows)
