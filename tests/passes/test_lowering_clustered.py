"""Clustered / improved-clustered / Auto lowering: degenerate settings equal dense attention
exactly (outputs and gradients), key padding is honoured, unsupported sites are declined with a
reason, and the per-call path (approximate or exact) is reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clusterfx as cfx
from clusterfx.models import bert_tiny, example_inputs, gpt_tiny
from tests.helpers import assert_within_eager_error, compile_and_compare, count_targets, rel_err

B, H, D = 2, 4, 8
DT = torch.float64
COND = torch.ops.clusterfx.conditional_attention.default


class PaddedAttention(nn.Module):
    """Self-attention over (B, N, H·D) with a key-padding mask (True = keep)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(H * D, 3 * H * D, dtype=DT)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def _inputs(n=24, pad=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, n, H * D, dtype=DT, generator=g)
    keep = torch.ones(B, n, dtype=torch.bool)
    keep[1, n - pad:] = False
    return x, keep


@pytest.mark.parametrize("config", [
    cfx.Clustered(clusters=24, seed=0),                      # one query per cluster
    cfx.Clustered(clusters=24, seed=0, refine=2),            # refinement keeps singletons
    cfx.ImprovedClustered(clusters=3, topk=24, seed=0),      # top-k covers every key
    cfx.ImprovedClustered(clusters=3, topk=24, seed=0, refine=1),
], ids=["clustered-C=N", "clustered-C=N-refine", "improved-topk=N", "improved-refine"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_degenerate_settings_equal_dense(config, backend):
    model = PaddedAttention()
    x, keep = _inputs()
    report = compile_and_compare(model, (x, keep), policy=config, rtol=1e-10, backend=backend)
    assert [(r.rewrite, r.status) for r in report] == [(config.name, "rewritten")]
    assert report[0].paths == {"approximate [cpu]": 1}  # one compiled forward
    gm = cfx.transform(model, (x, keep), policy=config)
    assert count_targets(gm, COND) == 1


def test_approximation_is_real_and_padding_is_ignored():
    model = PaddedAttention()
    x, keep = _inputs(n=48)
    compiled = cfx.compile(model, policy=cfx.Clustered(clusters=4, seed=0), backend="eager")
    with torch.no_grad():
        out, dense = compiled(x, keep), model(x, keep)
        x2 = x.clone()
        x2[1, ~keep[1]] += 10.0  # padded tokens change: only their own rows may change
        out2 = compiled(x2, keep)
    assert rel_err(out, dense) > 1e-3  # 4 clusters for 48 queries: an approximation
    assert torch.equal(out[0], out2[0])  # batch elements are clustered independently
    # the padded positions' keys are masked out: with the clustering fixed by seed, the rows
    # of valid queries of element 1 only move if their clusters move; C = N pins them
    pinned = cfx.compile(model, policy=cfx.Clustered(clusters=48, seed=0), backend="eager")
    with torch.no_grad():
        a, b = pinned(x, keep), pinned(x2, keep)
    assert torch.allclose(a[1][:, keep[1]], b[1][:, keep[1]], rtol=0, atol=1e-12)


def test_causal_sites_go_to_the_causal_variant():
    """Queries are never pooled on a causal site: it runs the causal variant (its own tests:
    tests/passes/test_lowering_causal.py), not the clustered op."""
    model = gpt_tiny(dropout=0.0).eval()
    ids = example_inputs("gpt", model=model, seq_len=16)[0]
    compiled = cfx.compile(model, policy=cfx.ImprovedClustered(clusters=4), backend="eager")
    report = cfx.explain(compiled, ids)
    assert all(r.status == "rewritten" and r.reason.startswith("causal:") and
               r.site.config.name == "causal_improved_clustered" for r in report)
    gm = cfx.transform(model, (ids,), policy=cfx.ImprovedClustered(clusters=4))
    assert count_targets(gm, COND) == 0


def test_static_mask_that_is_never_key_padding_is_declined():
    class Banded(nn.Module):
        def forward(self, q, k, v):
            n = q.shape[-2]
            i = torch.arange(n)
            keep = (i[None, :] - i[:, None]).abs() <= 3
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(B, H, 20, D, dtype=DT, generator=g) for _ in range(3))
    report = compile_and_compare(Banded(), qkv, policy=cfx.Clustered(clusters=2), rtol=1e-12)
    assert report[0].status == "declined" and "never key padding or causal" in report[0].reason
    assert report[0].site.mask_kind == "general" and not report[0].site.mask_observed


def test_input_mask_that_is_not_key_padding_runs_exact_with_its_own_status():
    class Masked(nn.Module):
        def forward(self, q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(B, H, 20, D, dtype=DT, generator=g) for _ in range(3))
    i = torch.arange(20)
    banded = (i[None, :] - i[:, None]).abs() <= 3
    report = compile_and_compare(Masked(), (*qkv, banded), policy=cfx.Clustered(clusters=2),
                                 rtol=1e-12)
    assert report[0].status == "rewritten, runs exact" and "never ran" in report[0].reason
    # a mask that varies over queries may be a decoder's causal + padding mask, so the site
    # runs the op that can tell (ops/causal_clustered); this one is neither: exact
    assert report[0].paths == {"exact: mask is neither causal nor key padding": 1}
    assert report[0].site.mask_kind == "general" and report[0].site.mask_observed


def test_min_length_switches_per_call_without_recompiling_each_length():
    model = PaddedAttention()
    compiled = cfx.compile(model, policy=cfx.Clustered(clusters=4, seed=0, min_length=32),
                           backend="eager")
    with torch.no_grad():
        for n in (16, 20, 40, 48, 56):
            x, keep = _inputs(n=n)
            out = compiled(x, keep)
            exact = rel_err(out, model(x, keep)) < 1e-12
            assert exact == (n < 32), n
    assert len(compiled._clusterfx_state.records) <= 2
    paths = cfx.explain(compiled)[0].paths
    assert paths == {"exact: shorter than min_length": 2, "approximate [cpu]": 3}


def test_auto_uses_the_cost_model_crossover():
    model = bert_tiny(depth=1, dropout=0.0).eval()
    ids, mask = example_inputs("bert", model=model, seq_len=16)
    report = cfx.explain(cfx.compile(model, policy=cfx.Auto(), backend="eager"), ids, mask)
    row = report[0]
    crossover = row.site.crossover
    assert 16 < crossover < 4096 and f"crossover at {crossover}" in row.reason
    assert row.paths == {"exact: shorter than min_length": 1}
    topk_auto = cfx.explain(cfx.compile(model, policy=cfx.Auto(candidate=cfx.TopK(k=4)),
                                        backend="eager"), ids, mask)
    assert topk_auto[0].status == "declined" and "never cheaper" in topk_auto[0].reason


def test_dropout_and_learned_bias_are_declined():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1, 1, 1, 12, dtype=DT))

        def forward(self, q, k, v):
            return torch.softmax(q @ k.mT * 0.3 + self.bias, -1) @ v

    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(B, H, 12, D, dtype=DT, generator=g) for _ in range(3))
    gm = cfx.transform(Biased(), qkv, policy=cfx.Clustered(clusters=3))
    assert "requires grad" in gm.meta["clusterfx_report"][0].reason
    assert count_targets(gm, COND) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", [cfx.ImprovedClustered(clusters=4, topk=48, seed=0),
                                    cfx.Clustered(clusters=48, seed=0), cfx.TopK(k=48)],
                         ids=["improved", "clustered", "topk"])
def test_low_precision_degenerate_settings_within_the_dtype_error(dtype, config):
    """Against the float64 oracle, the compiled model errs no more than eager does in dtype."""
    torch.manual_seed(0)
    model = bert_tiny(depth=2, dropout=0.0).eval()
    ids, mask = example_inputs("bert", model=model, seq_len=48)
    keep = mask.bool()
    with torch.no_grad():
        oracle = model.double()(ids, mask)[keep]
        model = model.to(dtype)
        eager = model(ids, mask)[keep].double()
        compiled = cfx.compile(model, policy=config, backend="inductor")
        got = compiled(ids, mask)[keep].double()
    assert all(r.status == "rewritten" for r in cfx.explain(compiled))
    assert_within_eager_error(got, eager, oracle, dtype)
