"""The coverage table: 40 Hugging Face architectures (tests/passes/hf_zoo.py) plus the full
`nn.Transformer` / `nn.TransformerDecoder`, compiled one after another in ONE process without
resetting dynamo (as a notebook or a sweep would), each asserting

- its sites: the module path of every attention, in order, each a real module of the model,
  with the expected status (dense under an empty policy, or "unsupported" with a reason);
- outputs and gradients equal to the eager model (fp32, 1e-5 relative);
- that every call reached clusterfx (no capture problem);
- for decoders and encoder-decoders: every decoder-side site has a causal query stream, and
  changing the last target token moves no earlier output under any config (Dense, Clustered,
  ImprovedClustered, TopK, Auto) — the causality perturbation test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import clusterfx as cfx
from tests.helpers import compile_and_compare

pytest.importorskip("transformers")
from tests.passes.hf_zoo import ZOO, B, E, V  # noqa: E402

pytestmark = pytest.mark.no_dynamo_reset

CONFIGS = [cfx.Dense(), cfx.Clustered(clusters=3, seed=0),
           cfx.ImprovedClustered(clusters=3, topk=4, seed=0), cfx.TopK(k=4),
           cfx.Auto(candidate=cfx.Clustered(clusters=3, seed=0))]
CAUSAL = [a for a in ZOO if a.causal]


def _decoder_side(arch, path: str) -> bool:
    return "decoder" in path or not any("encoder" in p for p in arch.sites)


@pytest.mark.parametrize("arch", ZOO, ids=[a.name for a in ZOO])
def test_sites_paths_outputs_and_gradients(arch):
    model, inputs = arch.build()
    report = compile_and_compare(model, inputs, rtol=1e-5)
    paths = [r.fqn for r in report]
    assert paths == arch.sites, str(report)
    modules = dict(model.named_modules())
    assert all(p in modules for p in paths)
    assert [r.status for r in report] == [arch.expected(p) for p in paths], str(report)
    assert all(r.reason for r in report if r.status == "unsupported")
    assert not report.capture_problems and report.calls == 1
    if arch.causal:
        for r in report:
            if r.status != "unsupported":
                assert r.site.causal_queries == _decoder_side(arch, r.fqn), (r.fqn, str(report))


def _perturbed(inputs: tuple, index: int) -> tuple:
    changed = list(inputs)
    ids = changed[index].clone()
    ids[:, -1] = 3 + (ids[:, -1] - 2) % (V - 3)  # another token id, never a special one
    changed[index] = ids
    return tuple(changed)


def assert_no_leak(model, inputs, changed, config, report_check=None):
    compiled = cfx.compile(model, policy=config, backend="eager")
    with torch.no_grad():
        a, b = compiled(*inputs), compiled(*changed)
        ref = model(*inputs)
    earlier = (a[:, :-1] - b[:, :-1]).abs().max().item()
    assert earlier <= 1e-6 * ref.abs().max().item(), (config, earlier)
    report = cfx.explain(compiled)
    for r in report:  # queries pooled on a causal query stream would be the leak
        if r.site.causal_queries and r.site.config is not None:
            assert r.site.config.name not in ("clustered", "improved_clustered"), str(report)
    return report


def _alternating(sites: list[str], a, b) -> list[dict]:
    """Two policies that give every site both configs: a, b, a, ... and b, a, b, ..."""
    return [{p: (a, b)[(i + swap) % 2] for i, p in enumerate(sites)} for swap in (0, 1)]


def _check_declines(report, policy) -> None:
    """Clustered on a causal query stream runs the causal variant (queries never pooled) and
    says so, or is declined with the reason; never silent."""
    resolved = cfx.Policy.make(policy)
    for r in report:
        if r.site.causal_queries and isinstance(resolved.resolve(r.fqn).config, cfx.Clustered):
            if r.status == "declined":
                assert r.reason, str(report)
            else:
                assert "causal" in r.reason, str(report)
                assert r.site.config is None or r.site.config.name.startswith("causal_"), \
                    str(report)


@pytest.mark.parametrize("arch", CAUSAL, ids=[a.name for a in CAUSAL])
def test_no_causal_leak(arch):
    """Every decoder-side site under both approximate families (two compiles: each site gets
    ImprovedClustered in one and TopK in the other); the full config matrix is the slow test
    below."""
    model, inputs = arch.build()
    changed = _perturbed(inputs, arch.perturb)
    for policy in _alternating(arch.sites, cfx.ImprovedClustered(clusters=3, topk=4, seed=0),
                               cfx.TopK(k=4)):
        _check_declines(assert_no_leak(model, inputs, changed, policy), policy)


@pytest.mark.slow
@pytest.mark.parametrize("arch", CAUSAL, ids=[a.name for a in CAUSAL])
def test_no_causal_leak_under_every_config(arch):
    model, inputs = arch.build()
    changed = _perturbed(inputs, arch.perturb)
    for config in CONFIGS:
        _check_declines(assert_no_leak(model, inputs, changed, config), config)


def test_the_perturbation_check_sees_a_leak():
    """The check above can fail: pooling decoder queries (what clustered attention does when
    nothing stops it) moves earlier rows when the last query changes."""
    from clusterfx.ops.clustered import clustered_attention_from_assignments

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    assign = torch.zeros(1, 2, 8, dtype=torch.int64)  # one cluster: every row pools all queries
    changed = q.clone()
    changed[:, :, -1] += 1.0
    a = clustered_attention_from_assignments(q, k, v, assign, 1, impl="reference")
    b = clustered_attention_from_assignments(changed, k, v, assign, 1, impl="reference")
    assert (a[:, :, :-1] - b[:, :, :-1]).abs().max() > 1e-3


# ------------------------------------------------------------------------- torch.nn models

def _nn_transformer():
    torch.manual_seed(0)
    model = nn.Transformer(E, 4, 2, 2, 64, dropout=0.0, batch_first=True).eval()
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(B, 10, E, generator=g), torch.randn(B, 7, E, generator=g)
    mask = nn.Transformer.generate_square_subsequent_mask(7)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, src, tgt):
            return self.model(src, tgt, tgt_mask=mask)

    sites = ([f"model.encoder.layers.{i}.self_attn" for i in range(2)]
             + [p for i in range(2) for p in (f"model.decoder.layers.{i}.self_attn",
                                              f"model.decoder.layers.{i}.multihead_attn")])
    return Seq2Seq(), (src, tgt), sites


def _nn_decoder():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, 2).eval()
    g = torch.Generator().manual_seed(1)
    tgt, memory = torch.randn(B, 7, E, generator=g), torch.randn(B, 10, E, generator=g)
    mask = nn.Transformer.generate_square_subsequent_mask(7)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tgt, memory):
            return self.model(tgt, memory, tgt_mask=mask)

    sites = [p for i in range(2) for p in (f"model.layers.{i}.self_attn",
                                           f"model.layers.{i}.multihead_attn")]
    return Decoder(), (tgt, memory), sites


NN = {"nn.Transformer": (_nn_transformer, 1), "nn.TransformerDecoder": (_nn_decoder, 0)}


@pytest.mark.parametrize("name", list(NN))
def test_torch_nn_encoder_decoders(name):
    build, target = NN[name]
    model, inputs, sites = build()
    report = compile_and_compare(model, inputs, rtol=1e-5)
    assert [r.fqn for r in report] == sites and not report.capture_problems, str(report)
    for r in report:
        assert r.site.causal_queries == ("decoder" in r.fqn or name.endswith("Decoder"))
    changed = list(inputs)
    changed[target] = inputs[target].clone()
    changed[target][:, -1] += 1.0  # the last target position
    for config in CONFIGS:
        assert_no_leak(model, inputs, tuple(changed), config)
