"""Where an attention's q, k and v come from: the linear projection each one is read from.

Walks back from a tensor through the ops that only select, reshape or scale it (`view`,
`reshape`, `permute`, `transpose`, `contiguous`, `unflatten`, `flatten`, `(un)squeeze`, dtype
casts, `unbind` / `chunk` / `split` and indexing of a fused projection, multiplication or
division by a scalar) to a `linear(x, W, b)` call, and returns that call. Anything else (a
rotary embedding, a normalisation, a concatenation) ends the walk without a projection.

Used to show that a site is self-attention (q, k, v are projections of one tensor x) and to
find x, the tokens the attention reads.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from clusterfx.passes.analysis import graph_utils as gu

LINEARS = (torch._C._nn.linear, F.linear)
_VIEW_METHODS = ("view", "reshape", "permute", "transpose", "contiguous", "unflatten", "flatten",
                 "squeeze", "unsqueeze", "float", "half", "bfloat16", "double", "to", "type_as",
                 "clone", "unbind", "chunk", "split", "tensor_split", "select", "narrow")
_VIEW_FUNCTIONS = (torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   torch.flatten, torch.unflatten, torch.unbind, torch.chunk, torch.split,
                   torch.tensor_split, torch.select, torch.narrow, torch.swapaxes,
                   torch.movedim, torch.clone, operator.getitem)
_MAX_STEPS = 32


def _source(node: fx.Node) -> fx.Node | None:
    """The tensor `node` passes through, or None when it is not a pass-through op."""
    if gu.is_method(node, *_VIEW_METHODS) or gu.is_function(node, *_VIEW_FUNCTIONS):
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None
    if gu.is_function(node, *gu.MUL_FUNCS, *gu.DIV_FUNCS) or gu.is_method(node, "mul", "div"):
        a, b = (node.args + (None, None))[:2]
        if isinstance(a, fx.Node) and gu.is_scalar_like(b):
            return a
        if isinstance(b, fx.Node) and gu.is_scalar_like(a) and not gu.is_function(
                node, *gu.DIV_FUNCS) and not gu.is_method(node, "div"):
            return b
    return None


def projection_of(node: fx.Node) -> fx.Node | None:
    """The `linear(x, W, b)` node `node` is read from through pass-through ops, or None."""
    for _ in range(_MAX_STEPS):
        if not isinstance(node, fx.Node):
            return None
        if gu.is_function(node, *LINEARS):
            return node
        node = _source(node)
    return None


def shared_input(q: fx.Node, k: fx.Node, v: fx.Node
                 ) -> tuple[fx.Node | None, list[fx.Node], str]:
    """(x, the q/k/v projection nodes, "") when q, k and v are linear projections of the same
    tensor x, else (None, [], why)."""
    projections = [projection_of(n) for n in (q, k, v)]
    missing = [name for name, p in zip("qkv", projections) if p is None]
    if missing:
        return None, [], f"{', '.join(missing)} not read from a linear projection"
    inputs = {p.args[0] for p in projections}
    if len(inputs) != 1:
        return None, [], "q, k and v are projections of different tensors (cross-attention)"
    return next(iter(inputs)), projections, ""
