"""Improved clustered attention over the ring on one process (one ring rank, no communication):
the op `sp_ring_improved_clustered_attention` against the float64 oracle of
ops/clustered/reference.py given its assignments (C + 1 clusters: C and the spare one of padded
queries), forward and backward, for float64/32/16 and bfloat16 (computing in float32), GQA/MQA,
a value dim ≠ the query dim, key padding (a whole batch element padded too), top-k at and
beyond S; padding moves no valid row; the exact paths; fake kernel, autograd registration and a
graph-break-free compile. The ring over 2 and 4 processes is
test_sequence_parallel_improved_distributed.py."""

from __future__ import annotations

import pytest
import torch

from clusterfx.ops import sequence_parallel as sp
from clusterfx.ops.clustered.reference import improved_clustered_attention_from_assignments
from clusterfx.ops.common import telemetry
from tests.helpers import oracle_tolerance

C, S = 3, 24
_op = torch.ops.clusterfx.sp_ring_improved_clustered_attention


def _one_rank(seq_len=S):
    return sp.SeqLayout(seq_len, 1, 1, False), sp.Groups(1, 1, "", "", 10.0)


def _inputs(heads=4, kv_heads=4, dv=8, dtype=torch.float64, pad="tail", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, S, 8, generator=gen, dtype=torch.float64)
    g = torch.randn(2, heads, S, dv, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, S, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, S, dv, generator=gen, dtype=torch.float64)
    keep = None
    if pad != "none":
        keep = torch.ones(2, S, dtype=torch.bool)
        keep[1, S - 7:] = False
        if pad == "all":
            keep[1] = False
    return [x.to(dtype) for x in (q, k, v, g)], keep


def _run(q, k, v, keep, topk, **kw):
    layout, groups = _one_rank()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, assignments = sp.usp_clustered_attention(
        *leaves, layout, groups, clusters=C, key_padding_mask=keep, seed=3, scale=0.4,
        topk=topk, **kw)
    return out, assignments, leaves


def _oracle(q, k, v, g, keep, assignments, topk):
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want, idx = improved_clustered_attention_from_assignments(*leaves, assignments, C + 1, keep,
                                                              0.4, topk)
    want.backward(g.double())
    return want.detach(), [x.grad for x in leaves], idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dv", [(4, 4, 8), (4, 2, 8), (4, 1, 5)])
@pytest.mark.parametrize("pad,topk", [("none", 5), ("tail", 5), ("all", 5), ("tail", 100)])
def test_equals_the_oracle_given_the_assignments(dtype, heads, kv_heads, dv, pad, topk):
    (q, k, v, g), keep = _inputs(heads, kv_heads, dv, dtype, pad)
    out, assignments, leaves = _run(q, k, v, keep, topk)
    out.backward(g)
    want, grads, _ = _oracle(q, k, v, g, keep, assignments, topk)
    assert out.dtype == dtype and assignments.max() <= C
    for got, ref in zip([out.detach()] + [x.grad for x in leaves], [want] + grads):
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        if dtype in (torch.float64, torch.float32):
            tol = (1e-12 if dtype == torch.float64 else 1e-5) * float(ref.abs().max())
        else:
            tol = oracle_tolerance(dtype, ref, S, rounding_ulps=4.0)
        assert float((got.double() - ref).abs().max()) <= tol
    if pad == "all":  # no key at all: zero output and gradients, as the oracle
        assert float(out[1].abs().max()) == 0.0


@pytest.mark.parametrize("tile", [1, 3, 64])  # a tile per query; several per cluster; one
def test_the_exact_part_in_tiles_of_one_cluster_is_the_same(monkeypatch, tile):
    from clusterfx.ops.sequence_parallel import improved

    (q, k, v, g), keep = _inputs(heads=4, kv_heads=2)
    monkeypatch.setattr(improved, "TILE", tile)
    out, assignments, leaves = _run(q, k, v, keep, 5)
    lane, tile_slot, P = improved.cluster_tiles(assignments, C + 1)
    # every query has its own lane, in a tile of its own cluster
    assert lane.unique().numel() == lane.numel() and int(lane.max()) < P * tile
    slots = (assignments + torch.arange(8).view(2, 4, 1) * (C + 1)).reshape(-1)
    assert torch.equal(tile_slot[lane // tile], slots)
    out.backward(g)
    want, grads, _ = _oracle(q, k, v, g, keep, assignments, 5)
    for got, ref in zip([out.detach()] + [x.grad for x in leaves], [want] + grads):
        assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


@pytest.mark.parametrize("topk", [5, None])  # None: the ring clustered op, the same rule
def test_padding_moves_no_valid_row_and_sits_in_the_spare_cluster(topk):
    (q, k, v, g), keep = _inputs()
    out, assignments, _ = _run(q, k, v, keep, topk)
    assert bool((assignments[1][:, ~keep[1]] == C).all())
    assert bool((assignments[1][:, keep[1]] < C).all()) and bool((assignments[0] < C).all())
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[1, :, ~keep[1]] += 10.0  # padded queries, keys and values change
    out2, assignments2, _ = _run(q2, k2, v2, keep, topk)
    assert torch.equal(assignments2, assignments)
    assert torch.equal(out2[0], out[0])
    assert float((out2[1][:, keep[1]] - out[1][:, keep[1]]).abs().max()) < 1e-13


def test_the_selection_is_the_oracles_top_k():
    (q, k, v, _), keep = _inputs()
    res = _op(q, k, v, keep[:, None, None, :], 0.4, C, 5, 63, 3, "hamming", 1, "attention", 5,
              0, S, False, 1, 1, "", "", 10.0, "auto", "", "")
    out, assignments, path, _, _, pos, kt, vt = res
    assert int(path) == 0 and pos.shape == (2, 4, C + 1, 5)
    _, _, idx = _oracle(q, k, v, torch.zeros_like(out), keep, assignments, 5)
    used = torch.nn.functional.one_hot(assignments, C + 1).sum(2) > 0
    assert torch.equal(pos.sort(-1).values[used], idx.sort(-1).values[used])
    # the copies are the selected keys' rows
    assert torch.equal(kt, k[:, :, None].expand(-1, -1, C + 1, -1, -1).gather(
        3, pos[..., None].expand(-1, -1, -1, -1, 8)))
    assert torch.equal(vt[0, 0, 0], v[0, 0, pos[0, 0, 0]])


def test_exact_paths_equal_ring_attention_and_say_why():
    (q, k, v, g), keep = _inputs()
    layout, groups = _one_rank()
    mask = keep[:, None, None, :].expand(2, 1, S, S).clone()
    mask[0, 0, 0, 0] = False  # varies over queries: not key padding
    sink = telemetry.new_sink()
    for m, min_length in ((keep[:, None, None, :], S + 1), (mask, 0), (keep[:, None, None, :],
                                                                      0)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = _op(*leaves, m, 0.4, C, 5, 63, 3, "hamming", 1, "attention", 5, min_length, S,
                  False, 1, 1, "", "", 10.0, "auto", "", sink.tag("site"))[0]
        if min_length == 0 and m is not mask:
            continue  # the approximate path, counted below
        out.backward(g)
        ref = [x.clone().requires_grad_() for x in (q, k, v)]
        want = sp.ring_attention(*ref, layout, groups, mask=m, scale=0.4)[0]
        want.backward(g)
        assert float((out - want).abs().max()) < 1e-13
        assert all(float((a.grad - b.grad).abs().max()) < 1e-13 for a, b in zip(leaves, ref))
    assert sink.paths("site") == {"exact: shorter than min_length [ring cpu]": 1,
                                  "exact: mask is not key padding [ring cpu]": 1,
                                  "approximate [ring torch]": 1}


def test_fake_kernel_and_autograd_registration():
    (q, k, v, _), keep = _inputs(heads=4, kv_heads=2, dtype=torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), keep[:, None, None, :],
            0.4, C, 5, 63, 3, "hamming", 1, "attention", 5, 0, S, False, 1, 1, "", "", 10.0,
            "auto", "", "")
    torch.library.opcheck(_op, args, test_utils=("test_schema", "test_faketensor",
                                                 "test_autograd_registration"))


def test_compiles_without_graph_breaks():
    (q, k, v, g), keep = _inputs(dtype=torch.float32)
    layout, groups = _one_rank()

    def f(q, k, v):
        return sp.usp_clustered_attention(q, k, v, layout, groups, clusters=C,
                                          key_padding_mask=keep, seed=3, scale=0.4, topk=5)[0]

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward(g)
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    f(*ref).backward(g)
    assert all(float((a.grad - b.grad).abs().max()) < 1e-6 for a, b in zip(leaves, ref))


@pytest.mark.parametrize("topk", [0, -1, 2.5, True])
def test_topk_is_checked_before_work(topk):
    (q, k, v, _), _ = _inputs()
    layout, groups = _one_rank()
    with pytest.raises(ValueError, match=r"topk"):
        sp.usp_clustered_attention(q, k, v, layout, groups, clusters=C, topk=topk)
