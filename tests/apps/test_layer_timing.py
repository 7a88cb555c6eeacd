"""The demo's per-layer attention timing runs, per site, the computation the rewrite runs."""

import torch
import torch.nn.functional as F

from clusterfx.apps.layer_timing import layer_table, site_attention, time_layers
from clusterfx.compiler.api import compile as cfx_compile
from clusterfx.compiler.api import explain
from clusterfx.config.configs import Clustered, Dense, ImprovedClustered, TopK


class OneSite(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class TwoSites(torch.nn.Module):
    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        return a + F.scaled_dot_product_attention(q * 0.5, k, v)


def test_timed_op_equals_the_compiled_rewrite():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=g) for _ in range(3))
    for config in (Clustered(clusters=7, seed=0, iterations=2, refine=0, metric="euclidean"),
                   ImprovedClustered(clusters=5, topk=6, seed=1),
                   TopK(k=9, chunk_size=32)):
        torch._dynamo.reset()
        compiled = cfx_compile(OneSite(), policy={"_default": config}, backend="eager")
        torch.testing.assert_close(site_attention(config)(q, k, v), compiled(q, k, v),
                                   atol=1e-6, rtol=1e-6)
    assert site_attention(Dense()) is None and site_attention(None) is None


def test_time_layers_one_row_per_site_with_what_ran():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    torch._dynamo.reset()
    compiled = cfx_compile(TwoSites(), policy={"_default": Clustered(clusters=4, seed=0)},
                           backend="eager")
    compiled(q, k, v)
    rows = time_layers(explain(compiled), runs=1)
    assert [(r["rewrite"], r["impl"], r["q"]) for r in rows] == [
        ("clustered", "cpu", (1, 2, 64, 8))] * 2
    assert all(r["exact_ms"] > 0 and r["policy_ms"] > 0 for r in rows)
    table = layer_table(rows)
    assert table.splitlines()[-1].startswith("all attention") and len(table.splitlines()) == 5
