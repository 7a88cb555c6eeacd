"""Graph inputs for the modules a rewrite installed on the user's model (passes/installed.py).

The lowering reads an installed module's parameters with `get_attr` nodes on the graph module
dynamo handed to the backend. AOT-based backends (Inductor, aot_eager) only accept graph-module
parameters that dynamo itself lifted (with a source for its guards), and dynamo's own graph
must keep exactly its placeholders. So, for those backends, `lift_installed` copies the graph,
turns every `get_attr` of an installed parameter into a trailing placeholder, and
`with_parameters` calls the compiled copy with dynamo's inputs plus the live `nn.Parameter`
objects. Gradients thus flow into `param.grad` of the user's model, an optimizer's in-place
updates are read at the next call, and `load_state_dict` into the model takes effect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from clusterfx.passes.installed import INSTALLED_PREFIX


def _installed(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "get_attr" and str(n.target).startswith(INSTALLED_PREFIX)]


def lift_installed(gm: fx.GraphModule
                   ) -> tuple[fx.GraphModule, list[torch.Tensor], list[torch.Tensor]] | None:
    """(a copy of `gm` whose installed parameters are trailing inputs, those parameters in
    input order, their example values), or None when the rewrites installed nothing.

    The example values are the static-shape fake tensors the lowering gave the `get_attr`
    nodes: handed real tensors, AOT would fakify them with fresh symbolic sizes that dynamo's
    guards have no source for."""
    if not _installed(gm):
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    params: list[torch.Tensor] = []
    examples: list[torch.Tensor] = []
    seen: dict[str, fx.Node] = {}
    for node in [env[n] for n in _installed(gm)]:
        target = str(node.target)
        if target not in seen:
            with graph.inserting_after(last):
                seen[target] = last = graph.placeholder(f"installed_{len(params)}")
            last.meta = dict(node.meta)
            params.append(gm.get_parameter(target))
            examples.append(node.meta.get("example_value", params[-1]))
        node.replace_all_uses_with(seen[target])
        graph.erase_node(node)
    lifted = fx.GraphModule(gm, graph)
    # not dynamo's graph any more: AOT must not look for dynamo sources of the new inputs
    lifted.meta = {k: v for k, v in gm.meta.items() if k != "dynamo_compile_id"}
    return lifted, params, examples


def with_parameters(compiled: Callable, params: list[torch.Tensor]) -> Callable:
    """`compiled` called with dynamo's inputs followed by the installed parameters."""
    def run(*args: Any):
        return compiled(*args, *params)

    return run
