"""USP attention on 2 and 4 gloo processes equals dense attention on the gathered sequence:
outputs and q/k/v gradients (float64 <= 1e-10, float32 <= 1e-5), for (ulysses, ring) in
{(2,1), (1,2), (2,2), (4,1), (1,4)}, causal with and without zigzag, key padding, MHA / GQA /
MQA; and the bytes each rank sent equal the reference formulas (docs: Ulysses
(u-1)/u·B·S·D·(2Hq+2Hkv)/P per direction, ring 2(r-1)/r·B·S·Hkv·D/u forward, plus dK/dV in
the compute dtype over r hops backward).

Every rank draws the same full q, k, v, attends on its own tokens, and compares its slice of
the result with the dense oracle; one launch per world size runs all the cases."""

from __future__ import annotations

import pytest
import torch

from tests.distributed_helpers import launch

pytestmark = pytest.mark.distributed

B, D = 2, 8


def _case(u, r, *, causal=True, zigzag=True, heads=4, kv_heads=4, pad=False,
          dtype="float64", impl="auto"):
    return dict(u=u, r=r, causal=causal, zigzag=zigzag, heads=heads, kv_heads=kv_heads,
                pad=pad, dtype=dtype, impl=impl)


def _dense(q, k, v, keep, causal, scale):
    from clusterfx.ops.attention import attention_reference

    mask = None if keep is None else keep[:, None, None, :]
    return attention_reference(q, k, v, mask, 0.0, causal, scale, q.shape[1] != k.shape[1])


def _expected_bytes(c, S, itemsize):
    """Per-rank bytes of each collective and phase, from the reference formulas."""
    u, r, P = c["u"], c["r"], c["u"] * c["r"]
    hkv = max(c["kv_heads"], u)  # kv heads are replicated up to u when fewer
    cd = 8 if c["dtype"] == "float64" else 4
    out = {}
    if u > 1:
        a2a = (u - 1) * B * S * D * (2 * c["heads"] + 2 * hkv) * itemsize // (u * P)
        out["all_to_all.fwd.bytes"] = a2a
        out["all_to_all.bwd.bytes"] = a2a
    if r > 1:
        x = B * S * hkv * D // u  # elements of one K (or V) over the whole sequence
        out["k,v.fwd.bytes"] = 2 * (r - 1) * x * itemsize // r
        out["k,v.bwd.bytes"] = 2 * (r - 1) * x * itemsize // r
        out["dk,dv.bwd.bytes"] = 2 * x * cd
    return out


def attention_cases(rank, world, cases, seq_len):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from clusterfx.ops import sequence_parallel as sp

    results = []
    for n, c in enumerate(cases):
        u, r = c["u"], c["r"]
        mesh = init_device_mesh("cpu", (world // (u * r), r, u),
                                mesh_dim_names=("dp", "ring", "ulysses"))
        groups = sp.Groups(u, r, mesh.get_group("ulysses").group_name if u > 1 else "",
                           mesh.get_group("ring").group_name if r > 1 else "", 60.0)
        layout = sp.SeqLayout(seq_len, u, r, c["zigzag"])
        dtype = getattr(torch, c["dtype"])
        gen = torch.Generator().manual_seed(n)
        q, k, v, g = (torch.randn(B, h, seq_len, D, generator=gen, dtype=dtype)
                      for h in (c["heads"], c["kv_heads"], c["kv_heads"], c["heads"]))
        keep = None
        if c["pad"]:
            keep = torch.ones(B, seq_len, dtype=torch.bool)
            keep[1, seq_len // 3:] = False  # a padded tail that crosses ranks
        scale = D ** -0.5
        want_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        want = _dense(*want_leaves, keep, c["causal"], scale)
        want.backward(g)
        pos = sp.local_positions(layout, groups)
        leaves = [x[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
        tag = f"case{n}"
        sp.traffic.pop(tag, None)
        mask = None if keep is None else keep[:, None, None, :]
        got = sp.usp_attention(*leaves, layout, groups, mask=mask, causal=c["causal"],
                               scale=scale, impl=c["impl"], tag=tag)
        got.backward(g[:, :, pos])
        errs = [float((got - want[:, :, pos]).abs().max() / want.abs().max())]
        errs += [float((a.grad - b.grad[:, :, pos]).abs().max() / b.grad.abs().max())
                 for a, b in zip(leaves, want_leaves)]
        sent = {k_: v_ for k_, v_ in sp.traffic[tag].items() if k_.endswith("bytes")}
        results.append({"errors": errs, "sent": sent, "pairs": sp.traffic[tag]["pairs"],
                        "expected": _expected_bytes(c, seq_len, q.element_size()),
                        "rank": dist.get_rank()})
    return results


TWO = [_case(2, 1), _case(1, 2), _case(1, 2, zigzag=False), _case(2, 1, causal=False, pad=True),
       _case(1, 2, causal=False, pad=True), _case(1, 2, pad=True),
       _case(2, 1, kv_heads=2), _case(1, 2, kv_heads=1), _case(2, 1, kv_heads=1),
       _case(1, 2, dtype="float32"), _case(2, 1, dtype="float32", kv_heads=2),
       _case(1, 2, impl="reference")]
FOUR = [_case(2, 2), _case(2, 2, zigzag=False), _case(4, 1), _case(1, 4),
        _case(1, 4, zigzag=False), _case(2, 2, causal=False, pad=True), _case(2, 2, kv_heads=2),
        _case(2, 2, kv_heads=1), _case(4, 1, kv_heads=2), _case(4, 1, kv_heads=1, heads=8),
        _case(1, 4, kv_heads=1), _case(2, 2, dtype="float32")]


def _ids(cases):
    return [f"u{c['u']}r{c['r']}-{'causal' if c['causal'] else 'full'}"
            f"{'-zz' if c['zigzag'] else ''}-h{c['heads']}kv{c['kv_heads']}"
            f"{'-pad' if c['pad'] else ''}-{c['dtype']}-{c['impl']}"
            for c in cases]


@pytest.fixture(scope="module")
def two_ranks():
    return launch(f"{__name__}:attention_cases", 2, {"cases": TWO, "seq_len": 16})


@pytest.fixture(scope="module")
def four_ranks():
    return launch(f"{__name__}:attention_cases", 4, {"cases": FOUR, "seq_len": 16},
                  timeout=400)


def _check(results, index, case):
    tol = 1e-10 if case["dtype"] == "float64" else 1e-5
    for rank in results:
        res = rank[index]
        assert max(res["errors"]) <= tol, (rank, res["errors"])
        assert res["sent"] == res["expected"], (res["sent"], res["expected"])


@pytest.mark.parametrize("index", range(len(TWO)), ids=_ids(TWO))
def test_usp_attention_two_ranks(two_ranks, index):
    _check(two_ranks, index, TWO[index])


@pytest.mark.parametrize("index", range(len(FOUR)), ids=_ids(FOUR))
def test_usp_attention_four_ranks(four_ranks, index):
    _check(four_ranks, index, FOUR[index])


def test_zigzag_balances_causal_pairs(four_ranks):
    """Zigzag: every rank computes the same number of unmasked (q, k) pairs; contiguous
    blocks do not (the last ring rank computes 2r-1 times the first's diagonal share)."""
    zigzag = [res[FOUR.index(_case(1, 4))]["pairs"] for res in four_ranks]
    plain = [res[FOUR.index(_case(1, 4, zigzag=False))]["pairs"] for res in four_ranks]
    assert max(zigzag) == min(zigzag) > 0
    assert max(plain) / min(plain) > 5  # ring rank i: 16·i + 10 pairs per head: 58 / 10
    assert sum(plain) == sum(zigzag) == B * 4 * 16 * 17 // 2  # all pairs, once


# ------------------------------------------------------------------ clustered over the mesh

C = 3  # clusters per (batch, head, ring rank)


def clustered_cases(rank, world, cases, seq_len):
    """Clustered attention over (u, r): outputs and q/k/v gradients against single-process
    clustered attention from the same assignments (ring rank i's cluster j = global cluster
    i·(C+1) + j: C per rank and its spare cluster of padded queries); the metric reduced over
    the ring against `attention_metric` of the gathered keys; the assignments against
    single-process clustering of the same queries (padded ones replaced by 0, then put in
    the spare cluster C) with the same seed and that metric."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from clusterfx.ops import sequence_parallel as sp
    from clusterfx.ops.clustered import clustered_attention_from_assignments
    from clusterfx.ops.clustering import ClusteringSpec, attention_metric, cluster_with

    results = []
    for n, c in enumerate(cases):
        u, r = c["u"], c["r"]
        mesh = init_device_mesh("cpu", (world // (u * r), r, u),
                                mesh_dim_names=("dp", "ring", "ulysses"))
        groups = sp.Groups(u, r, mesh.get_group("ulysses").group_name if u > 1 else "",
                           mesh.get_group("ring").group_name if r > 1 else "", 60.0)
        layout = sp.SeqLayout(seq_len, u, r, c["zigzag"])
        H, Hk = c["heads"], c["kv_heads"]
        gen = torch.Generator().manual_seed(100 + n)
        q, g = (torch.randn(B, H, seq_len, D, generator=gen, dtype=torch.float64)
                for _ in range(2))
        k, v = (torch.randn(B, Hk, seq_len, D, generator=gen, dtype=torch.float64)
                for _ in range(2))
        keep = torch.ones(B, seq_len, dtype=torch.bool)
        keep[1, -seq_len // 4:] = False
        pos = sp.local_positions(layout, groups)
        leaves = [x[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
        out, assignments = sp.usp_clustered_attention(
            *leaves, layout, groups, clusters=C, key_padding_mask=keep, seed=7, scale=0.3)
        out.backward(g[:, :, pos])
        i, j = groups.ring_rank(), groups.ulysses_rank()
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, (i, j, assignments))
        sp_ranks = _same_sequence(pieces, rank, u, r)
        global_assign = torch.zeros(B, H, seq_len, dtype=torch.int64)
        h = H // u
        for ri, uj, a in sp_ranks:
            block = layout.block_positions(ri)
            global_assign[:, uj * h:(uj + 1) * h][:, :, block] = a + ri * (C + 1)
        want_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        want = clustered_attention_from_assignments(*want_leaves, global_assign, r * (C + 1),
                                                    key_padding_mask=keep, scale=0.3,
                                                    impl="reference")
        want.backward(g)
        errs = [float((out - want[:, :, pos]).abs().max() / want.abs().max())]
        errs += [float((a.grad - b.grad[:, :, pos]).abs().max() / b.grad.abs().max())
                 for a, b in zip(leaves, want_leaves)]
        # the ring-reduced metric and the clustering with the same seed, on one process
        rep = max(1, u // Hk)
        kh = (k.repeat_interleave(rep, 1) if rep > 1 else k)[:, j * (k.shape[1] * rep // u):
                                                            (j + 1) * (k.shape[1] * rep // u)]
        metric = attention_metric(kh, h, keep)
        block = layout.block_positions(i)
        kb = kh[:, :, block]
        ring_m = sp.ring_metric(kb, h, keep, layout, groups, "")
        qb = q[:, j * h:(j + 1) * h][:, :, block]
        centre = keep[:, None, block].expand(qb.shape[:3])
        spec = ClusteringSpec(C, seed=7)
        again, _ = cluster_with(qb.masked_fill(~centre[..., None], 0.0), spec, metric=metric,
                                centre_mask=centre)
        again = again.masked_fill(~centre, C)
        results.append({"errors": errs,
                        "metric": float((ring_m - metric).abs().max() / metric.abs().max()),
                        "same_assignments": bool(torch.equal(again, assignments))})
    return results


def _same_sequence(pieces, rank, u, r):
    first = rank // (u * r) * (u * r)
    return pieces[first:first + u * r]


CLUSTERED_TWO = [dict(u=1, r=2, zigzag=True, heads=4, kv_heads=4),
                 dict(u=2, r=1, zigzag=True, heads=4, kv_heads=2)]
CLUSTERED_FOUR = [dict(u=2, r=2, zigzag=True, heads=4, kv_heads=2),
                  dict(u=1, r=4, zigzag=False, heads=2, kv_heads=1),
                  dict(u=4, r=1, zigzag=True, heads=4, kv_heads=1)]


@pytest.mark.parametrize("world,cases", [(2, CLUSTERED_TWO), (4, CLUSTERED_FOUR)])
def test_clustered_over_the_mesh_equals_one_process(world, cases):
    results = launch(f"{__name__}:clustered_cases", world, {"cases": cases, "seq_len": 32},
                     timeout=400)
    for rank in results:
        for case, res in zip(cases, rank):
            assert max(res["errors"]) <= 1e-10, (case, res)
            assert res["metric"] <= 1e-10, (case, res)
            assert res["same_assignments"], case


def causality_cases(rank, world, t, seq_len):
    """Perturb q, k, v at position t: no output before t may move, on any rank, for every
    (u, r) of `world` ranks with zigzag and contiguous blocks."""
    from torch.distributed.device_mesh import init_device_mesh

    from clusterfx.ops import sequence_parallel as sp

    results = []
    for u, r in ((1, world), (2, world // 2), (world, 1)):
        for zigzag in (True, False):
            mesh = init_device_mesh("cpu", (r, u), mesh_dim_names=("ring", "ulysses"))
            groups = sp.Groups(u, r, mesh.get_group("ulysses").group_name if u > 1 else "",
                               mesh.get_group("ring").group_name if r > 1 else "", 60.0)
            layout = sp.SeqLayout(seq_len, u, r, zigzag)
            gen = torch.Generator().manual_seed(3)
            q, k, v = (torch.randn(B, 4, seq_len, D, generator=gen) for _ in range(3))
            pos = sp.local_positions(layout, groups)
            outs = []
            for bump in (0.0, 5.0):
                qq, kk, vv = (x.clone() for x in (q, k, v))
                for x in (qq, kk, vv):
                    x[:, :, t] += bump
                outs.append(sp.usp_attention(qq[:, :, pos], kk[:, :, pos], vv[:, :, pos],
                                             layout, groups, causal=True))
            before = pos < t
            results.append({"u": u, "r": r, "zigzag": zigzag,
                            "unchanged_before": bool(torch.equal(outs[0][:, :, before],
                                                                 outs[1][:, :, before])),
                            "changed_after": bool((pos >= t).any()) and not torch.equal(
                                outs[0][:, :, ~before], outs[1][:, :, ~before])})
    return results


def test_causal_usp_attention_never_sees_the_future():
    results = launch(f"{__name__}:causality_cases", 4, {"t": 9, "seq_len": 32})
    for rank in results:
        for res in rank:
            assert res["unchanged_before"], res
    # position 9 and later live on some rank of each layout, and move there
    assert all(any(rank[i]["changed_after"] for rank in results)
               for i in range(len(results[0])))
