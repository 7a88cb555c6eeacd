"""The cost model: exact attention's formulas (materialised and fused), each rewrite's registered
formula, the fallback for a config without one, symbolic shapes evaluated at their hints, and
Auto's crossover length (the first length at which the rewrite is estimated cheaper)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import sympy

import clusterfx as cfx
from clusterfx.passes.cost_model import crossover_length, estimate
from clusterfx.passes.site import Site

B, H, N, D, DV = 2, 4, 64, 16, 8


def _site(n=N, dtype="float32", nk=None):
    nk = n if nk is None else nk
    return Site("attn", "matmul", q_shape=(B, H, n, D), k_shape=(B, H, nk, D),
                v_shape=(B, H, nk, DV), dtype=dtype)


def test_exact_attention_materialised_and_fused():
    site = _site()
    flops, memory = estimate(site, None, fused=False).at({})
    assert flops == 2 * B * H * N * N * (D + DV)
    assert memory == 2 * B * H * N * N * 4  # scores + probabilities, float32
    flops_fused, memory_fused = estimate(site, cfx.Dense(), fused=True).at({})
    assert flops_fused == flops and memory_fused == B * H * N * (DV + 1) * 4
    assert estimate(_site(dtype="bfloat16"), None, fused=True).at({})[1] == memory_fused / 2


def test_clustered_and_improved_formulas():
    c = cfx.Clustered(clusters=10, iterations=3, bits=31, refine=2, metric="euclidean")
    bh = B * H
    want = (2 * bh * N * D * 31 + 3 * bh * N * 10 + 2 * bh * 10 * N * (D + DV)
            + 2 * 2 * bh * N * 10 * D)
    flops, memory = estimate(_site(), c, fused=True).at({})
    assert flops == want and memory == (bh * 10 * N + bh * N * DV) * 4
    attention_metric = dataclasses.replace(c, metric="attention")
    assert estimate(_site(), attention_metric, fused=True).at({})[0] == want + 2 * bh * N * D * D
    i = cfx.ImprovedClustered(clusters=10, iterations=3, bits=31, refine=2, topk=5,
                              metric="euclidean")
    flops_i, memory_i = estimate(_site(), i, fused=True).at({})
    assert flops_i == want + 2 * bh * N * 5 * (D + DV)
    assert memory_i == memory + bh * N * 5 * 4
    # clusters beyond the number of queries cost as many clusters as queries
    many = dataclasses.replace(c, clusters=10_000)
    assert estimate(_site(), many, fused=True).at({})[0] == estimate(
        _site(), dataclasses.replace(c, clusters=N), fused=True).at({})[0]


def test_topk_formula():
    flops, memory = estimate(_site(), cfx.TopK(k=8, chunk_size=16), fused=True).at({})
    assert flops == 2 * B * H * N * N * D + 2 * B * H * N * 8 * DV
    assert memory == (B * H * 16 * N + B * H * N * 8) * 4


@dataclasses.dataclass(frozen=True)
class Unpriced(cfx.AttentionConfig):
    name: ClassVar[str] = "test_unpriced"


def test_a_config_without_a_formula_costs_materialised_exact_attention():
    assert estimate(_site(), Unpriced(), fused=True) == estimate(_site(), None, fused=False)
    assert crossover_length(_site(), Unpriced()) is None


def test_symbolic_shapes_are_evaluated_at_their_hints():
    s = sympy.Symbol("s0", positive=True, integer=True)
    site = Site("attn", "sdpa", q_shape=(B, H, s, D), k_shape=(B, H, s, D),
                v_shape=(B, H, s, DV), dtype="float32", hints={s: 100})
    cost = estimate(site, None, fused=True)
    assert cost.flops.free_symbols == {s}
    assert cost.at(site.hints) == estimate(_site(100), None, fused=True).at({})


@pytest.mark.parametrize("config", [cfx.Clustered(clusters=32), cfx.ImprovedClustered(
    clusters=16, topk=16)])
def test_crossover_is_the_first_length_where_the_rewrite_is_cheaper(config):
    from clusterfx.passes.cost_model import cost_for, dense_cost, dims_of

    entry = cost_for(config)
    n = crossover_length(_site(), config)
    assert n is not None and n > 16

    def cheaper(length):
        dims = dims_of((B * H, length, D), (B * H, length, DV), "float32")
        return float(entry.formula(dims, config).flops) / entry.efficiency < float(
            dense_cost(dims, fused=True).flops)

    assert cheaper(n) and not cheaper(n - 1)
    assert crossover_length(_site(), config, limit=n - 1) is None
