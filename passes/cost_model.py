"""Symbolic FLOP and memory estimates per attention site and rewrite (sympy expressions over
the site's shapes, evaluated at the observed sizes for the report).

Shapes: q (B, H, Nq, D), v (B, Hk, Nk, Dv); leading dims multiply into one batch-head count.
- dense, materialised (a manual spelling): FLOPs 2·BH·Nq·Nk·(D + Dv), memory 2·BH·Nq·Nk scores
  and probabilities (bytes = elements · itemsize).
- dense, fused SDPA: same FLOPs, memory BH·Nq·(Dv + 1) (output and log-sum-exp).
- clustered (C clusters, I iterations, b bits, R refine steps): hashing 2·BH·Nq·D·b, K-means
  I·BH·Nq·C, refinement R·2·BH·Nq·C·D, centroid attention 2·BH·C·Nk·(D + Dv), and with the
  attention metric the keys' covariance 2·BH·min(Nk, 4096)·D²; memory BH·C·Nk + BH·Nq·Dv.
- improved clustered adds 2·BH·Nq·k·(D + Dv) FLOPs and BH·Nq·k memory.
- top-k: 2·BH·Nq·Nk·D scores (chunked), 2·BH·Nq·k·Dv; memory BH·chunk·Nk + BH·Nq·k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy

from ..compiler.configs import (
    AttentionConfig,
    Clustered,
    Dense,
    ImprovedClustered,
    PatchToCluster,
    TopK,
)
from ..ops.clustering import METRIC_KEYS

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


# Time per FLOP relative to fused dense attention, measured on the CPU benchmark
# (`clusterfx bench attention`: N=16k, H=8, D=64, C=100 ran 27x faster than SDPA for 121x
# fewer FLOPs). `Auto` compares flops / efficiency.
EFFICIENCY = {"dense": 1.0, "clustered": 0.22, "improved_clustered": 0.22}


@dataclass(frozen=True)
class Cost:
    flops: sympy.Expr
    memory: sympy.Expr  # bytes of attention intermediates

    def at(self, hints: dict) -> tuple[float, float]:
        return (float(sympy.sympify(self.flops).xreplace(hints)),
                float(sympy.sympify(self.memory).xreplace(hints)))


def _dims(site) -> tuple[Any, Any, Any, Any, Any]:
    q, v = site.q_shape, site.v_shape
    bh = sympy.Integer(1)
    for d in q[:-2]:
        bh = bh * d
    return bh, q[-2], v[-2], q[-1], v[-1]


def estimate(site, config: AttentionConfig | None, fused: bool) -> Cost:
    """Cost of running `site` as `config` (None or Dense: exact attention)."""
    if len(site.q_shape) < 3 or len(site.v_shape) < 3:
        return Cost(sympy.Integer(0), sympy.Integer(0))
    bh, nq, nk, d, dv = _dims(site)
    size = _ITEMSIZE.get(site.dtype, 4)
    dense_flops = 2 * bh * nq * nk * (d + dv)
    if config is None or isinstance(config, Dense):
        mem = bh * nq * (dv + 1) if fused else 2 * bh * nq * nk
        return Cost(dense_flops, mem * size)
    if isinstance(config, Clustered):
        c = sympy.Min(config.clusters, nq)
        flops = 2 * bh * nq * d * config.bits + config.iterations * bh * nq * c \
            + 2 * bh * c * nk * (d + dv) + config.refine * 2 * bh * nq * c * d
        if config.metric == "attention":
            flops += 2 * bh * sympy.Min(nk, METRIC_KEYS) * d * d
        mem = bh * c * nk + bh * nq * dv
        if isinstance(config, ImprovedClustered):
            k = sympy.Min(config.topk, nk)
            flops += 2 * bh * nq * k * (d + dv)
            mem += bh * nq * k
        return Cost(flops, mem * size)
    if isinstance(config, TopK):
        k = sympy.Min(config.k, nk)
        chunk = sympy.Min(config.chunk_size, nq)
        return Cost(2 * bh * nq * nk * d + 2 * bh * nq * k * dv,
                    (bh * chunk * nk + bh * nq * k) * size)
    if isinstance(config, PatchToCluster):
        m = sympy.Integer(config.clusters)
        return Cost(2 * bh * nq * m * (d + dv), 2 * bh * nq * m * size)
    return Cost(dense_flops, 2 * bh * nq * nk * size)


def crossover_length(site, config: Clustered, limit: int = 1 << 24) -> int | None:
    """The smallest self-attention length N (Nq = Nk = N) at which `config` is estimated to be
    faster than exact attention for this site's batch, heads and head dims; None if never
    below `limit`. Symbolic dims are taken at their observed values."""
    hints = site.extra.get("hints", {})
    q = [int(sympy.sympify(d).xreplace(hints)) for d in site.q_shape]
    v = [int(sympy.sympify(d).xreplace(hints)) for d in site.v_shape]
    bh = 1
    for d in q[:-2]:
        bh *= d
    d, dv = q[-1], v[-1]
    efficiency = EFFICIENCY.get(config.name, 1.0)

    def cheaper(n: int) -> bool:
        probe = type(site)(site.fqn, site.spelling, q_shape=(bh, n, d), v_shape=(bh, n, dv),
                           dtype=site.dtype)
        dense = float(estimate(probe, None, fused=True).flops)
        approx = float(estimate(probe, config, fused=True).flops) / efficiency
        return approx < dense

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
