"""Evaluate mask subgraphs that depend only on sizes, constants and module buffers, to learn
whether a mask is the causal (lower-triangular) pattern.

A mask built inside `forward` (`ones(T, T).tril()`, `arange(T)[:, None] >= arange(T)`, a sliced
`tril` buffer, Hugging Face's mask functions) is evaluated once at the graph's concrete sizes
(the hints of symbolic sizes). If every (Nq, Nk) slice equals `ones(Nq, Nk).tril()` (boolean
keep-mask) or is 0 on the triangle and <= -1e4 above it (additive mask), the site is causal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from clusterfx.passes.analysis.graph_utils import inplace_users, symbolic_hint, value_of

_MAX_NODES = 400
_RANDOM = {"rand", "randn", "randint", "bernoulli", "dropout", "rand_like", "randn_like",
           "normal", "multinomial"}


def _is_buffer_placeholder(node: fx.Node) -> bool:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else name
    return "_buffers" in str(name) or "_buffers_" in node.name


def evaluate_static(node: fx.Node, concrete: dict[fx.Node, Any],
                    positions: dict[fx.Node, int] | None = None, *, inputs: bool = False,
                    overrides: dict[fx.Node, Any] | None = None) -> torch.Tensor | None:
    """The value of `node` if it depends on no tensor input other than module buffers;
    `concrete` maps placeholders to the real example inputs. None when not static.
    `positions` (node -> index in the graph) may be passed to save recomputing it; nodes
    added since are placed after every indexed node.

    `inputs=True`: tensor inputs are allowed too, read from `concrete` (the value at the
    observed inputs, not a static one); `overrides` replaces some placeholders' values (to
    probe how a mask depends on an input)."""
    overrides = overrides or {}
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()
    index = positions if positions is not None else {
        n: i for i, n in enumerate(node.graph.nodes)}
    position = lambda n: index.get(n, len(index))  # noqa: E731
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > _MAX_NODES:
            return None
        if n.op == "placeholder":
            val = value_of(n)
            if isinstance(val, torch.Tensor) and not _is_buffer_placeholder(n) and not (
                    inputs or n in overrides):
                return None
            if n not in concrete and n not in overrides:
                return None
        elif n.op in ("call_function", "call_method"):
            name = getattr(n.target, "__name__", str(n.target))
            if name in _RANDOM:
                return None
        elif n.op != "get_attr":
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
        # in-place writes before the use (`m[i] = x`, `m.tril_()`) are part of the value
        stack.extend(u for u in inplace_users(n) if position(u) < position(node))
    env: dict[fx.Node, Any] = {}
    gm = node.graph.owning_module
    threads = torch.get_num_threads()
    # mask subgraphs are small: one thread, so a busy machine does not stall every op on the
    # thread pool's barrier (measured: 10 ms per 128x128 tril on 2 loaded cores, 0.05 ms alone)
    torch.set_num_threads(1)
    try:
        for n in sorted(order, key=position):
            if n.op == "placeholder":
                env[n] = overrides[n] if n in overrides else symbolic_hint(concrete[n])
                continue
            if n.op == "get_attr":
                env[n] = getattr(gm, n.target)
                continue
            args = fx.node.map_arg(n.args, lambda x: env[x])
            kwargs = fx.node.map_arg(n.kwargs, lambda x: env[x])
            with torch.no_grad():
                if n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - anything that will not evaluate is simply not static
        return None
    finally:
        torch.set_num_threads(threads)
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None


def input_placeholders(node: fx.Node, limit: int = _MAX_NODES) -> list[fx.Node] | None:
    """The non-buffer tensor placeholders `node` depends on (None past `limit` nodes)."""
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        if n.op == "placeholder":
            if isinstance(value_of(n), torch.Tensor) and not _is_buffer_placeholder(n):
                found.append(n)
            continue
        stack.extend(n.all_input_nodes)
        stack.extend(inplace_users(n))
    return found


def is_causal_pattern(mask: torch.Tensor, additive: bool) -> bool:
    """True if every trailing (Nq, Nk) slice of `mask` is the top-left causal pattern."""
    if mask.dim() < 2 or mask.shape[-2] < 2 or mask.shape[-2] != mask.shape[-1]:
        return False
    n = mask.shape[-1]
    idx = torch.arange(n, device=mask.device)
    keep = idx[:, None] >= idx[None, :]  # (n, n) lower triangle
    if not additive:
        return mask.dtype == torch.bool and bool((mask == keep).all())
    if not mask.is_floating_point():
        return False
    on, off = mask.masked_select(keep.expand_as(mask)), mask.masked_select(~keep.expand_as(mask))
    return bool((on == 0).all()) and bool((off <= -1e4).all())
