"""PaCa-ViT and TCFormer: sizes as the papers, the PaCa layer's properties, TCFormer's token
bookkeeping (token <-> map round trip, merging), local clustering, and zero graph breaks."""

from __future__ import annotations

import pytest
import torch

from clusterfx.models.paca_vit import PaCaAttention, PaCaViT, paca_vit_small, paca_vit_tiny
from clusterfx.models.tcformer import MTANeck, TCFormer, tcformer, tcformer_light
from clusterfx.models.tcformer_tokens import (
    dpc_knn,
    grid_tokens,
    map2token,
    merge_tokens,
    token2map,
    token_downup,
)
from clusterfx.ops.dpc_knn import dpc_knn_reference
from tests.helpers import assert_same_values_and_grads


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_paper_sizes():
    """Parameter counts of the papers' READMEs (1000 classes)."""
    assert round(count(paca_vit_tiny()) / 1e6, 1) == 12.2
    assert round(count(paca_vit_small()) / 1e6, 1) == 22.0
    assert round(count(paca_vit_small(clustering="mlp")) / 1e6, 1) == 22.6
    assert round(count(tcformer_light()) / 1e6, 1) == 14.2
    assert round(count(tcformer()) / 1e6, 1) == 25.6


def small_paca(**kwargs):
    torch.manual_seed(0)
    return PaCaViT(dims=(16, 32), heads=(2, 2), depths=(2, 1), clusters=(4, 0),
                   num_classes=10, drop_path=0.0, **kwargs)


@pytest.mark.parametrize("share", [True, False])
def test_paca_vit_runs_compiles_and_trains(share):
    model = small_paca(share_assignment=share)
    assert (model.stages[0][1].attn.clustering is None) == share
    x = torch.randn(2, 3, 32, 32)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.stages[0][0].attn.clustering.net[0].weight.grad.abs().sum() > 0


def test_paca_layer_with_m_equal_n_identity_equals_dense_attention():
    torch.manual_seed(0)
    layer = PaCaAttention(16, 2, clusters=9, clustering="linear").double()
    layer.cluster_norm = torch.nn.Identity()  # the paper's LayerNorm on cluster tokens aside
    dense = PaCaAttention(16, 2, clusters=0).double()
    dense.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if not k.startswith("clustering")})
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, _ = layer(x, (3, 3), z=torch.eye(9, dtype=torch.float64).expand(2, 9, 9))
    torch.testing.assert_close(out, dense(x, (3, 3))[0], rtol=1e-12, atol=1e-12)


def test_paca_layer_assignment_rows_sum_to_one_and_one_cluster_is_uniform():
    torch.manual_seed(0)
    layer = PaCaAttention(16, 2, clusters=5, clustering="conv").double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    z = layer.assignment(x, (3, 4))
    torch.testing.assert_close(z.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    single = PaCaAttention(16, 2, clusters=1, clustering="mlp").double()
    out, _ = single(x, (3, 4))
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-13)


def test_paca_layer_linear_clustering_is_permutation_equivariant():
    torch.manual_seed(0)
    layer = PaCaAttention(16, 2, clusters=5, clustering="linear").double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    perm = torch.randperm(12)
    torch.testing.assert_close(layer(x[:, perm], (3, 4))[0], layer(x, (3, 4))[0][:, perm],
                               rtol=1e-12, atol=1e-12)


def test_paca_errors():
    with pytest.raises(ValueError, match=r"clusters \(-1\) must be an int >= 0"):
        PaCaAttention(16, 2, clusters=-1)
    with pytest.raises(ValueError, match="one length per stage"):
        PaCaViT(dims=(16, 32), heads=(2,), depths=(1, 1), clusters=(4, 0))


# ----------------------------------------------------------------------------------- TCFormer
def tiny_tcformer(**kwargs):
    torch.manual_seed(0)
    args = dict(image_size=32, dims=(16, 32, 64), heads=(1, 2, 4), depths=(1, 1, 1),
                mlp_ratios=(2, 2, 2), sr_ratios=(2, 1, 1), regions=((2, 2), (1, 1)),
                stem_stride=2, num_classes=10)
    return TCFormer(**{**args, **kwargs})


def test_token_map_round_trip_is_exact():
    x = torch.randn(2, 64, 5, dtype=torch.float64)
    t = grid_tokens(x, (8, 8))
    fmap = token2map(t)
    torch.testing.assert_close(fmap, x.transpose(1, 2).reshape(2, 5, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(map2token(t, fmap), x, rtol=0, atol=0)
    # merged tokens: each pixel of the initial grid equals its owner token; round trip exact
    labels = dpc_knn(x, 16, 3, 1)
    merged = merge_tokens(t, labels, 16, torch.zeros(2, 64, 1, dtype=torch.float64), (8, 8),
                          (1, 1))
    fmap = token2map(merged)
    owner = merged.x.gather(1, merged.idx_token[:, :, None].expand(-1, -1, 5))
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), owner, rtol=0, atol=1e-15)
    torch.testing.assert_close(map2token(merged, fmap), merged.x, rtol=0, atol=1e-15)


def test_merge_weights_and_downup():
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    t = grid_tokens(x, (2, 4))
    labels = torch.tensor([[0, 0, 1, 1, 0, 2, 2, 1]])
    score = torch.log(torch.arange(1, 9, dtype=torch.float64))[None, :, None]  # w = 1..8
    merged = merge_tokens(t, labels, 3, score, (1, 2), (1, 1))
    w = torch.arange(1, 9, dtype=torch.float64)
    for c in range(3):
        m = labels[0] == c
        want = (w[m, None] * x[0, m]).sum(0) / w[m].sum()
        torch.testing.assert_close(merged.x[0, c], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged.idx_token, labels)
    # back onto the grid: every cell gets its cluster's token
    back = token_downup(t, merged)
    torch.testing.assert_close(back[0], merged.x[0, labels[0]], rtol=1e-5, atol=1e-6)


def test_model_dpc_matches_the_op_oracle_globally_and_per_region():
    x = torch.randn(2, 64, 8)
    for regions in (1, 4):
        assert torch.equal(dpc_knn(x, 16, 5, regions),
                           dpc_knn_reference(x, 16, k=5, regions=regions)[0])


def test_tcformer_stages_local_clusters_stay_in_their_region():
    model = tiny_tcformer().eval()
    with torch.no_grad():
        stages = model.forward_features(torch.randn(2, 3, 32, 32))
    assert [t.x.shape[1] for t in stages] == [256, 64, 16]
    assert [t.map_size for t in stages] == [(16, 16), (8, 8), (4, 4)]
    # CTM 1 clusters per 2×2 region of the 16×16 grid: 16 clusters in each 8×8 quadrant
    idx = stages[1].idx_token.view(2, 16, 16)
    quadrants = [idx[:, :8, :8], idx[:, :8, 8:], idx[:, 8:, :8], idx[:, 8:, 8:]]
    for r, q in enumerate(quadrants):
        assert q.min() >= 16 * r and q.max() < 16 * (r + 1)


def test_tcformer_zero_graph_breaks_and_compiled_equals_eager():
    model = tiny_tcformer().eval()
    x = torch.randn(2, 3, 32, 32)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), model(x))


def test_tcformer_light_at_224_has_zero_graph_breaks():
    model = tcformer_light().eval()
    assert torch._dynamo.explain(model)(torch.randn(1, 3, 224, 224)).graph_break_count == 0


def test_tcformer_trains_the_importance_score():
    model = tiny_tcformer()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.ctms[0].score.weight.grad.abs().sum() > 0  # only through the merge weights


def test_mta_neck_returns_one_map_per_stage():
    model = tiny_tcformer().eval()
    neck = MTANeck([16, 32, 64], dim=8, heads=1, sr_ratios=(2, 1, 1))
    with torch.no_grad():
        maps = neck(model.forward_features(torch.randn(2, 3, 32, 32)))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 8, 8, 8), (2, 8, 4, 4)]


def test_tcformer_config_errors():
    with pytest.raises(ValueError, match="144 tokens into 36 clusters cannot be split evenly"):
        tiny_tcformer(regions=((4, 4), (1, 1)), image_size=24)
    with pytest.raises(ValueError, match=r"regions of 4 tokens are fewer than k \(5\)"):
        tiny_tcformer(regions=((4, 4), (1, 1)), image_size=16)
    with pytest.raises(ValueError, match=r"regions \(3, 3\) must tile"):
        tiny_tcformer(regions=((3, 3), (1, 1)))
    with pytest.raises(ValueError, match="regions needs one"):
        tiny_tcformer(regions=((2, 2),))


def test_conv_clustering_head_equals_its_convolutions():
    """The conv head computes its 1×1 convolutions as channel products: it must equal the
    convolution stack it holds (depthwise 7×7, GELU, 1×1, GELU, 1×1), values and gradients."""
    from clusterfx.models.paca_vit import Clustering

    torch.manual_seed(0)
    head = Clustering(12, 5, "conv").double()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6 * 4, 12, dtype=torch.float64, requires_grad=True)
    got = head(x, (6, 4))
    want = head.net(x.transpose(1, 2).reshape(2, 12, 6, 4)).flatten(2)
    assert_same_values_and_grads(got, want, (x, *head.parameters()))


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_mlp_and_linear_clustering_heads_equal_their_layers(kind):
    """The mlp and linear heads go through ops.paca.cluster_logits: they must equal the layers
    they hold applied to the tokens, transposed to (B, M, N)."""
    from clusterfx.models.paca_vit import Clustering

    torch.manual_seed(0)
    head = Clustering(12, 5, kind).double()
    x = torch.randn(2, 24, 12, dtype=torch.float64)
    torch.testing.assert_close(head(x, (6, 4)), head.net(x).transpose(1, 2), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("contiguous", [True, False])
def test_conv_mlp_depthwise_on_tokens_equals_the_nchw_convolution(contiguous):
    """ConvMlp runs its depthwise 3×3 on a channels-last view of the tokens; it must equal the
    convolution of the (B, C, H, W) copy, values and gradients, also for tokens that are not
    contiguous."""
    from clusterfx.models.paca_vit import ConvMlp

    torch.manual_seed(0)
    mlp = ConvMlp(6, 10).double()
    wide = torch.randn(2, 5 * 3, 9, dtype=torch.float64, requires_grad=True)
    x = wide[..., :6] if not contiguous else wide[..., :6].contiguous()
    assert x.is_contiguous() == contiguous
    got = mlp(x, (5, 3))
    h = mlp.fc1(x)
    fmap = h.transpose(1, 2).reshape(2, 10, 5, 3)
    want = mlp.fc2(torch.nn.functional.gelu(h + mlp.dw(fmap).flatten(2).transpose(1, 2)))
    assert_same_values_and_grads(got, want, (wide, *mlp.parameters()))
