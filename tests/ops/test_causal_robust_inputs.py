"""Causal clustered / i-clustered attention on inputs that eager attention answers: zero-size
dims (forward and backward), cluster counts far beyond the sequence, out-of-range seeds, and
non-finite values (ops/causal_clustered/guard.py), for every implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clusterfx.ops.causal_clustered import (
    causal_clustered_attention,
    causal_improved_clustered_attention,
)

IMPLS = ["reference", "cpu"]
DT = torch.float64


def _clustered(q, k, v, **kw):
    kw.setdefault("clusters", 3)
    return causal_clustered_attention(q, k, v, block=4, seed=0, **kw)


def _improved(q, k, v, **kw):
    kw.setdefault("clusters", 3)
    return causal_improved_clustered_attention(q, k, v, topk=4, block=4, seed=0, **kw)


OPS = {"clustered": _clustered, "improved": _improved}


def _qkv(B, H, N, D, Nk=None, Dv=None, grad=False):
    g = torch.Generator().manual_seed(0)
    Nk, Dv = N if Nk is None else Nk, D if Dv is None else Dv
    return [torch.randn(*s, dtype=DT, generator=g).requires_grad_(grad)
            for s in ((B, H, N, D), (B, H, Nk, D), (B, H, Nk, Dv))]


def _dense(q, k, v, causal=True, keep=None, scale=None):
    see = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    see = (see.tril() if causal else see)[None, None]
    if keep is not None:
        see = see & keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=see, scale=scale)


SHAPES = {"batch 0": (0, 2, 16, 8), "heads 0": (2, 0, 16, 8), "length 0": (2, 2, 0, 8),
          "head dim 0": (2, 2, 16, 0), "value dim 0": (2, 2, 16, 8, 16, 0)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", list(SHAPES))
def test_zero_size_dims_answer_as_exact_attention(case, op, impl):
    q, k, v = _qkv(*SHAPES[case], grad=True)
    out = OPS[op](q, k, v, impl=impl)
    want = _dense(q, k, v, scale=1.0 if case == "head dim 0" else None)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    want_grads = torch.autograd.grad(want.sum(), (q, k, v), allow_unused=True)
    for t, w in zip((q, k, v), want_grads, strict=True):
        assert t.grad.shape == t.shape
        if w is not None:
            torch.testing.assert_close(t.grad, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", list(OPS))
def test_no_keys_gives_zeros_as_sdpa(op):
    q, k, v = _qkv(2, 2, 16, 8, Nk=0)
    out = OPS[op](q, k, v, causal=False, impl="cpu")
    assert out.shape == (2, 2, 16, 8) and bool((out == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
def test_huge_cluster_counts_are_one_cluster_per_position(op, impl):
    """10**7 clusters on 16 positions: clamped before any buffer (it hung on the reference and
    would allocate gigabytes); one key per cluster is exact attention."""
    q, k, v = _qkv(2, 2, 16, 8)
    out, (_, _, idx) = OPS[op](q, k, v, clusters=10**7, impl=impl, return_choices=True)
    assert idx.shape[3] == 16
    torch.testing.assert_close(out, _dense(q, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [2**63, -2])
def test_seed_outside_int64_names_the_value(seed):
    q, k, v = _qkv(1, 1, 8, 4)
    with pytest.raises(ValueError, match=str(seed)):
        causal_clustered_attention(q, k, v, clusters=2, seed=seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_bad_query_spoils_only_its_own_row(op, impl, value):
    """The key metric and the query codebooks read earlier queries: one bad query must not
    make any other row non-finite (dense attention spoils exactly one)."""
    q, k, v = _qkv(2, 2, 32, 8)
    q[0, 1, 10, 3] = value
    out, want = OPS[op](q, k, v, impl=impl), _dense(q, k, v)
    assert torch.equal(out.isfinite().all(-1), want.isfinite().all(-1))
    assert int((~out.isfinite().all(-1)).sum()) == 1 and bool(out[0, 1, 10].isnan().all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("where,value", [("k", float("nan")), ("v", float("nan")),
                                         ("k", float("inf")), ("k", -float("inf"))])
def test_a_bad_kept_key_or_value_gives_dense_rows(op, impl, where, value):
    q, k, v = _qkv(2, 2, 32, 8)
    {"k": k, "v": v}[where][0, 0, 5, 0] = value
    out, want = OPS[op](q, k, v, impl=impl), _dense(q, k, v)
    assert torch.equal(out.isnan(), want.isnan())
    finite = want.isfinite()
    torch.testing.assert_close(out[finite], want[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
def test_padded_positions_never_influence_valid_rows(op, impl):
    q, k, v = _qkv(2, 2, 32, 8)
    keep = torch.ones(2, 32, dtype=torch.bool)
    keep[0, -5:] = False
    clean = OPS[op](q, k, v, key_padding_mask=keep, impl=impl)
    for t in (q, k, v):
        t[0, 0, -2, 0] = float("nan")
    out = OPS[op](q, k, v, key_padding_mask=keep, impl=impl)
    torch.testing.assert_close(out[0, :, :-5], clean[0, :, :-5], rtol=0, atol=0)
    torch.testing.assert_close(out[1], clean[1], rtol=0, atol=0)


@pytest.mark.parametrize("op", list(OPS))
def test_gradients_of_a_bad_kept_key_are_dense_gradients(op):
    q, k, v = _qkv(1, 2, 16, 4, grad=True)
    with torch.no_grad():
        k[0, 0, 3, 1] = float("inf")
    out, want = OPS[op](q, k, v, impl="cpu"), _dense(q, k, v)
    got = torch.autograd.grad(out.nan_to_num().sum(), (q, k, v))
    ref = torch.autograd.grad(want.nan_to_num().sum(), (q, k, v))
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-10, atol=1e-12)


def test_the_conditional_op_answers_an_empty_batch():
    q, k, v = _qkv(0, 2, 16, 8, grad=True)
    mask = torch.ones(0, 1, 16, 16, dtype=torch.bool).tril()
    out = torch.ops.clusterfx.causal_conditional_attention(
        q, k, v, mask, 0.3, "clustered", 3, 2, 63, 0, "hamming", 1, "attention", 0, 4, False,
        False, 0, "auto", "")[0]
    assert out.shape == (0, 2, 16, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
