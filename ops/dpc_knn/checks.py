"""Argument checks for ``dpc_knn`` (before any work; metadata only, so safe on fake tensors)."""

from __future__ import annotations

from clusterfx.ops.common.checks import check_float, check_impl, check_int

IMPLS = ("auto", "reference", "cpu")


def validate(x, clusters, k, regions, impl) -> None:
    """x (B, N, C) floating; regions divides N and clusters; 1 <= clusters <= N;
    1 <= k <= N / regions."""
    check_float("x", x, 3, exact_rank=True)
    check_int("clusters", clusters)
    check_int("k", k)
    check_int("regions", regions)
    if impl not in IMPLS:
        check_impl(impl)  # the generic message for unknown names
        raise ValueError(f"impl ({impl!r}) must be one of {IMPLS}: DPC-kNN has no Triton "
                         f"kernel (its cpu path is device-agnostic torch)")
    n = x.shape[1]
    if n % regions:
        raise ValueError(f"regions ({regions}) must divide the number of tokens N ({n})")
    if clusters % regions:
        raise ValueError(f"regions ({regions}) must divide clusters ({clusters}): each region "
                         f"gets clusters / regions centres")
    if clusters > n:
        raise ValueError(f"clusters ({clusters}) must be at most the number of tokens N ({n})")
    if k > n // regions:
        raise ValueError(f"k ({k}) must be at most the tokens per region ({n // regions})")
