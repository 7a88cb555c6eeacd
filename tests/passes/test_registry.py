"""A rewrite added without touching any package file: a toy config, its lowering and its cost
formula, all defined in this test file, compile a model through the public API.

The toy rewrite `Sharpened(factor)` is exact attention with the softmax temperature divided by
`factor` (scale × factor). Its oracle is the float64 reference attention with that scale."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import clusterfx as cfx
from clusterfx.ops.attention import attention_reference
from clusterfx.passes.analysis.graph_utils import SDPA
from clusterfx.passes.cost_model import Cost, Dims, estimate, register_cost
from clusterfx.passes.registry import LoweringContext, lowering_for, register_lowering
from tests.helpers import count_targets


@dataclasses.dataclass(frozen=True)
class Sharpened(cfx.AttentionConfig):
    name: ClassVar[str] = "test_sharpened"
    factor: float = 2.0


@register_lowering(Sharpened)
def lower_sharpened(lctx: LoweringContext, node, site, config: Sharpened):
    q, k, v, mask, dropout_p, causal, scale, gqa = node.args
    return lctx.editor.call(SDPA, (q, k, v), {
        "attn_mask": mask, "dropout_p": dropout_p, "is_causal": causal,
        "scale": scale * config.factor, "enable_gqa": gqa}, like=node)


@register_cost(Sharpened)
def sharpened_cost(dims: Dims, config: Sharpened) -> Cost:
    return Cost(dims.dense_flops() + 1, dims.bh * dims.nq * dims.itemsize)


class TwoAttentions(nn.Module):
    def forward(self, q, k, v):
        first = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v
        return first, torch.nn.functional.scaled_dot_product_attention(first, k, v)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen) for _ in range(3))


def test_a_rewrite_defined_outside_the_package_compiles_and_reports():
    q, k, v = _inputs()
    model = TwoAttentions()
    compiled = cfx.compile(model, policy=Sharpened(factor=3.0), backend="eager")
    first, second = compiled(q, k, v)
    scale = 8 ** -0.5 * 3.0
    want_first = attention_reference(q, k, v, scale=scale)
    want_second = attention_reference(want_first, k, v, scale=scale)
    torch.testing.assert_close(first, want_first, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, want_second, rtol=1e-12, atol=1e-12)
    report = cfx.explain(compiled)
    assert [(r.rewrite, r.status) for r in report] == [("test_sharpened", "rewritten")] * 2
    site = report[0].site
    assert isinstance(site.config, Sharpened) and site.config.factor == 3.0
    flops, _ = site.cost_after.at(site.hints)
    dense, _ = estimate(site, None, fused=True).at(site.hints)
    assert flops == dense + 1  # the registered formula, not the fallback


def test_the_toy_rewrite_does_not_fire_where_the_policy_says_dense():
    q, k, v = _inputs()
    gm = cfx.transform(TwoAttentions(), (q, k, v), policy={"_default": None})
    assert count_targets(gm, SDPA) == 2
    scales = [n.kwargs.get("scale") for n in gm.graph.nodes if n.target is SDPA]
    assert scales == [pytest.approx(8 ** -0.5)] * 2
    gm = cfx.transform(TwoAttentions(), (q, k, v), policy=Sharpened(factor=2.0))
    scales = [n.kwargs.get("scale") for n in gm.graph.nodes if n.target is SDPA]
    assert scales == [pytest.approx(2 * 8 ** -0.5)] * 2


def test_lookup_walks_the_config_mro_and_rejects_non_configs():
    @dataclasses.dataclass(frozen=True)
    class EvenSharper(Sharpened):
        name: ClassVar[str] = "test_even_sharper"

    assert lowering_for(EvenSharper()) is lower_sharpened
    with pytest.raises(TypeError, match="AttentionConfig subclass"):
        register_lowering(int)
    with pytest.raises(TypeError, match="AttentionConfig subclass"):
        register_cost(dict)


def test_configs_register_by_name_and_round_trip_through_a_policy_dict():
    policy = cfx.Policy.make({"_default": Sharpened(factor=1.5)})
    again = cfx.Policy.from_dict(policy.to_dict())
    assert again.rules[0].config == Sharpened(factor=1.5)
    with pytest.raises(TypeError, match="already used"):
        @dataclasses.dataclass(frozen=True)
        class Clash(cfx.AttentionConfig):
            name: ClassVar[str] = "test_sharpened"
