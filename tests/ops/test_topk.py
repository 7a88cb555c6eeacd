"""Tests for `clusterfx::topk_attention`; the oracle is `topk_attention_reference` in float64."""


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfx.ops.topk import counters, topk_attention, topk_attention_reference
from tests.helpers import oracle_tolerance

F64 = torch.float64
TRITON = pytest.mark.triton
IMPLS = ("cpu", "torch")  # the fused C++ kernels and the vectorised torch path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the randn_like / randint perturbations below are reproducible


def make_qkv(b=2, h=4, hk=2, nq=11, nk=13, d=8, dv=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=F64).to(dtype)
                 for s in ((b, h, nq, d), (b, hk, nk, d), (b, hk, nk, dv)))


def make_mask(kind, b, h, nq, nk, seed=1):
    """None, a bool keep-mask with a fully masked query row, or an additive mask with -inf."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        keep = torch.rand(b, 1, nq, nk, generator=g) < 0.6
        keep[:, :, 1] = False  # query 1 sees no key
        return keep
    if kind == "additive":
        add = torch.randn(1, h, nq, nk, generator=g, dtype=F64)
        return add.masked_fill(torch.rand(1, h, nq, nk, generator=g) < 0.2, float("-inf"))
    return None


def tolerance(dtype, ref, d):
    """|impl - float64 oracle| bound: one ulp of output rounding in ``dtype`` (Triton's
    interpreter truncates instead of rounding) plus fp32 score error growing like sqrt(D)."""
    return oracle_tolerance(dtype, ref, reduction=d, accumulation_ulps=4.0, floor=1.0)


@pytest.mark.parametrize("impl", ["cpu", "torch", "reference"])
@pytest.mark.parametrize("kind", ["none", "bool", "additive", "causal"])
@pytest.mark.parametrize("extra", [0, 7])
def test_topk_at_least_nk_equals_dense_sdpa(impl, kind, extra):
    q, k, v = make_qkv()
    causal, mask = kind == "causal", make_mask(kind, 2, 4, 11, 13)
    out = topk_attention(q, k, v, topk=13 + extra, attn_mask=mask, is_causal=causal, impl=impl,
                         chunk_size=4)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=True)
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_one_returns_value_of_argmax_key(impl):
    q, k, v = make_qkv()
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)  # (B, H, Nq, Nk)
    best = scores.argmax(dim=-1).unsqueeze(-1).expand(-1, -1, -1, v.shape[-1])  # (B, H, Nq, Dv)
    expected = v.repeat_interleave(2, dim=1).gather(2, best)
    out = topk_attention(q, k, v, topk=1, impl=impl, chunk_size=3)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["cpu", "torch", "reference"])
def test_causal_output_ignores_future_keys(impl):
    q, k, v = make_qkv(nq=12, nk=12)
    out = topk_attention(q, k, v, topk=4, is_causal=True, impl=impl, chunk_size=5)
    torch.testing.assert_close(out[:, :, 0], v.repeat_interleave(2, dim=1)[:, :, 0])
    for t in (0, 4, 10):
        k2, v2 = k.clone(), v.clone()
        for x in (k2, v2):
            x[:, :, t + 1:] += 3 * torch.randn_like(x[:, :, t + 1:])
        out2 = topk_attention(q, k2, v2, topk=4, is_causal=True, impl=impl, chunk_size=5)
        torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], atol=0, rtol=0)
        assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:])  # the test can see


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("topk", [3, 20])
def test_padded_keys_are_irrelevant(topk, impl):
    q, k, v = make_qkv(nk=16)
    keep = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    keep[0, ..., 10:] = False  # batch 0 has 10 real keys, batch 1 has 16
    out = topk_attention(q, k, v, topk=topk, attn_mask=keep, impl=impl, chunk_size=4)
    k2, v2 = k.clone(), v.clone()
    for x in (k2, v2):
        x[0, :, 10:] = 100 * torch.randn_like(x[0, :, 10:])
    out2 = topk_attention(q, k2, v2, topk=topk, attn_mask=keep, impl=impl, chunk_size=4)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_rows_are_convex_combinations_and_empty_rows_are_zero(kind, impl):
    (q, k, v), mask = make_qkv(), make_mask(kind, 2, 4, 11, 13)
    row_sum = topk_attention(q, k, torch.ones_like(v), topk=5, attn_mask=mask, is_causal=True,
                             impl=impl)
    full = torch.broadcast_to(mask if kind == "bool" else mask > float("-inf"), (2, 4, 11, 13))
    has_key = (full & torch.ones(11, 13, dtype=torch.bool).tril()).any(-1, keepdim=True)
    assert (~has_key).any() and has_key.any()
    torch.testing.assert_close(row_sum, has_key.to(F64).expand_as(row_sum), atol=1e-14, rtol=0)
    out = topk_attention(q, k, v, topk=5, attn_mask=mask, is_causal=True, impl=impl)
    lo, hi = v.amin(dim=2, keepdim=True), v.amax(dim=2, keepdim=True)
    lo, hi = lo.repeat_interleave(2, dim=1), hi.repeat_interleave(2, dim=1)
    assert bool(((out >= lo - 1e-12) & (out <= hi + 1e-12) | ~has_key).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
def test_cpu_matches_reference_in_low_precision(dtype, kind, impl):
    q, k, v = make_qkv(nq=40, nk=50, d=16, dtype=dtype)
    mask = make_mask(kind, 2, 4, 40, 50)
    ref = topk_attention_reference(q.double(), k.double(), v.double(), topk=6, attn_mask=mask,
                                   is_causal=True)
    out = topk_attention(q, k, v, topk=6, attn_mask=mask, is_causal=True, impl=impl,
                         chunk_size=16)
    err = (out.double() - ref).abs().max()
    assert out.dtype == dtype and err <= tolerance(dtype, ref, 16), f"{dtype}: error {err}"


def test_chunk_size_does_not_change_the_result():
    # float64: BLAS rounding depends on the chunk's shape (not bitwise equal), but 1e-15 score
    # noise cannot flip a top-k choice; in fp32 a near-tie at the k-th score can flip.
    q, k, v = make_qkv(nq=40, nk=37)
    mask = make_mask("additive", 2, 4, 40, 37)
    outs = [topk_attention(q, k, v, topk=5, attn_mask=mask, is_causal=True, impl="torch",
                           chunk_size=c) for c in (1, 7, 1000)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-13, rtol=0)


def separated_inputs(nq=5, nk=7, d=3, seed=3):
    """Inputs whose k-th and (k+1)-th scores are far apart, so gradcheck cannot flip them."""
    q, k, v = make_qkv(b=1, h=2, hk=1, nq=nq, nk=nk, d=d, dv=4, seed=seed)
    mask = torch.randn(1, 2, nq, nk, dtype=F64, generator=torch.Generator().manual_seed(seed))
    s = (q @ k.transpose(-1, -2)) * d**-0.5 + mask
    s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1), float("-inf"))
    top = s.topk(4, dim=-1).values
    gaps = (top[..., 2] - top[..., 3])[torch.isfinite(top[..., 3])]
    assert gaps.min() > 1e-3, "seed gives a near-tie; pick another"
    return [t.requires_grad_() for t in (q, k, v, mask)]


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64_and_gradients_match_reference_autograd(impl):
    inputs = separated_inputs()
    op = lambda q, k, v, m: topk_attention(q, k, v, topk=3, attn_mask=m, is_causal=True,
                                           impl=impl, chunk_size=2)
    assert torch.autograd.gradcheck(op, inputs)
    ref = lambda q, k, v, m: topk_attention_reference(q, k, v, topk=3, attn_mask=m,
                                                      is_causal=True)
    weight = torch.randn(1, 2, 5, 4, dtype=F64)
    got = torch.autograd.grad((op(*inputs) * weight).sum(), inputs)
    want = torch.autograd.grad((ref(*inputs) * weight).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", ["cpu", "torch", "reference",
                                  pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
def test_opcheck(impl, kind, request):
    if impl == "triton":
        request.getfixturevalue("interpret")
    q, k, v = (t.float().requires_grad_() for t in make_qkv(nq=6, nk=7))
    mask = make_mask(kind, 2, 4, 6, 7)
    if mask is not None and mask.is_floating_point():
        mask = mask.float().requires_grad_()
    args = (q, k, v, 3, mask, True, None, 4, impl)
    torch.library.opcheck(torch.ops.clusterfx.topk_attention.default, args)
    plain = [None if t is None else t.detach() for t in (q, k, v, mask)]  # no double backward
    bwd_args = (torch.randn(2, 4, 6, 5), *plain, 3, True, 0.3, 4, kind == "additive", impl)
    torch.library.opcheck(torch.ops.clusterfx.topk_attention_backward.default, bwd_args)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiles_fullgraph_with_matching_outputs_and_gradients(impl):
    inputs = separated_inputs(nq=6, nk=8)
    fn = lambda q, k, v, m: topk_attention(q, k, v, topk=3, attn_mask=m, impl=impl)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, out_c = fn(*inputs), compiled(*inputs)
    torch.testing.assert_close(out_c, out, atol=0, rtol=0)
    grads, grads_c = (torch.autograd.grad(o.sum(), inputs) for o in (out, out_c))
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, atol=0, rtol=0)


def test_auto_runs_cpu_on_cpu_tensors():
    before = counters["topk_attention.cpu"]
    assert topk_attention(*make_qkv(), topk=2).shape == (2, 4, 11, 5)
    assert counters["topk_attention.cpu"] == before + 1


@settings(max_examples=40, deadline=None, database=None)
@given(data=st.data())
def test_fuzz_cpu_matches_reference(data):
    draw = data.draw
    b, hk, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    nq, nk, d, dv = (draw(st.integers(1, 12)) for _ in range(4))
    q, k, v = make_qkv(b, h := hk * groups, hk, nq, nk, d, dv, seed=draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["none", "bool", "additive"]))
    mask = None
    if kind != "none":
        shape = [n if draw(st.booleans()) else 1 for n in (b, h, nq, nk)][draw(st.integers(0, 3)):]
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        mask = (torch.rand(shape, generator=g) < 0.7 if kind == "bool"
                else torch.randn(shape, generator=g, dtype=F64))
    kw = dict(topk=draw(st.integers(1, nk + 2)), attn_mask=mask, is_causal=draw(st.booleans()))
    ref = topk_attention_reference(q, k, v, **kw)
    for impl in IMPLS:
        out = topk_attention(q, k, v, chunk_size=draw(st.integers(1, 8)), impl=impl, **kw)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


BAD = [
    (dict(topk=0), ValueError, r"topk \(0\) must be a positive int \(>= 1\)"),
    (dict(topk=-3), ValueError, r"topk \(-3\)"),
    (dict(topk=2.5), TypeError, r"topk \(2.5\) must be a positive int \(>= 1\), not float"),
    (dict(chunk_size=0), ValueError, r"chunk_size \(0\) must be a positive int"),
    (dict(q=torch.randn(4, 11, 8)), ValueError, r"q must have rank 4 \(B, H, Nq, D\), got rank 3"),
    (dict(k=torch.randn(2, 2, 13, 7)), ValueError, "head dims differ: q has D=8, k has D=7"),
    (dict(q=torch.randn(2, 3, 11, 8)), ValueError, r"query heads \(3\) .* key/value heads \(2\)"),
    (dict(attn_mask=torch.ones(5, 13, dtype=torch.bool)), ValueError,
     r"\(5, 13\) is not broadcastable to \(B, H, Nq, Nk\) = \(2, 4, 11, 13\)"),
    (dict(attn_mask=torch.ones(11, 13, dtype=torch.int64)), TypeError, "attn_mask has dtype"),
    (dict(q=torch.randn(2, 4, 11, 8).to(torch.complex64)), ValueError, "accepted: torch.float16"),
    (dict(v=torch.randn(2, 2, 13, 5, dtype=F64)), ValueError, "must share one dtype"),
    (dict(impl="gpu"), ValueError, r"impl \(.gpu.\) must be one of"),
    (dict(scale=0.0), ValueError, "scale must be a positive finite float"),
    (dict(is_causal="yes"), TypeError, "is_causal must be a bool"),
]


# The op's schema itself rejects a float topk or a str is_causal; the rest also go to the op.
DIRECT = [(*case, direct) for case in BAD for direct in (False, True)
          if not (direct and case[1] is TypeError and "attn_mask" not in case[0])]


@pytest.mark.parametrize(("change", "error", "match", "direct"), DIRECT)
def test_bad_arguments_raise_before_any_work(change, error, match, direct):
    q, k, v = make_qkv(dtype=torch.float32)
    kw = dict(q=q, k=k, v=v, topk=3, attn_mask=None, is_causal=False, scale=None,
              chunk_size=4, impl="cpu") | change
    before = counters.copy()
    with pytest.raises(error, match=match):
        if direct:  # graphs call the op itself, which checks too
            torch.ops.clusterfx.topk_attention(*kw.values())
        else:
            topk_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)
    assert counters == before


def test_triton_impl_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        topk_attention(*make_qkv(dtype=torch.float32), topk=2, impl="triton")


@pytest.fixture
def interpret(monkeypatch):
    """Triton reads TRITON_INTERPRET when a kernel is *decorated*, not when it is called;
    ops/topk/triton.py decorates at first launch, so this works after importing it without."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import clusterfx.ops.topk.triton  # noqa: F401 - imported before the variable is set
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("kind", "topk"), [("none", 5), ("bool", 5), ("additive", 20),
                                            ("causal", 17)])
def test_triton_matches_reference(interpret, dtype, kind, topk):
    q, k, v = make_qkv(nq=19, nk=23, d=12, dtype=dtype)  # 19 and 17 are not block multiples
    mask = make_mask(kind, 2, 4, 19, 23)
    kw = dict(topk=topk, attn_mask=mask, is_causal=kind == "causal")
    ref = topk_attention_reference(q.double(), k.double(), v.double(), **kw)
    before = counters["topk_attention.triton"]
    out = topk_attention(q, k, v, impl="triton", chunk_size=8, **kw)
    assert counters["topk_attention.triton"] == before + 1 and out.dtype == dtype
    err = (out.double() - ref).abs().max()
    assert err <= tolerance(dtype, ref, 12), f"{dtype} {kind}: error {err}"


@TRITON
def test_triton_gathered_kernel_with_arbitrary_indices(interpret):
    from clusterfx.ops.topk.triton import gathered_attention_triton

    q, k, v = make_qkv(nq=9, nk=6, d=5, dtype=torch.float32)
    idx = torch.randint(0, 6, (2, 4, 9, 20), dtype=torch.int32)  # repeats allowed
    bias = torch.randn(2, 4, 9, 20).masked_fill(torch.rand(2, 4, 9, 20) < 0.3, float("-inf"))
    bias[:, :, 2] = float("-inf")  # a query with nothing selected -> zeros
    rows = idx.long().unsqueeze(-1).expand(-1, -1, -1, -1, 5)  # (B, H, Nq, k, 5)
    k_sel, v_sel = (x.repeat_interleave(2, dim=1).unsqueeze(2).expand(-1, -1, 9, -1, -1)
                    .gather(3, rows) for x in (k, v))
    s = (q.unsqueeze(-2) * k_sel).sum(-1) * 0.7 + bias
    want = (torch.softmax(s, dim=-1).nan_to_num(0.0).unsqueeze(-1) * v_sel).sum(-2)
    out = gathered_attention_triton(q, k, v, idx, bias, 0.7)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    assert out[:, :, 2].abs().max() == 0


@pytest.mark.parametrize("kind", ["none", "bool", "additive", "causal"])
def test_fused_backward_matches_reference_autograd(kind):
    """impl="cpu" runs its own backward kernel when the mask needs no gradient (GQA, masks,
    causality, k > valid keys): gradients equal the float64 oracle's autograd."""
    q, k, v = (t.requires_grad_() for t in make_qkv(nq=9, nk=12, seed=5))
    causal, mask = kind == "causal", make_mask("bool" if kind == "causal" else kind, 2, 4, 9, 12)
    weight = torch.randn(2, 4, 9, 5, dtype=F64)
    for topk in (4, 20):
        kw = dict(topk=topk, attn_mask=mask, is_causal=causal)
        got = torch.autograd.grad((topk_attention(q, k, v, impl="cpu", **kw) * weight).sum(),
                                  (q, k, v))
        want = torch.autograd.grad((topk_attention_reference(q, k, v, **kw) * weight).sum(),
                                   (q, k, v))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
