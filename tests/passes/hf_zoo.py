"""A zoo of Hugging Face architectures for the coverage table: tiny random configs (hidden 32,
2 layers, sequences <= 16, no downloads), chosen for spelling variety — encoder-decoders,
sliding windows, soft-capping, ALiBi, QK-norm, MQA/GQA, relative position biases, rotary
encoders, audio and vision encoders.

Each `Arch` builds `(model, inputs)`: `model(*inputs)` returns one tensor whose dim 1 is the
sequence (for decoders and encoder-decoders the *target* sequence, so that the causality
perturbation test can change its last position), and lists the module paths of its attention
sites in graph order, whether it is causal (a decoder, or an encoder-decoder's decoder side),
and which input carries the token ids to perturb.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

transformers = __import__("transformers")
tf = transformers

B, N, E, V = 2, 12, 32, 100
T = 8  # target length of encoder-decoders


def ids(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (B, n), generator=torch.Generator().manual_seed(seed))


def padding(n: int = N) -> torch.Tensor:
    mask = torch.ones(B, n, dtype=torch.long)
    mask[1, -3:] = 0  # right padding on the second row
    return mask


class Main(nn.Module):
    """Calls an HF model with keyword tensors named `names` (plus fixed `extra` kwargs) and
    returns `output.<attr>` (a tensor)."""

    def __init__(self, model: nn.Module, names: list[str], attr: str = "last_hidden_state",
                 **extra):
        super().__init__()
        self.model = model.eval()
        self.names = names
        self.attr = attr
        self.extra = extra

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)), **self.extra)
        return getattr(out, self.attr)


@dataclass
class Arch:
    name: str
    feature: str  # what it brings to the table
    build: Callable[[], tuple[nn.Module, tuple]]
    sites: list[str]  # module paths of the attention sites (prefixed with "model.")
    causal: bool = False  # a decoder / the target side of an encoder-decoder
    perturb: int = 0  # which input holds the token ids whose last position is changed
    # expected status when the policy leaves every site dense: "kept dense", or per path
    # ("*": every site) "unsupported" for attention that is recorded but cannot be read
    kinds: dict[str, str] = field(default_factory=dict)

    def expected(self, path: str) -> str:
        return self.kinds.get(path, self.kinds.get("*", "kept dense"))


def _text(cls, cfg, names=("input_ids", "attention_mask"), **extra):
    def build():
        model = cls(cfg() if callable(cfg) else cfg)
        tensors = {"input_ids": ids(), "attention_mask": padding()}
        return Main(model, list(names), **extra), tuple(tensors[n] for n in names)
    return build


def _layers(prefix: str, leaf: str, n: int = 2) -> list[str]:
    return [f"model.{prefix}.{i}.{leaf}" for i in range(n)]


SMALL = {"hidden_size": E, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "vocab_size": V, "max_position_embeddings": 64}
DECODER = {**SMALL, "num_key_value_heads": 2}


def _seq2seq(cls, cfg):
    def build():
        model = cls(cfg())
        names = ["input_ids", "attention_mask", "decoder_input_ids"]
        return Main(model, names, use_cache=False), (ids(), padding(), ids(T, seed=1))
    return build


def _bart_like(cls, **kw):
    return lambda: cls(vocab_size=V, d_model=E, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                       dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, decoder_start_token_id=2, **kw)


def _seq2seq_sites(enc="encoder.layers", dec="decoder.layers", self_attn="self_attn",
                   cross="encoder_attn"):
    return ([f"model.{enc}.{i}.{self_attn}" for i in range(2)]
            + [p for i in range(2) for p in (f"model.{dec}.{i}.{self_attn}",
                                              f"model.{dec}.{i}.{cross}")])


def _image(cls, cfg, size=32):
    def build():
        model = cls(cfg())
        return Main(model, ["pixel_values"]), (torch.randn(B, 3, size, size,
                                                           generator=torch.Generator()
                                                           .manual_seed(0)),)
    return build


def _audio(cls, cfg, samples=4000):
    def build():
        model = cls(cfg())
        x = torch.randn(B, samples, generator=torch.Generator().manual_seed(0))
        return Main(model, ["input_values"]), (x,)
    return build


def _whisper():
    cfg = tf.WhisperConfig(vocab_size=V, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, d_model=E,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                           max_target_positions=32, dropout=0.0, attention_dropout=0.0,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           decoder_start_token_id=0)
    model = tf.WhisperModel(cfg)
    feats = torch.randn(B, 8, 32, generator=torch.Generator().manual_seed(0))
    return Main(model, ["input_features", "decoder_input_ids"], use_cache=False), (
        feats, ids(T, seed=1))


def _vision(name: str, cls, cfg_cls, paths, feature, size=32, **kw):
    cfg = lambda: cfg_cls(image_size=size, patch_size=8, num_channels=3, hidden_size=E,  # noqa
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          **kw)
    return Arch(name, feature, _image(cls, cfg, size), paths)


ZOO: list[Arch] = [
    # ---------------------------------------------------------------- encoders (text)
    Arch("distilbert", "encoder, masked_fill on (B,1,1,N) padding",
         _text(tf.DistilBertModel, lambda: tf.DistilBertConfig(
             vocab_size=V, dim=E, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0,
             attention_dropout=0.0, max_position_embeddings=64)),
         _layers("transformer.layer", "attention")),
    Arch("albert", "encoder, shared layer weights",
         _text(tf.AlbertModel, lambda: tf.AlbertConfig(**SMALL, embedding_size=16)),
         ["model.encoder.albert_layer_groups.0.albert_layers.0.attention"] * 2),
    Arch("electra", "encoder, embedding projection",
         _text(tf.ElectraModel, lambda: tf.ElectraConfig(**SMALL, embedding_size=16)),
         _layers("encoder.layer", "attention.self")),
    Arch("xlm-roberta", "encoder, RoBERTa layout",
         _text(tf.XLMRobertaModel, lambda: tf.XLMRobertaConfig(**SMALL, pad_token_id=1)),
         _layers("encoder.layer", "attention.self")),
    Arch("mpnet", "encoder, relative position bias added to the scores",
         _text(tf.MPNetModel, lambda: tf.MPNetConfig(**SMALL, pad_token_id=1)),
         _layers("encoder.layer", "attention.attn")),
    Arch("roformer", "rotary encoder",
         _text(tf.RoFormerModel, lambda: tf.RoFormerConfig(**SMALL, embedding_size=E)),
         _layers("encoder.layer", "attention.self")),
    Arch("esm", "rotary encoder (protein LM), scaled queries",
         _text(tf.EsmModel, lambda: tf.EsmConfig(**SMALL, pad_token_id=1,
                                                  position_embedding_type="rotary")),
         _layers("encoder.layer", "attention.self")),
    Arch("modernbert", "rotary encoder, global + sliding-window local layers",
         _text(tf.ModernBertModel, lambda: tf.ModernBertConfig(
             vocab_size=V, hidden_size=E, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, global_attn_every_n_layers=2,
             local_attention=4, pad_token_id=1, bos_token_id=0, eos_token_id=2,
             cls_token_id=0, sep_token_id=2)),
         _layers("layers", "attn")),
    Arch("deberta-v2", "disentangled attention (content + relative position terms)",
         _text(tf.DebertaV2Model, lambda: tf.DebertaV2Config(
             **SMALL, relative_attention=True, pos_att_type=["c2p", "p2c"],
             max_relative_positions=16, position_buckets=8)),
         _layers("encoder.layer", "attention.self")),
    Arch("longformer", "sliding-window + global attention (banded einsum)",
         _text(tf.LongformerModel, lambda: tf.LongformerConfig(
             **SMALL, attention_window=4, pad_token_id=1)),
         _layers("encoder.layer", "attention.self"), kinds={"*": "unsupported"}),
    # ---------------------------------------------------------------- decoders
    Arch("gpt-neo", "decoder, global + local layers, unscaled scores",
         _text(tf.GPTNeoModel, lambda: tf.GPTNeoConfig(
             vocab_size=V, hidden_size=E, num_layers=2, num_heads=4, max_position_embeddings=64,
             attention_types=[[["global", "local"], 1]], window_size=4,
             embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)),
         _layers("h", "attn.attention"), causal=True),
    Arch("gpt-neox", "decoder, partial rotary, fp32 scores",
         _text(tf.GPTNeoXModel, lambda: tf.GPTNeoXConfig(**SMALL, rotary_pct=0.5)),
         _layers("layers", "attention"), causal=True),
    Arch("gptj", "decoder, interleaved rotary",
         _text(tf.GPTJModel, lambda: tf.GPTJConfig(vocab_size=V, n_embd=E, n_layer=2, n_head=4,
                                                    rotary_dim=4, n_positions=64,
                                                    attn_pdrop=0.0, resid_pdrop=0.0,
                                                    embd_pdrop=0.0)),
         _layers("h", "attn"), causal=True),
    Arch("opt", "decoder, learned positions, scaled queries",
         _text(tf.OPTModel, lambda: tf.OPTConfig(
             vocab_size=V, hidden_size=E, num_hidden_layers=2, ffn_dim=64,
             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=E,
             dropout=0.0, attention_dropout=0.0, pad_token_id=1)),
         _layers("decoder.layers", "self_attn"), causal=True),
    Arch("bloom", "decoder, ALiBi (baddbmm with a bias)",
         _text(tf.BloomModel, lambda: tf.BloomConfig(vocab_size=V, hidden_size=E, n_layer=2,
                                                      n_head=4, attention_dropout=0.0,
                                                      hidden_dropout=0.0)),
         _layers("h", "self_attention"), causal=True),
    Arch("mpt", "decoder, ALiBi, no-bias layer norm",
         _text(tf.MptModel, lambda: tf.MptConfig(d_model=E, n_heads=4, n_layers=2,
                                                  vocab_size=V, max_seq_len=64,
                                                  expansion_ratio=2)),
         _layers("blocks", "attn"), causal=True),
    Arch("falcon", "decoder, multi-query attention (one KV head)",
         _text(tf.FalconModel, lambda: tf.FalconConfig(
             vocab_size=V, hidden_size=E, num_hidden_layers=2, num_attention_heads=4,
             multi_query=True, new_decoder_architecture=False, alibi=False, bias=False,
             attention_dropout=0.0, hidden_dropout=0.0)),
         _layers("h", "self_attention"), causal=True),
    Arch("gpt-bigcode", "decoder, MQA with fused c_attn",
         _text(tf.GPTBigCodeModel, lambda: tf.GPTBigCodeConfig(
             vocab_size=V, n_embd=E, n_layer=2, n_head=4, n_positions=64, multi_query=True,
             attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
         _layers("h", "attn"), causal=True),
    Arch("mistral", "decoder, GQA, sliding window",
         _text(tf.MistralModel, lambda: tf.MistralConfig(**DECODER, sliding_window=4)),
         _layers("layers", "self_attn"), causal=True),
    Arch("qwen2", "decoder, GQA, QKV bias",
         _text(tf.Qwen2Model, lambda: tf.Qwen2Config(**DECODER)),
         _layers("layers", "self_attn"), causal=True),
    Arch("qwen3", "decoder, QK-norm, GQA",
         _text(tf.Qwen3Model, lambda: tf.Qwen3Config(**DECODER, head_dim=8)),
         _layers("layers", "self_attn"), causal=True),
    Arch("olmo2", "decoder, QK-norm over all heads",
         _text(tf.Olmo2Model, lambda: tf.Olmo2Config(**DECODER)),
         _layers("layers", "self_attn"), causal=True),
    Arch("gemma2", "decoder, tanh soft-capping of scores, sliding window",
         _text(tf.Gemma2Model, lambda: tf.Gemma2Config(**DECODER, head_dim=8,
                                                        sliding_window=4)),
         _layers("layers", "self_attn"), causal=True, kinds={"*": "unsupported"}),
    Arch("gemma3", "decoder, QK-norm, sliding + global layers",
         _text(tf.Gemma3TextModel, lambda: tf.Gemma3TextConfig(**DECODER, head_dim=8,
                                                                sliding_window=4)),
         _layers("layers", "self_attn"), causal=True),
    Arch("phi", "decoder, partial rotary, dense QK layer norm off",
         _text(tf.PhiModel, lambda: tf.PhiConfig(**SMALL, partial_rotary_factor=0.5)),
         _layers("layers", "self_attn"), causal=True),
    Arch("phi3", "decoder, fused qkv projection",
         _text(tf.Phi3Model, lambda: tf.Phi3Config(**DECODER, pad_token_id=0)),
         _layers("layers", "self_attn"), causal=True),
    Arch("cohere", "decoder, parallel block, optional QK-norm",
         _text(tf.CohereModel, lambda: tf.CohereConfig(**DECODER, use_qk_norm=True)),
         _layers("layers", "self_attn"), causal=True),
    Arch("starcoder2", "decoder, GQA, sliding window, biases",
         _text(tf.Starcoder2Model, lambda: tf.Starcoder2Config(**DECODER, sliding_window=4)),
         _layers("layers", "self_attn"), causal=True),
    # ---------------------------------------------------------------- encoder-decoders
    Arch("bart", "encoder-decoder, scaled queries, cross-attention",
         _seq2seq(tf.BartModel, _bart_like(tf.BartConfig)), _seq2seq_sites(), causal=True,
         perturb=2),
    Arch("pegasus", "encoder-decoder, sinusoidal positions, pre-norm",
         _seq2seq(tf.PegasusModel, _bart_like(tf.PegasusConfig)), _seq2seq_sites(),
         causal=True, perturb=2),
    Arch("marian", "encoder-decoder (translation)",
         _seq2seq(tf.MarianModel, _bart_like(tf.MarianConfig)), _seq2seq_sites(),
         causal=True, perturb=2),
    Arch("mt5", "encoder-decoder, relative bias buckets, no scaling",
         _seq2seq(tf.MT5Model, lambda: tf.MT5Config(
             vocab_size=V, d_model=E, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
             num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)),
         [f"model.encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
         + [p for i in range(2) for p in (f"model.decoder.block.{i}.layer.0.SelfAttention",
                                          f"model.decoder.block.{i}.layer.1.EncDecAttention")],
         causal=True, perturb=2),
    Arch("whisper", "audio encoder-decoder (log-mel conv front end)", _whisper,
         _seq2seq_sites(), causal=True, perturb=1),
    # ---------------------------------------------------------------- vision and audio
    _vision("beit", tf.BeitModel, tf.BeitConfig,
            _layers("layers", "attention"),
            "vision, relative position bias table", use_relative_position_bias=True),
    _vision("data2vec-vision", tf.Data2VecVisionModel, tf.Data2VecVisionConfig,
            _layers("encoder.layer", "attention.attention"),
            "vision, shared relative position bias", use_shared_relative_position_bias=True),
    Arch("swin", "vision, windowed attention with relative position bias and shift masks",
         _image(tf.SwinModel, lambda: tf.SwinConfig(
             image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2],
             num_heads=[2, 4], window_size=4, mlp_ratio=2.0, drop_path_rate=0.0)),
         [f"model.encoder.layers.{s}.blocks.{b}.attention" for s in range(2)
          for b in range(2)]),
    _vision("dinov2", tf.Dinov2Model, tf.Dinov2Config, _layers("encoder.layer", "attention"),
            "vision, layer scale, interpolated positions"),
    Arch("clip-vision", "vision, CLIP layout (scaled queries)",
         _image(tf.CLIPVisionModel, lambda: tf.CLIPVisionConfig(
             image_size=32, patch_size=8, hidden_size=E, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64)),
         _layers("encoder.layers", "self_attn")),
    Arch("wav2vec2", "audio encoder (conv feature extractor)",
         _audio(tf.Wav2Vec2Model, lambda: tf.Wav2Vec2Config(
             hidden_size=E, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
             num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)),
         _layers("encoder.layers", "attention")),
    Arch("hubert", "audio encoder",
         _audio(tf.HubertModel, lambda: tf.HubertConfig(
             hidden_size=E, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
             num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)),
         _layers("encoder.layers", "attention")),
]

BY_NAME = {a.name: a for a in ZOO}
