"""clusterfx::paca_attention: every implementation against the float64 oracle, the analytic
backward against autograd of the oracle, the properties of patch-to-cluster attention, and
argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clusterfx.ops.common.telemetry import counters
from clusterfx.ops.paca import PatchClustering, paca_attention, paca_attention_reference
from tests.helpers import assert_same_values_and_grads, tolerance


def make(b=2, h=3, n=21, d=8, m=5, prefix=1, dtype=torch.float64, seed=0, dv=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, n, dv or d, generator=gen, dtype=torch.float64)
    logits = 2 * torch.randn(b, m, n - prefix, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)] + [logits.to(dtype)]


def oracle(q, k, v, logits, prefix, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return paca_attention_reference(q.double(), k.double(), v.double(), logits.double(),
                                    prefix=prefix, scale=scale)


@pytest.mark.parametrize("prefix", [0, 1, 4])
@pytest.mark.parametrize("m", [1, 5, 20])
def test_cpu_matches_reference_float64(prefix, m):
    q, k, v, logits = make(m=m, prefix=prefix, dv=6)
    out = paca_attention(q, k, v, logits, prefix=prefix, impl="cpu")
    torch.testing.assert_close(out, oracle(q, k, v, logits, prefix), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_low_precision_within_dtype_tolerance(dtype):
    q, k, v, logits = make(dtype=dtype, n=40, m=7, prefix=2)
    before = counters["paca_attention.cpu"]
    out = paca_attention(q, k, v, logits, prefix=2)  # auto = cpu on CPU
    assert counters["paca_attention.cpu"] == before + 1 and out.dtype == dtype
    want = oracle(q, k, v, logits, 2)
    err = float((out.double() - want).abs().max() / want.abs().max())
    assert err <= tolerance(dtype, 40, factor=16), err


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("prefix", [0, 2])
def test_backward_matches_autograd_of_the_oracle(impl, prefix):
    inputs = [t.requires_grad_() for t in make(n=13, m=4, prefix=prefix, dv=5)]
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(2, 3, 13, 5, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((paca_attention(*inputs, prefix=prefix, impl=impl) * g).sum(),
                              inputs)
    want = torch.autograd.grad((oracle(*inputs, prefix) * g).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_opcheck():
    inputs = [t.requires_grad_() for t in make(b=1, h=2, n=7, d=3, m=3, prefix=1)]
    assert torch.autograd.gradcheck(lambda *t: paca_attention(*t, prefix=1, impl="cpu"), inputs)
    torch.library.opcheck(torch.ops.clusterfx.paca_attention.default,
                          (*[t.detach() for t in make(m=3)], 1, None, "cpu", ""))


def test_compiles_without_graph_breaks_and_matches_eager():
    q, k, v, logits = make(dtype=torch.float32, n=17, m=4, prefix=1)

    def fn(q, k, v, logits):
        return paca_attention(q, k, v, logits, prefix=1) * 2

    explanation = torch._dynamo.explain(fn)(q, k, v, logits)
    assert explanation.graph_break_count == 0
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, logits)
    torch.testing.assert_close(got, fn(q, k, v, logits))


# ------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_identity_assignment_with_m_equal_n_is_dense_attention(prefix):
    q, k, v, _ = make(n=16, prefix=prefix)
    patches = 16 - prefix
    # softmax of 0 on the diagonal and -1e4 elsewhere is exactly the identity in float64
    logits = torch.full((2, patches, patches), -1e4, dtype=torch.float64).diagonal_scatter(
        torch.zeros(2, patches, dtype=torch.float64), dim1=1, dim2=2)
    dense = F.scaled_dot_product_attention(q, k, v)
    for impl in ("reference", "cpu"):
        out = paca_attention(q, k, v, logits, prefix=prefix, impl=impl)
        torch.testing.assert_close(out, dense, rtol=1e-13, atol=1e-13)


def test_assignment_and_attention_rows_sum_to_one():
    """Constant values pass through unchanged only if the rows of z (pooling) and of the
    attention both sum to one; clustering probabilities themselves sum to one over patches."""
    q, k, v, logits = make(n=30, m=6, prefix=2)
    const = torch.randn(1, 3, 1, 8, dtype=torch.float64).expand_as(v)
    for impl in ("reference", "cpu"):
        out = paca_attention(q, k, const, logits, prefix=2, impl=impl)
        torch.testing.assert_close(out, const, rtol=1e-12, atol=1e-12)
    head = PatchClustering(8, 6, (4, 7), "conv", init="random").double()
    z = head(torch.randn(2, 28, 8, dtype=torch.float64)).softmax(dim=-1)
    torch.testing.assert_close(z.sum(-1), torch.ones(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_permutation_equivariance_with_token_wise_clustering(kind):
    """Permuting the patches permutes the outputs (linear / MLP heads see each patch alone;
    the conv head reads the grid and is not equivariant, as the paper notes)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 12, generator=gen, dtype=torch.float64)
    head = PatchClustering(12, 5, (4, 5), kind, init="random").double()
    wq, wk, wv = (torch.randn(12, 12, generator=gen, dtype=torch.float64) for _ in range(3))

    def layer(x):
        split = lambda t: t.view(2, 20, 3, 4).transpose(1, 2)  # noqa: E731
        return paca_attention(split(x @ wq), split(x @ wk), split(x @ wv), head(x), impl="cpu")

    perm = torch.randperm(20, generator=gen)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, :, perm], rtol=1e-12, atol=1e-12)


def test_one_cluster_gives_every_patch_the_same_output():
    q, k, v, logits = make(n=12, m=1, prefix=0)
    out = paca_attention(q, k, v, logits, prefix=0, impl="cpu")
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "logits": a["logits"][:, :0]}, r"M = 0 clusters; M must be >= 1"),
    (lambda a: {**a, "logits": a["logits"][:, :, 1:]}, r"must be \(B, M, N - prefix\)"),
    (lambda a: {**a, "prefix": 21}, r"prefix \(21\) must be below the sequence length"),
    (lambda a: {**a, "prefix": -1}, r"prefix \(-1\) must be an int >= 0"),
    (lambda a: {**a, "k": a["k"][:, :, :5]}, r"self-attention over one sequence"),
    (lambda a: {**a, "v": a["v"].float()}, r"dtypes .* must be the same"),
    (lambda a: {**a, "scale": -1.0}, r"scale \(-1.0\) must be a positive"),
    (lambda a: {**a, "impl": "gpu"}, r"impl \('gpu'\) must be one of"),
])
def test_bad_arguments_raise_value_error_naming_the_value(change, message):
    q, k, v, logits = make()
    args = change({"q": q, "k": k, "v": v, "logits": logits, "prefix": 1, "scale": None,
                   "impl": "cpu"})
    with pytest.raises(ValueError, match=message):
        paca_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("logits"), **args)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        paca_attention(*make(dtype=torch.float32), prefix=1, impl="triton")


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_clustering_head_rejects_bad_cluster_counts(bad):
    with pytest.raises(ValueError, match="clusters"):
        PatchClustering(8, bad, (4, 4))


def test_conv_patch_clustering_equals_its_convolutions():
    """cluster_logits' conv kind (1×1 convolutions computed as channel products) equals the
    paper's convolution stack on the (C, H, W) map, with a prior, values and gradients."""
    torch.manual_seed(0)
    head = PatchClustering(12, 6, (4, 5), kind="conv", init="pool").double()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 20, 12, dtype=torch.float64, requires_grad=True)
    got = head(x)
    fmap = x.transpose(1, 2).reshape(2, 12, 4, 5)
    fmap = F.gelu(F.conv2d(fmap, head.dw.weight, head.dw.bias, padding=3, groups=12))
    fmap = F.gelu(F.conv2d(fmap, head.pw.weight, head.pw.bias))
    want = F.conv2d(fmap, head.out.weight).flatten(2) + head.prior
    assert_same_values_and_grads(got, want, (x, *head.parameters()))


@pytest.mark.parametrize("contiguous", [True, False])
def test_depthwise_on_grid_equals_the_nchw_convolution(contiguous):
    """depthwise_on_grid convolves a channels-last view of the tokens: it equals the
    convolution of the (B, C, H, W) copy, values and gradients, contiguous tokens or not."""
    from clusterfx.ops.paca import depthwise_on_grid

    torch.manual_seed(0)
    wide = torch.randn(2, 4 * 5, 11, dtype=torch.float64, requires_grad=True)
    x = wide[..., 2:9] if not contiguous else wide[..., 2:9].contiguous()
    assert x.is_contiguous() == contiguous
    w, b = torch.randn(7, 1, 5, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    got = depthwise_on_grid(x, w, b, (4, 5))
    fmap = x.transpose(1, 2).reshape(2, 7, 4, 5)
    want = F.conv2d(fmap, w, b, padding=2, groups=7).flatten(2).transpose(1, 2)
    assert got.shape == (2, 20, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * g).sum(), wide)[0],
                               torch.autograd.grad((want * g).sum(), wide)[0], rtol=0,
                               atol=1e-12)
