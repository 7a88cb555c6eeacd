"""Small helpers shared by the passes: node metadata, target tests, and a graph editor that
keeps `meta["example_value"]` (FakeTensors, possibly with symbolic shapes) on the nodes it adds."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

# the frame-local source of a module path: `L['self']`, `L['args'][0]` (a `*args` decorator
# around forward), `G['model']`
_PREFIX = re.compile(r"^([LG]\['[^']*'\](?:\[\d+\])*)\.?")


def value_of(node: Any) -> Any:
    """The FakeTensor / SymInt a dynamo or aten node carries, or the literal itself."""
    if isinstance(node, fx.Node):
        meta = node.meta
        return meta["example_value"] if "example_value" in meta else meta.get("val")
    return node


def module_path(node: fx.Node) -> str:
    """`L['self'].encoder.layer.0.attention` -> `encoder.layer.0.attention` ("" for the root);
    `L['args'][0].encoder...` alike. Relative to the frame's root module: `rebase_module_paths`
    makes it relative to the compiled model when the frame is a submodule's."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _PREFIX.sub("", path)


def frame_sources(gm: fx.GraphModule) -> set[str]:
    """The frame-local sources (`L['self']`, `L['args'][0]`) module paths start from."""
    out = set()
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            m = _PREFIX.match(path)
            if m:
                out.add(m.group(1))
    return out


def rebase_module_paths(gm: fx.GraphModule, roots: dict[str, str]) -> None:
    """Rewrite the `nn_module_stack` of every node so its paths start at the compiled model:
    `roots` maps a frame source (`L['self']`) to that module's path in the model (a graph
    captured after a graph break, inside `encoder.forward`, has `L['self']` = the encoder)."""
    def rebase(path: str) -> str:
        m = _PREFIX.match(path)
        if not m or m.group(1) not in roots:
            return path
        rest = path[m.end():]
        full = ".".join(p for p in (roots[m.group(1)], rest) if p)
        return "L['self']" + ("." + full if full else "")

    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (rebase(path), kind)
                                            for k, (path, kind) in stack.items()}


def is_function(node: Any, *targets: Callable) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def static_number(x: Any) -> float | None:
    """A Python number, or None when `x` is a node or a symbolic value."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def is_scalar_like(x: Any) -> bool:
    """A number, a SymInt/SymFloat node, or a 0-d tensor: something that scales uniformly."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    val = value_of(x)
    if isinstance(val, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(val, bool):
        return True
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()


def ndim(node: Any) -> int | None:
    val = value_of(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def is_inplace(node: Any) -> bool:
    """Does this call mutate its first argument (`x.add_(...)`, `x[i] = v`, `x += y`)?"""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in (operator.setitem, operator.iadd, operator.imul, operator.isub,
                           operator.itruediv, operator.iand, operator.ior):
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__") or "out" in node.kwargs
    return False


def inplace_users(node: fx.Node) -> list[fx.Node]:
    """Users that mutate `node` in place (its first argument)."""
    return [u for u in node.users if is_inplace(u) and u.args and u.args[0] is node]


MATMULS = (operator.matmul, torch.matmul, torch.bmm)
SOFTMAXES = (torch.softmax, torch.nn.functional.softmax, torch.special.softmax)
SDPA = torch._C._nn.scaled_dot_product_attention
EINSUMS = (torch.einsum, torch.functional.einsum)
CAST_METHODS = ("float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous",
                "clone")
MUL_FUNCS = (operator.mul, torch.mul)
DIV_FUNCS = (operator.truediv, torch.div, torch.true_divide)
ADD_FUNCS = (operator.add, operator.iadd, torch.add)


class GraphEditor:
    """Adds nodes to a dynamo FX graph and fills their `example_value` with fake execution."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        # The nodes' own FakeTensors decide the mode (the tracing context may hold another).
        fakes = [value_of(n) for n in self.graph.nodes if n.op == "placeholder"]
        modes = [f.fake_mode for f in fakes if hasattr(f, "fake_mode")]
        self.fake_mode = modes[0] if modes else detect_fake_mode()

    def _fake_run(self, op: str, target: Any, args: tuple, kwargs: dict) -> Any:
        fargs = fx.node.map_arg(args, value_of)
        fkwargs = fx.node.map_arg(kwargs, value_of)
        if op == "call_method":
            return getattr(fargs[0], target)(*fargs[1:], **fkwargs)
        return target(*fargs, **fkwargs)

    def infer(self, node: fx.Node) -> None:
        """Compute `node.meta["example_value"]` from its inputs' values."""
        if self.fake_mode is None:
            return
        with self.fake_mode:
            node.meta["example_value"] = self._fake_run(node.op, node.target, node.args,
                                                        node.kwargs)

    def call(self, target: Any, args: tuple = (), kwargs: dict | None = None, *,
             like: fx.Node | None = None, method: bool = False) -> fx.Node:
        """Insert a call at the graph's current insertion point."""
        kwargs = kwargs or {}
        if method:
            node = self.graph.call_method(target, args, kwargs)
        else:
            node = self.graph.call_function(target, args, kwargs)
        if like is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        self.infer(node)
        return node

    def copy_graph(self, sub: fx.Graph, env: dict[fx.Node, Any], like: fx.Node) -> Any:
        """Copy the nodes of `sub` (placeholders pre-bound in `env`); return its output value."""
        for n in sub.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                return fx.node.map_arg(n.args[0], lambda x: env[x])
            new = self.graph.node_copy(n, lambda x: env[x])
            for key in ("nn_module_stack", "stack_trace"):
                if key in like.meta:
                    new.meta[key] = like.meta[key]
            self.infer(new)
            env[n] = new
        raise AssertionError("graph without output")


def symbolic_hint(x: Any) -> Any:
    """A concrete int/float for a SymInt/SymFloat (its hint), or x itself."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        hint = x.node.hint
        return hint if hint is not None else x
    return x
