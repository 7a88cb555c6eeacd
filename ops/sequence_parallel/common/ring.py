"""Ring attention over the ring group, for any block kernel (`reference` or `cpu`).

Each of the r ring ranks holds one ring block of S/r tokens (queries, keys, values; after the
Ulysses all-to-all, for its H/u heads). Forward, r steps: at step s rank i holds the keys and
values of ring block j = (i - s) mod r, posts their exchange with its neighbours (send to
i+1, receive from i-1), attends its queries to them, merges by log-sum-exp (`common.merge`,
in fp32 or fp64), and waits for the next block: r-1 exchanges of K and V.

Causality works on token positions (`SeqLayout.chunks`): a ring block is one or two contiguous
chunks; a (query chunk, key chunk) pair is computed in full when every key precedes every
query, as the causal diagonal when the chunks coincide, and skipped when every key follows.
With zigzag every step after the first computes exactly half a block on every rank.

Backward, r steps: K and V travel the ring again (r-1 exchanges) together with their
gradient accumulators dK, dV (kept in fp32/fp64, r exchanges, so they arrive back at their
owner); each block's gradients use the global out and lse.

A mask is over original token positions, broadcastable to (B, H, S, S) (bool keep-mask or
additive); each pair reads its rows and columns.

Without causality the queries need not be the block's tokens (cluster centroids, say: any
number of rows, with a mask over keys only).

Shapes: q (B, H, Nb, D), k (B, Hk, Nb, D), v (B, Hk, Nb, Dv), Nb = S/r in ring-block order →
out (B, H, Nb, Dv) in q's dtype, lse (B, H, Nb) in the compute dtype.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import compute_dtype
from clusterfx.ops.sequence_parallel.common import comm
from clusterfx.ops.sequence_parallel.common.blocks import additive_bias, merge
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout

FULL, DIAGONAL, SKIP = "full", "diagonal", "skip"


def pair_kind(q_chunk: tuple[int, int], k_chunk: tuple[int, int], causal: bool) -> str:
    if not causal:
        return FULL
    (a0, a1), (b0, b1) = q_chunk, k_chunk
    if b1 <= a0:
        return FULL
    if b0 >= a1:
        return SKIP
    if (a0, a1) == (b0, b1):
        return DIAGONAL
    raise AssertionError(f"chunks {q_chunk} and {k_chunk} overlap partially")  # by layout


def _rows(chunks: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(start, stop) positions with their (offset, length) in the block."""
    out, offset = [], 0
    for a, b in chunks:
        out.append((a, b, offset, b - a))
        offset += b - a
    return out


def pairs(layout: SeqLayout, i: int, j: int, causal: bool, device=None):
    """The (kind, q rows, k rows, q positions, k positions) computed at ring rank i when it
    holds ring block j, skipped pairs left out. Without causality one pair covers the blocks
    (q positions None: the queries need not be tokens, e.g. cluster centroids)."""
    if not causal:
        yield FULL, slice(None), slice(None), None, layout.block_positions(j, device)
        return
    for a0, a1, qo, qn in _rows(layout.chunks(i)):
        for b0, b1, ko, kn in _rows(layout.chunks(j)):
            kind = pair_kind((a0, a1), (b0, b1), causal)
            if kind != SKIP:
                yield (kind, slice(qo, qo + qn), slice(ko, ko + kn),
                       torch.arange(a0, a1, device=device), torch.arange(b0, b1, device=device))


def unmasked_pairs(kind: str, nq: int, nk: int) -> int:
    return nq * (nq + 1) // 2 if kind == DIAGONAL else nq * nk


def _bias(mask, qpos, kpos, dtype, layout: SeqLayout, i: int):
    """The mask's rows of the queries (token positions; ring block i when `qpos` is None) and
    columns of the keys, additive in `dtype`."""
    if mask is None:
        return None
    m = mask
    if mask.shape[-2] != 1:
        rows = qpos if qpos is not None else layout.block_positions(i, mask.device)
        m = m.index_select(-2, rows)
    return additive_bias(m.index_select(-1, kpos), dtype)


class _Ring:
    def __init__(self, groups: comm.Groups, tag: str, phase: str):
        self.groups, self.tag, self.phase = groups, tag, phase
        self.r = groups.ring
        self.i = groups.ring_rank()

    def shift(self, what: str) -> comm.RingShift | None:
        if self.r == 1:
            return None
        return comm.RingShift(self.groups.ring_pg(), self.r, self.groups.timeout, self.tag,
                              self.phase, what)


def ring_forward(q, k, v, mask, causal: bool, scale: float, layout: SeqLayout,
                 groups: comm.Groups, kernels, tag: str = ""):
    """(out, lse) of attention of the local ring block's queries to all S keys."""
    ring = _Ring(groups, tag, "fwd")
    cd = compute_dtype(q)
    B, H, Nq, _ = q.shape
    out = q.new_zeros(B, H, Nq, v.shape[-1], dtype=cd)
    lse = q.new_full((B, H, Nq), float("-inf"), dtype=cd)
    computed = 0
    for s in range(ring.r):
        j = (ring.i - s) % ring.r
        shift = ring.shift("k,v") if s < ring.r - 1 else None
        if shift is not None:
            shift.start([k, v])
        for kind, qr, kr, qpos, kpos in pairs(layout, ring.i, j, causal, q.device):
            ks = k[:, :, kr]
            o, lse_b = kernels.block_forward(q[:, :, qr], ks, v[:, :, kr],
                                             _bias(mask, qpos, kpos, cd, layout, ring.i), scale,
                                             kind == DIAGONAL)
            out[:, :, qr], lse[:, :, qr] = merge(out[:, :, qr], lse[:, :, qr], o, lse_b)
            computed += unmasked_pairs(kind, o.shape[2], ks.shape[2])
        if shift is not None:
            k, v = shift.finish()
    if tag:
        comm.traffic[tag]["pairs"] += computed * B * H
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, mask, causal: bool, scale: float,
                  layout: SeqLayout, groups: comm.Groups, kernels, tag: str = "",
                  grad_lse=None, add_key_grads=None):
    """(dq, dk, dv) of `ring_forward`; dk, dv are those of the local ring block's keys.

    `grad_lse` (B, H, Nq): a gradient flowing into lse too (the blocks' ds gain g_lse·p).
    `add_key_grads(j, dk, dv)`: called while ring block j's accumulators (B, Hk, S/r, ·)
    are here, to add gradients this rank holds for that block's keys (they travel home with
    the rest)."""
    ring = _Ring(groups, tag, "bwd")
    cd = compute_dtype(q)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=k.device)
    dv = torch.zeros(v.shape, dtype=cd, device=v.device)
    kk, vv = k, v
    for s in range(ring.r):
        j = (ring.i - s) % ring.r
        shift = ring.shift("k,v") if s < ring.r - 1 else None
        if shift is not None:
            shift.start([kk, vv])
        for kind, qr, kr, qpos, kpos in pairs(layout, ring.i, j, causal, q.device):
            extra = {} if grad_lse is None else {"grad_lse": grad_lse[:, :, qr]}
            gq, gk, gv = kernels.block_backward(
                dout[:, :, qr], q[:, :, qr], kk[:, :, kr], vv[:, :, kr], out[:, :, qr],
                lse[:, :, qr], _bias(mask, qpos, kpos, cd, layout, ring.i), scale,
                kind == DIAGONAL, **extra)
            dq[:, :, qr] += gq
            dk[:, :, kr] += gk
            dv[:, :, kr] += gv
        if add_key_grads is not None:
            add_key_grads(j, dk, dv)
        grads = ring.shift("dk,dv")
        if grads is not None:  # the accumulators follow their block; r hops bring them home
            grads.start([dk, dv])
        if shift is not None:
            kk, vv = shift.finish()
        if grads is not None:
            dk, dv = grads.finish()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
