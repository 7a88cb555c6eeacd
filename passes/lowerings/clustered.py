"""Lower canonical attention to clustered / improved-clustered attention, and `Auto`.

Before:
    o = torch.ops.clusterfx.attention(q, k, v, pad_mask, 0.0, False, 0.125, False)
After:
    r = torch.ops.clusterfx.conditional_attention(q, k, v, pad_mask, 0.125, 'clustered',
            100, 5, 63, -1, 'hamming', 1, 'attention', 1, 0, 'auto', 'c0/frame0/0#0')
    o = r[0]

The op decides per call (no recompiles): exact attention below `min_length` keys or when the
mask turns out not to be key padding; clustered attention otherwise (ops/clustered). Its
clustering knobs travel as one `ClusteringSpec`, spread into the schema's primitives here.
A cluster mixes queries from different positions, so its centroid row would see the future:
causal sites, sites whose query stream is causal (`site.causal_queries`), and self-attention
whose mask varies over queries (a decoder's causal + padding mask) go to the causal variant
instead (`causal_clustered.py`, ops/causal_clustered), which never pools queries.
Declined, with the reason in the report: attention dropout, masks that vary over heads or
require grad. `Auto` takes its `min_length` from the cost model's crossover length (of the
causal variant's formula on causal sites).

Cost (C clusters, I iterations, b bits, R refine steps): hashing 2·BH·Nq·D·b, K-means
I·BH·Nq·C, refinement R·2·BH·Nq·C·D, centroid attention 2·BH·C·Nk·(D + Dv), and with the
attention metric the keys' covariance 2·BH·min(Nk, 4096)·D²; memory BH·C·Nk + BH·Nq·Dv.
Improved clustered adds 2·BH·Nq·k·(D + Dv) FLOPs and BH·Nq·k memory. Efficiency 0.22:
`clusterfx bench attention` at N=16k, H=8, D=64, C=100 ran 27x faster than SDPA for 121x
fewer FLOPs.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from clusterfx.config.configs import Auto, Clustered, ImprovedClustered
from clusterfx.config.vocabulary import Decline
from clusterfx.ops.clustered import ClusteringSpec
from clusterfx.ops.clustering import METRIC_KEYS
from clusterfx.passes.analysis.graph_utils import value_of
from clusterfx.passes.cost_model import Cost, Dims, crossover_length, register_cost
from clusterfx.passes.lowerings.causal_clustered import (
    causal_stream,
    causal_variant,
    check_can_run,
    describe,
    emit_causal,
    mask_may_be_causal,
)
from clusterfx.passes.lowerings.common import as_four_d, require_no_dropout
from clusterfx.passes.registry import LoweringContext, register_lowering
from clusterfx.passes.site import Site


def clustering_spec(config: Clustered) -> ClusteringSpec:
    """The op-level clustering value of a config (seed None = torch's global RNG = -1)."""
    return ClusteringSpec(clusters=config.clusters, iterations=config.iterations,
                          bits=config.bits, seed=-1 if config.seed is None else config.seed,
                          clustering=config.clustering, refine=config.refine,
                          metric=config.metric)


def _check_site(node: fx.Node, site: Site, config: Clustered) -> None:
    require_no_dropout(site, config)
    mask = value_of(node.args[3])
    if mask is not None:
        if mask.requires_grad:
            raise Decline("the mask requires grad (a learned bias); clustered attention only "
                          "takes key-padding masks")
        heads = mask.shape[-3] if mask.dim() >= 3 else 1
        if isinstance(heads, int) and heads > 1:
            raise Decline(f"the mask varies over {heads} heads: not a key-padding mask")


def routes_causal(node: fx.Node, site: Site) -> bool:
    """Whether the site may see a decoder, so that queries must never be pooled."""
    return causal_stream(site) or mask_may_be_causal(node)


def emit_clustered(lctx: LoweringContext, node: fx.Node, site: Site, config: Clustered,
                   min_length: int) -> fx.Node:
    check_can_run(site, config)
    if routes_causal(node, site):
        return emit_causal(lctx, node, site, causal_variant(config), min_length)
    _check_site(node, site, config)
    q, k, v, mask, restore = as_four_d(lctx.editor, node, site)
    scale = node.args[6]
    topk = config.topk if isinstance(config, ImprovedClustered) else 1
    site.min_length = min_length
    result = lctx.editor.call(
        torch.ops.clusterfx.conditional_attention.default,
        (q, k, v, mask, scale, config.name, *clustering_spec(config).to_args(), topk,
         min_length, "auto", lctx.tag(site)),
        like=node)
    return restore(lctx.editor.call(operator.getitem, (result, 0), like=node))


@register_lowering(Clustered)
def lower_clustered(lctx: LoweringContext, node: fx.Node, site: Site, config: Clustered):
    if routes_causal(node, site):
        site.reason = describe(site, config)
        if causal_stream(site):
            site.config = causal_variant(config)  # what runs
    return emit_clustered(lctx, node, site, config, config.min_length)


@register_lowering(Auto)
def lower_auto(lctx: LoweringContext, node: fx.Node, site: Site, config: Auto):
    candidate = config.candidate
    if not isinstance(candidate, Clustered):
        raise Decline(f"Auto's candidate {candidate.name} is never cheaper than exact "
                      f"attention in the cost model; choose it explicitly")
    costed = causal_variant(candidate) if causal_stream(site) else candidate
    crossover = crossover_length(site, costed)
    if crossover is None:
        raise Decline(f"{costed.name} is not cheaper than exact attention at any length "
                      f"for this site's shapes")
    min_length = max(crossover, candidate.min_length)
    site.crossover = crossover
    observed = value_of(node.args[1]).shape[-2]
    observed = int(observed.node.hint) if isinstance(observed, torch.SymInt) else observed
    site.config = costed if observed >= min_length else None
    site.reason = f"crossover at {crossover} keys (cost model): {costed.name} from there"
    if routes_causal(node, site):
        site.reason += f"; {describe(site, candidate)}"
    return emit_clustered(lctx, node, site, candidate, min_length)


@register_cost(Clustered, efficiency=0.22)
def clustered_cost(dims: Dims, config: Clustered) -> Cost:
    bh, nq, nk, d, dv = dims.bh, dims.nq, dims.nk, dims.d, dims.dv
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
    return Cost(flops, mem * dims.itemsize)
