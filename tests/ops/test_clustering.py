"""Query clustering: popcount, LSH hashing, Hamming and Euclidean k-means.

The oracle is ``clusterfx.ops.clustering.reference``; the fused C++ kernels (impl="cpu",
``fused.py``) and the vectorised torch path (impl="torch", ``cpu.py``, on both of its GEMM forms:
int8 per row and batched fp32) must agree with it bit for bit given the same seed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfx.ops import clustering as cl
from clusterfx.ops.clustering import cpu, fused, reference

BACKENDS = (reference, cpu, fused)
BACKEND_IDS = ["reference", "torch", "fused"]
FAST = ("cpu", "torch")  # impl names of the fused kernels and the vectorised torch path


@pytest.fixture(params=["int8", "fp32"])
def gemm_form(request, monkeypatch):
    """Run a test once with the int8-per-row GEMM forced on and once with it off."""
    monkeypatch.setattr(cpu, "_INT8_MIN_WORK", 0 if request.param == "int8" else 2**62)
    return request.param


def _plan(R: int, C: int, init: list[int], reseed: list[list[int]] | None = None):
    """An explicit k-means plan: the same init positions in every row."""
    init_idx = torch.tensor(init).expand(R, C).contiguous()
    reseed_idx = torch.tensor(reseed or [], dtype=torch.int64).view(-1, 1, C).expand(-1, R, C)
    return init_idx, reseed_idx, torch.ones(R, C, dtype=torch.bool)


# ----------------------------------------------------------------------------------- popcount


def test_popcount_matches_python_bin_count():
    torch.manual_seed(0)
    x = torch.cat([torch.randint(-2**63, 2**63 - 1, (2000,), dtype=torch.int64),
                   torch.tensor([0, 1, -1, 2**63 - 1, -2**63, 0x5555555555555555])])
    expected = torch.tensor([bin(int(v) & (2**64 - 1)).count("1") for v in x])
    for impl in ("reference", *FAST):
        assert torch.equal(cl.popcount(x, impl=impl), expected), impl


# ----------------------------------------------------------------------------------- hashing


def test_lsh_hash_bits_follow_the_hyperplane_rule():
    torch.manual_seed(1)
    x = torch.randn(3, 20, 5, dtype=torch.float64)
    planes = cl.make_planes(11, 5, seed=4, dtype=torch.float64)
    expected = torch.zeros(3, 20, dtype=torch.int64)
    for b in range(11):
        bit = (x @ planes[b, :5]) > planes[b, 5]
        expected |= bit.long() << b
    for impl in ("reference", *FAST):
        assert torch.equal(cl.lsh_hash(x, planes, impl=impl), expected), impl
    assert int(expected.max()) < 2**11


def test_make_planes_is_seeded_and_device_dtype_independent():
    a = cl.make_planes(63, 8, seed=7)
    assert a.shape == (63, 9) and a.dtype == torch.float32
    assert torch.equal(a, cl.make_planes(63, 8, seed=7))
    assert not torch.equal(a, cl.make_planes(63, 8, seed=8))
    assert torch.equal(a, cl.make_planes(63, 8, seed=7, dtype=torch.float64).float())
    torch.manual_seed(3)
    g1 = cl.make_planes(5, 4, seed=-1)
    torch.manual_seed(3)
    assert torch.equal(g1, cl.make_planes(5, 4, seed=-1))


# ----------------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("mod", BACKENDS, ids=BACKEND_IDS)
def test_hamming_ties_go_to_the_lowest_cluster(mod, gemm_form):
    # query 2 (0b01) is at distance 1 from both 0b00 and 0b11; query 3 equals nobody
    hashes = torch.tensor([[0b00, 0b11, 0b01, 0b10]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    for init in ([0, 1], [1, 0]):
        a, counts = mod.hamming_kmeans(hashes, *_plan(1, 2, init), valid, bits=2)
        assert a[0, 2] == 0 and a[0, 3] == 0, (init, a)
    # duplicated centroids: every query ties, so everything lands in cluster 0
    a, counts = mod.hamming_kmeans(torch.tensor([[5, 5, 9]]), *_plan(1, 2, [0, 1]),
                                   torch.ones(1, 3, dtype=torch.bool), bits=4)
    assert a.tolist() == [[0, 0, 0]] and counts.tolist() == [[3, 0]]


def test_majority_vote_and_tie_to_zero(gemm_form):
    members = torch.tensor([0b0111, 0b0011, 0b1001, 0b1000])
    # bit 0: 3 of 4 -> 1; bit 1: 2 of 4, a tie -> 0; bit 2: 1 of 4 -> 0; bit 3: a tie -> 0
    assert int(reference._majority_code(members, 4)) == 0b0001
    signs = cpu.unpack_signs(members[None], 4)
    gemm = cpu._HammingGemm(signs, torch.ones(1, 4, dtype=torch.bool), 2)
    sums, counts = gemm.votes(torch.tensor([[0, 0, 0, 0]]))
    voted = cpu.pack_signs((sums[0, 0] > 0).to(torch.int8) * 2 - 1)
    assert int(voted) == 0b0001 and counts.tolist() == [[4, 0]]


@pytest.mark.parametrize("mod", BACKENDS, ids=BACKEND_IDS)
def test_empty_cluster_is_reseeded_from_the_drawn_query(mod, gemm_form):
    # both centroids start on code 0, so cluster 1 wins no query and is empty after round 1;
    # it is re-seeded with query 4's code (0xFF), which then captures the two 0xFF queries.
    hashes = torch.tensor([[0, 0, 1, 0xFF, 0xFF]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    a, counts = mod.hamming_kmeans(hashes, *_plan(1, 2, [0, 1], reseed=[[0, 4]]), valid, bits=8)
    assert a.tolist() == [[0, 0, 0, 1, 1]] and counts.tolist() == [[3, 2]]
    # without the reseed round (iterations = 1) cluster 1 stays empty
    a, counts = mod.hamming_kmeans(hashes, *_plan(1, 2, [0, 1]), valid, bits=8)
    assert counts.tolist() == [[5, 0]]


def test_padded_queries_get_cluster_zero_and_no_count():
    torch.manual_seed(0)
    hashes = torch.randint(0, 2**20, (2, 3, 40))
    valid = torch.rand(2, 3, 40) > 0.4
    for impl in ("reference", *FAST):
        a, counts = cl.hamming_kmeans(hashes, 4, bits=20, seed=1, valid=valid, impl=impl)
        assert (a[~valid] == 0).all()
        assert torch.equal(counts.sum(-1), valid.sum(-1))
        for c in range(4):
            assert torch.equal(counts[..., c], ((a == c) & valid).sum(-1))


@settings(max_examples=25, deadline=None)
@given(R=st.integers(1, 3), N=st.integers(1, 40), C=st.integers(1, 12), bits=st.integers(1, 63),
       iterations=st.integers(1, 4), pad=st.booleans(), seed=st.integers(0, 2**31))
def test_cpu_hamming_kmeans_equals_reference(R, N, C, bits, iterations, pad, seed):
    g = torch.Generator().manual_seed(seed)
    hashes = torch.randint(0, 2**min(bits, 62), (R, N), generator=g)
    hashes[:, N // 2:] = hashes[:, :1]  # duplicates make ties
    valid = (torch.rand(R, N, generator=g) > 0.3) if pad else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cl.hamming_kmeans(hashes, C, iterations, bits, seed, valid, impl="reference")
        for int8_work in (0, 2**62):
            cpu._INT8_MIN_WORK, saved = int8_work, cpu._INT8_MIN_WORK
            try:
                got = cl.hamming_kmeans(hashes, C, iterations, bits, seed, valid, impl="torch")
            finally:
                cpu._INT8_MIN_WORK = saved
            assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        got = cl.hamming_kmeans(hashes, C, iterations, bits, seed, valid, impl="cpu")
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.parametrize("clustering", ["hamming", "kmeans"])
def test_cluster_queries_cpu_equals_reference_and_is_deterministic(clustering, gemm_form):
    torch.manual_seed(0)
    centres = torch.randn(5, 8, dtype=torch.float64) * 10
    q = (centres[torch.randint(0, 5, (2, 3, 60))] + 0.1 * torch.randn(2, 3, 60, 8,
                                                                      dtype=torch.float64))
    ref = cl.cluster_queries(q, 5, seed=11, clustering=clustering, impl="reference")
    for impl in FAST:
        got = cl.cluster_queries(q, 5, seed=11, clustering=clustering, impl=impl)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]), impl
    assert torch.equal(got[0], cl.cluster_queries(q, 5, seed=11, clustering=clustering)[0])
    assert got[1].shape == (2, 3, 5) and (got[1].sum(-1) == 60).all()
    torch.manual_seed(5)
    a1 = cl.cluster_queries(q, 5, seed=-1, clustering=clustering)[0]
    torch.manual_seed(5)
    assert torch.equal(a1, cl.cluster_queries(q, 5, seed=-1, clustering=clustering)[0])


def test_seeds_change_the_clustering():
    q = torch.randn(1, 1, 200, 16)
    outs = {tuple(cl.cluster_queries(q, 10, seed=s)[0].flatten().tolist()) for s in range(4)}
    assert len(outs) > 1


def test_more_clusters_than_queries_warns_and_keeps_static_shape():
    q = torch.randn(2, 10, 4)
    with pytest.warns(UserWarning, match=r"clusters \(16\) exceeds the number of queries \(10\)"):
        a, counts = cl.cluster_queries(q, 16, seed=0)
    assert counts.shape == (2, 16) and (counts[:, 10:] == 0).all()
    assert (a < 10).all() and (counts.sum(-1) == 10).all()
    valid = torch.zeros(2, 10, dtype=torch.bool)
    valid[0, :3] = True
    with pytest.warns(UserWarning, match=r"clusters \(5\) exceeds .* valid queries .* \(0\)"):
        a, counts = cl.euclidean_kmeans(q, 5, seed=0, valid=valid)
    assert counts[0].sum() == 3 and counts[1].sum() == 0 and (a[1] == 0).all()


def test_euclidean_kmeans_finds_separated_blobs():
    torch.manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    labels = torch.arange(3).repeat_interleave(20)
    x = centres[labels] + torch.randn(60, 2)
    for impl in ("reference", *FAST):
        a, counts = cl.euclidean_kmeans(x[None], 3, iterations=10, seed=0, impl=impl)
        # same partition as the blobs (up to renaming): each blob maps to one cluster
        pairs = {(int(lab), int(c)) for lab, c in zip(labels, a[0], strict=True)}
        assert len(pairs) == 3 and sorted(counts[0].tolist()) == [20, 20, 20], impl


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    ({"clusters": 0}, r"clusters \(0\)"),
    ({"clusters": -3}, r"clusters \(-3\)"),
    ({"clusters": True}, r"clusters \(True\)"),
    ({"iterations": 0}, r"iterations \(0\)"),
    ({"bits": 64}, r"bits \(64\)"),
    ({"bits": 0}, r"bits \(0\)"),
    ({"seed": -2}, r"seed \(-2\)"),
    ({"impl": "gpu"}, r"impl \('gpu'\)"),
])
def test_bad_parameters_raise_value_error_naming_the_value(kwargs, match):
    args = {"clusters": 2, "iterations": 3, "bits": 8, "seed": 0, "impl": "cpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        cl.hamming_kmeans(torch.zeros(4, dtype=torch.int64), **args)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match=r"hashes \(torch.int32"):
        cl.hamming_kmeans(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"x.dtype \(torch.int64\) is not supported"):
        cl.euclidean_kmeans(torch.zeros(4, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"valid has shape \(3,\); expected \(4,\)"):
        cl.hamming_kmeans(torch.zeros(4, dtype=torch.int64), 2, valid=torch.ones(3).bool())
    with pytest.raises(ValueError, match=r"planes \(\(3, 5\)\) must have shape \(bits, 3\)"):
        cl.lsh_hash(torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"clustering \('lsh'\)"):
        cl.cluster_queries(torch.zeros(4, 2), 2, clustering="lsh")


def test_explicit_triton_on_cpu_refuses_instead_of_falling_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA tensors or TRITON_INTERPRET"):
        cl.cluster_queries(torch.randn(8, 4), 2, impl="triton")


def _inertia(x, a, clusters):
    means = torch.stack([x[a == c].mean(0) if (a == c).any() else torch.zeros(x.shape[-1],
                         dtype=x.dtype) for c in range(clusters)])
    return float(((x - means[a]) ** 2).sum())


def test_lloyd_refine_never_increases_inertia_and_keeps_range():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 60, 8, generator=g)
    start = torch.randint(0, 7, (2, 3, 60), generator=g)
    refined, counts = cl.lloyd_refine(x, start, 7, 3)
    assert refined.shape == start.shape and counts.shape == (2, 3, 7)
    assert int(refined.min()) >= 0 and int(refined.max()) < 7
    assert torch.equal(counts.sum(-1), torch.full((2, 3), 60))
    for b in range(2):
        for h in range(3):
            before = _inertia(x[b, h], start[b, h], 7)
            after = _inertia(x[b, h], refined[b, h], 7)
            assert after <= before + 1e-4, (b, h, before, after)
    same, _ = cl.lloyd_refine(x, start, 7, 0)
    assert torch.equal(same, start)


def test_lloyd_refine_recovers_separated_blobs_from_a_bad_start():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.1 * torch.randn(60, 2, generator=g)
    start = (truth + 1) % 3  # every point starts in a wrong cluster, clusters still distinct
    start[::7] = truth[::7]  # a few right ones so that the means differ
    refined, _ = cl.lloyd_refine(x[None], start[None], 3, 5)
    # the same partition up to relabelling
    labels = refined[0]
    for c in range(3):
        assert labels[truth == c].unique().numel() == 1
    assert labels.unique().numel() == 3


# ------------------------------------------------------------------------ the attention metric


def test_attention_metric_is_the_covariance_of_the_valid_keys():
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 30, 5, generator=g, dtype=torch.float64) * 3 + 1
    keep = torch.rand(2, 30, generator=g) > 0.3
    m = cl.attention_metric(k, heads=4, key_padding_mask=keep)
    assert m.shape == (2, 4, 5, 5) and m.dtype == torch.float64
    for b in range(2):
        for h in range(4):
            valid = k[b, h // 2][keep[b]]  # GQA: query head h reads key head h // 2
            want = torch.cov(valid.T, correction=0)
            torch.testing.assert_close(m[b, h], want, atol=1e-12, rtol=1e-12)
    # more keys than max_keys: every ceil(Nk / max_keys)-th key, deterministically
    torch.testing.assert_close(cl.attention_metric(k, max_keys=10),
                               cl.attention_metric(k[:, :, ::3]), atol=0, rtol=0)
    none = cl.attention_metric(k, key_padding_mask=torch.zeros(2, 30, dtype=torch.bool))
    assert torch.equal(none, torch.zeros_like(none))
    assert cl.attention_metric(k.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"heads \(3\) must be a multiple of the key heads \(2\)"):
        cl.attention_metric(k, heads=3)


def test_metric_root_is_the_symmetric_square_root():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    m = a @ a.transpose(-1, -2)  # rank 4 of 6: PSD with zero eigenvalues
    root = cl.metric_root(m)
    torch.testing.assert_close(root, root.transpose(-1, -2), atol=1e-12, rtol=0)
    torch.testing.assert_close(root @ root, m, atol=1e-10, rtol=1e-10)
    assert torch.linalg.eigvalsh(root).min() > -1e-7


def _metric_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 40, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 50, 6, generator=g, dtype=torch.float64) * torch.arange(1.0, 7.0)
    return q, cl.attention_metric(k)


def test_metric_hash_cpu_equals_reference_and_is_shift_and_scale_invariant():
    q, m = _metric_inputs()
    planes = cl.make_planes(63, 6, seed=2, dtype=torch.float64)
    ref = cl.lsh_hash(q, planes, impl="reference", metric=m)
    assert torch.equal(ref, cl.lsh_hash(q, planes, impl="cpu", metric=m))
    assert torch.equal(ref, cl.lsh_hash(q, planes, impl="torch", metric=m))
    # centred SimHash: a common shift of the queries and a positive scale change nothing
    shifted = q * 3.5 + torch.randn(1, 1, 1, 6, dtype=torch.float64) * 10
    assert torch.equal(ref, cl.lsh_hash(shifted, planes, impl="cpu", metric=m))
    assert torch.equal(ref, cl.lsh_hash(q, planes, impl="cpu", metric=m * 7.0))
    # the identity metric is the centred SimHash of the raw queries
    eye = torch.eye(6, dtype=torch.float64)
    want = (q - q.mean(-2, keepdim=True)) @ planes[:, :-1].T > 0
    packed = (want.long() << torch.arange(63)).sum(-1)
    assert torch.equal(cl.lsh_hash(q, planes, impl="cpu", metric=eye), packed)


def test_metric_hash_ignores_what_the_keys_cannot_see_and_the_masked_queries():
    """Keys in a 2-D subspace: query components outside it change no logit (up to a shift),
    so they must not change the hash; queries outside centre_mask do not move the centre."""
    g = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    seen, unseen = basis[:, :2], basis[:, 2:]
    k = (torch.randn(1, 1, 64, 2, generator=g, dtype=torch.float64) @ seen.T)
    q = torch.randn(1, 1, 30, 8, generator=g, dtype=torch.float64)
    m = cl.attention_metric(k)
    planes = cl.make_planes(40, 8, seed=0, dtype=torch.float64)
    noise = torch.randn(1, 1, 30, 6, generator=g, dtype=torch.float64) @ unseen.T * 100
    for impl in ("reference", *FAST):
        base = cl.lsh_hash(q, planes, impl=impl, metric=m)
        assert torch.equal(base, cl.lsh_hash(q + noise, planes, impl=impl, metric=m))
        keep = torch.ones(1, 1, 30, dtype=torch.bool)
        keep[..., 25:] = False
        moved = q.clone()
        moved[..., 25:, :] += 50.0
        a = cl.lsh_hash(q, planes, impl=impl, metric=m, centre_mask=keep)
        b = cl.lsh_hash(moved, planes, impl=impl, metric=m, centre_mask=keep)
        assert torch.equal(a[..., :25], b[..., :25])
        assert not torch.equal(a, cl.lsh_hash(moved, planes, impl=impl, metric=m))


def test_lloyd_refine_in_a_metric_is_euclidean_refinement_of_the_mapped_queries():
    q, m = _metric_inputs(3)
    start = torch.randint(0, 5, q.shape[:-1], generator=torch.Generator().manual_seed(0))
    got = cl.lloyd_refine(q, start, 5, 3, m)
    want = cl.lloyd_refine(q @ cl.metric_root(m), start, 5, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("clustering", ["hamming", "kmeans"])
def test_cluster_queries_with_a_metric_cpu_equals_reference(clustering, gemm_form):
    q, m = _metric_inputs(5)
    kw = dict(seed=9, clustering=clustering, metric=m, refine=2)
    ref = cl.cluster_queries(q, 6, impl="reference", **kw)
    for impl in FAST:
        got = cl.cluster_queries(q, 6, impl=impl, **kw)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]), impl
    assert torch.equal(got[1].sum(-1), torch.full((2, 3), 40))
    if clustering == "kmeans":  # Euclidean k-means on q M^½, then Lloyd in M
        mapped = cl.cluster_queries(q @ cl.metric_root(m), 6, seed=9, clustering="kmeans",
                                    refine=2)
        assert torch.equal(got[0], mapped[0])


def test_attention_metric_clusters_queries_that_attend_alike():
    """Queries = a few attention patterns + large noise the keys cannot see. The attention
    metric clusters by pattern; the Euclidean one by noise, so its attention is far worse."""
    from clusterfx.ops.clustered import improved_clustered_attention

    g = torch.Generator().manual_seed(0)
    D, N = 16, 256
    basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    k = torch.randn(1, 1, N, 4, generator=g, dtype=torch.float64) @ basis[:, :4].T * 2
    v = torch.randn(1, 1, N, D, generator=g, dtype=torch.float64)
    patterns = torch.randn(4, 4, generator=g, dtype=torch.float64) @ basis[:, :4].T
    q = patterns[torch.randint(0, 4, (N,), generator=g)][None, None]
    q = q + torch.randn(1, 1, N, D - 4, generator=g, dtype=torch.float64) @ basis[:, 4:].T * 5
    dense = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, -1) @ v
    err = {}
    for metric in ("attention", "euclidean"):
        out = improved_clustered_attention(q, k, v, clusters=16, topk=4, seed=0,
                                           metric=metric, impl="reference")
        err[metric] = float((out - dense).norm() / dense.norm())
    assert err["attention"] < 1e-10  # every cluster holds one pattern: exact
    assert err["euclidean"] > 100 * max(err["attention"], 1e-6)


def test_bad_metric_inputs_raise_value_error():
    q = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"metric has shape \(4, 3\); expected \(\.\.\., 4, 4\)"):
        cl.cluster_queries(q, 2, metric=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"metric's batch shape \(3,\) does not broadcast"):
        cl.cluster_queries(q, 2, metric=torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"refine \(-1\) must be an int >= 0"):
        cl.cluster_queries(q, 2, refine=-1)
    with pytest.raises(ValueError, match=r"centre_mask has shape \(2, 9\); expected \(2, 10\)"):
        cl.cluster_queries(q, 2, metric=torch.eye(4), centre_mask=torch.ones(2, 9).bool())


def test_non_finite_keys_fall_back_to_the_euclidean_geometry_instead_of_failing():
    from clusterfx.ops.clustered import clustered_attention

    g = torch.Generator().manual_seed(0)
    m = torch.eye(4).expand(3, 4, 4).clone()
    m[1, 2, 2] = float("nan")
    m[2, 0, 1] = float("inf")
    root = cl.metric_root(m)
    assert torch.equal(root, torch.eye(4).expand(3, 4, 4))
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(3))
    k[0, 0, 3, 2] = float("nan")
    out = clustered_attention(q, k, v, clusters=4, seed=0)  # no linalg error
    assert out[0, 0].isnan().all()  # as dense attention: every row reads the NaN key
    assert out[0, 1].isfinite().all()  # the other head's keys are finite: untouched


@settings(max_examples=25, deadline=None)
@given(R=st.integers(1, 3), N=st.integers(1, 50), D=st.integers(1, 9), C=st.integers(1, 12),
       bits=st.integers(1, 63), iterations=st.integers(1, 4), refine=st.integers(0, 2),
       clustering=st.sampled_from(["hamming", "kmeans"]), with_metric=st.booleans(),
       seed=st.integers(0, 2**31))
def test_fused_cluster_queries_equals_reference(R, N, D, C, bits, iterations, refine, clustering,
                                                with_metric, seed):
    """The fused kernel (hash or metric map, k-means, Lloyd steps in one call) gives the
    oracle's clusters bit for bit in float64, with duplicated queries (Hamming ties), C > N."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, N, D, generator=g, dtype=torch.float64)
    if clustering == "hamming":  # duplicates make ties (Euclidean distances of duplicates
        q[:, N // 2:] = q[:, :1]  # differ by rounding between the oracle's and the GEMM form)
    metric = centre = None
    if with_metric:
        k = torch.randn(1, R, 2 * D + 3, D, generator=g, dtype=torch.float64)
        metric = cl.attention_metric(k)[0]
        centre = torch.rand(R, N, generator=g) > 0.3
    kw = dict(iterations=iterations, bits=bits, seed=seed % 1000, clustering=clustering,
              refine=refine, metric=metric, centre_mask=centre)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cl.cluster_queries(q, C, impl="reference", **kw)
        got = cl.cluster_queries(q, C, impl="cpu", **kw)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_fused_euclidean_kmeans_with_padding_equals_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    valid = torch.rand(3, 40, generator=g) > 0.4
    ref = cl.euclidean_kmeans(x, 6, iterations=4, seed=2, valid=valid, impl="reference")
    got = cl.euclidean_kmeans(x, 6, iterations=4, seed=2, valid=valid, impl="cpu")
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert (got[0][~valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_low_precision_clusters_like_the_torch_path(dtype):
    """fp32/fp16/bf16 queries are clustered in float32 by both fast paths; well-separated
    clusters leave no near-ties, so the two agree exactly."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 10
    q = (centres[torch.randint(0, 6, (2, 4, 80), generator=g)]
         + 0.05 * torch.randn(2, 4, 80, 16, generator=g)).to(dtype)
    k = torch.randn(2, 4, 50, 16, generator=g).to(dtype)
    m = cl.attention_metric(k)
    for metric in (None, m):
        kw = dict(seed=3, refine=1, metric=metric)
        got = cl.cluster_queries(q, 6, impl="cpu", **kw)
        want = cl.cluster_queries(q, 6, impl="torch", **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("impl", ["reference", "cpu", "torch"])
@pytest.mark.parametrize("clustering", ["hamming", "kmeans"])
def test_draw_rows_cluster_some_heads_as_among_all(impl, clustering):
    """``draw_rows``: heads 2..3 of 4 clustered alone get the assignments they get among all
    heads (what a Ulysses rank needs to equal one process)."""
    from clusterfx.ops.clustering import ClusteringSpec, attention_metric, cluster_with

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 24, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    spec = ClusteringSpec(3, seed=4, clustering=clustering, refine=1)
    metric = attention_metric(k)
    whole, _ = cluster_with(q, spec, metric=metric, impl=impl)
    rows = (torch.arange(2)[:, None] * 4 + torch.arange(2, 4)).reshape(-1)
    part, _ = cluster_with(q[:, 2:4], spec, metric=metric[:, 2:4], impl=impl,
                           draw_rows=(8, rows))
    assert torch.equal(part, whole[:, 2:4])
    alone, _ = cluster_with(q[:, 2:4], spec, metric=metric[:, 2:4], impl=impl)
    assert not torch.equal(alone, whole[:, 2:4])  # without it: other random choices
    with pytest.raises(ValueError, match=r"draw_rows names \(3,\) rows; the queries have 4"):
        cluster_with(q[:, 2:4], spec, impl=impl, draw_rows=(8, rows[:3]))
