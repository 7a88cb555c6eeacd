"""compile(): backends, training, dynamic sequence lengths, graph breaks, the named backend,
policy changes, strictness, reports, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

import clusterfx as cfx
from clusterfx.models import bert_tiny, example_inputs, gpt_tiny
from tests.helpers import compile_and_compare, run_with_grads


@dataclasses.dataclass(frozen=True)
class _NoLowering(cfx.AttentionConfig):
    """A config no lowering is registered for."""

    name: ClassVar[str] = "no_lowering_here"


def _gpt(depth=2, **kw):
    torch.manual_seed(0)
    return gpt_tiny(depth=depth, dropout=0.0, **kw).eval()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_training_through_backends(backend):
    model = _gpt().train()  # dropout 0: train mode, no randomness
    ids = example_inputs("gpt", model=model, seq_len=16)
    report = compile_and_compare(model, ids, backend=backend, rtol=1e-5)
    assert [r.fqn for r in report] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(r.site.causal for r in report)


def test_optimizer_steps_match_eager():
    torch.manual_seed(0)
    ref, comp = _gpt(), _gpt()
    comp.load_state_dict(ref.state_dict())
    compiled = cfx.compile(comp, backend="aot_eager")
    opt_a = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(comp.parameters(), lr=0.1)
    ids = example_inputs("gpt", model=ref, seq_len=16)[0]
    for _ in range(3):
        for model, opt in ((ref, opt_a), (compiled, opt_b)):
            opt.zero_grad()
            model(ids).float().pow(2).mean().backward()
            opt.step()
    for (name, a), b in zip(ref.named_parameters(), comp.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_dynamic_sequence_lengths_bounded_recompiles():
    model = _gpt()
    compiled = cfx.compile(model, backend="aot_eager")
    for n in (8, 13, 21, 34, 55):
        ids = example_inputs("gpt", model=model, seq_len=n)[0]
        with torch.no_grad():
            got, want = compiled(ids), model(ids)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), n
    state = compiled._clusterfx_state
    assert len(state.records) <= 2  # static first shape, then one dynamic graph
    report = cfx.explain(compiled)
    assert len(report) == 2 and all(r.site.causal for r in report)
    shape = report[0].site.q_shape
    assert any(isinstance(d, sympy.Expr) and d.free_symbols for d in shape), shape
    costs = report[0].costs()
    assert costs["flops_before"].free_symbols and costs["flops_before_value"] > 0


def test_graph_breaks_every_graph_is_transformed():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 48)
            self.b = nn.Linear(16, 48)

        def attend(self, lin, x):
            q, k, v = lin(x).view(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 10, 16)

        def forward(self, x):
            y = self.attend(self.a, x)
            print("graph break")  # noqa: T201 - forces a second graph
            return self.attend(self.b, y)

    model = Broken()
    x = torch.randn(2, 10, 16)
    report = compile_and_compare(model, (x,), rtol=1e-5)
    assert report.graphs == 2
    assert [r.fqn for r in report] == ["", ""]
    assert {r.site.graph_index for r in report} == {0, 1}


def test_named_backend_and_explain_without_argument():
    model = _gpt()
    ids = example_inputs("gpt", model=model, seq_len=8)[0]
    compiled = torch.compile(model, backend="clusterfx",
                             options={"policy": {"blocks.1": None}, "backend": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
    report = cfx.explain()
    assert [r.site.policy_key for r in report] == [None, "blocks.1"]


def test_policy_change_never_reuses_a_stale_graph():
    model = _gpt()
    ids = example_inputs("gpt", model=model, seq_len=8)[0]
    first = cfx.compile(model, policy={"blocks.0": None}, backend="inductor")
    first(ids)
    second = cfx.compile(model, policy={"blocks.1": None}, backend="inductor")
    second(ids)
    # the second compile ran its own passes with its own policy
    assert len(second._clusterfx_state.records) == 1
    assert [r.site.policy_key for r in cfx.explain(second)] == [None, "blocks.1"]
    assert [r.site.policy_key for r in cfx.explain(first)] == ["blocks.0", None]


def test_strict_unmatched_key_and_declined_config():
    model = _gpt()
    ids = example_inputs("gpt", model=model, seq_len=8)[0]
    loose = cfx.compile(model, policy={"nothing.here": None}, backend="eager")
    assert cfx.explain(loose, ids).unmatched_keys == ["nothing.here"]
    strict = cfx.compile(model, policy={"nothing.here": None}, backend="eager", strict=True)
    with pytest.raises(ValueError, match="nothing.here"):
        cfx.explain(strict, ids)
    # a config without an available lowering is reported, or an error under strict
    unknown = _NoLowering()
    report = cfx.explain(cfx.compile(model, policy=unknown, backend="eager"), ids)
    assert all(r.status == "declined" and "no_lowering_here" in r.reason for r in report)
    with pytest.raises(cfx.PolicyError, match="no_lowering_here cannot apply"):
        cfx.compile(model, policy=unknown, backend="eager", strict=True)(ids)


def test_twelve_layer_report():
    model = bert_tiny(depth=12).eval()
    ids, mask = example_inputs("bert", model=model, seq_len=32)
    report = cfx.explain(cfx.compile(model, backend="eager"), ids, mask)
    assert [r.fqn for r in report] == [f"encoder.layer.{i}.attention" for i in range(12)]
    b, n, dim, heads = ids.shape[0], 32, 64, 4
    for row in report:
        costs = row.costs()
        # two matmuls of B·H·N·N·(D) multiply-adds each
        assert costs["flops_before_value"] == 2 * b * heads * n * n * (dim // heads) * 2
        assert row.site.mask == "additive" and not row.site.causal
    text = str(report)
    assert "encoder.layer.11.attention" in text and "12 attention site(s)" in text
    md = report.to_markdown()
    assert md.count("\n| encoder.layer.") == 12
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["sites"]) == 12 and data["sites"][0]["flops_before_value"] > 0


def test_transform_returns_readable_running_code():
    model = _gpt()
    ids = example_inputs("gpt", model=model, seq_len=8)[0]
    gm = cfx.transform(model, (ids,))
    assert "scaled_dot_product_attention" in gm.code and "softmax" not in gm.code
    canon = cfx.transform(model, (ids,), stop_after="canonicalize")
    assert canon.code.count("clusterfx.attention") == 2
    ref, _ = run_with_grads(model, (ids,), [])
    assert len(gm.meta["clusterfx_report"]) == 2 and ref[0].shape[1] == 8


def test_bad_arguments_raise_before_work():
    model = _gpt()
    with pytest.raises(ValueError, match=r"backend \('tensorrt-nope'\) must be one of"):
        cfx.compile(model, backend="tensorrt-nope")
    with pytest.raises(TypeError, match="must be a config"):
        cfx.compile(model, policy={"blocks.0": "dense"})
    with pytest.raises(ValueError, match="not a valid regex"):
        cfx.compile(model, policy={"re:blocks.[": cfx.Dense()})
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        cfx.compile(42)
    with pytest.raises(ValueError, match="stop_after"):
        cfx.transform(model, example_inputs("gpt", model=model, seq_len=8), stop_after="x")
    with pytest.raises(TypeError, match="explain"):
        cfx.explain(model)


def test_attention_op_rejects_wrong_rank():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"rank"):
        torch.ops.clusterfx.attention(q, q, q, None, 0.0, False, 1.0, False)
    q3, k3 = torch.randn(2, 5, 8), torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"head dim"):
        torch.ops.clusterfx.attention(q3, k3, k3, None, 0.0, False, 1.0, False)
