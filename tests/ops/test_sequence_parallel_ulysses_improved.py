"""i-clustered attention under Ulysses alone (`sp_ulysses_conditional_attention`, issue 10)
equals one process's `conditional_attention(..., "improved_clustered", ...)` with the same seed.

On 2 (and, slow, 4) gloo processes, u = world, r = 1: every rank draws the same full q, k, v,
runs the single-process op on all H heads itself (the oracle, impl "auto": the fused kernels),
then the mesh op on its H/u heads (GQA: K/V heads replicated to u first when Hk < u, as the
pass does) with the full q, k, v as leaves, so that the gradients summed over the ranks are the
gradients of the whole computation:

* assignments and top-k indices equal the oracle's rows of this rank's heads, exactly;
* outputs and q/k/v gradients: float64 <= 1e-10, float32 <= 1e-5 (relative to the largest);
* key padding, Hamming and Euclidean k-means, refine, clusters > S (clamped), a non-finite query
  (its row NaN, the others equal), the exact paths (S < min_length, a mask that is not key
  padding) with the same path as one process;
* the plain op on a rank's heads (what ran before, and still runs with ring_clustering="local")
  draws other random numbers: its assignments differ from one process's on some rank.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed_helpers import launch

pytestmark = pytest.mark.distributed

B, D, TOPK, SCALE = 2, 8, 5, 0.3


def _case(*, heads=4, kv_heads=4, pad=True, dtype="float64", clustering="hamming",
          metric="attention", refine=1, clusters=3, seq_len=32, min_length=0, mask="padding",
          nan_query=False):
    return dict(heads=heads, kv_heads=kv_heads, pad=pad, dtype=dtype, clustering=clustering,
                metric=metric, refine=refine, clusters=clusters, seq_len=seq_len,
                min_length=min_length, mask=mask, nan_query=nan_query)


def _inputs(c, n):
    dtype = getattr(torch, c["dtype"])
    S, H, Hk = c["seq_len"], c["heads"], c["kv_heads"]
    gen = torch.Generator().manual_seed(2000 + n)
    q, g = (torch.randn(B, H, S, D, generator=gen, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, Hk, S, D, generator=gen, dtype=dtype) for _ in range(2))
    if c["nan_query"]:
        q[0, H - 1, 5, 2] = float("nan")
    mask = None
    if c["mask"] == "padding":
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[1, S // 3:] = False
        mask = keep[:, None, None, :]
    elif c["mask"] == "causal":  # varies over queries: not key padding (exact path 2)
        mask = torch.ones(S, S, dtype=torch.bool).tril()
    return q, k, v, g, mask


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def ulysses_cases(rank, world, cases):
    import torch.distributed as dist

    from clusterfx.ops import sequence_parallel as sp
    from clusterfx.ops.clustering import ClusteringSpec

    u = world
    groups = sp.Groups(u, 1, dist.group.WORLD.group_name, "", 60.0)
    j = groups.ulysses_rank()
    results = []
    for n, c in enumerate(cases):
        S, H, Hk = c["seq_len"], c["heads"], c["kv_heads"]
        q, k, v, g, mask = _inputs(c, n)
        spec = ClusteringSpec(clusters=c["clusters"], iterations=5, seed=7,
                              clustering=c["clustering"], refine=c["refine"],
                              metric=c["metric"])
        args = (SCALE, "improved_clustered", *spec.to_args(), TOPK, c["min_length"], "auto")
        want_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        want, want_assign, want_path, want_idx = torch.ops.clusterfx.conditional_attention(
            *want_leaves, mask, *args, f"one{n}")
        # the mesh: this rank's heads after the all-to-all (K/V replicated when Hk < u)
        h, rep = H // u, sp.kv_replication(Hk, u)
        hk = Hk * rep // u
        heads, kv_heads = slice(j * h, (j + 1) * h), slice(j * hk, (j + 1) * hk)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ql = leaves[0][:, heads]
        kl, vl = (x.repeat_interleave(rep, 1)[:, kv_heads] for x in leaves[1:])
        out, assign, path, idx = torch.ops.clusterfx.sp_ulysses_conditional_attention(
            ql, kl, vl, mask, *args[:-1], S, False, u, 1, groups.ulysses_group, "", 60.0,
            "auto", f"mesh{n}")
        plain = torch.ops.clusterfx.conditional_attention(
            ql.detach(), kl.detach(), vl.detach(), mask, *args, f"plain{n}")[1]
        res = {"path": int(path), "want_path": int(want_path),
               "same_assignments": bool(torch.equal(assign, want_assign[:, heads])),
               "same_idx": bool(torch.equal(idx, want_idx[:, heads])),
               "plain_same": bool(torch.equal(plain, want_assign[:, heads])),
               "nan_rows_match": bool(torch.equal(out.isnan(), want[:, heads].isnan()))}
        finite = ~want[:, heads].isnan()
        res["errors"] = [_rel(out[finite], want[:, heads][finite].detach())]
        if not c["nan_query"]:  # a NaN query makes NaN gradients (as one process)
            want.backward(g)
            out.backward(g[:, heads])
            for leaf, ref in zip(leaves, want_leaves):
                grad = leaf.grad.clone()
                dist.all_reduce(grad)  # every rank's part of d(Σ ranks' outputs)/d(leaf)
                res["errors"].append(_rel(grad, ref.grad))
        results.append(res)
    return results


def _causal(*, method="improved_clustered", heads=4, kv_heads=2, dtype="float64",
            metric="attention", clustering="hamming", is_causal=True, causal_queries=False,
            pad=True):
    return dict(method=method, heads=heads, kv_heads=kv_heads, dtype=dtype, metric=metric,
                clustering=clustering, is_causal=is_causal, causal_queries=causal_queries,
                pad=pad, seq_len=32, nan_query=False, mask="padding" if pad else "none")


def _causal_mesh(q, k, v, heads, kv_heads, rep, mask, args, kv_count, groups, tag):
    """The mesh op on this rank's heads (K/V replicated, then this rank's, as the pass)."""
    kl, vl = (x.repeat_interleave(rep, 1)[:, kv_heads] for x in (k, v))
    return torch.ops.clusterfx.sp_ulysses_causal_conditional_attention(
        q[:, heads], kl, vl, mask, *args, kv_count, q.shape[2], False, groups.ulysses, 1,
        groups.ulysses_group, "", 60.0, "auto", tag)


def causal_cases(rank, world, cases):
    """`sp_ulysses_causal_conditional_attention` against one process's
    `causal_conditional_attention`, and a causality perturbation on the mesh op."""
    import torch.distributed as dist

    from clusterfx.ops import sequence_parallel as sp
    from clusterfx.ops.clustering import ClusteringSpec

    u = world
    groups = sp.Groups(u, 1, dist.group.WORLD.group_name, "", 60.0)
    j = groups.ulysses_rank()
    results = []
    for n, c in enumerate(cases):
        H, Hk = c["heads"], c["kv_heads"]
        q, k, v, g, mask = _inputs(c, 100 + n)
        spec = ClusteringSpec(clusters=3, iterations=2, seed=9, clustering=c["clustering"],
                              refine=1, metric=c["metric"])
        args = (SCALE, c["method"], *spec.to_args(), TOPK, 8, c["is_causal"],
                c["causal_queries"], 0)
        want_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        want = torch.ops.clusterfx.causal_conditional_attention(*want_leaves, mask, *args,
                                                                "auto", f"cone{n}")
        h, rep = H // u, sp.kv_replication(Hk, u)
        hk = Hk * rep // u
        heads, kv_heads = slice(j * h, (j + 1) * h), slice(j * hk, (j + 1) * hk)
        original = (j * hk + torch.arange(hk)) // rep

        where = (heads, kv_heads, rep, mask, args, Hk, groups)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        got = _causal_mesh(*leaves, *where, f"cmesh{n}")
        plain = torch.ops.clusterfx.causal_conditional_attention(
            q[:, heads], *(x.repeat_interleave(rep, 1)[:, kv_heads] for x in (k, v)), mask,
            *args, "auto", f"cplain{n}")
        res = {"path": int(got[5]), "want_path": int(want[5]),
               "same_choices": [bool(torch.equal(got[1], want[1][:, original])),
                                bool(torch.equal(got[2], want[2][:, heads])),
                                bool(torch.equal(got[3], want[3][:, heads])),
                                bool(torch.equal(got[4], want[4][:, heads]))],
               "plain_same": all(torch.equal(a, b) for a, b in zip(plain[1:5], got[1:5]))}
        want[0].backward(g)
        got[0].backward(g[:, heads])
        res["errors"] = [_rel(got[0], want[0][:, heads].detach())]
        for leaf, ref in zip(leaves, want_leaves):
            grad = leaf.grad.clone()
            dist.all_reduce(grad)
            res["errors"].append(_rel(grad, ref.grad))
        if c["is_causal"]:  # change position t: no earlier output may move
            t = 20
            moved = [x.detach().clone() for x in (q, k, v)]
            for x in moved:
                x[:, :, t:] += 3.0
            again = _causal_mesh(*moved, *where, f"cperturbed{n}")[0]
            res["earlier_moved"] = float((again[:, :, :t] - got[0][:, :, :t]).abs().max())
            res["later_moved"] = float((again[:, :, t:] - got[0][:, :, t:]).abs().max())
        results.append(res)
    return results


def all_cases(rank, world, cases, causal):
    return ulysses_cases(rank, world, cases), causal_cases(rank, world, causal)


TWO = [_case(), _case(dtype="float32"), _case(kv_heads=1),  # GQA: Hk < u, replicated
       _case(kv_heads=2, clustering="kmeans", refine=2, pad=False),
       _case(metric="euclidean", refine=0, dtype="float32", kv_heads=2),
       _case(clusters=40),  # more clusters than queries: clamped, as one process
       _case(nan_query=True),
       _case(min_length=64),  # S < min_length: exact
       _case(mask="causal")]  # not key padding: exact
FOUR = [_case(), _case(kv_heads=1), _case(kv_heads=2, dtype="float32"),
        _case(clustering="kmeans", pad=False, heads=8, kv_heads=2)]


def _ids(cases):
    return [f"h{c['heads']}kv{c['kv_heads']}-{c['mask']}{'-pad' if c['pad'] else ''}-{c['dtype']}"
            f"-{c['clustering']}-{c['metric']}-refine{c['refine']}-C{c['clusters']}"
            f"-min{c['min_length']}{'-nan' if c['nan_query'] else ''}" for c in cases]


CAUSAL_TWO = [_causal(), _causal(method="clustered", dtype="float32"),
              _causal(kv_heads=1, metric="euclidean"),  # replicated K/V heads
              _causal(clustering="kmeans", pad=False),
              _causal(is_causal=False, causal_queries=True),  # path 1: all keys visible
              _causal(is_causal=False)]  # path 4: the pooled (conditional_attention) path
CAUSAL_FOUR = [_causal(heads=8, kv_heads=4), _causal(kv_heads=1, metric="euclidean")]


@pytest.fixture(scope="module")
def two_all():
    return launch(f"{__name__}:all_cases", 2, {"cases": TWO, "causal": CAUSAL_TWO},
                  timeout=300)


@pytest.fixture(scope="module")
def two_ranks(two_all):
    return [cases for cases, _ in two_all]


@pytest.fixture(scope="module")
def four_all():
    return launch(f"{__name__}:all_cases", 4, {"cases": FOUR, "causal": CAUSAL_FOUR},
                  timeout=300)


@pytest.fixture(scope="module")
def four_ranks(four_all):
    return [cases for cases, _ in four_all]


def _check(results, index, case):
    tol = {"float64": 1e-10, "float32": 1e-5}[case["dtype"]]
    exact = case["min_length"] > case["seq_len"] or case["mask"] == "causal"
    for rank in results:
        res = rank[index]
        assert res["path"] == res["want_path"] == (1 if case["min_length"] else 2 if exact
                                                   else 0), res
        assert res["same_assignments"] and res["same_idx"] and res["nan_rows_match"], res
        assert len(res["errors"]) == (1 if case["nan_query"] else 4), res
        assert max(res["errors"]) <= tol, (case, res["errors"])
    if not exact:  # the old per-head-group draw differs from one process's on some rank
        assert not all(rank[index]["plain_same"] for rank in results), case


@pytest.mark.parametrize("index", range(len(TWO)), ids=_ids(TWO))
def test_ulysses_improved_clustered_equals_one_process_on_two_ranks(two_ranks, index):
    _check(two_ranks, index, TWO[index])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(FOUR)), ids=_ids(FOUR))
def test_ulysses_improved_clustered_equals_one_process_on_four_ranks(four_ranks, index):
    _check(four_ranks, index, FOUR[index])


def _check_causal(all_ranks, index, case):
    tol = {"float64": 1e-10, "float32": 1e-5}[case["dtype"]]
    path = 0 if case["is_causal"] else 1 if case["causal_queries"] else 4
    for _, rank in all_ranks:
        res = rank[index]
        assert res["path"] == res["want_path"] == path, res
        assert all(res["same_choices"]), res
        assert max(res["errors"]) <= tol, (case, res["errors"])
        if case["is_causal"]:
            assert res["earlier_moved"] == 0.0 and res["later_moved"] > 0, res
    # the old per-head-group draw gives other choices on some rank
    assert not all(rank[index]["plain_same"] for _, rank in all_ranks), case


def _causal_ids(cases):
    return [f"{c['method']}-h{c['heads']}kv{c['kv_heads']}-{c['dtype']}-{c['clustering']}-"
            f"{c['metric']}-causal{int(c['is_causal'])}-cq{int(c['causal_queries'])}"
            f"{'-pad' if c['pad'] else ''}" for c in cases]


@pytest.mark.parametrize("index", range(len(CAUSAL_TWO)), ids=_causal_ids(CAUSAL_TWO))
def test_ulysses_causal_clustered_equals_one_process_on_two_ranks(two_all, index):
    _check_causal(two_all, index, CAUSAL_TWO[index])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CAUSAL_FOUR)), ids=_causal_ids(CAUSAL_FOUR))
def test_ulysses_causal_clustered_equals_one_process_on_four_ranks(four_all, index):
    _check_causal(four_all, index, CAUSAL_FOUR[index])
