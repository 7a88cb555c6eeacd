"""Lower canonical attention to exact top-k attention (`TopK(k)`).

Before:
    o = torch.ops.clusterfx.attention(q, k, v, mask, 0.0, True, 0.125, False)
After:
    o = torch.ops.clusterfx.topk_attention(q, k, v, 32, mask, True, 0.125, 256, 'auto',
                                           'c0/frame0/0#0')

Any mask and causality are supported; GQA is native. Declines attention dropout and batch
dims that only broadcast. Memory O(N·k) per chunk of queries (see ops/topk).

Cost: 2·BH·Nq·Nk·D scores (chunked), 2·BH·Nq·k·Dv; memory BH·chunk·Nk + BH·Nq·k.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from clusterfx.config.configs import TopK
from clusterfx.ops import topk as _topk_ops  # noqa: F401 - registers clusterfx::topk_attention
from clusterfx.passes.cost_model import Cost, Dims, register_cost
from clusterfx.passes.lowerings.common import as_four_d, require_no_dropout
from clusterfx.passes.registry import LoweringContext, register_lowering
from clusterfx.passes.site import Site


@register_lowering(TopK)
def lower_topk(lctx: LoweringContext, node: fx.Node, site: Site, config: TopK) -> fx.Node:
    require_no_dropout(site, config)
    q, k, v, mask, restore = as_four_d(lctx.editor, node, site)
    _, _, _, _, _, causal, scale, _ = node.args
    out = lctx.editor.call(torch.ops.clusterfx.topk_attention.default,
                           (q, k, v, config.k, mask, causal, scale, config.chunk_size, "auto",
                            lctx.tag(site)), like=node)
    return restore(out)


@register_cost(TopK)
def topk_cost(dims: Dims, config: TopK) -> Cost:
    k = sympy.Min(config.k, dims.nk)
    chunk = sympy.Min(config.chunk_size, dims.nq)
    return Cost(2 * dims.bh * dims.nq * dims.nk * dims.d + 2 * dims.bh * dims.nq * k * dims.dv,
                (dims.bh * chunk * dims.nk + dims.bh * dims.nq * k) * dims.itemsize)
