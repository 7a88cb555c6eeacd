"""The inline_mha pass: `F.multi_head_attention_forward` becomes projections + one attention
spelling (counter `inlined`, node counts before/after), and the MHA features outside its
decomposition — bias_k/bias_v, add_zero_attn, static k/v, unbatched input — leave the call as
written with the reason (an `unsupported` site), outputs still equal to eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clusterfx as cfx
from clusterfx.passes.inline_mha import MHA_FORWARD
from tests.helpers import canonical_count, compile_and_compare, count_targets

E, H, N, B = 16, 4, 7, 2


def _results(compiled, name):
    records = compiled._clusterfx_state.latest_records()
    return [r for rec in records for r in rec.results if r.name == name]


class Functional(nn.Module):
    """Calls the functional form directly, as static_k needs."""

    def __init__(self, static: bool):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, H)
        self.static = static

    def forward(self, x):
        m = self.mha
        static_k = torch.ones(B * H, N, E // H) if self.static else None
        return F.multi_head_attention_forward(
            x, x, x, E, H, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0,
            m.out_proj.weight, m.out_proj.bias, training=False, need_weights=False,
            static_k=static_k)[0]


def test_plain_mha_is_inlined_and_canonicalised():
    torch.manual_seed(0)
    model = nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, N, E)
    captured = cfx.transform(lambda t: model(t, t, t, need_weights=False)[0], (x,),
                             stop_after="inline_mha")
    assert count_targets(captured, MHA_FORWARD) == 0 and canonical_count(captured) == 0
    sdpa = count_targets(captured, torch._C._nn.scaled_dot_product_attention)
    assert sdpa == 1  # the decomposition spells it as SDPA, not yet canonical
    compiled = cfx.compile(model, backend="eager")
    compiled(x, x, x, need_weights=False)
    assert [r.counters["inlined"] for r in _results(compiled, "inline_mha")] == [1]


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"add_bias_kv": True}, "bias_k/bias_v"),
    ({"add_zero_attn": True}, "add_zero_attn"),
])
def test_mha_features_outside_the_decomposition_stay_as_written(kwargs, reason):
    torch.manual_seed(0)
    model = nn.MultiheadAttention(E, H, batch_first=True, **kwargs)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    report = compile_and_compare(Wrap(), (torch.randn(B, N, E),), rtol=1e-6)
    assert [(r.fqn, r.spelling, r.status) for r in report] == [
        ("attn", "nn.MultiheadAttention", "unsupported")]
    assert reason in report[0].reason
    gm = cfx.transform(Wrap(), (torch.randn(B, N, E),))
    assert count_targets(gm, MHA_FORWARD) == 1  # the call is still there


def test_static_k_stays_as_written():
    report = compile_and_compare(Functional(static=True), (torch.randn(N, B, E),), rtol=1e-6)
    assert [r.status for r in report] == ["unsupported"]
    assert "static_k/static_v" in report[0].reason
    report = compile_and_compare(Functional(static=False), (torch.randn(N, B, E),), rtol=1e-6)
    assert [r.status for r in report] == ["kept dense"]  # the same call, inlined


def test_unbatched_input_stays_as_written():
    torch.manual_seed(0)
    model = nn.MultiheadAttention(E, H)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    report = compile_and_compare(Wrap(), (torch.randn(N, E),), rtol=1e-6)
    assert [r.status for r in report] == ["unsupported"]
    assert "unbatched" in report[0].reason
