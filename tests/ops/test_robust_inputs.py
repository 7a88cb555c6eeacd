"""Inputs nobody here wrote: zero-size dimensions, absurd cluster counts, non-finite values and
padding. Each either gets exact attention's answer (checked against SDPA) or a clear error,
for every implementation the fast paths must keep ("reference", "cpu").

Rules (ops/common/degenerate.py, ops/clustered/nonfinite.py):
- a zero-size dim (batch, heads, queries, keys, head dims) answers as SDPA does: empty output,
  zeros with no key, the mean of the values with D = 0 — forward and backward;
- more clusters than queries use one per query: nothing is sized by the requested count;
- a NaN/inf in a query makes that row NaN (as dense attention) and no other row non-finite;
- a NaN/inf in a kept key or value: the call is exact, so its rows are dense attention's;
- padded positions (masked keys and values; queries at padded positions in self-attention)
  never influence the valid rows, whatever they hold.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from clusterfx.ops.clustered import clustered_attention, improved_clustered_attention
from clusterfx.ops.topk import topk_attention

IMPLS = ["reference", "cpu"]
DT = torch.float64


def _clustered(impl, q, k, v, mask=None, **kw):
    return clustered_attention(q, k, v, clusters=3, key_padding_mask=mask, seed=0, impl=impl,
                               **kw)


def _improved(impl, q, k, v, mask=None, **kw):
    return improved_clustered_attention(q, k, v, clusters=3, topk=2, key_padding_mask=mask,
                                        seed=0, impl=impl, **kw)


def _topk(impl, q, k, v, mask=None, **kw):
    attn_mask = None if mask is None else mask[:, None, None, :]
    return topk_attention(q, k, v, topk=2, attn_mask=attn_mask, impl=impl)


OPS = {"clustered": _clustered, "improved": _improved, "topk": _topk}


def _dense(q, k, v, mask=None):
    attn_mask = None if mask is None else mask[:, None, None, :]
    scale = 1.0 if q.shape[-1] == 0 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


SHAPES = {  # (B, H, Nq, D), (Hk, Nk, Dv)
    "batch 0": ((0, 2, 8, 4), (2, 8, 4)),
    "heads 0": ((1, 0, 8, 4), (0, 8, 4)),
    "queries 0": ((1, 2, 0, 4), (2, 8, 4)),
    "keys 0": ((1, 2, 8, 4), (2, 0, 4)),
    "head dim 0": ((1, 2, 8, 0), (2, 8, 4)),
    "value dim 0": ((1, 2, 8, 4), (2, 8, 0)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", list(SHAPES))
def test_zero_size_dims_answer_as_exact_attention(case, op, impl):
    (b, h, nq, d), (hk, nk, dv) = SHAPES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, nq, d, dtype=DT, generator=g, requires_grad=True)
    k = torch.randn(b, hk, nk, d, dtype=DT, generator=g, requires_grad=True)
    v = torch.randn(b, hk, nk, dv, dtype=DT, generator=g, requires_grad=True)
    out = OPS[op](impl, q, k, v)
    want = _dense(q, k, v)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    grad = torch.randn(want.shape, dtype=DT, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad, allow_unused=True)
    ref = torch.autograd.grad(want, (q, k, v), grad, allow_unused=True)
    for a, r in zip(got, ref, strict=True):
        a = torch.zeros_like(r) if a is None and r is not None else a
        if r is not None:
            torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", ["clustered", "improved"])
def test_huge_cluster_counts_use_one_cluster_per_query(op):
    """clusters=10**7 on 16 queries: same result as clusters=16, no buffer sized by 10**7
    (peak memory of a fresh process stays far below the 5 GB it used to take)."""
    code = textwrap.dedent(f"""
        import resource, warnings, torch
        from clusterfx.ops.clustered import {op}_clustered_attention as fn
        q = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(0))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            big = fn(q, q, q, clusters=10**7, seed=0, impl="cpu")
        small = fn(q, q, q, clusters=16, seed=0, impl="cpu")
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        assert torch.equal(big, small), "clamped result differs"
        assert any("10000000" in str(x.message) for x in w), [str(x.message) for x in w]
        print(grew)
    """).replace("improved_clustered_clustered", "improved_clustered").replace(
        "clustered_clustered", "clustered")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 200 * 1024  # KiB: under 200 MiB


def _qkv(n=12, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, 4, dtype=DT, generator=g) for _ in range(3))
    mask = None
    if pad:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, -4:] = False
    return q, k, v, mask


def _nonfinite_rows(x):
    return ~torch.isfinite(x).all(-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["clustered", "improved"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_bad_query_spoils_only_its_own_row(op, impl, value):
    q, k, v, mask = _qkv()
    q[0, 1, 5, 2] = value
    out = OPS[op](impl, q, k, v, mask)
    dense = _dense(q, k, v, mask)
    assert torch.equal(_nonfinite_rows(out), _nonfinite_rows(dense))
    assert _nonfinite_rows(out).sum() == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["clustered", "improved"])
def test_a_bad_key_or_value_gives_dense_attention_rows(op, impl):
    for where in ("k", "v"):
        for value in (float("nan"), float("inf"), -float("inf")):
            q, k, v, mask = _qkv()
            {"k": k, "v": v}[where][0, 1, 3, 0] = value
            out = OPS[op](impl, q, k, v, mask)
            dense = _dense(q, k, v, mask)
            assert torch.equal(_nonfinite_rows(out), _nonfinite_rows(dense)), (where, value)
            ok = ~_nonfinite_rows(dense)
            torch.testing.assert_close(out[ok], dense[ok], rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["clustered", "improved"])
def test_padded_positions_never_influence_valid_rows(op, impl):
    """Whatever the padded queries, keys and values hold (NaN, inf, noise), the valid rows are
    exactly the same."""
    q, k, v, mask = _qkv()
    base = OPS[op](impl, q, k, v, mask)
    valid = mask[:, None, :].expand(base.shape[:3])
    assert torch.isfinite(base[valid]).all()
    for fill in (float("nan"), float("inf"), 1e6):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[1, :, -4:] = fill
        out = OPS[op](impl, q2, k2, v2, mask)
        assert torch.equal(out[valid], base[valid]), fill


def test_bad_inputs_through_a_compiled_model():
    """The rewritten op (`conditional_attention`) keeps the same rules inside a model."""
    import clusterfx as cfx

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v, _ = _qkv(pad=False)
    q[0, 0, 7, 1] = float("nan")
    for config in (cfx.Clustered(clusters=3, seed=0),
                   cfx.ImprovedClustered(clusters=3, topk=2, seed=0), cfx.TopK(k=2)):
        compiled = cfx.compile(Attention(), policy=config, backend="eager")
        out = compiled(q, k, v)
        assert torch.equal(_nonfinite_rows(out), _nonfinite_rows(_dense(q, k, v))), config
        empty = compiled(q[:0], k[:0], v[:0])
        assert empty.shape == (0, *q.shape[1:])


def test_empty_batch_trains_through_a_compiled_model():
    import clusterfx as cfx

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    for config in (cfx.Clustered(clusters=3, seed=0), cfx.TopK(k=2)):
        compiled = cfx.compile(Attention(), policy=config, backend="eager")
        q, k, v = (torch.randn(0, 2, 8, 4, requires_grad=True) for _ in range(3))
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert out.shape == (0, 2, 8, 4)
        assert all(g is None or g.shape == (0, 2, 8, 4) for g in grads)
