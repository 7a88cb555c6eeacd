"""Improved clustered (i-clustered) attention over the ring on 2 and 4 gloo processes equals
single-process i-clustered attention (the float64 oracle of ops/clustered/reference.py) on the
gathered sequence given the same assignments (ring rank i's cluster j = global cluster
i·(C+1) + j, r·(C+1) clusters: C per rank and its spare cluster of padded queries): outputs
and q/k/v gradients (float64 <= 1e-10, float32 <= 1e-5), for (u, r) in {(1, 2), (1, 4),
(2, 2)}, with and without zigzag, key padding, GQA and MQA. Each cluster's top-k keys, kept
running across the rotating K blocks, are the oracle's (as sets), keys planted in remote
blocks are selected, and each rank sent exactly what clustered ring attention sends (K/V
rotation, the attention metric's all-reduce, dK/dV home): nothing more.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed_helpers import launch

pytestmark = pytest.mark.distributed

B, D, C = 2, 8, 3
C1 = C + 1  # with the spare cluster


def _case(u, r, *, zigzag=True, heads=4, kv_heads=4, pad=True, dtype="float64", topk=4,
          plant=False, impl="auto"):
    return dict(u=u, r=r, zigzag=zigzag, heads=heads, kv_heads=kv_heads, pad=pad, dtype=dtype,
                topk=topk, plant=plant, impl=impl)


def _expected_bytes(c, S, itemsize):
    """Per-rank bytes: as clustered ring attention (tests/ops/test_sequence_parallel_
    distributed.py's formulas, plus the metric's float64 statistics all-reduced)."""
    u, r, P = c["u"], c["r"], c["u"] * c["r"]
    hkv = max(c["kv_heads"], u)
    cd = 8 if c["dtype"] == "float64" else 4
    out = {}
    if u > 1:
        a2a = (u - 1) * B * S * D * (2 * c["heads"] + 2 * hkv) * itemsize // (u * P)
        out["all_to_all.fwd.bytes"] = a2a
        out["all_to_all.bwd.bytes"] = a2a
    x = B * S * hkv * D // u
    out["k,v.fwd.bytes"] = out["k,v.bwd.bytes"] = 2 * (r - 1) * x * itemsize // r
    out["dk,dv.bwd.bytes"] = 2 * x * cd
    out["all_reduce.fwd.bytes"] = 2 * (r - 1) * B * (hkv // u) * (1 + D + D * D) * 8 // r
    return out


def _inputs(c, n, S):
    dtype = getattr(torch, c["dtype"])
    gen = torch.Generator().manual_seed(200 + n)
    H, Hk = c["heads"], c["kv_heads"]
    q, g = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, Hk, S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    planted = []
    if c["plant"]:  # every query leans on dim 0; a few keys far out along it, off block 0
        q[..., 0] = q[..., 0].abs() + 2.0
        planted = [S - 1, S // 2 + 1] if c["zigzag"] else [S - 1, S // 2 + 1, S // 4 + 2]
        k[:, :, planted, 0] += 8.0
    keep = None
    if c["pad"]:
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[1, S - S // 4:] = False  # a padded tail on the last ring block(s)
        if planted:
            keep[1, planted] = True
    return [x.to(dtype) for x in (q, k, v, g)], keep, planted


def improved_cases(rank, world, cases, seq_len):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from clusterfx.ops import sequence_parallel as sp
    from clusterfx.ops.clustered.reference import (
        improved_clustered_attention_from_assignments as oracle,
    )
    from clusterfx.ops.sequence_parallel import improved

    forward, seen = improved.forward, {}

    def recording(*args, **kwargs):  # keep each call's top-k positions for the checks
        result = forward(*args, **kwargs)
        seen["pos"] = result[4]
        return result

    improved.forward = recording
    results = []
    for n, c in enumerate(cases):
        u, r, H = c["u"], c["r"], c["heads"]
        mesh = init_device_mesh("cpu", (world // (u * r), r, u),
                                mesh_dim_names=("dp", "ring", "ulysses"))
        groups = sp.Groups(u, r, mesh.get_group("ulysses").group_name if u > 1 else "",
                           mesh.get_group("ring").group_name if r > 1 else "", 60.0)
        layout = sp.SeqLayout(seq_len, u, r, c["zigzag"])
        (q, k, v, g), keep, planted = _inputs(c, n, seq_len)
        pos = sp.local_positions(layout, groups)
        leaves = [x[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
        tag = f"improved{n}"
        sp.traffic.pop(tag, None)
        out, assignments = sp.usp_clustered_attention(
            *leaves, layout, groups, clusters=C, key_padding_mask=keep, seed=7, scale=0.3,
            topk=c["topk"], impl=c["impl"], tag=tag)
        out.backward(g[:, :, pos])
        i, j = groups.ring_rank(), groups.ulysses_rank()
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, (i, j, assignments))
        first = rank // (u * r) * (u * r)
        h = H // u
        global_assign = torch.zeros(B, H, seq_len, dtype=torch.int64)
        for ri, uj, a in pieces[first:first + u * r]:
            global_assign[:, uj * h:(uj + 1) * h][:, :, layout.block_positions(ri)] = a + ri * C1
        want_leaves = [x.double().requires_grad_() for x in (q, k, v)]
        want, idx = oracle(*want_leaves, global_assign, r * C1, keep, 0.3, c["topk"])
        want.backward(g.double())
        out, want = out.detach(), want.detach()
        errs = [float((out.double() - want[:, :, pos]).abs().max() / want.abs().max())]
        errs += [float((a.grad.double() - b.grad[:, :, pos]).abs().max() / b.grad.abs().max())
                 for a, b in zip(leaves, want_leaves)]
        # top-k sets of this rank's non-empty clusters against the oracle's selection
        mine = seen["pos"].sort(-1).values
        theirs = idx[:, j * h:(j + 1) * h, i * C1:(i + 1) * C1].sort(-1).values
        members = torch.nn.functional.one_hot(assignments, C1).sum(2) > 0  # (B, h, C + 1)
        same_topk = bool(torch.equal(mine[members], theirs[members]))
        blocks = set((layout.inverse_order()[seen["pos"][members]] //
                      layout.block_len).flatten().tolist())
        has_planted = all(bool(torch.isin(torch.tensor(planted), row).all())
                          for row in seen["pos"][members])
        spare = bool((assignments == C).any())  # padded queries in the spare cluster
        sent = {k_: v_ for k_, v_ in sp.traffic[tag].items() if k_.endswith("bytes")}
        results.append({"errors": errs, "same_topk": same_topk, "blocks": sorted(blocks),
                        "has_planted": has_planted, "sent": sent, "spare": spare,
                        "expected": _expected_bytes(c, seq_len, q.element_size())})
    return results


TWO = [_case(1, 2), _case(1, 2, zigzag=False, kv_heads=2, topk=5),
       _case(1, 2, kv_heads=1, pad=False, dtype="float32"),
       _case(1, 2, heads=2, kv_heads=2, plant=True, impl="reference")]
FOUR = [_case(1, 4, kv_heads=2, topk=6, plant=True),
        _case(1, 4, zigzag=False, heads=2, kv_heads=2, dtype="float32", topk=12),  # k > S/r
        _case(2, 2, kv_heads=2), _case(2, 2, zigzag=False, kv_heads=1, plant=True)]


def _ids(cases):
    return [f"u{c['u']}r{c['r']}{'-zz' if c['zigzag'] else ''}-h{c['heads']}kv{c['kv_heads']}"
            f"{'-pad' if c['pad'] else ''}-{c['dtype']}-top{c['topk']}"
            f"{'-planted' if c['plant'] else ''}-{c['impl']}" for c in cases]


@pytest.fixture(scope="module")
def two_ranks():
    return launch(f"{__name__}:improved_cases", 2, {"cases": TWO, "seq_len": 32})


@pytest.fixture(scope="module")
def four_ranks():
    return launch(f"{__name__}:improved_cases", 4, {"cases": FOUR, "seq_len": 32},
                  timeout=400)


def _check(results, index, case):
    tol = 1e-10 if case["dtype"] == "float64" else 1e-5
    for rank in results:
        res = rank[index]
        assert max(res["errors"]) <= tol, (case, res)
        assert res["same_topk"], (case, res)
        assert res["sent"] == res["expected"], (res["sent"], res["expected"])
        # padded queries (batch 1's tail) sit in the spare cluster on the ranks holding them
        assert any(rank[index]["spare"] for rank in results) == case["pad"]
        if case["plant"] or case["topk"] > 32 // case["r"]:  # T spans several blocks
            assert res["has_planted"] and len(res["blocks"]) >= 2, res


@pytest.mark.parametrize("index", range(len(TWO)), ids=_ids(TWO))
def test_improved_clustered_over_two_ranks_equals_the_oracle(two_ranks, index):
    _check(two_ranks, index, TWO[index])


@pytest.mark.parametrize("index", range(len(FOUR)), ids=_ids(FOUR))
def test_improved_clustered_over_four_ranks_equals_the_oracle(four_ranks, index):
    _check(four_ranks, index, FOUR[index])
