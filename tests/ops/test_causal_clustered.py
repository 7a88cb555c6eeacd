"""Causal clustered / i-clustered attention (ops/causal_clustered): the fast path equals the
float64 oracle (clustering, selection and attention), nothing before position t moves when
position t changes (outputs and gradients, bit for bit in float64), gradients equal the
reference's autograd, degenerate settings are dense attention, and arguments are checked."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from clusterfx.ops import causal_clustered as cc
from clusterfx.ops.causal_clustered import cpu, reference, registration
from clusterfx.ops.causal_clustered.common import draw_plan
from clusterfx.ops.clustering import ClusteringSpec
from tests.helpers import oracle_tolerance

B, H, HK, N, D = 2, 4, 2, 40, 8  # GQA: two query heads per key/value head
BLOCK, C, TOPK = 8, 5, 4
DT = torch.float64
VARIANTS = list(itertools.product(["clustered", "improved"], ["hamming", "kmeans"],
                                  ["attention", "euclidean"]))
IDS = ["-".join(v) for v in VARIANTS]


def _inputs(n=N, nk=None, dtype=DT, seed=0, pad=True, dv=D + 2):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    q = torch.randn(B, H, n, D, generator=g, dtype=dtype)
    k = torch.randn(B, HK, nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, HK, nk, dv, generator=g, dtype=dtype)
    keep = torch.ones(B, nk, dtype=torch.bool)
    if pad:
        keep[1, :5] = False  # left padding
        keep[0, nk - 3:] = False  # right padding
        keep[0, nk // 2] = False  # a hole
    return q, k, v, keep


def _call(variant, clustering, metric, q, k, v, keep, impl="cpu", causal=True, **kw):
    fn = cc.causal_improved_clustered_attention if variant == "improved" else \
        cc.causal_clustered_attention
    extra = {"topk": TOPK} if variant == "improved" else {}
    args = dict(clusters=C, block=BLOCK, causal=causal, key_padding_mask=keep, seed=3,
                clustering=clustering, metric=metric, bits=16, iterations=3, refine=1,
                impl=impl)
    return fn(q, k, v, **{**args, **extra, **kw})


def _dense(q, k, v, keep, causal=True):
    """Exact attention with zeros for queries that see no key (the op's convention)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    mask = keep[:, None, None, :].expand(B, 1, q.shape[2], k.shape[2])
    if causal:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.where(mask.any(-1, keepdim=True), out, 0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "all-keys"])
@pytest.mark.parametrize(("variant", "clustering", "metric"), VARIANTS, ids=IDS)
def test_cpu_equals_the_float64_oracle(variant, clustering, metric, causal):
    q, k, v, keep = _inputs(nk=None if causal else 27)
    topk = TOPK if variant == "improved" else 0
    spec = ClusteringSpec(C, 3, 16, 3, clustering, 1, metric)
    ref = registration.run(q, k, v, keep, 0.3, spec, topk, BLOCK, causal, "reference")
    fast = registration.run(q, k, v, keep, 0.3, spec, topk, BLOCK, causal, "cpu")
    assert torch.equal(ref[1], fast[1])  # key clusters of every epoch
    assert torch.equal(ref[2], fast[2])  # causal query clusters
    assert torch.equal(ref[3].sort(-1).values, fast[3].sort(-1).values)  # selected keys
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-12)
    # the differentiable form (used for gradients) is the same function
    args = (q, k, v, keep, *fast[1:], C, 0.3, BLOCK, causal)
    torch.testing.assert_close(cpu.attention_from_choices(*args), ref[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_fused_inference_path_equals_the_oracle(variant, pad):
    """With Dv = D the inference forward runs the local blocks on the fused flash kernel
    (causal flag without padding, an additive mask with it)."""
    q, k, v, keep = _inputs(dv=D, pad=pad)
    topk = TOPK if variant == "improved" else 0
    spec = ClusteringSpec(C, 3, 16, 3, "hamming", 1, "attention")
    ref = registration.run(q, k, v, keep, 0.3, spec, topk, BLOCK, True, "reference")
    fast = registration.run(q, k, v, keep, 0.3, spec, topk, BLOCK, True, "cpu")
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-12)
    base = _call(variant, "hamming", "attention", q, k, v, keep)
    for t in (3, 8, 21, 39):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t], k2[:, :, t], v2[:, :, t] = 2.0, -1.0, 3.0
        out = _call(variant, "hamming", "attention", q2, k2, v2, keep)
        assert torch.equal(out[:, :, :t], base[:, :, :t]), t
        assert not torch.equal(out[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize(("variant", "clustering", "metric", "impl"), [
    *(v + ("cpu",) for v in VARIANTS), ("improved", "hamming", "attention", "reference"),
    ("clustered", "kmeans", "euclidean", "reference")],
    ids=[*(i + "-cpu" for i in IDS), "improved-hamming-attention-reference",
         "clustered-kmeans-euclidean-reference"])
def test_nothing_before_t_moves_when_position_t_changes(variant, clustering, metric, impl):
    """Change q, k and v at position t (and, separately, whether t is padding): outputs
    before t are bit-identical in float64, and their gradients w.r.t. positions >= t are 0."""
    q, k, v, keep = _inputs()
    base = _call(variant, clustering, metric, q, k, v, keep, impl)
    moved = 0.0
    for t in (1, 7, 8, 13, 16, 23, 31, 39):
        q2, k2, v2, keep2 = q.clone(), k.clone(), v.clone(), keep.clone()
        q2[:, :, t] += 1.5
        k2[:, :, t] -= 2.0
        v2[:, :, t] += 3.0
        out = _call(variant, clustering, metric, q2, k2, v2, keep, impl)
        assert torch.equal(out[:, :, :t], base[:, :, :t]), t
        moved = max(moved, float((out[:, :, t:] - base[:, :, t:]).abs().max()))
        keep2[:, t] = ~keep2[:, t]
        out = _call(variant, clustering, metric, q, k, v, keep2, impl)
        assert torch.equal(out[:, :, :t], base[:, :, :t]), t
    assert moved > 0.1  # the perturbations were seen by the later positions
    if impl == "cpu":
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = _call(variant, clustering, metric, qg, kg, vg, keep, impl)
        t = 19
        w = torch.randn(out[:, :, :t].shape, dtype=DT, generator=torch.Generator().manual_seed(1))
        dq, dk, dv = torch.autograd.grad((out[:, :, :t] * w).sum(), (qg, kg, vg))
        assert not dq[:, :, t:].any() and not dk[:, :, t:].any() and not dv[:, :, t:].any()
        assert dq[:, :, :t].abs().max() > 0 and dk[:, :, :t].abs().max() > 0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "all-keys"])
@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_gradients_equal_the_reference_autograd(variant, causal):
    q, k, v, keep = _inputs(nk=None if causal else 27)
    _, choices = _call(variant, "hamming", "attention", q, k, v, keep, causal=causal,
                       return_choices=True)
    w = torch.randn(B, H, N, D + 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    grads = []
    for impl in ("cpu", "reference"):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = cc.causal_clustered_attention_from_choices(
            *xs, *choices, C, block=BLOCK, causal=causal, key_padding_mask=keep, impl=impl)
        grads.append(torch.autograd.grad((out * w).sum(), xs))
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = reference.attention_from_choices(*xs, keep, *choices, C, q.shape[-1] ** -0.5, BLOCK,
                                           causal)
    oracle = torch.autograd.grad((out * w).sum(), xs)
    for got in grads:
        for a, b in zip(got, oracle, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # the op that clusters inside differentiates the same function
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = _call(variant, "hamming", "attention", *xs, keep, causal=causal)
    for a, b in zip(torch.autograd.grad((out * w).sum(), xs), oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_gradcheck_on_tiny_float64_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 12, 3, generator=g, dtype=DT)
    k = torch.randn(1, 1, 12, 3, generator=g, dtype=DT)
    v = torch.randn(1, 1, 12, 2, generator=g, dtype=DT)
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, 2] = False
    _, choices = cc.causal_improved_clustered_attention(
        q, k, v, clusters=2, topk=2, block=4, key_padding_mask=keep, seed=0, return_choices=True)
    fn = lambda q_, k_, v_: cc.causal_clustered_attention_from_choices(  # noqa: E731
        q_, k_, v_, *choices, 2, block=4, key_padding_mask=keep)
    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_(True) for x in (q, k, v)))


@pytest.mark.parametrize("clustering", ["hamming", "kmeans"])
def test_degenerate_settings_are_dense_attention(clustering):
    q, k, v, keep = _inputs()
    dense = _dense(q, k, v, keep)
    settings = [
        (cc.causal_clustered_attention, dict(clusters=3, block=64)),  # one block: all local
        (cc.causal_clustered_attention, dict(clusters=N, block=BLOCK)),  # a key per cluster
        (cc.causal_improved_clustered_attention, dict(clusters=3, block=BLOCK, topk=N)),
    ]
    for fn, kw in settings:
        out = fn(q, k, v, key_padding_mask=keep, seed=0, clustering=clustering, **kw)
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-13)
    # every key visible (cross-attention): one key per cluster is dense attention
    q, k, v, keep = _inputs(nk=27)
    out = cc.causal_clustered_attention(q, k, v, clusters=27, block=BLOCK, causal=False,
                                        key_padding_mask=keep, seed=0, clustering=clustering)
    torch.testing.assert_close(out, _dense(q, k, v, keep, causal=False), rtol=0, atol=1e-13)


def test_the_approximation_is_real_and_improved_is_closer():
    q, k, v, keep = _inputs(n=96)
    dense = _dense(q, k, v, keep)
    err = {}
    for variant in ("clustered", "improved"):
        out = _call(variant, "hamming", "attention", q, k, v, keep)
        err[variant] = float((out - dense).abs().max())
    assert 1e-3 < err["improved"] < err["clustered"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_the_dtype_error_of_the_oracle(dtype):
    q, k, v, keep = _inputs()
    _, choices = _call("improved", "hamming", "attention", q, k, v, keep, return_choices=True)
    low = [x.to(dtype) for x in (q, k, v)]
    out = cc.causal_clustered_attention_from_choices(*low, *choices, C, block=BLOCK,
                                                     key_padding_mask=keep)
    assert out.dtype == dtype
    oracle = reference.attention_from_choices(*(x.double() for x in low), keep, *choices, C,
                                              D ** -0.5, BLOCK, True)
    tol = oracle_tolerance(dtype, oracle, reduction=N)
    assert float((out.double() - oracle).abs().max()) <= tol
    # the clustering itself runs in float32 for low precision inputs
    out = _call("improved", "hamming", "attention", *low, keep)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_seeds_are_deterministic_and_global_rng_is_used_for_minus_one():
    q, k, v, keep = _inputs()
    a = _call("improved", "hamming", "attention", q, k, v, keep, return_choices=True)
    b = _call("improved", "hamming", "attention", q, k, v, keep, return_choices=True)
    assert torch.equal(a[0], b[0])
    other = _call("improved", "hamming", "attention", q, k, v, keep, seed=4)
    assert not torch.equal(a[0], other)
    torch.manual_seed(7)
    x = _call("clustered", "hamming", "attention", q, k, v, keep, seed=-1)
    torch.manual_seed(7)
    y = _call("clustered", "hamming", "attention", q, k, v, keep, seed=-1)
    assert torch.equal(x, y)


def test_plan_draws_planes_then_priorities_from_one_generator():
    plan = draw_plan(5, "hamming", 4, 3, 2, 6, 4, 6, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(plan.planes, torch.randn(4, 3, generator=g, dtype=DT))
    assert torch.equal(plan.key_priority, torch.rand(2, 6, generator=g, dtype=DT))
    assert draw_plan(5, "kmeans", 4, 3, 2, 6, 4, 6, torch.device("cpu")).planes.numel() == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(block=0), "block (0) must be a positive int"),
    (dict(clusters=0), "clusters (0) must be a positive int"),
    (dict(clustering="lsh"), "clustering"),
    (dict(impl="gpu"), "impl ('gpu') must be one of"),
])
def test_bad_arguments_raise_before_any_work(kwargs, message):
    q, k, v, keep = _inputs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cc.causal_clustered_attention(q, k, v, **{"clusters": 2, **kwargs})


def test_shape_errors_name_the_values():
    q, k, v, keep = _inputs()
    with pytest.raises(ValueError, match=r"Nq \(40\) must equal Nk \(27\)"):
        cc.causal_clustered_attention(q, k[:, :, :27], v[:, :, :27], clusters=2)
    with pytest.raises(ValueError, match=r"topk \(0\) must be >= 1"):
        cc.causal_improved_clustered_attention(q, k, v, clusters=2, topk=0)
    with pytest.raises(RuntimeError, match="no Triton kernels"):
        cc.causal_clustered_attention(q, k, v, clusters=2, impl="triton")
    _, (ka, qa, idx) = cc.causal_improved_clustered_attention(q, k, v, clusters=2, topk=2,
                                                              return_choices=True, block=8)
    with pytest.raises(ValueError, match="key_assign has shape"):
        cc.causal_clustered_attention_from_choices(q, k, v, ka[:, :, :1], qa, idx, 2, block=8)
    bad = idx.clone()
    bad[0, 0, 3, 0, :2] = 5  # a key twice in one row
    with pytest.raises(ValueError, match="repeats a key"):
        cc.causal_clustered_attention_from_choices(q, k, v, ka, qa, bad, 2, block=8)


def test_mask_structure_tells_padding_from_causal_padding_from_other():
    n = 6
    keep = torch.tensor([[True] * n, [False, False] + [True] * (n - 2)])
    tri = torch.ones(n, n, dtype=torch.bool).tril()
    causal_pad = (tri & keep[:, None, :])[:, None]  # (B,1,N,N) as Hugging Face builds it
    kind, got = cc.mask_structure(causal_pad, 2, n, n)
    assert kind == "causal_padding" and torch.equal(got, keep)
    additive = torch.zeros(2, 1, n, n).masked_fill(~causal_pad, torch.finfo(torch.float32).min)
    assert cc.mask_structure(additive, 2, n, n)[0] == "causal_padding"
    assert cc.mask_structure(keep[:, None, None, :], 2, n, n)[0] == "padding"
    assert cc.mask_structure(keep[:, None, None, :].expand(2, 1, n, n), 2, n, n)[0] == "padding"
    assert cc.mask_structure(None, 2, n, n) == ("padding", None)
    banded = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 1
    assert cc.mask_structure(banded, 2, n, n) == ("other", None)
    heads = torch.stack([causal_pad[:, 0], ~causal_pad[:, 0]], 1)
    assert cc.mask_structure(heads, 2, n, n) == ("other", None)
    assert cc.mask_structure(additive + 0.5 * (additive == 0), 2, n, n) == ("other", None)


def _conditional(q, k, v, mask, method="improved_clustered", is_causal=False,
                 causal_queries=False, min_length=0):
    return torch.ops.clusterfx.causal_conditional_attention(
        q, k, v, mask, 0.3, method, C, 3, 16, 3, "hamming", 1, "attention", TOPK, BLOCK,
        is_causal, causal_queries, min_length, "cpu", "")


def test_conditional_op_paths():
    q, k, v, keep = _inputs()
    tri = torch.ones(N, N, dtype=torch.bool).tril()
    causal_pad = (tri & keep[:, None, :])[:, None]
    out, *_, path = _conditional(q, k, v, causal_pad)
    assert int(path) == 0
    want = cc.causal_improved_clustered_attention(
        q, k, v, clusters=C, topk=TOPK, block=BLOCK, key_padding_mask=keep, scale=0.3, seed=3,
        bits=16, iterations=3)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out, *_, path = _conditional(q, k, v, keep[:, None, None, :], is_causal=True)
    assert int(path) == 0 and torch.equal(out, want)
    out, *_, path = _conditional(q, k, v, None, min_length=N + 1, is_causal=True)
    assert int(path) == 2
    torch.testing.assert_close(out, _dense(q * 0.3 / D ** -0.5, k, v, keep | True), atol=1e-12,
                               rtol=0)
    banded = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs() <= 2
    out, *_, path = _conditional(q, k, v, banded)
    assert int(path) == 3
    # key padding only: queries pooled (clustered family) unless the query stream is causal
    out, *_, fam, path = _conditional(q, k, v, keep[:, None, None, :])
    assert int(path) == 4
    # C + 1: the clustered family's spare cluster holds padded queries (ops/clustered/nonfinite)
    fam_out = torch.ops.clusterfx.improved_clustered_attention_from_assignments(
        q, k, v, fam, keep, C + 1, TOPK, 0.3, "cpu")[0]
    torch.testing.assert_close(out, fam_out, rtol=0, atol=1e-12)
    out, *_, path = _conditional(q, k, v, keep[:, None, None, :], causal_queries=True)
    assert int(path) == 1
    want = cc.causal_improved_clustered_attention(
        q, k, v, clusters=C, topk=TOPK, block=BLOCK, key_padding_mask=keep, scale=0.3, seed=3,
        bits=16, iterations=3, causal=False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("path_mask", ["causal", "padding", "banded"])
def test_conditional_op_gradients(path_mask):
    q, k, v, keep = _inputs()
    tri = torch.ones(N, N, dtype=torch.bool).tril()
    mask = {"causal": (tri & keep[:, None, :])[:, None], "padding": keep[:, None, None, :],
            "banded": (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs() <= 2}[path_mask]
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, ka, qa, idx, fam, path = _conditional(*xs, mask)
    w = torch.randn(out.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out * w).sum(), xs)
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    if path_mask == "causal":
        ref = reference.attention_from_choices(*xs, keep, ka, qa, idx, C, 0.3, BLOCK, True)
    elif path_mask == "padding":
        ref = torch.ops.clusterfx.improved_clustered_attention_from_assignments(
            *xs, fam, keep, C + 1, TOPK, 0.3, "reference")[0]  # + the spare cluster
    else:
        ref = torch.softmax((xs[0] @ xs[1].repeat_interleave(2, 1).mT * 0.3).masked_fill(
            ~mask, float("-inf")), -1) @ xs[2].repeat_interleave(2, 1)
    want = torch.autograd.grad((ref * w).sum(), xs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_opcheck_registrations():
    q, k, v, keep = _inputs(n=16)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    args = (q, k, v, keep, 0.3, 3, 2, 16, 0, "hamming", 1, "attention", 2, 4, True, "cpu")
    torch.library.opcheck(torch.ops.clusterfx.causal_clustered_attention, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    _, choices = cc.causal_improved_clustered_attention(
        q.detach(), k.detach(), v.detach(), clusters=3, topk=2, block=4, seed=0,
        return_choices=True)
    args = (q, k, v, keep, *choices, 3, 0.3, 4, True, "cpu")
    torch.library.opcheck(torch.ops.clusterfx.causal_clustered_attention_from_choices, args)
