"""TopK lowering: the canonical node becomes clusterfx::topk_attention per policy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import clusterfx as cfx
from tests.helpers import compile_and_compare, count_targets

B, H, N, D = 2, 4, 16, 8
DT = torch.float64


class Causal(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.proj = nn.Linear(D * H, 3 * D * H, dtype=DT)
        self.p = dropout

    def forward(self, x):
        q, k, v = self.proj(x).view(B, -1, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p
                                              if self.training else 0.0)


def _x(n=N):
    return torch.randn(B, n, D * H, dtype=DT, generator=torch.Generator().manual_seed(0))


def test_topk_all_keys_equals_dense_with_gradients():
    report = compile_and_compare(Causal(), (_x(),), policy=cfx.TopK(k=N), rtol=1e-10)
    assert [(r.rewrite, r.status) for r in report] == [("topk", "rewritten")]
    gm = cfx.transform(Causal(), (_x(),), policy=cfx.TopK(k=N))
    assert count_targets(gm, torch.ops.clusterfx.topk_attention.default) == 1
    assert "scaled_dot_product_attention" not in gm.code


def test_topk_small_k_is_causal_and_approximate():
    model = Causal()
    compiled = cfx.compile(model, policy=cfx.TopK(k=3), backend="eager")
    x = _x()
    with torch.no_grad():
        out = compiled(x)
        x2 = x.clone()
        x2[:, 9:] += 1.0  # change the future
        out2 = compiled(x2)
        dense = model(x)
    assert torch.equal(out[:, :, :9], out2[:, :, :9])
    assert not torch.allclose(out, dense)  # k=3 of 16 keys really approximates
    torch.testing.assert_close(out[:, :, :3], dense[:, :, :3])  # rows with <= 3 keys: exact


def test_topk_declines_dropout_in_training():
    model = Causal(dropout=0.1).train()
    gm = cfx.transform(model, (_x(),), policy=cfx.TopK(k=4))
    row = gm.meta["clusterfx_report"][0]
    assert row.status == "declined" and "dropout" in row.reason
    assert count_targets(gm, torch.ops.clusterfx.topk_attention.default) == 0


def test_topk_on_three_d_bmm_attention():
    def bmm_attn(q, k, v):
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.3, -1), v)

    class M(nn.Module):
        def forward(self, q, k, v):
            return bmm_attn(q, k, v)

    g = torch.Generator().manual_seed(1)
    qkv = tuple(torch.randn(B * H, N, D, dtype=DT, generator=g) for _ in range(3))
    report = compile_and_compare(M(), qkv, policy=cfx.TopK(k=N), rtol=1e-10)
    assert report[0].status == "rewritten"


def test_topk_training_under_inductor_with_permuted_layouts():
    """q/k/v are permuted views (B, H, N, D) of (B, N, H, D): Inductor checks each op's output
    layout against its fake kernel, forward and backward."""
    report = compile_and_compare(Causal(), (_x(),), policy=cfx.TopK(k=N), rtol=1e-10,
                                 backend="inductor")
    assert report[0].status == "rewritten"
