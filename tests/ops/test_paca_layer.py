"""ops.paca.paca_layer: the whole PaCa attention layer from the patches. Its torch form equals
the model's layer (models.paca_vit.PaCaAttention); the fused CPU kernels (impl="cpu") equal the
torch form (float64 to 1e-12, float32 to 1e-5) across clustering heads, priors, grids, widths
that exercise the kernels' channel blocks and tiles; errors name what is wrong."""

from __future__ import annotations

import math

import pytest
import torch

from clusterfx.models.paca_vit import PaCaAttention
from clusterfx.ops.paca import NATIVE_LIBRARY, counters, paca_layer, paca_layer_reference

needs_kernels = pytest.mark.skipif(not NATIVE_LIBRARY.available(),
                                   reason="fused CPU kernels unavailable (no compiler)")


def layer_args(layer: PaCaAttention, norm: bool = True) -> dict:
    """paca_layer's keyword arguments from a model layer's parameters."""
    args = layer.paca_parameters()
    return args if norm else {**args, "norm": None}


def make(kind, dim=20, heads=2, clusters=6, grid=(7, 9), batch=2, dtype=torch.float64,
         kernel=None, seed=0):
    torch.manual_seed(seed)
    layer = PaCaAttention(dim, heads, clusters=clusters, clustering=kind).to(dtype).eval()
    if kernel is not None:  # another depthwise kernel size
        c = dim
        layer.clustering.net[0] = torch.nn.Conv2d(c, c, kernel, padding=kernel // 2,
                                                  groups=c).to(dtype)
    for p in layer.parameters():  # weights large enough that every term matters
        torch.nn.init.normal_(p, std=0.4)
    x = torch.randn(batch, grid[0] * grid[1], dim, dtype=dtype)
    return layer, x


@pytest.mark.parametrize("kind", ["conv", "mlp", "linear"])
def test_reference_equals_the_model_layer(kind):
    layer, x = make(kind)
    want, z_want = layer(x, (7, 9))
    got, z = paca_layer_reference(x, (7, 9), **layer_args(layer))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(z, z_want, rtol=0, atol=1e-14)


CASES = [  # kind, dim, heads, clusters, grid, kernel
    ("conv", 20, 2, 6, (7, 9), None),     # C not a multiple of 16: masked channel blocks
    ("conv", 136, 4, 5, (5, 6), 3),       # C > 128: two depthwise passes; a 3×3 kernel
    ("conv", 32, 1, 40, (6, 6), None),    # M > N
    ("mlp", 24, 3, 7, (8, 5), None),
    ("linear", 16, 4, 3, (1, 50), None),  # one-row grid
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("kind", "dim", "heads", "clusters", "grid", "kernel"), CASES)
def test_fused_equals_the_reference(dtype, kind, dim, heads, clusters, grid, kernel):
    layer, x = make(kind, dim, heads, clusters, grid, dtype=dtype, kernel=kernel)
    args = layer_args(layer)
    want, z_want = paca_layer_reference(x, grid, **args)
    before = counters["paca_layer.cpu"]
    with torch.no_grad():
        got, z = paca_layer(x, grid, impl="cpu", **args)
    assert counters["paca_layer.cpu"] == before + 1
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(z, z_want, rtol=tol, atol=tol)
    torch.testing.assert_close(z.sum(-1), torch.ones_like(z.sum(-1)), rtol=0, atol=10 * tol)


@needs_kernels
@pytest.mark.parametrize("norm", [True, False])
def test_fused_with_a_prior_and_without_the_norm(norm):
    """A PatchClustering-style positional prior (M, N) on the logits, and no LayerNorm on the
    cluster tokens."""
    layer, x = make("conv", grid=(6, 8))
    args = layer_args(layer, norm=norm)
    prior = torch.randn(6, 48, dtype=torch.float64) * 3
    want, z_want = paca_layer_reference(x, (6, 8), prior=prior, **args)
    with torch.no_grad():
        got, z = paca_layer(x, (6, 8), prior=prior, impl="cpu", **args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, z_want, rtol=1e-12, atol=1e-14)


@needs_kernels
def test_fused_softmax_merge_with_minus_inf_logits():
    """The fused softmax over the patches is merged tile by tile: a cluster whose logits are
    -inf over whole tiles (a prior masking patches out) equals the torch form; a cluster that
    is -inf everywhere is NaN in both (0 / 0), and only its z row and z·x row are."""
    layer, x = make("linear", grid=(6, 8), batch=1)
    args = layer_args(layer, norm=False)
    prior = torch.zeros(6, 48, dtype=torch.float64)
    prior[0, :30] = float("-inf")  # tiles 0.. of cluster 0 masked out
    prior[2, 20:] = float("-inf")
    want_out, want_z = paca_layer_reference(x, (6, 8), prior=prior, **args)
    with torch.no_grad():
        got_out, got_z = paca_layer(x, (6, 8), prior=prior, impl="cpu", **args)
    torch.testing.assert_close(got_z, want_z, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    assert (got_z[0, 0, :30] == 0).all() and (got_z[0, 2, 20:] == 0).all()
    prior[4] = float("-inf")
    _, want_z = paca_layer_reference(x, (6, 8), prior=prior, **args)
    with torch.no_grad():
        _, got_z = paca_layer(x, (6, 8), prior=prior, impl="cpu", **args)
    assert torch.isnan(want_z[0, 4]).all() and torch.isnan(got_z[0, 4]).all()
    torch.testing.assert_close(got_z, want_z, rtol=1e-12, atol=1e-14, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("n_side", [16, 56])
def test_fused_is_independent_of_the_thread_count(n_side):
    """Tiles follow the thread count; the result may only move by rounding (float64)."""
    layer, x = make("conv", dim=24, clusters=10, grid=(n_side, n_side), batch=1)
    args = layer_args(layer)
    threads = torch.get_num_threads()
    outs = []
    try:
        with torch.no_grad():
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(paca_layer(x, (n_side, n_side), impl="cpu", **args)[0])
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-12, atol=1e-12)


@needs_kernels
def test_non_finite_patches_poison_like_the_reference():
    """A NaN patch reaches every cluster's softmax over the patches (conv head: through its
    neighbours too), so every output is NaN, as in the torch form; an inf logit likewise."""
    layer, x = make("linear", grid=(5, 5))
    x[0, 7, 3] = float("nan")
    args = layer_args(layer)
    want, z_want = paca_layer_reference(x, (5, 5), **args)
    with torch.no_grad():
        got, z = paca_layer(x, (5, 5), impl="cpu", **args)
    assert torch.isnan(want[0]).all() and not torch.isnan(want[1]).any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(z, z_want, rtol=1e-12, atol=1e-14, equal_nan=True)


@needs_kernels
def test_auto_runs_the_kernels_only_for_inference():
    layer, x = make("conv", dtype=torch.float32)
    args = layer_args(layer)
    cpu, ref = counters["paca_layer.cpu"], counters["paca_layer.reference"]
    out, _ = paca_layer(x, (7, 9), **args)  # parameters require grad: the torch form
    assert out.requires_grad and counters["paca_layer.reference"] == ref + 1
    out.sum().backward()
    assert layer.clustering.net[0].weight.grad is not None
    with torch.no_grad():
        paca_layer(x, (7, 9), **args)
        half = layer_args(layer.half())
        paca_layer(x.half(), (7, 9), **half)  # float16: the torch form
    assert counters["paca_layer.cpu"] == cpu + 1
    assert counters["paca_layer.reference"] == ref + 2


def test_errors_name_the_value():
    layer, x = make("conv")
    args = layer_args(layer)
    with pytest.raises(ValueError, match=r"grid \(7, 8\) must be two positive ints with H·W = "
                                         r"N = 63"):
        paca_layer(x, (7, 8), **args)
    with pytest.raises(ValueError, match=r"kind \('pool'\) must be one of"):
        paca_layer(x, (7, 9), **{**args, "kind": "pool"})
    with pytest.raises(ValueError, match="a 'conv' head takes 5 parameters"):
        paca_layer(x, (7, 9), **{**args, "head": args["head"][:4]})
    with pytest.raises(ValueError, match=r"heads \(3\) must be a positive int dividing C = 20"):
        paca_layer(x, (7, 9), **{**args, "heads": 3})
    with pytest.raises(ValueError, match=r"impl \('triton'\) must be one of"):
        paca_layer(x, (7, 9), impl="triton", **args)
    with pytest.raises(ValueError, match=r"a q parameter is torch.float32 on cpu; every "
                                         r"parameter must match x \(torch.float64 on cpu\)"):
        paca_layer(x, (7, 9), **{**args, "q": (args["q"][0].float(), args["q"][1])})
    with pytest.raises(ValueError, match=r"prior \(6, 62\) must be \(M, N\) = \(6, 63\)"):
        paca_layer(x, (7, 9), prior=torch.zeros(6, 62, dtype=x.dtype), **args)
    head = args["head"]
    bad_heads = [
        ([torch.zeros(20, 1, 4, 4, dtype=x.dtype), *head[1:]], r"depthwise weight must be "
         r"\(C, 1, k, k\) with C = 20 and k odd, got \(20, 1, 4, 4\)"),
        ([head[0], torch.zeros(19, dtype=x.dtype), *head[2:]], r"depthwise bias must be "
         r"\(20,\), got \(19,\)"),
        ([*head[:2], torch.zeros(20, 18, 1, 1, dtype=x.dtype), *head[3:]], r"hidden weight must "
         r"be \(20, 20\), got \(20, 18\)"),
        ([*head[:4], torch.zeros(6, 21, 1, 1, dtype=x.dtype)], r"logits weight must be \(6, 20\)"
         r", got \(6, 21\)"),
    ]
    for bad, message in bad_heads:
        with pytest.raises(ValueError, match=message):
            paca_layer(x, (7, 9), impl="reference", **{**args, "head": bad})
    with pytest.raises(ValueError, match=r"the kv bias must be \(40,\), got \(39,\)"):
        paca_layer(x, (7, 9), **{**args, "kv": (args["kv"][0], torch.zeros(39, dtype=x.dtype))})
    if NATIVE_LIBRARY.available():
        with pytest.raises(ValueError, match=r"impl='cpu'\) is the fused forward for inference"):
            paca_layer(x, (7, 9), impl="cpu", **args)  # the parameters want gradients


def test_the_model_sized_layer_at_3136_patches():
    """The bench's case (C = 96, 2 heads, M = 100, 56×56), float32: fused equals the model."""
    if not NATIVE_LIBRARY.available():
        pytest.skip("fused CPU kernels unavailable (no compiler)")
    torch.manual_seed(0)
    layer = PaCaAttention(96, 2, clusters=100).eval()
    x = torch.randn(1, 3136, 96)
    side = math.isqrt(3136)
    with torch.no_grad():
        want, z_want = layer(x, (side, side))
        got, z = paca_layer(x, (side, side), impl="cpu", **layer_args(layer))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, z_want, rtol=1e-5, atol=1e-9)


@needs_kernels
@pytest.mark.parametrize(("batch", "grid", "clusters", "kind"), [
    (0, (3, 3), 4, "conv"), (1, (1, 1), 1, "conv"), (3, (2, 2), 1, "linear"),
    (1, (1, 7), 9, "mlp"), (2, (9, 1), 2, "conv")])
def test_edge_shapes(batch, grid, clusters, kind):
    """An empty batch, one patch, one cluster, more clusters than patches, one-column grids:
    the model layer, the torch form and the fused forward agree (float64)."""
    torch.manual_seed(0)
    layer = PaCaAttention(8, 2, clusters=clusters, clustering=kind).double().eval()
    x = torch.randn(batch, grid[0] * grid[1], 8, dtype=torch.float64)
    with torch.no_grad():
        model_out, model_z = layer(x, grid)
        want, z_want = paca_layer_reference(x, grid, **layer.paca_parameters())
        got, z = paca_layer(x, grid, impl="cpu", **layer.paca_parameters())
    assert got.shape == want.shape == model_out.shape == x.shape
    assert z.shape == z_want.shape == (batch, clusters, grid[0] * grid[1])
    torch.testing.assert_close(want, model_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, z_want, rtol=1e-12, atol=1e-14)
