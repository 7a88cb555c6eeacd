"""Clustered and improved-clustered attention against dense attention and the float64 oracle.

Covers the testable properties of reference notes §4: the degenerate settings that must equal
dense attention, Proposition 2, convexity, padding, permutation equivariance, gradients, the
fp32/fp16/bf16 CPU path against the reference, shape fuzzing, determinism, errors and opcheck.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterfx.ops.clustered as ca
import clusterfx.ops.clustering as cl
from clusterfx.ops.clustered import reference
from tests.helpers import oracle_tolerance

F64 = torch.float64
IMPLS = ("reference", "cpu", "torch")  # oracle, fused C++ kernels, vectorised torch
OPS = torch.ops.clusterfx


def make_inputs(B=2, H=4, Hk=2, Nq=12, Nk=10, D=6, Dv=5, dtype=F64, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, Hk, Nk, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, Hk, Nk, Dv, generator=g, dtype=F64).to(dtype)
    mask = None
    if pad:
        mask = torch.rand(B, Nk, generator=g) > 0.35
        mask[:, 0] = True
    return q, k, v, mask


def dense(q, k, v, mask=None, scale=None):
    """Plain softmax attention, written out here so it depends on no clusterfx code."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v


def random_assignments(q, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, q.shape[:3], generator=g)


def clustered(impl, q, k, v, a, C, mask=None):
    return ca.clustered_attention_from_assignments(q, k, v, a, C, mask, impl=impl)


def improved(impl, q, k, v, a, C, mask=None, topk=3):
    return ca.improved_clustered_attention_from_assignments(q, k, v, a, C, mask, topk=topk,
                                                            impl=impl)


# -------------------------------------------------------------- degenerate settings == dense


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pad", [False, True])
def test_one_query_per_cluster_is_dense(impl, pad):
    q, k, v, mask = make_inputs(pad=pad)
    a = torch.arange(q.shape[2]).expand(q.shape[:3]).contiguous()
    want = dense(q, k, v, mask)
    torch.testing.assert_close(clustered(impl, q, k, v, a, q.shape[2], mask), want,
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(improved(impl, q, k, v, a, q.shape[2], mask, topk=2), want,
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_clusters_of_identical_queries_are_dense(impl):
    q, k, v, mask = make_inputs(pad=True)
    a = random_assignments(q, 4)
    distinct = torch.randn(*q.shape[:2], 4, q.shape[-1], dtype=F64)
    q = torch.gather(distinct, 2, a[..., None].expand(*a.shape, q.shape[-1]))
    want = dense(q, k, v, mask)
    torch.testing.assert_close(clustered(impl, q, k, v, a, 4, mask), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(improved(impl, q, k, v, a, 4, mask), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pad", [False, True])
def test_improved_with_topk_covering_all_keys_is_dense(impl, pad):
    q, k, v, mask = make_inputs(pad=pad)
    a = random_assignments(q, 3)
    want = dense(q, k, v, mask)
    for topk in (k.shape[2], k.shape[2] + 7):
        torch.testing.assert_close(improved(impl, q, k, v, a, 3, mask, topk), want,
                                   atol=1e-12, rtol=0)
    got = ca.improved_clustered_attention(q, k, v, clusters=3, topk=k.shape[2],
                                          key_padding_mask=mask, seed=1, impl=impl)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_improved_with_topk_one_is_clustered(impl):
    q, k, v, mask = make_inputs(pad=True)
    a = random_assignments(q, 3)
    torch.testing.assert_close(improved(impl, q, k, v, a, 3, mask, topk=1),
                               clustered(impl, q, k, v, a, 3, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("clustering", ["hamming", "kmeans"])
def test_full_op_with_as_many_clusters_as_distinct_queries_is_dense(clustering):
    q, k, v, _ = make_inputs(Nq=9)
    for impl in IMPLS:
        got = ca.clustered_attention(q, k, v, clusters=9, seed=3, clustering=clustering,
                                     impl=impl)
        torch.testing.assert_close(got, dense(q, k, v), atol=1e-12, rtol=0)


# -------------------------------------------------------------- attention-matrix properties


def _explicit_matrices(q, k, a, C, topk):
    """Dense A, clustered A^c and improved A^t per (b, h), written out with loops over clusters."""
    B, H, Nq, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], 1)
    s = D ** -0.5
    A = torch.softmax(q @ k.transpose(-1, -2) * s, -1)
    Ac = torch.empty_like(A)
    At = torch.empty_like(A)
    for b in range(B):
        for h in range(H):
            for j in range(C):
                members = (a[b, h] == j).nonzero().flatten()
                if members.numel() == 0:
                    continue
                centroid = q[b, h, members].mean(0)
                row = torch.softmax(centroid @ k[b, h].T * s, -1)
                top = row.topk(topk).indices
                mass = row[top].sum()
                for i in members:
                    Ac[b, h, i] = row
                    At[b, h, i] = row
                    At[b, h, i, top] = mass * torch.softmax(q[b, h, i] @ k[b, h, top].T * s, -1)
    return A, Ac, At


@pytest.mark.parametrize("topk", [1, 3, 7])
def test_proposition_2_and_rows_are_distributions(topk):
    q, k, v, _ = make_inputs(Nq=16, Nk=12, seed=3)
    a = random_assignments(q, 4, seed=1)
    A, Ac, At = _explicit_matrices(q, k, a, 4, topk)
    err_t = (At - A).abs().sum(-1)
    err_c = (Ac - A).abs().sum(-1)
    assert (err_t <= err_c + 1e-12).all()  # Proposition 2, per query
    if topk > 1:
        assert (err_t < err_c - 1e-6).float().mean() > 0.5  # and it actually helps
    ref_c = reference.clustered_attention_weights(q, k, a, 4)
    ref_t, _ = reference.improved_clustered_attention_weights(q, k, a, 4, topk=topk)
    torch.testing.assert_close(ref_c, Ac, atol=1e-13, rtol=0)
    torch.testing.assert_close(ref_t, At, atol=1e-13, rtol=0)
    for W in (ref_c, ref_t):
        assert (W >= 0).all()
        torch.testing.assert_close(W.sum(-1), torch.ones_like(W[..., 0]), atol=1e-13, rtol=0)
    v_rep = v.repeat_interleave(2, 1)
    for impl in IMPLS:
        torch.testing.assert_close(improved(impl, q, k, v, a, 4, topk=topk), At @ v_rep,
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(clustered(impl, q, k, v, a, 4), Ac @ v_rep,
                                   atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_are_convex_combinations_of_values(impl):
    q, k, v, mask = make_inputs(Dv=1, pad=True, seed=5)
    a = random_assignments(q, 3)
    lo = v.masked_fill(~mask[:, None, :, None], float("inf")).amin(2).repeat_interleave(2, 1)
    hi = v.masked_fill(~mask[:, None, :, None], float("-inf")).amax(2).repeat_interleave(2, 1)
    for out in (clustered(impl, q, k, v, a, 3, mask), improved(impl, q, k, v, a, 3, mask)):
        assert (out >= lo[:, :, None] - 1e-12).all() and (out <= hi[:, :, None] + 1e-12).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_changing_padded_keys_changes_nothing(impl):
    q, k, v, mask = make_inputs(pad=True, seed=2)
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :].expand(-1, k.shape[1], -1)] = 1e3
    v2[~mask[:, None, :].expand(-1, k.shape[1], -1)] = -7.0
    for kw in ({"topk": 3}, {"topk": 40}):
        for fn in (ca.clustered_attention, ca.improved_clustered_attention):
            kwargs = kw if fn is ca.improved_clustered_attention else {}
            out1 = fn(q, k, v, clusters=3, key_padding_mask=mask, seed=0, impl=impl, **kwargs)
            out2 = fn(q, k2, v2, clusters=3, key_padding_mask=mask, seed=0, impl=impl, **kwargs)
            torch.testing.assert_close(out1, out2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_padded_batch_element_gives_zeros_not_nan(impl):
    q, k, v, mask = make_inputs(pad=True)
    mask[1] = False
    q.requires_grad_(True)
    a = random_assignments(q, 3)
    for out in (clustered(impl, q, k, v, a, 3, mask), improved(impl, q, k, v, a, 3, mask)):
        assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0] != 0).any()
        (grad,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_query_permutation_equivariance(impl):
    q, k, v, mask = make_inputs(pad=True, seed=4)
    a = random_assignments(q, 4)
    perm = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(0))
    for fn in (clustered, improved):
        out = fn(impl, q, k, v, a, 4, mask)
        out_p = fn(impl, q[:, :, perm], k, v, a[:, :, perm], 4, mask)
        torch.testing.assert_close(out_p, out[:, :, perm], atol=1e-12, rtol=0)
        kperm = torch.randperm(k.shape[2], generator=torch.Generator().manual_seed(1))
        out_k = fn(impl, q, k[:, :, kperm], v[:, :, kperm], a, 4, mask[:, kperm])
        torch.testing.assert_close(out_k, out, atol=1e-12, rtol=0)


# -------------------------------------------------------------- gradients


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_with_assignments_held_fixed(impl):
    q, k, v, mask = make_inputs(B=2, H=2, Hk=1, Nq=7, Nk=6, D=3, Dv=2, pad=True)
    a = random_assignments(q, 3)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *x: clustered(impl, *x, a, 3, mask), args)
    assert torch.autograd.gradcheck(lambda *x: improved(impl, *x, a, 3, mask, topk=2), args)


@pytest.mark.parametrize("fn", ["clustered", "improved"])
def test_full_op_backward_uses_its_own_clusters(fn):
    q, k, v, mask = make_inputs(pad=True)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    if fn == "clustered":
        out, a = OPS.clustered_attention(*args, mask, 0.4, 3, 10, 63, 5, "hamming", 0,
                                         "euclidean", "cpu")
        # C = 3 clusters and the spare one (id 3) that holds the padded queries
        again = ca.clustered_attention_from_assignments(*args, a, 4, mask, 0.4, impl="reference")
    else:
        out, a, idx = OPS.improved_clustered_attention(*args, mask, 0.4, 3, 10, 63, 5,
                                                       "hamming", 1, "attention", 2, "cpu")
        again = reference.improved_clustered_attention_from_assignments(
            *args, a, 4, mask, 0.4, topk=2, topk_indices=idx)[0]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, args, g)
    want = torch.autograd.grad(again, args, g)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
    assert got[0].abs().sum() > 0  # q gets a gradient through the centroid means


# -------------------------------------------------------------- CPU path vs float64 oracle


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Rounding of the output to ``dtype`` (2 ulp) plus float32 accumulation over D = 16."""
    return oracle_tolerance(dtype, ref, reduction=16)


@pytest.mark.parametrize("impl", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_path_matches_float64_reference(dtype, impl):
    q, k, v, mask = make_inputs(Nq=40, Nk=33, D=16, Dv=8, dtype=dtype, pad=True)
    up = [t.to(F64) for t in (q, k, v)]
    a = random_assignments(q, 5)
    out = clustered(impl, q, k, v, a, 5, mask)
    ref = reference.clustered_attention_from_assignments(*up, a, 5, mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.to(F64), ref, atol=_tolerance(dtype, ref), rtol=0)
    out, idx = OPS.improved_clustered_attention_from_assignments(q, k, v, a, mask, 5, 4,
                                                                 0.25, impl)
    ref, _ = reference.improved_clustered_attention_from_assignments(*up, a, 5, mask, 0.25, 4,
                                                                     topk_indices=idx)
    assert out.dtype == dtype
    torch.testing.assert_close(out.to(F64), ref, atol=_tolerance(dtype, ref), rtol=0)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.integers(1, 3), Nq=st.integers(1, 14),
       Nk=st.integers(1, 14), D=st.integers(1, 6), Dv=st.integers(1, 5), C=st.integers(1, 18),
       topk=st.integers(1, 16), pad=st.booleans(), clustering=st.sampled_from(["hamming",
                                                                                "kmeans"]))
def test_fuzz_shapes_cpu_against_reference(B, Hk, G, Nq, Nk, D, Dv, C, topk, pad, clustering):
    q, k, v, mask = make_inputs(B, Hk * G, Hk, Nq, Nk, D, Dv, pad=pad, seed=Nq * 31 + Nk)
    kw = {"clusters": C, "key_padding_mask": mask, "seed": 9, "clustering": clustering}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn, extra in ((ca.clustered_attention, {}),
                          (ca.improved_clustered_attention, {"topk": topk})):
            want = fn(q, k, v, impl="reference", **kw, **extra)
            for impl in ("cpu", "torch"):
                got = fn(q, k, v, impl=impl, **kw, **extra)
                assert got.shape == (B, Hk * G, Nq, Dv)
                torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


# -------------------------------------------------------------- seeds, C > N, counters


def test_same_seed_same_result_and_global_rng_seed():
    q, k, v, _ = make_inputs(Nq=30)
    r1 = OPS.improved_clustered_attention(q, k, v, None, 0.3, 4, 10, 63, 7, "hamming", 1,
                                          "attention", 3, "cpu")
    r2 = OPS.improved_clustered_attention(q, k, v, None, 0.3, 4, 10, 63, 7, "hamming", 1,
                                          "attention", 3, "cpu")
    for x, y in zip(r1, r2, strict=True):
        assert torch.equal(x, y)
    torch.manual_seed(1)
    o1 = ca.clustered_attention(q, k, v, clusters=4)
    torch.manual_seed(1)
    assert torch.equal(o1, ca.clustered_attention(q, k, v, clusters=4))


def test_more_clusters_than_queries_warns_and_works():
    q, k, v, _ = make_inputs(Nq=5)
    with pytest.warns(UserWarning, match=r"clusters \(50\) exceeds the number of queries \(5\)"):
        out = ca.improved_clustered_attention(q, k, v, clusters=50, topk=2, seed=0)
    assert out.shape == (2, 4, 5, 5) and torch.isfinite(out).all()


def test_counters_record_the_backend():
    q, k, v, _ = make_inputs()
    before = ca.counters["clustered_attention.cpu"]
    ca.clustered_attention(q, k, v, clusters=2, seed=0)
    assert ca.counters["clustered_attention.cpu"] == before + 1


# -------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    ({"clusters": 0}, r"clusters \(0\)"),
    ({"clusters": -1}, r"clusters \(-1\)"),
    ({"topk": 0}, r"topk \(0\)"),
    ({"bits": 64}, r"bits \(64\)"),
    ({"iterations": 0}, r"iterations \(0\)"),
    ({"clustering": "lsh"}, r"clustering \('lsh'\)"),
    ({"refine": -2}, r"refine \(-2\) must be an int >= 0"),
    ({"metric": "l1"}, r"metric \('l1'\) must be one of \('attention', 'euclidean'\)"),
    ({"impl": "cuda"}, r"impl \('cuda'\)"),
    ({"scale": float("nan")}, r"scale \(nan\)"),
])
def test_bad_parameters_raise_value_error(kwargs, match):
    q, k, v, _ = make_inputs()
    with pytest.raises(ValueError, match=match):
        ca.improved_clustered_attention(q, k, v, **{"clusters": 2, **kwargs})


def test_bad_inputs_raise_value_error():
    q, k, v, mask = make_inputs(pad=True)
    with pytest.raises(ValueError, match=r"q.dtype \(torch.int64\) is not supported"):
        ca.clustered_attention(q.long(), k, v, clusters=2)
    with pytest.raises(ValueError, match=r"heads of q \(3\) must be a multiple .* \(2\)"):
        ca.clustered_attention(q[:, :3], k, v, clusters=2)
    with pytest.raises(ValueError, match=r"dtypes \(torch.float64, torch.float32"):
        ca.clustered_attention(q, k.float(), v, clusters=2)
    with pytest.raises(ValueError, match=r"key_padding_mask \(torch.float32\)"):
        ca.clustered_attention(q, k, v, clusters=2, key_padding_mask=mask.float())
    with pytest.raises(ValueError, match=r"assignments contain 7; expected values in \[0, 3\)"):
        ca.clustered_attention_from_assignments(q, k, v, torch.full(q.shape[:3], 7), 3)
    with pytest.raises(ValueError, match=r"assignments has shape \(2, 4\)"):
        ca.clustered_attention_from_assignments(q, k, v, torch.zeros(2, 4).long(), 3)


def test_explicit_triton_on_cpu_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = make_inputs()
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA tensors"):
        ca.clustered_attention(q, k, v, clusters=2, impl="triton")


# -------------------------------------------------------------- registration


_LIGHT = ("test_schema", "test_faketensor")  # variants of an op already checked in full


def test_opcheck_every_op():
    """Every op in full (schema, autograd registration, fake tensor, AOT dispatch); further
    argument variants of the same op only through the cheap checks (the AOT one compiles)."""
    q, k, v, mask = make_inputs(dtype=torch.float32, pad=True)
    a = random_assignments(q, 3)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    cases = [
        (OPS.clustered_attention_from_assignments.default, (*args, a, mask, 3, 0.4, "cpu"),
         None),
        (OPS.improved_clustered_attention_from_assignments.default,
         (*args, a, mask, 3, 2, 0.4, "cpu"), None),
        (OPS.improved_clustered_attention_from_assignments.default,
         (*args, a, mask, 3, 2, 0.4, "reference"), _LIGHT),
        (OPS.clustered_attention.default,
         (*args, mask, 0.4, 3, 3, 63, 1, "hamming", 1, "attention", "cpu"), None),
        (OPS.clustered_attention.default,
         (*args, mask, 0.4, 3, 3, 63, 1, "hamming", 0, "euclidean", "cpu"), _LIGHT),
        (OPS.improved_clustered_attention.default,
         (*args, None, 0.4, 3, 3, 63, 1, "kmeans", 2, "attention", 2, "cpu"), None),
        (OPS.clustered_attention_backward.default,
         (torch.randn(2, 4, 12, 5), *[t.detach() for t in args], a, mask, 3, 0.4), None),
    ]
    for op, op_args, utils in cases:
        if utils is None:
            torch.library.opcheck(op, op_args)
        else:
            torch.library.opcheck(op, op_args, test_utils=utils)


def test_compiles_as_one_opaque_node():
    q, k, v, mask = make_inputs(dtype=torch.float32, pad=True)
    fn = lambda q, k, v: ca.improved_clustered_attention(q, k, v, clusters=3, topk=4,
                                                         key_padding_mask=mask, seed=2)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), atol=0, rtol=0)


# -------------------------------------------------------------- triton glue (stand-in kernels)


def _stand_in_kernels():
    """Torch versions of the Triton kernel contract, to test the glue around the kernels."""
    clustering_tr = types.ModuleType("clusterfx.ops.clustering.triton")
    clustering_tr.lsh_hash = lambda x, planes: cl.lsh_hash(x, planes, impl="reference")
    clustering_tr.hamming_assign = lambda h, c: cl.popcount(
        h[..., :, None] ^ c[..., None, :], impl="reference").argmin(-1)
    clustered_tr = types.ModuleType("clusterfx.ops.clustered.triton_kernels")

    def centroid_attention(qc, k, v, mask, scale):
        out = dense(qc.double(), k.double(), v.double(), mask, scale)
        return out.nan_to_num(0.0).to(qc.dtype), None

    def topk_gather_attention(q, k, v, idx, scale, mass=None):
        G = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        ks = torch.gather(kk[:, :, None].expand(*idx.shape[:3], *kk.shape[2:]), 3,
                          idx[..., None].expand(*idx.shape, k.shape[-1]))
        vs = torch.gather(vv[:, :, None].expand(*idx.shape[:3], *vv.shape[2:]), 3,
                          idx[..., None].expand(*idx.shape, v.shape[-1]))
        w = torch.softmax((ks @ q[..., None])[..., 0].float() * scale, -1)
        return (mass[..., None, None] * w[..., None, :] @ vs.float())[..., 0, :].to(q.dtype)

    clustered_tr.centroid_attention = centroid_attention
    clustered_tr.topk_gather_attention = topk_gather_attention
    return clustering_tr, clustered_tr


def test_triton_glue_with_stand_in_kernels_matches_reference(monkeypatch):
    import clusterfx.ops.clustered as clustered_pkg
    import clusterfx.ops.clustering as clustering_pkg

    clustering_tr, clustered_tr = _stand_in_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for pkg, mod, attr in ((clustering_pkg, clustering_tr, "triton"),
                           (clustered_pkg, clustered_tr, "triton_kernels")):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setattr(pkg, attr, mod, raising=False)
    q, k, v, mask = make_inputs(Nq=20, Nk=9, dtype=torch.float32, pad=True)
    mask[0, 3:] = False  # batch 0 has 3 valid keys (< topk), batch 1 more
    for m in (None, mask):
        for fn, extra in ((ca.clustered_attention, {}),
                          (ca.improved_clustered_attention, {"topk": 5})):
            got = fn(q, k, v, clusters=4, key_padding_mask=m, seed=3, impl="triton", **extra)
            want = fn(q, k, v, clusters=4, key_padding_mask=m, seed=3, impl="reference", **extra)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.triton
@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get(
    "TRITON_INTERPRET") == "1"), reason="needs CUDA or TRITON_INTERPRET=1 set before start")
def test_triton_kernels_match_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, mask = (None if t is None else t.to(device) for t in
                     make_inputs(Nq=24, Nk=20, D=16, Dv=8, dtype=torch.float32, pad=True))
    mask[0, 4:] = False
    for fn, extra in ((ca.clustered_attention, {}),
                      (ca.clustered_attention, {"metric": "euclidean", "refine": 0}),
                      (ca.improved_clustered_attention, {"topk": 6})):
        got = fn(q, k, v, clusters=4, key_padding_mask=mask, seed=3, impl="triton", **extra)
        want = fn(q.cpu(), k.cpu(), v.cpu(), clusters=4, key_padding_mask=mask.cpu(), seed=3,
                  impl="reference", **extra)
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)


def test_op_defaults_are_the_configs_defaults():
    """`clustered_attention(...)` called directly clusters as `Clustered()` does."""
    import inspect

    import clusterfx as cfx

    for fn, config in ((ca.clustered_attention, cfx.Clustered()),
                       (ca.improved_clustered_attention, cfx.ImprovedClustered())):
        params = inspect.signature(fn).parameters
        for name in ("iterations", "bits", "clustering", "refine", "metric"):
            assert params[name].default == getattr(config, name), (fn.__name__, name)


# -------------------------------------------------------------- fused kernels (impl="cpu")


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("shape", [dict(), dict(Hk=1, Nq=7, Nk=30), dict(Hk=4, Nq=33, Nk=5)])
def test_fused_backward_matches_reference_autograd(pad, shape):
    """The fused clustered backward (GQA, Nq != Nk, padding, empty clusters) against the
    float64 oracle's autograd."""
    q, k, v, mask = make_inputs(pad=pad, **shape)
    a = random_assignments(q, 9, seed=3)  # 9 clusters: some stay empty
    args = [t.requires_grad_(True) for t in (q, k, v)]
    g = torch.randn(*q.shape[:3], v.shape[-1], dtype=F64)
    got = torch.autograd.grad(clustered("cpu", *args, a, 9, mask), args, g)
    want = torch.autograd.grad(clustered("reference", *args, a, 9, mask), args, g)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_gradients_in_low_precision_match_float64_reference(dtype):
    q, k, v, mask = make_inputs(Nq=40, Nk=33, D=16, Dv=8, dtype=dtype, pad=True)
    a = random_assignments(q, 5)
    g = torch.randn(*q.shape[:3], v.shape[-1], dtype=F64)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    got = torch.autograd.grad(clustered("cpu", *args, a, 5, mask), args, g.to(dtype))
    up = [t.detach().to(F64).requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(clustered("reference", *up, a, 5, mask), up, g)
    for x, y in zip(got, want, strict=True):
        assert x.dtype == dtype
        torch.testing.assert_close(x.to(F64), y, atol=_tolerance(dtype, y), rtol=0)


def test_fused_improved_selects_the_oracles_top_k_keys():
    """Without near-ties the streamed top-k equals torch.topk of the centroid scores (as sets),
    also when k exceeds the valid keys (masked keys fill the rest)."""
    q, k, v, mask = make_inputs(Nq=30, Nk=40, D=8, pad=True)
    mask[0, 5:] = False  # batch 0: 5 valid keys
    a = random_assignments(q, 4)
    for topk in (3, 8, 40):
        _, idx = OPS.improved_clustered_attention_from_assignments(q, k, v, a, mask, 4, topk,
                                                                   0.3, "cpu")
        _, want = reference.improved_clustered_attention_from_assignments(q, k, v, a, 4, mask,
                                                                          0.3, topk)
        valid = mask[:, None, None, :].expand(-1, 4, 4, -1)
        got_valid = torch.gather(valid, -1, idx)
        want_valid = torch.gather(valid, -1, want)
        slots = a + torch.arange(8).view(2, 4, 1) * 4  # (b, h, cluster) slots
        counts = torch.bincount(slots.flatten(), minlength=32).view(2, 4, 4)
        for b, h, c in (counts > 0).nonzero().tolist():
            chosen = set(idx[b, h, c][got_valid[b, h, c]].tolist())
            assert chosen == set(want[b, h, c][want_valid[b, h, c]].tolist()), (b, h, c)
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct keys per cluster
