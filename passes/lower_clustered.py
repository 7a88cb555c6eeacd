"""Lower canonical attention to clustered / improved-clustered attention, and `Auto`.

Before:
    o = torch.ops.clusterfx.attention(q, k, v, pad_mask, 0.0, False, 0.125, False)
After:
    r = torch.ops.clusterfx.conditional_attention(q, k, v, pad_mask, 0.125, 'clustered', 100,
                                                  1, 10, 63, -1, 'hamming', 0, 0, 'auto', 'site3')
    o = r[0]

The op decides per call (no recompiles): exact attention below `min_length` keys or when the
mask turns out not to be key padding; clustered attention otherwise (ops/conditional).
Declined, with the reason in the report: causal attention (a cluster mixes queries from
different positions, so its centroid row would see the future — the paper's code rejects it
too; use TopK or Dense), attention dropout, masks that vary over heads or require grad.
`Auto` takes its `min_length` from the cost model's crossover length.
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.fx as fx

from ..compiler.configs import Auto, Clustered, ImprovedClustered
from ..ops import conditional as _conditional_ops  # noqa: F401 - registers the op
from .cost_model import crossover_length
from .graph_utils import GraphEditor, value_of
from .lower import Decline, as_four_d, register_lowering, require_no_dropout
from .site import Site

_site_ids = itertools.count()


def _check_site(node: fx.Node, site: Site, config: Clustered) -> None:
    require_no_dropout(site, config)
    if site.causal:
        raise Decline(f"causal attention is not supported by {config.name} (a cluster mixes "
                      f"positions, so its row would see future keys); use TopK or Dense")
    mask = value_of(node.args[3])
    if mask is not None:
        if mask.requires_grad:
            raise Decline("the mask requires grad (a learned bias); clustered attention only "
                          "takes key-padding masks")
        heads = mask.shape[-3] if mask.dim() >= 3 else 1
        if isinstance(heads, int) and heads > 1:
            raise Decline(f"the mask varies over {heads} heads: not a key-padding mask")


def emit_clustered(editor: GraphEditor, node: fx.Node, site: Site, config: Clustered,
                   min_length: int) -> fx.Node:
    _check_site(node, site, config)
    q, k, v, mask, restore = as_four_d(editor, node, site)
    scale = node.args[6]
    topk = config.topk if isinstance(config, ImprovedClustered) else 1
    seed = -1 if config.seed is None else config.seed
    site_id = f"site{next(_site_ids)}"
    site.extra["runtime_id"] = site_id
    site.extra["min_length"] = min_length
    result = editor.call(
        torch.ops.clusterfx.conditional_attention.default,
        (q, k, v, mask, scale, config.name, config.clusters, topk, config.iterations,
         config.bits, seed, config.clustering, config.refine, config.metric, min_length, "auto",
         site_id),
        like=node)
    return restore(editor.call(operator.getitem, (result, 0), like=node))


@register_lowering(Clustered)
def lower_clustered(editor: GraphEditor, node: fx.Node, site: Site, config: Clustered):
    return emit_clustered(editor, node, site, config, config.min_length)


register_lowering(ImprovedClustered)(lower_clustered)


@register_lowering(Auto)
def lower_auto(editor: GraphEditor, node: fx.Node, site: Site, config: Auto):
    candidate = config.candidate
    if not isinstance(candidate, Clustered):
        raise Decline(f"Auto's candidate {candidate.name} is never cheaper than exact "
                      f"attention in the cost model; choose it explicitly")
    crossover = crossover_length(site, candidate)
    if crossover is None:
        raise Decline(f"{candidate.name} is not cheaper than exact attention at any length "
                      f"for this site's shapes")
    min_length = max(crossover, candidate.min_length)
    site.extra["crossover"] = crossover
    observed = value_of(node.args[1]).shape[-2]
    observed = int(observed.node.hint) if isinstance(observed, torch.SymInt) else observed
    site.extra["effective_config"] = candidate if observed >= min_length else None
    site.extra["note"] = f"crossover at {crossover} keys (cost model): {candidate.name} from there"
    return emit_clustered(editor, node, site, candidate, min_length)
