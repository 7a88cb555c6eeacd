"""Argument checks of the canonical attention op."""

from __future__ import annotations


def check_qkv(q, k, v) -> None:
    """q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv), rank >= 3: else a ValueError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() < 3:
            raise ValueError(f"{name} has rank {x.dim()} (shape {tuple(x.shape)}); attention "
                             f"takes rank >= 3: (..., N, D)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim ({q.shape[-1]}) must equal k head dim ({k.shape[-1]})")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k length ({k.shape[-2]}) must equal v length ({v.shape[-2]})")
