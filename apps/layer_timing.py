"""Per-layer attention time of a compiled model: where a policy's speed-up comes from.

Inside one Inductor graph the attention of a layer cannot be timed apart from the rest, so each
attention site of the report is timed on its own: the site's shapes (observed values), inputs
~ N(0, 1) from a seeded generator, no mask, every layer's exact attention
(``F.scaled_dot_product_attention``) against what the policy runs there (the public op of its
config with the config's knobs, impl="auto"), interleaved, median of ``runs`` after a warm-up.
Sites the policy kept exact (or declined) run SDPA on both sides. The sum over layers is the
attention share of the model's forward; the rest (projections, MLP, norms) is the same in both
compiled models.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.nn.functional as F

from clusterfx.config.configs import Clustered, ImprovedClustered, TopK
from clusterfx.config.vocabulary import Status
from clusterfx.ops.clustered import clustered_attention, improved_clustered_attention
from clusterfx.ops.common.telemetry import counters
from clusterfx.ops.topk import topk_attention

_OPS = {Clustered: "clustered_attention", ImprovedClustered: "improved_clustered_attention",
        TopK: "topk_attention"}


def _concrete(shape: tuple, hints: dict) -> tuple[int, ...]:
    return tuple(int(sympy.sympify(d).subs(hints)) for d in shape)


def site_attention(config: Any) -> Callable | None:
    """(q, k, v) -> out running ``config``'s op (None: exact attention, SDPA)."""
    if isinstance(config, TopK):
        return lambda q, k, v: topk_attention(q, k, v, topk=config.k,
                                              chunk_size=config.chunk_size)
    if isinstance(config, (Clustered, ImprovedClustered)):
        kw = dict(clusters=config.clusters, iterations=config.iterations, bits=config.bits,
                  seed=config.seed, clustering=config.clustering, refine=config.refine,
                  metric=config.metric)
        if isinstance(config, ImprovedClustered):
            return lambda q, k, v: improved_clustered_attention(q, k, v, topk=config.topk, **kw)
        return lambda q, k, v: clustered_attention(q, k, v, **kw)
    return None


def _sdpa(causal: bool, gqa: bool) -> Callable:
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                          enable_gqa=gqa)


def _impl_ran(config: Any, before: dict) -> str:
    op = next((name for cls, name in _OPS.items() if type(config) is cls), None)
    if op is None:
        return "sdpa"
    moved = sorted(k.split(".", 1)[1] for k, v in counters.items()
                   if k.startswith(op + ".") and v > before.get(k, 0))
    return "+".join(moved) or "?"


def time_layers(report: Any, runs: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """One entry per attention site (rewrites of other configs than Clustered,
    ImprovedClustered and TopK are left out): fqn, rewrite, shapes, exact and policy ms."""
    rows = []
    for row in report:
        site = row.site
        # the config that runs at the observed shapes; None where the site stayed exact
        config = site.config if site.status == Status.REWRITTEN else None
        if config is not None and type(config) not in _OPS:
            continue  # a rewrite this table cannot time on its own (e.g. the causal variants)
        q_shape, k_shape, v_shape = (_concrete(s, site.hints)
                                     for s in (site.q_shape, site.k_shape, site.v_shape))
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(s, generator=gen) for s in (q_shape, k_shape, v_shape))
        exact = _sdpa(site.causal, q_shape[-3] != k_shape[-3])
        policy = site_attention(config) or exact
        before = dict(counters)
        times: dict[str, list[float]] = {"exact": [], "policy": []}
        with torch.no_grad():
            for i in range(runs + 1):
                for name, fn in (("exact", exact), ("policy", policy)):
                    start = time.perf_counter()
                    fn(q, k, v)
                    if i:
                        times[name].append(time.perf_counter() - start)
        rows.append({"fqn": site.fqn, "rewrite": site.rewrite if config is not None else "dense",
                     "impl": _impl_ran(config, before), "q": q_shape,
                     "exact_ms": statistics.median(times["exact"]) * 1e3,
                     "policy_ms": statistics.median(times["policy"]) * 1e3})
    return rows


def layer_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``time_layers`` with a total line."""
    head = f"{'layer':<28} {'runs':<20} {'impl':<6} {'exact ms':>9} {'policy ms':>10} {'gain':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['fqn']:<28} {r['rewrite']:<20} {r['impl']:<6} {r['exact_ms']:>9.1f} "
                     f"{r['policy_ms']:>10.1f} {r['exact_ms'] / r['policy_ms']:>6.2f}x")
    exact, policy = sum(r["exact_ms"] for r in rows), sum(r["policy_ms"] for r in rows)
    if rows:
        lines.append(f"{'all attention':<28} {'':<20} {'':<6} {exact:>9.1f} {policy:>10.1f} "
                     f"{exact / policy:>6.2f}x")
    return "\n".join(lines)
