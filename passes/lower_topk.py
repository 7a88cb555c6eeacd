"""Lower canonical attention to exact top-k attention (`TopK(k)`).

Before:
    o = torch.ops.clusterfx.attention(q, k, v, mask, 0.0, True, 0.125, False)
After:
    o = torch.ops.clusterfx.topk_attention(q, k, v, 32, mask, True, 0.125, 256, 'auto')

Any mask and causality are supported; GQA is native. Declines attention dropout and batch
dims that only broadcast. Memory O(N·k) per chunk of queries (see ops/topk).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..compiler.configs import TopK
from ..ops import topk as _topk_ops  # noqa: F401 - registers clusterfx::topk_attention
from .graph_utils import GraphEditor
from .lower import as_four_d, register_lowering, require_no_dropout
from .site import Site


@register_lowering(TopK)
def lower_topk(editor: GraphEditor, node: fx.Node, site: Site, config: TopK) -> fx.Node:
    require_no_dropout(site, config)
    q, k, v, mask, restore = as_four_d(editor, node, site)
    _, _, _, _, _, causal, scale, _ = node.args
    out = editor.call(torch.ops.clusterfx.topk_attention.default,
                      (q, k, v, config.k, mask, causal, scale, config.chunk_size, "auto"),
                      like=node)
    return restore(out)
