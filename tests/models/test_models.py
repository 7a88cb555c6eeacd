"""Reference models: shapes, masking properties, GQA equivalence, gradients, determinism."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from clusterfx.models import MODEL_FACTORIES, example_inputs, gpt_tiny

MODELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "models"


def _build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODEL_FACTORIES[name](**kwargs)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("vit", (2, 10)), ("bert", (2, 16, 64)), ("gpt", (2, 16, 1000))],
)
def test_output_shapes(name, shape):
    model = _build(name).eval()
    out = model(*example_inputs(name, batch=2, seq_len=16, model=model))
    assert out.shape == shape
    assert torch.isfinite(out).all()


def test_bert_predict_proba_is_a_distribution_and_forward_is_not():
    model = _build("bert").eval()
    inputs = example_inputs("bert", batch=3, seq_len=8)
    proba = model.predict_proba(*inputs)
    assert proba.shape == (3, 2)
    torch.testing.assert_close(proba.sum(-1), torch.ones(3))
    torch.testing.assert_close(proba, model.classify(*inputs).softmax(-1))
    assert (model(*inputs) < 0).any()  # forward is the hidden state, never a softmax


def test_vit_follows_image_size():
    model = _build("vit", image_size=48, patch_size=16).eval()
    (images,) = example_inputs("vit", batch=1, model=model)
    assert images.shape == (1, 3, 48, 48)
    assert model(images).shape == (1, 10)


@pytest.mark.parametrize(
    ("name", "site"),
    [("vit", "blocks.{}.attn"), ("bert", "encoder.layer.{}.attention"), ("gpt", "blocks.{}.attn")],
)
def test_depth_and_attention_module_paths(name, site):
    modules = dict(_build(name, depth=12).named_modules())
    assert site.format(11) in modules
    assert site.format(12) not in modules


def test_gpt_is_causal():
    model = _build("gpt").double().eval()
    (idx,) = example_inputs("gpt", batch=2, seq_len=12)
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % model.vocab_size
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=1e-12, atol=1e-12)
    # Position t and later must see the change, or the test above proves nothing.
    assert (after[:, t:] - before[:, t:]).abs().amax(-1).min() > 1e-6


def test_bert_ignores_padded_tokens():
    model = _build("bert").double().eval()
    ids, mask = example_inputs("bert", batch=2, seq_len=12)
    keep = mask[-1].bool()
    assert not keep.all()
    changed = ids.clone()
    changed[-1, ~keep] = torch.arange(1, int((~keep).sum()) + 1) + 7
    before, after = model(ids, mask), model(changed, mask)
    torch.testing.assert_close(after[:, keep], before[:, keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after[0], before[0], rtol=1e-12, atol=1e-12)
    # Without the mask the same change reaches the real tokens: the mask is what protects them.
    unmasked_diff = (model(changed) - model(ids))[-1, keep].abs().max()
    assert unmasked_diff > 1e-6


def _gqa_as_mha_state(gqa: torch.nn.Module, heads: int, kv_heads: int) -> dict:
    """The GQA state dict with each k/v head's weights repeated for the query heads reading it."""
    state = {k: v.clone() for k, v in gqa.state_dict().items()}
    rep = heads // kv_heads
    for i, block in enumerate(gqa.blocks):
        attn = block.attn
        dim, kv_dim = attn.n_head * attn.head_dim, attn.kv_dim
        for suffix in ("weight", "bias"):
            key = f"blocks.{i}.attn.c_attn.{suffix}"
            q, k, v = state[key].split([dim, kv_dim, kv_dim], dim=0)
            # (kv_dim, ...) -> (n_kv, D, ...) -> (n_kv * rep, D, ...) -> (dim, ...)
            k = k.unflatten(0, (kv_heads, -1)).repeat_interleave(rep, dim=0).flatten(0, 1)
            v = v.unflatten(0, (kv_heads, -1)).repeat_interleave(rep, dim=0).flatten(0, 1)
            state[key] = torch.cat([q, k, v], dim=0)
    return state


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = gpt_tiny(heads=4, kv_heads=2).double().eval()
    for p in gqa.parameters():  # non-zero biases so their repetition is checked too
        torch.nn.init.normal_(p, std=0.1)
    mha = gpt_tiny(heads=4).double().eval()
    assert mha.blocks[0].attn.c_attn.out_features == 3 * 64
    assert gqa.blocks[0].attn.c_attn.out_features == 64 + 2 * 32
    mha.load_state_dict(_gqa_as_mha_state(gqa, heads=4, kv_heads=2))
    (idx,) = example_inputs("gpt", batch=2, seq_len=10)
    torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-10, atol=1e-10)
    # A different grouping (query head h reading kv head h % n_kv) must not match.
    wrong = _gqa_as_mha_state(gqa, heads=4, kv_heads=2)
    for i in range(len(gqa.blocks)):
        w = wrong[f"blocks.{i}.attn.c_attn.weight"]
        k = w[64:128].unflatten(0, (4, 16))
        w[64:128] = k[[0, 2, 1, 3]].flatten(0, 1)
    mha.load_state_dict(wrong)
    assert not torch.allclose(mha(idx), gqa(idx), rtol=1e-6, atol=1e-6)


def test_gqa_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"n_head \(4\) must be a positive multiple of n_kv_head"):
        gpt_tiny(heads=4, kv_heads=3)


def test_gpt_head_is_tied_to_embedding_after_double():
    model = gpt_tiny().double()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.dtype == torch.float64


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_gradients_reach_every_parameter(name):
    model = _build(name).eval()
    inputs = example_inputs(name, batch=2, seq_len=8, model=model)
    out = model(*inputs)
    # A random projection: a plain sum of a LayerNorm output has zero gradient upstream.
    loss = (out * torch.randn_like(out)).sum()
    if name == "bert":
        loss = loss + (model.classify(*inputs) * torch.randn(2, 2)).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_deterministic_in_eval_and_stochastic_in_train(name):
    model = _build(name)
    inputs = example_inputs(name, batch=2, seq_len=8, model=model)
    model.train()
    assert not torch.equal(model(*inputs), model(*inputs))  # dropout is active in train
    model.eval()
    assert torch.equal(model(*inputs), model(*inputs))


def test_models_never_import_passes_or_compiler():
    offending = []
    for path in sorted(MODELS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            for mod in names:
                parts = mod.lstrip(".").split(".")
                if "passes" in parts or "compiler" in parts:
                    offending.append(f"{path.name}: {mod}")
    assert len(list(MODELS_DIR.glob("*.py"))) >= 4
    assert offending == []
