"""Static mask analysis: which mask subgraphs evaluate at compile time (sizes, constants, module
buffers; in-place writes before the use included; never tensor inputs or random ops), and which
values are the causal pattern."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from clusterfx.passes.analysis.mask_analysis import evaluate_static, is_causal_pattern


def test_boolean_causal_pattern():
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    assert is_causal_pattern(keep, additive=False)
    assert is_causal_pattern(keep.expand(2, 3, 5, 5), additive=False)
    assert not is_causal_pattern(~keep, additive=False)
    assert not is_causal_pattern(torch.ones(5, 6, dtype=torch.bool).tril(), additive=False)
    assert not is_causal_pattern(keep.float(), additive=False)  # not a bool keep-mask
    batch = keep.repeat(2, 1, 1)
    batch[1, 4, 0] = False  # one row of one batch element differs
    assert not is_causal_pattern(batch, additive=False)


@pytest.mark.parametrize("fill", [float("-inf"), -1e9, torch.finfo(torch.float32).min])
def test_additive_causal_pattern(fill):
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = torch.zeros(4, 4).masked_fill(~keep, fill)
    assert is_causal_pattern(mask, additive=True)
    assert not is_causal_pattern(mask.masked_fill(~keep, -1.0), additive=True)  # a bias
    bias = mask.clone()
    bias[2, 1] = 0.5  # a non-zero value where causal attention keeps the key
    assert not is_causal_pattern(bias, additive=True)
    assert not is_causal_pattern(keep, additive=True)  # bool is not additive


def _graph(*steps):
    """A graph whose placeholders are `n` (a size) and `x` (a tensor input), then `steps`:
    (op, target, args) with "n", "x" and earlier step indices as references; returns
    (placeholders n and x, the last node)."""
    g = fx.Graph()
    env = {"n": g.placeholder("n"), "x": g.placeholder("x")}
    env["x"].meta["example_value"] = torch.empty(3)  # a tensor input, as dynamo records it
    nodes = []
    for op, target, args, kwargs in steps:
        real = tuple(env.get(a, a) if isinstance(a, str) else nodes[a] if isinstance(
            a, int) and a < 0 else a for a in args)
        make = g.call_method if op == "method" else g.call_function
        nodes.append(make(target, real, kwargs))
    g.output(nodes[-1])
    fx.GraphModule(torch.nn.Module(), g)
    return env["n"], env["x"], nodes[-1]


def test_a_mask_built_from_sizes_evaluates():
    n, x, out = _graph(("fn", torch.ones, ("n", "n"), {"dtype": torch.bool}),
                       ("method", "tril", (-1,), {}))
    value = evaluate_static(out, {n: 6, x: torch.randn(2, 6)})
    assert torch.equal(value, torch.ones(6, 6, dtype=torch.bool).tril())


def test_masks_from_tensor_inputs_or_random_ops_are_not_static():
    n, x, out = _graph(("fn", torch.gt, ("x", 0), {}))
    assert evaluate_static(out, {n: 3, x: torch.randn(3)}) is None
    n, x, out = _graph(("fn", torch.rand, ("n", "n"), {}), ("fn", torch.gt, (-1, 0.5), {}))
    assert evaluate_static(out, {n: 4, x: torch.randn(3)}) is None


def test_in_place_writes_before_the_use_are_part_of_the_value():
    g = fx.Graph()
    n = g.placeholder("n")
    ones = g.call_function(torch.ones, (n, n), {"dtype": torch.bool})
    g.call_method("tril_", (ones,))
    use = g.call_method("clone", (ones,))
    g.output(use)
    fx.GraphModule(torch.nn.Module(), g)
    assert torch.equal(evaluate_static(use, {n: 3}), torch.ones(3, 3, dtype=torch.bool).tril())
