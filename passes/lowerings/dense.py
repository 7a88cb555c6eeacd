"""Lower canonical attention to exact attention (`Dense`, `None`, and every declined site).

Before:
    o = torch.ops.clusterfx.attention(q, k, v, mask, 0.0, False, 0.125, False)
After:
    o = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, ...)
or `dense_attention` (SDPA after combining mask and causality) when SDPA cannot take the
arguments as they are.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from clusterfx.config.configs import Dense
from clusterfx.ops.attention import dense_attention
from clusterfx.passes.analysis.graph_utils import SDPA, value_of
from clusterfx.passes.registry import LoweringContext, register_lowering
from clusterfx.passes.site import Site


@register_lowering(Dense)
def lower_dense(lctx: LoweringContext, node: fx.Node, site: Site, config=None) -> fx.Node:
    """Exact attention: SDPA directly, or `dense_attention` when SDPA cannot take the
    arguments as they are (mask together with causality, a float mask of another dtype,
    batch dims that only broadcast)."""
    q, k, v, mask, dropout_p, causal, scale, gqa = node.args
    qv, kv, mv = value_of(q), value_of(k), value_of(mask)
    direct = (mv is None or not causal) and (
        mv is None or mv.dtype == torch.bool or mv.dtype == qv.dtype) and (
        gqa or tuple(qv.shape[:-2]) == tuple(kv.shape[:-2]))
    if direct:
        return lctx.editor.call(SDPA, (q, k, v), {"attn_mask": mask, "dropout_p": dropout_p,
                                                  "is_causal": causal, "scale": scale,
                                                  "enable_gqa": gqa}, like=node)
    return lctx.editor.call(dense_attention, node.args, like=node)
