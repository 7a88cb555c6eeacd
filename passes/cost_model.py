"""Symbolic FLOP and memory estimates per attention site and rewrite (sympy expressions over
the site's shapes, evaluated at the observed sizes for the report).

Shapes: q (B, H, Nq, D), v (B, Hk, Nk, Dv); leading dims multiply into one batch-head count BH.
Exact attention is the baseline and is estimated here:
- materialised (a manual spelling): FLOPs 2·BH·Nq·Nk·(D + Dv), memory 2·BH·Nq·Nk scores and
  probabilities (bytes = elements · itemsize);
- fused SDPA: same FLOPs, memory BH·Nq·(Dv + 1) (output and log-sum-exp).
Every rewrite registers its own formula beside its lowering (`register_cost`), with
an efficiency (time per FLOP relative to fused dense attention) that `Auto` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy

from clusterfx.config.configs import AttentionConfig, Dense

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Cost:
    flops: sympy.Expr
    memory: sympy.Expr  # bytes of attention intermediates

    def at(self, hints: dict) -> tuple[float, float]:
        return (float(sympy.sympify(self.flops).xreplace(hints)),
                float(sympy.sympify(self.memory).xreplace(hints)))


@dataclass(frozen=True)
class Dims:
    """A site's sizes for the formulas: batch·heads, lengths, head dims, bytes per element."""

    bh: Any
    nq: Any
    nk: Any
    d: Any
    dv: Any
    itemsize: int

    def dense_flops(self) -> Any:
        return 2 * self.bh * self.nq * self.nk * (self.d + self.dv)


CostFormula = Callable[[Dims, AttentionConfig], Cost]


@dataclass(frozen=True)
class CostEntry:
    formula: CostFormula
    efficiency: float  # time per FLOP relative to fused dense attention (for Auto)


COSTS: dict[type, CostEntry] = {}


def register_cost(config_type: type, efficiency: float = 1.0
                  ) -> Callable[[CostFormula], CostFormula]:
    """Register the cost formula of a rewrite, beside its lowering."""
    if not (isinstance(config_type, type) and issubclass(config_type, AttentionConfig)):
        raise TypeError(f"cost formulas are keyed by an AttentionConfig subclass, got "
                        f"{config_type!r}")

    def wrap(fn: CostFormula) -> CostFormula:
        COSTS[config_type] = CostEntry(fn, efficiency)
        return fn
    return wrap


def cost_for(config: AttentionConfig) -> CostEntry | None:
    """The formula registered for the config's type or its nearest base."""
    return next((COSTS[c] for c in type(config).__mro__ if c in COSTS), None)


def dims_of(q_shape: tuple, v_shape: tuple, dtype: str) -> Dims | None:
    if len(q_shape) < 3 or len(v_shape) < 3:
        return None
    bh = sympy.Integer(1)
    for d in q_shape[:-2]:
        bh = bh * d
    return Dims(bh, q_shape[-2], v_shape[-2], q_shape[-1], v_shape[-1],
                _ITEMSIZE.get(dtype, 4))


def dense_cost(dims: Dims, fused: bool) -> Cost:
    mem = dims.bh * dims.nq * (dims.dv + 1) if fused else 2 * dims.bh * dims.nq * dims.nk
    return Cost(dims.dense_flops(), mem * dims.itemsize)


def estimate(site, config: AttentionConfig | None, fused: bool) -> Cost:
    """Cost of running `site` as `config` (None or Dense: exact attention). A config without a
    registered formula is estimated as materialised exact attention."""
    dims = dims_of(site.q_shape, site.v_shape, site.dtype)
    if dims is None:
        return Cost(sympy.Integer(0), sympy.Integer(0))
    if config is None or isinstance(config, Dense):
        return dense_cost(dims, fused)
    entry = cost_for(config)
    if entry is None:
        return dense_cost(dims, fused=False)
    return entry.formula(dims, config)


def crossover_length(site, config: AttentionConfig, limit: int = 1 << 24) -> int | None:
    """The smallest self-attention length N (Nq = Nk = N) at which `config` is estimated to be
    faster than exact attention for this site's batch, heads and head dims; None if never
    below `limit` (or `config` has no cost formula). Symbolic dims are taken at their observed
    values."""
    entry = cost_for(config)
    if entry is None:
        return None
    q = [int(sympy.sympify(d).xreplace(site.hints)) for d in site.q_shape]
    v = [int(sympy.sympify(d).xreplace(site.hints)) for d in site.v_shape]
    bh = 1
    for d in q[:-2]:
        bh *= d

    def cheaper(n: int) -> bool:
        dims = dims_of((bh, n, q[-1]), (bh, n, v[-1]), site.dtype)
        dense = float(dense_cost(dims, fused=True).flops)
        return float(entry.formula(dims, config).flops) / entry.efficiency < dense

    n = 16
    while n <= limit and not cheaper(n):
        n *= 2
    if n > limit:
        return None
    lo, hi = n // 2, n  # cheaper(hi) holds; find the first length that is
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cheaper(mid) else (mid, hi)
    return hi
