"""The sequence-parallel family on one process: the layout (positions, zigzag balance, errors),
the block kernels with their log-sum-exp (reference and fused CPU against dense attention,
fully masked rows), the merge, the block backward from the global out/lse, and the ring op
with one ring rank (no communication) forward and backward. The multi-process behaviour is
in test_sequence_parallel_distributed.py."""

from __future__ import annotations

import pytest
import torch

from clusterfx.ops import sequence_parallel as sp
from clusterfx.ops.attention import attention_reference
from clusterfx.ops.sequence_parallel import cpu, reference
from clusterfx.ops.sequence_parallel.common.blocks import merge

KERNELS = {"reference": reference, "cpu": cpu}


@pytest.mark.parametrize("u,r,zigzag", [(1, 1, True), (2, 1, True), (1, 4, True), (2, 2, True),
                                        (2, 2, False), (4, 2, True)])
def test_layout_positions_partition_the_sequence(u, r, zigzag):
    layout = sp.SeqLayout(32, u, r, zigzag)
    held = torch.cat([layout.positions(i, j) for i in range(r) for j in range(u)])
    assert torch.equal(held, layout.order())  # layout order = ranks in (ring, ulysses) order
    assert torch.equal(torch.sort(held).values, torch.arange(32))
    assert torch.equal(layout.order()[layout.inverse_order()], torch.arange(32))
    if not zigzag or r == 1:
        assert torch.equal(layout.order(), torch.arange(32))


def test_zigzag_pairs_chunks_and_balances_causal_work():
    layout = sp.SeqLayout(16, 1, 4, True)
    assert layout.chunks(0) == [(0, 2), (14, 16)] and layout.chunks(3) == [(6, 8), (8, 10)]
    counts = [layout.causal_pairs(i) for i in range(4)]
    c = 16 // 8
    assert counts == [2 * 4 * c * c + c] * 4  # 2r·c² + c for every ring rank
    plain = [sp.SeqLayout(16, 1, 4, False).causal_pairs(i) for i in range(4)]
    assert plain == [10, 26, 42, 58] and sum(plain) == sum(counts) == 16 * 17 // 2


@pytest.mark.parametrize("seq_len,u,r,zigzag,multiple", [(18, 2, 2, False, 4),
                                                          (20, 2, 2, True, 8), (6, 4, 1, True, 4)])
def test_layout_rejects_indivisible_lengths(seq_len, u, r, zigzag, multiple):
    with pytest.raises(ValueError, match=rf"sequence length \({seq_len}\) must be divisible .* "
                                         rf"= {multiple}"):
        sp.SeqLayout(seq_len, u, r, zigzag)


def test_check_heads_messages():
    sp.check_heads(8, 2, 4)  # kv heads replicated to 4
    sp.check_heads(8, 8, 4)
    with pytest.raises(ValueError, match=r"heads \(6\) must be divisible by the ulysses "
                                         r"degree \(4\)"):
        sp.check_heads(6, 6, 4)
    with pytest.raises(ValueError, match=r"kv heads \(3\) must be divisible"):
        sp.check_heads(12, 3, 4)
    assert sp.kv_replication(1, 4) == 4 and sp.kv_replication(2, 4) == 2
    assert sp.kv_replication(8, 4) == 1


def _qkv(heads=4, kv_heads=2, nq=12, nk=10, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, nq, d, generator=gen, dtype=dtype),
            torch.randn(2, kv_heads, nk, d, generator=gen, dtype=dtype),
            torch.randn(2, kv_heads, nk, d, generator=gen, dtype=dtype))


def _dense(q, k, v, bias=None, causal=False, scale=0.3):
    return attention_reference(q, k, v, bias, 0.0, causal, scale, q.shape[1] != k.shape[1])


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("causal", [False, True])
def test_block_forward_equals_dense_with_lse(impl, causal):
    q, k, v = _qkv(nk=12 if causal else 10)
    bias = torch.zeros(2, 1, 1, k.shape[2], dtype=q.dtype)
    bias[1, ..., -3:] = float("-inf")
    out, lse = KERNELS[impl].block_forward(q, k, v, bias, 0.3, causal)
    assert (out - _dense(q, k, v, bias, causal)).abs().max() < 1e-13
    s = 0.3 * q @ k.repeat_interleave(2, 1).mT + bias
    if causal:
        s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    assert (lse - torch.logsumexp(s, -1)).abs().max() < 1e-13


@pytest.mark.parametrize("impl", list(KERNELS))
def test_fully_masked_rows_give_zero_and_minus_inf(impl):
    q, k, v = _qkv()
    bias = torch.zeros(2, 1, 12, 10, dtype=q.dtype)
    bias[0, :, 3] = float("-inf")  # query 3 of batch 0 sees no key in this block
    out, lse = KERNELS[impl].block_forward(q, k, v, bias, 0.3, False)
    assert torch.isneginf(lse[0, :, 3]).all() and (out[0, :, 3] == 0).all()
    assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("impl", list(KERNELS))
def test_merge_of_blocks_is_attention_over_their_union_in_any_order(impl):
    q, k, v = _qkv(nk=15)
    bias = torch.zeros(2, 1, 12, 15, dtype=q.dtype)
    bias[0, :, :, :5] = float("-inf")  # rows of batch 0 see nothing in the first block
    want = _dense(q, k, v, bias)
    blocks = [slice(0, 5), slice(5, 11), slice(11, 15)]
    for order in ([0, 1, 2], [2, 0, 1]):
        out = torch.zeros_like(want)
        lse = torch.full(want.shape[:3], float("-inf"), dtype=q.dtype)
        for b in order:
            sl = blocks[b]
            o, lb = KERNELS[impl].block_forward(q, k[:, :, sl], v[:, :, sl], bias[..., sl],
                                                0.3, False)
            out, lse = merge(out, lse, o, lb)
        assert (out - want).abs().max() < 1e-13


@pytest.mark.parametrize("impl", list(KERNELS))
def test_block_backward_from_global_out_and_lse_sums_to_the_gradient(impl):
    q, k, v = _qkv(nk=15)
    bias = torch.zeros(2, 1, 1, 15, dtype=q.dtype)
    bias[1, ..., -4:] = float("-inf")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = _dense(*leaves, bias)
    g = torch.randn_like(want)
    want.backward(g)
    out, lse = reference.block_forward(q, k, v, bias, 0.3, False)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for sl in (slice(0, 6), slice(6, 15)):
        a, b, c = KERNELS[impl].block_backward(g, q, k[:, :, sl], v[:, :, sl], out, lse,
                                               bias[..., sl], 0.3, False)
        dq, dks, dvs = dq + a, dks + [b], dvs + [c]
    for got, ref in ((dq, leaves[0]), (torch.cat(dks, 2), leaves[1]),
                     (torch.cat(dvs, 2), leaves[2])):
        assert (got - ref.grad).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_ring_op_with_one_rank_equals_dense_forward_and_backward(causal, dtype, tol):
    layout = sp.SeqLayout(12, 1, 1, True)
    groups = sp.Groups(1, 1, "", "", 10.0)
    q, k, v = _qkv(nq=12, nk=12, dtype=dtype)
    keep = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    keep[1, ..., -5:] = False
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = sp.ring_attention(*leaves, layout, groups, mask=keep, causal=causal, scale=0.3)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = _dense(*ref_leaves, keep, causal)
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    assert (out - want).abs().max() / want.abs().max() < tol
    for a, b in zip(leaves, ref_leaves):
        assert (a.grad - b.grad).abs().max() / b.grad.abs().max() < tol


def test_ring_op_compiles_without_graph_breaks():
    layout = sp.SeqLayout(8, 1, 1, True)
    groups = sp.Groups(1, 1, "", "", 10.0)
    q, k, v = _qkv(nq=8, nk=8, dtype=torch.float32)

    def f(q, k, v):
        return sp.ring_attention(q, k, v, layout, groups, causal=True, scale=0.3)[0].sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled(*leaves).backward()
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    _dense(*ref, causal=True).sum().backward()
    assert all((a.grad - b.grad).abs().max() < 1e-5 for a, b in zip(leaves, ref))


def test_ring_inputs_are_checked_before_work():
    layout = sp.SeqLayout(8, 1, 2, True)
    groups = sp.Groups(1, 2, "", "nonexistent", 10.0)
    q, k, v = _qkv(nq=8, nk=8)
    with pytest.raises(ValueError, match=r"a ring block holds S/r = 4"):
        sp.ring_attention(q, k, v, layout, groups)
    with pytest.raises(ValueError, match=r"impl \('triton'\) must be one of"):
        sp.ring_attention(q, k, v, sp.SeqLayout(8, 1, 1, True), sp.Groups(1, 1, "", "", 1.0),
                          impl="triton")
