"""Library models: torch.nn attention modules and Hugging Face transformers models built from
small configs with random weights. Every attention layer is found at its module path, and Dense
lowering reproduces outputs (fp32, <= 1e-5 relative) and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import clusterfx as cfx
from tests.helpers import compile_and_compare

transformers = pytest.importorskip("transformers")
torch.manual_seed(0)
B, N, E = 2, 12, 32


def _paths(report):
    return [r.fqn for r in report]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", [False, True])
def test_multihead_attention(batch_first, need_weights, masks):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, 4, batch_first=batch_first)

        def forward(self, x):
            kw = {}
            if masks:
                kpm = torch.zeros(B, N, dtype=torch.bool)
                kpm[1, -3:] = True
                kw = {"key_padding_mask": kpm,
                      "attn_mask": torch.ones(N, N, dtype=torch.bool).triu(1)}
            out, weights = self.mha(x, x, x, need_weights=need_weights, **kw)
            return out if weights is None else (out, weights)

    x = torch.randn(B, N, E) if batch_first else torch.randn(N, B, E)
    report = compile_and_compare(M(), (x,), rtol=1e-5)
    assert _paths(report) == ["mha"]
    site = report[0].site
    if need_weights:  # averaged weights are returned: stays as written, with the reason
        assert site.status == "unsupported" and "probabilities" in site.reason
    else:
        # MHA merges key padding and the causal mask into one additive mask before attention
        assert site.status == "kept dense" and not site.causal
        assert site.mask == ("additive" if masks else "none")


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_transformer_layers(layer, mode):
    if layer == "encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 4, 64, dropout=0.0,
                                                                 batch_first=True), 2)
        inputs = (torch.randn(B, N, E),)
        expected = ["layers.0.self_attn", "layers.1.self_attn"]
    else:
        model = nn.TransformerDecoderLayer(E, 4, 64, dropout=0.0, batch_first=True)
        inputs = (torch.randn(B, N, E), torch.randn(B, N + 3, E))
        expected = ["self_attn", "multihead_attn"]
    if mode == "train":
        report = compile_and_compare(model, inputs, rtol=1e-5)
    else:
        model.eval()
        report = compile_and_compare(model, inputs, rtol=1e-5, grads=False)
    assert _paths(report) == expected
    assert all(r.status == "kept dense" for r in report)


def _hf(name, impl):
    tf = transformers
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32,
             "intermediate_size": 64, "vocab_size": 100, "attn_implementation": impl,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    ids = torch.randint(3, 100, (B, N), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, -4:] = 0
    if name == "bert":
        return tf.BertModel(tf.BertConfig(**small)), {"input_ids": ids, "attention_mask": mask}, [
            f"encoder.layer.{i}.attention.self" for i in range(2)]
    if name == "roberta":
        cfg = tf.RobertaConfig(**small, max_position_embeddings=64, pad_token_id=1)
        return tf.RobertaModel(cfg), {"input_ids": ids, "attention_mask": mask}, [
            f"encoder.layer.{i}.attention.self" for i in range(2)]
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=impl,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2Model(cfg), {"input_ids": ids}, [f"h.{i}.attn" for i in range(2)]
    if name == "vit":
        cfg = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, **{
            k: v for k, v in small.items() if k != "vocab_size"})
        return tf.ViTModel(cfg), {"pixel_values": torch.randn(B, 3, 32, 32)}, [
            f"layers.{i}.attention" for i in range(2)]
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                             attn_implementation=impl)
        return tf.LlamaModel(cfg), {"input_ids": ids, "use_cache": False}, [
            f"layers.{i}.self_attn" for i in range(2)]
    if name == "t5":
        cfg = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                          num_heads=4, dropout_rate=0.0, attn_implementation=impl)
        return tf.T5EncoderModel(cfg), {"input_ids": ids, "attention_mask": mask}, [
            f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    raise AssertionError(name)


HF = [(m, impl) for m in ("bert", "roberta", "gpt2", "vit", "llama", "t5")
      for impl in ("eager", "sdpa")]


class KwargsModel(nn.Module):
    """Calls a HF model with keyword inputs and returns its main output tensor."""

    def __init__(self, model, kwargs):
        super().__init__()
        self.model = model
        self.names = list(kwargs)
        self.extra = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}

    def forward(self, *tensors):
        kw = dict(zip([n for n in self.names if n not in self.extra], tensors))
        return self.model(**kw, **self.extra).last_hidden_state


@pytest.mark.parametrize("name,impl", HF, ids=[f"{m}-{i}" for m, i in HF])
def test_huggingface_model(name, impl):
    model, kwargs, paths = _hf(name, impl)
    model.train(False)
    wrapped = KwargsModel(model, kwargs)
    tensors = tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    report = compile_and_compare(wrapped, tensors, rtol=1e-5)
    assert _paths(report) == [f"model.{p}" for p in paths]
    assert all(r.status == "kept dense" for r in report), str(report)
    if name in ("gpt2", "llama"):
        assert all(r.site.causal for r in report), str(report)
    if name == "llama":
        assert all(r.site.gqa_groups == 2 for r in report)
    if name == "t5":  # no scaling; the relative position bias is the additive mask
        assert all(r.site.scale == 1.0 and r.site.mask == "additive" for r in report)


def test_policy_paths_on_hf_model():
    model, kwargs, _ = _hf("bert", "eager")
    wrapped = KwargsModel(model.eval(), kwargs)
    tensors = tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    compiled = cfx.compile(wrapped, policy={"model.encoder.layer.1": None}, backend="eager")
    compiled(*tensors)
    report = cfx.explain(compiled)
    assert [r.site.policy_key for r in report] == [None, "model.encoder.layer.1"]
    assert "None" in report[1].reason


def test_hf_output_attentions_stays_as_written():
    model, kwargs, _ = _hf("bert", "eager")
    model.eval()
    ids = kwargs["input_ids"]
    compiled = cfx.compile(lambda x: model(input_ids=x, output_attentions=True), backend="eager")
    got, want = compiled(ids), model(input_ids=ids, output_attentions=True)
    torch.testing.assert_close(got.attentions[1], want.attentions[1], rtol=0, atol=0)
    report = cfx.explain(compiled)
    assert len(report) == 2
    assert all(r.status == "unsupported" and "probabilities" in r.reason for r in report)


def test_hf_encoder_decoder_cross_attention():
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_heads=4, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 100, (B, N), generator=torch.Generator().manual_seed(0))
    dec = ids[:, :7]

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, dec):
            return self.model(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits

    report = compile_and_compare(Seq2Seq(), (ids, dec), rtol=1e-5)
    paths = {r.fqn: r.site for r in report}
    cross = paths["model.decoder.block.0.layer.1.EncDecAttention"]
    assert cross.q_shape[-2] == 7 and cross.k_shape[-2] == N  # Nq != Nk
    assert set(paths) == {"model.encoder.block.0.layer.0.SelfAttention",
                          "model.decoder.block.0.layer.0.SelfAttention",
                          "model.decoder.block.0.layer.1.EncDecAttention"}


# ------------------------------------------------------------ decoders given an attention_mask

def _decoder(name):
    tf = transformers
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
    gqa = {**small, "num_key_value_heads": 2}
    if name == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return {"gpt-neox": lambda: tf.GPTNeoXModel(tf.GPTNeoXConfig(**small)),
            "mistral": lambda: tf.MistralModel(tf.MistralConfig(**gqa, sliding_window=None)),
            "qwen2": lambda: tf.Qwen2Model(tf.Qwen2Config(**gqa)),
            "gemma3": lambda: tf.Gemma3TextModel(tf.Gemma3TextConfig(**gqa, head_dim=8,
                                                                     sliding_window=64)),
            "phi": lambda: tf.PhiModel(tf.PhiConfig(**small)),
            "phi3": lambda: tf.Phi3Model(tf.Phi3Config(**gqa, pad_token_id=0))}[name]()


DECODERS = ["gpt2", "gpt-neox", "mistral", "qwen2", "gemma3", "phi", "phi3"]


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_hf_decoder_masks_from_attention_mask_are_causal_plus_key_padding(name, padding):
    """The causal + padding mask HF builds from `attention_mask` is recognised (not 'general'
    at the observed inputs only): every site is causal with key padding, TopK takes it as it
    is, and with k = N keys TopK is exact attention again."""
    model = _decoder(name).eval()
    ids = torch.randint(3, 100, (B, N), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, N, dtype=torch.long)
    if padding == "right":
        mask[1, -4:] = 0
    else:
        mask[1, :4] = 0
    wrapped = KwargsModel(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
    report = compile_and_compare(wrapped, (ids, mask), policy=cfx.TopK(k=N), rtol=1e-5)
    assert len(report) == 2, str(report)
    for r in report:
        assert r.site.causal and r.site.causal_queries, str(report)
        assert r.site.mask_kind == "causal + key padding" and not r.site.mask_observed
        assert r.status == "rewritten" and r.paths == {"top-k [cpu]": 1}, str(report)


def test_module_paths_of_a_model_compiled_directly_exist():
    """RoFormer's forward is wrapped by a `*args` decorator (dynamo names the module
    `L['args'][0]`); Longformer's encoder is captured after a graph break in its own frame:
    the reported paths are still the model's own."""
    tf = transformers
    ids = torch.randint(3, 100, (B, N), generator=torch.Generator().manual_seed(0))
    for model in (tf.RoFormerModel(tf.RoFormerConfig(
                      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, vocab_size=100, embedding_size=32)),
                  tf.LongformerModel(tf.LongformerConfig(
                      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, vocab_size=100, attention_window=4,
                      pad_token_id=1))):
        compiled = cfx.compile(model.eval(), backend="eager")
        with torch.no_grad():
            compiled(input_ids=ids)
        paths = [r.fqn for r in cfx.explain(compiled)]
        modules = dict(model.named_modules())
        assert paths == [f"encoder.layer.{i}.attention.self" for i in range(2)]
        assert all(p in modules for p in paths)
