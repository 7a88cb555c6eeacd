"""PatchToCluster lowering: dense self-attention over patches -> clusterfx::paca_attention in
the reference ViT, Hugging Face ViT / DeiT and a timm-style ViT; the clustering modules it
installs on the model (parameters, optimizer, state_dict, reuse across recompiles); exactness
with M = N and an identity assignment; the sites it must leave dense, with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import clusterfx as cfx
from clusterfx.models import bert_tiny, gpt_tiny, vit_tiny
from clusterfx.ops.paca import PatchClustering
from tests.helpers import canonical_count, count_targets
from tests.passes.timm_style import VisionTransformer

PACA = torch.ops.clusterfx.paca_attention.default
torch.manual_seed(0)


def vit(dtype=torch.float32, depth=2):
    torch.manual_seed(0)
    return vit_tiny(image_size=32, patch_size=8, dim=32, depth=depth, heads=4,
                    dropout=0.0).to(dtype)


def images(b=2, dtype=torch.float32, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def clustering_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PatchClustering)}


def set_identity(module: PatchClustering) -> None:
    """Logits 0 on the diagonal, -1e4 elsewhere (an exact identity after softmax), with the
    head's last layer zero (the "pool" init)."""
    n = module.prior.shape[0]
    with torch.no_grad():
        module.prior.copy_(torch.full((n, n), -1e4).fill_diagonal_(0.0))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("kind", ["conv", "mlp", "linear"])
def test_m_equal_n_with_identity_assignment_equals_dense(backend, kind):
    model = vit(torch.float64).eval()
    x = images(dtype=torch.float64)
    dense = model(x)
    cm = cfx.compile(model, policy=cfx.PatchToCluster(clusters=16, clustering=kind),
                     backend=backend)
    cm(x)
    modules = clustering_modules(model)
    assert sorted(modules) == ["blocks.0.attn.paca_clustering", "blocks.1.attn.paca_clustering"]
    for module in modules.values():
        set_identity(module)
    torch.testing.assert_close(cm(x), dense, rtol=1e-12, atol=1e-12)
    report = cfx.explain(cm)
    assert [r.status for r in report] == ["rewritten", "rewritten"]
    assert all("16 parameters" not in r.reason and "1 prefix tokens" in r.reason for r in report)


def test_graph_counts_and_clustering_parameters_are_graph_attributes():
    model = vit()
    gm = cfx.transform(model, (images(),), policy=cfx.PatchToCluster(clusters=4))
    assert count_targets(gm, PACA) == 2 and canonical_count(gm) == 0
    getattrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(getattrs) == 2 * 6  # conv head: dw w/b, pw w/b, out w, prior
    gm_dense = cfx.transform(vit(), (images(),), policy=None)
    assert count_targets(gm_dense, PACA) == 0


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_optimizer_built_after_first_call_trains_the_clustering(backend):
    model = vit()
    cm = cfx.compile(model, policy={"blocks.0": cfx.PatchToCluster(clusters=4)},
                     backend=backend)
    x, y = images(8), torch.arange(8) % 10
    cm(x)  # installs blocks.0.attn.paca_clustering (blocks.1 patches never reach the head)
    assert list(clustering_modules(model)) == ["blocks.0.attn.paca_clustering"]
    names = [n for n, _ in model.named_parameters() if "paca_clustering" in n]
    assert len(names) == 6
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    head = clustering_modules(model)["blocks.0.attn.paca_clustering"]
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(cm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, p in head.named_parameters():
        assert p.grad is not None and not torch.equal(p, before[name]), name
    # the compiled model reads the updated parameters: it equals the eager rewritten model
    # recompiled from scratch with the same (trained) modules, which are reused
    assert torch.allclose(cm(x), cfx.compile(model, policy={"blocks.0": cfx.PatchToCluster(
        clusters=4)}, backend="eager")(x), atol=1e-5)
    assert len(clustering_modules(model)) == 1


def test_state_dict_round_trips_into_a_fresh_model():
    policy = cfx.PatchToCluster(clusters=4, clustering="mlp")
    model = vit()
    cm = cfx.compile(model, policy=policy, backend="eager")
    x = images()
    cm(x)
    for module in clustering_modules(model).values():  # make the state non-trivial
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
    want = cm(x)
    state = model.state_dict()
    assert sum("paca_clustering" in k for k in state) == 2 * 5
    fresh = vit()
    with torch.no_grad():
        fresh.blocks[0].attn.qkv.weight.zero_()  # differs until loaded
    fresh_cm = cfx.compile(fresh, policy=policy, backend="aot_eager")
    fresh_cm(x)  # installs the modules, then the checkpoint fills them
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh_cm(x), want, rtol=1e-5, atol=1e-6)
    # and the compiled wrapper's own state_dict carries the same entries
    assert {k for k in cm.state_dict() if k.startswith("_orig_mod.")} == {
        f"_orig_mod.{k}" for k in state}


def test_recompiles_reuse_the_installed_module():
    model = vit()
    cm = cfx.compile(model, policy=cfx.PatchToCluster(clusters=4), backend="eager")
    cm(images(2))
    first = clustering_modules(model)["blocks.0.attn.paca_clustering"]
    model.eval()
    with torch.no_grad():
        cm(images(3))  # eval mode and a new batch size: recompiles
    cm(images(5))
    assert clustering_modules(model)["blocks.0.attn.paca_clustering"] is first
    report = cfx.explain(cm)
    assert report.compiles >= 2 and all("reused" in r.reason for r in report)


HF = ("vit", "deit")


def _hf(name, impl):
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                 intermediate_size=64, image_size=32, patch_size=8, num_channels=3,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 attn_implementation=impl)
    if name == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**small))
        return model, "vit", 1
    model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**small))
    return model, "deit", 2  # class + distillation tokens


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", HF)
def test_huggingface_vit_and_deit(name, impl):
    model, prefix_name, prefix = _hf(name, impl)
    wrapped = Logits(model.eval())
    x = images()
    dense = wrapped(x)
    cm = cfx.compile(wrapped, policy=cfx.PatchToCluster(clusters=16, clustering="linear"),
                     backend="eager")
    cm(x)
    report = cfx.explain(cm)
    assert [r.fqn for r in report] == [f"model.{prefix_name}.layers.{i}.attention"
                                       for i in range(2)]
    assert all(r.status == "rewritten" and f"{prefix} prefix tokens" in r.reason
               for r in report), str(report)
    for module in clustering_modules(wrapped).values():
        set_identity(module)
    torch.testing.assert_close(cm(x), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_timm_style_vit_with_register_tokens(fused, reg_tokens):
    torch.manual_seed(0)
    model = VisionTransformer(reg_tokens=reg_tokens, fused_attn=fused).double().eval()
    x = images(dtype=torch.float64)
    dense = model(x)
    cm = cfx.compile(model, policy=cfx.PatchToCluster(clusters=64, clustering="conv"),
                     backend="aot_eager")
    cm(x)
    report = cfx.explain(cm)
    assert all(f"{1 + reg_tokens} prefix tokens" in r.reason and "grid 8x8" in r.reason
               for r in report), str(report)
    for module in clustering_modules(model).values():
        set_identity(module)
    torch.testing.assert_close(cm(x), dense, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- where it must not fire
def _declines(model, inputs, policy):
    cm = cfx.compile(model, policy=policy, backend="eager")
    cm(*inputs)
    return cfx.explain(cm)


def test_text_models_are_kept_dense_with_the_reason():
    report = _declines(bert_tiny(dim=32, depth=1, heads=4).eval(), (torch.randint(1, 100, (2, 12)),
                                                              torch.ones(2, 12, dtype=torch.long)),
                       cfx.PatchToCluster(clusters=4, grid=(3, 4)))
    assert report[0].status == "declined" and "mask" in report[0].reason
    report = _declines(gpt_tiny(dim=32, depth=1, heads=4).eval(), (torch.randint(1, 100, (2, 12)),),
                       cfx.PatchToCluster(clusters=4, grid=(3, 4)))
    assert report[0].status == "declined" and "causal" in report[0].reason


def test_grid_that_does_not_match_the_sequence_is_declined():
    report = _declines(vit(), (images(),), cfx.PatchToCluster(clusters=4, grid=(5, 5)))
    assert all(r.status == "declined" for r in report)
    assert "17 tokens, which is not the 5x5 patch grid (25)" in report[0].reason
    report = _declines(vit(), (images(),), cfx.PatchToCluster(clusters=4, prefix_tokens=2))
    assert "4x4 grid plus prefix_tokens=2 makes 18" in report[0].reason


def test_cross_attention_is_not_self_attention_over_patches():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.grid_size = (4, 4)
            self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))

        def forward(self, x, memory):
            split = lambda t: t.view(2, 17, 2, 8).transpose(1, 2)  # noqa: E731
            out = nn.functional.scaled_dot_product_attention(
                split(self.q(x)), split(self.k(memory)), split(self.v(memory)))
            return out.sum()

    report = _declines(Cross(), (torch.randn(2, 17, 16), torch.randn(2, 17, 16)),
                       cfx.PatchToCluster(clusters=4))
    assert report[0].status == "declined" and "cross-attention" in report[0].reason


def test_compiling_a_function_has_no_model_to_hold_the_clustering():
    model = vit()
    fn = lambda x: model(x)  # noqa: E731
    report = _declines(fn, (images(),), cfx.PatchToCluster(clusters=4))
    assert all(r.status == "declined" and "not an nn.Module" in r.reason for r in report)


def test_no_grid_on_the_model_is_declined_and_strict_raises():
    class NoGrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.attn(x).view(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return nn.functional.scaled_dot_product_attention(q, k, v).sum()

    report = _declines(NoGrid(), (torch.randn(2, 10, 16),), cfx.PatchToCluster(clusters=4))
    assert "no patch grid found" in report[0].reason
    with pytest.raises(cfx.PolicyError, match="no patch grid found"):
        cfx.compile(NoGrid(), policy=cfx.PatchToCluster(clusters=4), strict=True,
                    backend="eager")(torch.randn(2, 10, 16))


def test_attention_dropout_in_training_is_declined():
    torch.manual_seed(0)
    model = vit_tiny(image_size=32, patch_size=8, dim=32, depth=1, heads=4, dropout=0.1)
    report = _declines(model.train(), (images(),), cfx.PatchToCluster(clusters=4))
    assert "dropout" in report[0].reason


@pytest.mark.parametrize("kwargs, message", [
    ({"clusters": 0}, r"clusters \(0\) must be a positive int"),
    ({"clusters": -2}, r"clusters \(-2\) must be a positive int"),
    ({"clusters": 4, "clustering": "kmeans"}, r"clustering \('kmeans'\) must be one of"),
    ({"clusters": 4, "grid": (4,)}, r"grid \(\(4,\)\) must be None or \(H, W\)"),
    ({"clusters": 4, "grid": (4, 0)}, r"grid \(0\) must be a positive int"),
    ({"clusters": 4, "prefix_tokens": -1}, r"prefix_tokens \(-1\) must be None"),
    ({"clusters": 4, "init": "zeros"}, r"init \('zeros'\) must be one of"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cfx.PatchToCluster(**kwargs)


def test_config_round_trips_through_dict():
    from clusterfx.config import config_from_dict

    config = cfx.PatchToCluster(clusters=9, clustering="mlp", grid=(3, 5), prefix_tokens=1)
    data = config.to_dict()
    data["grid"] = list(data["grid"])  # as JSON gives it back
    assert config_from_dict(data) == config


def test_aot_backend_equals_eager_backend_outputs_and_gradients():
    """The lifted graph (installed parameters as trailing inputs, AOT autograd) computes what the
    eager-backend graph (get_attr parameters) computes, values and gradients, all parameters."""
    model = vit()
    policy = cfx.PatchToCluster(clusters=4, clustering="mlp")
    eager = cfx.compile(model, policy=policy, backend="eager")
    # automatic dynamic shapes: the second batch size recompiles with a symbolic batch only
    aot = cfx.compile(model, policy=policy, backend="aot_eager")
    params = list(dict(model.named_parameters()).values())
    for batch in (2, 3):
        x = images(batch, seed=batch)
        eager(x)  # installs (first time), later reuses
        results = []
        for fn in (eager, aot):
            for p in model.parameters():
                p.grad = None
            out = fn(x)
            (out * torch.arange(10.0)).sum().backward()
            params = list(model.parameters())
            # blocks.1's patch outputs never reach the head (it reads the class token): AOT
            # may leave those gradients None where eager autograd gives zeros
            results.append((out.detach(), [torch.zeros_like(p) if p.grad is None else
                                           p.grad.clone() for p in params]))
        (o1, g1), (o2, g2) = results
        torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
        assert len(g1) == len(g2) == len(params)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum("paca_clustering" in n for n, _ in model.named_parameters()) == 2 * 5
    report = cfx.explain(aot)
    assert report.compiles == 2 and all(r.status == "rewritten" for r in report)


def test_dynamic_image_size_is_declined_with_the_reason():
    # (the timm-style model: with dynamic=True the canonicaliser leaves the reference ViT's
    # nn.Dropout spelling unsupported, which is not this rewrite's concern)
    compiled = cfx.compile(VisionTransformer().eval(), policy=cfx.PatchToCluster(clusters=4),
                           backend="eager", dynamic=True)
    compiled(images())
    rows = [r for r in cfx.explain(compiled) if r.status == "declined"]
    assert rows and all("the sequence length is dynamic" in r.reason for r in rows)
