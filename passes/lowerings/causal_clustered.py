"""Lower canonical attention that may see a decoder to causal clustered / i-clustered attention.

Before:
    o = torch.ops.clusterfx.attention(q, k, v, None, 0.0, True, 0.125, False)
After:
    r = torch.ops.clusterfx.causal_conditional_attention(q, k, v, None, 0.125,
            'improved_clustered', 25, 5, 63, -1, 'hamming', 1, 'attention', 32, 128, True,
            False, 0, 'auto', 'c0/frame0/0#0')
    o = r[0]

Which sites come here (``clustered.py`` routes them; ``CausalClustered`` /
``CausalImprovedClustered`` in a policy come directly):
- causal sites (``site.causal``): clustered attention would pool queries of different
  positions, leaking the future; the causal variant (ops/causal_clustered) never does;
- sites whose query stream is causal (``site.causal_queries``, e.g. a decoder's
  cross-attention): the causal variant with every key visible — queries are never pooled;
- self-attention sites whose mask varies over queries (Hugging Face decoders given an
  ``attention_mask`` build causal ∧ padding into one 4-D mask, so ``site.causal`` is False):
  the op decides per call — the causal variant for a causal ∧ key-padding mask, clustered
  attention (queries pooled) for a key-padding mask, exact attention for anything else.
Declined, with the reason: attention dropout, masks that vary over heads or require grad.

Cost (b block, C clusters, R = iterations + refine rounds, k top-k): key clustering
R·2·BH·Nk·C·D (each round re-clusters a prefix; the prefixes of the O(log N) epochs sum to
~Nk), its metric 2·BH·Nq·D², local attention BH·Nq·b·(D + Dv) (half a block on average),
far field 2·BH·Nq·C·(D + Dv); i-clustered adds the query clustering R·2·BH·Nq·C·D, the
selection 4·BH·C·Nk·D and the top-k attention 2·BH·Nq·k·(D + Dv). Memory BH·Nq·(b + C + k).
"""

from __future__ import annotations

import dataclasses
import operator

import sympy
import torch
import torch.fx as fx

from clusterfx.config.configs import (
    CausalClustered,
    CausalImprovedClustered,
    Clustered,
    ImprovedClustered,
)
from clusterfx.config.vocabulary import Decline
from clusterfx.ops import causal_clustered as _ops  # noqa: F401 - registers the ops
from clusterfx.passes.analysis.graph_utils import value_of
from clusterfx.passes.cost_model import Cost, Dims, register_cost
from clusterfx.passes.lowerings.common import as_four_d, require_no_dropout
from clusterfx.passes.registry import LoweringContext, register_lowering
from clusterfx.passes.site import Site

CAUSAL_TYPES = (CausalClustered, CausalImprovedClustered)
# mask kinds (passes/analysis/causality.py) for which some path of the ops is approximate
RUNNABLE_KINDS = ("", "key padding", "causal", "causal + key padding")


def causal_variant(config: Clustered) -> CausalClustered | CausalImprovedClustered:
    """The causal config with the same knobs (the default block unless it is one already)."""
    if isinstance(config, CAUSAL_TYPES):
        return config
    target = CausalImprovedClustered if isinstance(config, ImprovedClustered) else \
        CausalClustered
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return target(**fields)


def causal_stream(site: Site) -> bool:
    """The site is causal, or its query stream is (robustness analysis: `causal_queries`)."""
    return bool(site.causal or getattr(site, "causal_queries", False))


def mask_may_be_causal(node: fx.Node) -> bool:
    """Self-attention whose mask varies over queries: it may hold causality (Hugging Face
    decoders merge it with the padding), which only the call's values can tell."""
    q, k, mask = (value_of(a) for a in (node.args[0], node.args[1], node.args[3]))
    if mask is None or mask.dim() < 2 or q.shape[-2] != k.shape[-2]:
        return False
    rows = mask.shape[-2]
    return not (isinstance(rows, int) and rows == 1)


def check_can_run(site: Site, config: Clustered) -> None:
    """Decline a site whose mask, for every input, is neither key padding nor causal (+ key
    padding): neither the clustered op nor its causal variant could ever take the approximate
    path, so "rewritten" would be a promise that never runs."""
    if site.mask_kind not in RUNNABLE_KINDS and not site.mask_observed:
        raise Decline(f"the mask is {site.mask_kind} for every input, never key padding or "
                      f"causal: {config.name}'s approximate path could never run")


def check_mask(node: fx.Node) -> None:
    mask = value_of(node.args[3])
    if mask is None:
        return
    if mask.requires_grad:
        raise Decline("the mask requires grad (a learned bias); clustered attention only takes "
                      "key-padding (and causal) masks")
    heads = mask.shape[-3] if mask.dim() >= 3 else 1
    if isinstance(heads, int) and heads > 1:
        raise Decline(f"the mask varies over {heads} heads: not a key-padding mask")


def emit_causal(lctx: LoweringContext, node: fx.Node, site: Site,
                config: CausalClustered | CausalImprovedClustered, min_length: int) -> fx.Node:
    """The `causal_conditional_attention` call for a site (see the module docstring)."""
    require_no_dropout(site, config)
    check_mask(node)
    q, k, v, mask, restore = as_four_d(lctx.editor, node, site)
    causal, scale = node.args[5], node.args[6]
    improved = isinstance(config, ImprovedClustered)
    method = "improved_clustered" if improved else "clustered"
    topk = config.topk if improved else 1
    site.min_length = min_length
    spec = (config.clusters, config.iterations, config.bits,
            -1 if config.seed is None else config.seed, config.clustering, config.refine,
            config.metric)
    result = lctx.editor.call(
        torch.ops.clusterfx.causal_conditional_attention.default,
        (q, k, v, mask, scale, method, *spec, topk, config.block, bool(causal),
         bool(getattr(site, "causal_queries", False)), min_length, "auto", lctx.tag(site)),
        like=node)
    return restore(lctx.editor.call(operator.getitem, (result, 0), like=node))


def describe(site: Site, config: Clustered) -> str:
    """The report's reason for a site served by the causal op."""
    if site.causal:
        return (f"causal: {causal_variant(config).name} (exact within blocks of "
                f"{causal_variant(config).block}, key clusters before them)")
    if getattr(site, "causal_queries", False):
        return (f"causal query stream: {causal_variant(config).name} over all keys (queries "
                f"never pooled)")
    return ("per call: the causal variant for a causal + key-padding mask (a decoder), "
            f"{config.name} for key padding only, exact otherwise")


def lower_causal(lctx: LoweringContext, node: fx.Node, site: Site,
                 config: CausalClustered) -> fx.Node:
    check_can_run(site, config)
    if not (causal_stream(site) or mask_may_be_causal(node)):
        plain = "ImprovedClustered" if isinstance(config, ImprovedClustered) else "Clustered"
        raise Decline(f"{config.name} serves causal sites (or causal query streams); this one "
                      f"is neither: use {plain}")
    site.reason = describe(site, config)
    return emit_causal(lctx, node, site, config, config.min_length)


register_lowering(CausalClustered)(lower_causal)
register_lowering(CausalImprovedClustered)(lower_causal)


def _causal_cost(dims: Dims, config: CausalClustered) -> Cost:
    bh, nq, nk, d, dv = dims.bh, dims.nq, dims.nk, dims.d, dims.dv
    c = sympy.Min(config.clusters, nk)
    rounds = config.iterations + config.refine
    b = sympy.Min(config.block, nq)
    flops = rounds * 2 * bh * nk * c * d + 2 * bh * nq * d * d \
        + bh * nq * b * (d + dv) + 2 * bh * nq * c * (d + dv)
    mem = bh * nq * (b + c)
    if isinstance(config, ImprovedClustered):
        k = sympy.Min(config.topk, nk)
        flops += rounds * 2 * bh * nq * c * d + 4 * bh * c * nk * d + 2 * bh * nq * k * (d + dv)
        mem += bh * nq * k
    return Cost(flops, mem * dims.itemsize)


# efficiency = measured speed-up over SDPA is_causal / FLOP ratio against the (non-causal)
# dense formula, `clusterfx bench causal --part speed` (H=8, D=64, float32, 2 threads):
# clustered C=100 ran 3.5x at 16k for 47x fewer FLOPs (1.0x at 4k for 12x);
# i-clustered C=25, k=32 ran 1.8x at 16k for 65x fewer (0.5x at 4k for 16x).
register_cost(CausalClustered, efficiency=0.075)(_causal_cost)
register_cost(CausalImprovedClustered, efficiency=0.03)(_causal_cost)
