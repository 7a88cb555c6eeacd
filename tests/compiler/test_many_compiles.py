"""Compiles in a long-lived process (a notebook, a policy sweep, a test run): none of these
tests resets dynamo, so compiles accumulate as they would for a user.

- 50 compiles of one Hugging Face model with alternating policies all apply and explain;
- 25 different architectures one after another all rewrite and explain;
- when dynamo does not hand a call to clusterfx (`torch._dynamo.disable`, the recompile
  limit), the user is warned once with the cause, `explain()` reports it, `strict` raises;
- `strict=True` raises at the first call for a policy key that matches no site;
- `transform()` leaves other compiled models' caches alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import clusterfx as cfx
from clusterfx.compiler.capture import CaptureWarning

transformers = pytest.importorskip("transformers")
from tests.passes.hf_zoo import ZOO, Main, ids, padding  # noqa: E402

pytestmark = pytest.mark.no_dynamo_reset


def _bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                  intermediate_size=64, vocab_size=100,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg)
    return Main(model, ["input_ids", "attention_mask"]), (ids(), padding())


@pytest.mark.parametrize("count", [16, pytest.param(50, marks=pytest.mark.slow)])
def test_fifty_compiles_of_one_model_with_alternating_policies(count):
    """16 in the default tier (twice the ~8 after which dynamo used to stop handing graphs
    over, ~15 s on 2 loaded cores), the full 50 in the slow tier (~55 s)."""
    model, inputs = _bert()
    with torch.no_grad():
        ref = model(*inputs)
    for i in range(count):
        policy = cfx.Clustered(clusters=3, seed=i) if i % 2 else cfx.Dense()
        compiled = cfx.compile(model, policy=policy, backend="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("error", CaptureWarning)
            with torch.no_grad():
                out = compiled(*inputs)
        report = cfx.explain(compiled)
        want = "rewritten" if i % 2 else "kept dense"
        assert [r.status for r in report] == [want, want], (i, str(report))
        assert not report.capture_problems and report.graphs == 1
        if i % 2:  # the approximate path ran: this compile's graph, not a reused dense one
            assert all(r.paths == {"approximate [cpu]": 1} for r in report), (i, str(report))
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_twenty_five_architectures_one_after_another():
    archs = [a for a in ZOO if not a.kinds][:25]
    assert len({a.name for a in archs}) == 25
    for arch in archs:
        model, inputs = arch.build()
        compiled = cfx.compile(model, policy=cfx.TopK(k=4), backend="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("error", CaptureWarning)
            with torch.no_grad():
                compiled(*inputs)
        report = cfx.explain(compiled)
        assert [r.fqn for r in report] == arch.sites, arch.name
        assert all(r.status == "rewritten" for r in report), (arch.name, str(report))
        assert all(sum(r.paths.values()) == 1 for r in report), (arch.name, str(report))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v


def test_disabled_forward_warns_once_and_is_reported():
    model = _Attention()
    model.forward = torch._dynamo.disable(model.forward)
    compiled = cfx.compile(model, policy=cfx.TopK(k=2), backend="eager")
    x = torch.randn(2, 6, 16)
    with pytest.warns(CaptureWarning, match="torch._dynamo.disable") as record:
        compiled(x)
        compiled(x)
    assert len([w for w in record if issubclass(w.category, CaptureWarning)]) == 1
    report = cfx.explain(compiled)  # not "the model has not run yet"
    assert len(report) == 0 and report.calls == 2
    (cause, calls), = report.capture_problems.items()
    assert "torch._dynamo.disable" in cause and calls == 2
    assert "NOT CAPTURED in 2 of 2 call(s)" in str(report)


def test_recompile_limit_is_named_and_strict_raises():
    model = _Attention()
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled = cfx.compile(model, backend="eager", dynamic=False)
        with pytest.warns(CaptureWarning, match="recompile_limit"):
            for n in (4, 5, 6):
                compiled(torch.randn(2, n, 16))
        report = cfx.explain(compiled)
        assert report.graphs == 1 and sum(report.capture_problems.values()) == 2
        strict = cfx.compile(model, backend="eager", dynamic=False, strict=True)
        strict(torch.randn(2, 4, 16))
        with pytest.raises(cfx.PolicyError, match="recompile_limit"):
            strict(torch.randn(2, 5, 16))


def test_strict_raises_at_the_first_call_for_unmatched_keys():
    model = _Attention()
    compiled = cfx.compile(model, policy={"nothing.here": cfx.TopK(k=2)}, backend="eager",
                           strict=True)
    with pytest.raises(cfx.PolicyError, match="nothing.here"):
        compiled(torch.randn(2, 6, 16))


def test_transform_leaves_other_compiles_alone():
    model = _Attention()
    compiled = cfx.compile(model, policy=cfx.TopK(k=2), backend="eager")
    x = torch.randn(2, 6, 16)
    compiled(x)
    cfx.transform(_Attention(), (x,))
    compiled(x)
    report = cfx.explain(compiled)
    assert report.compiles == 1 and report.calls == 2 and not report.capture_problems
