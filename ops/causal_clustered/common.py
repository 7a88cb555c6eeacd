"""Code shared by the causal clustered-attention implementations and the registration: the
random plan of one call, the block layout, and the factor that turns a metric into hash
projections. Plain torch, any device.

Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D); key rows are the B·Hk (batch, kv head) pairs, query rows
the B·H (batch, head) pairs; query head h reads kv head h // (H/Hk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def nblocks(n: int, block: int) -> int:
    """Blocks of ``block`` positions covering n positions (the last may be partial)."""
    return (n + block - 1) // block


def refreshes(beta: int) -> bool:
    """Whether the codebooks are rebuilt at the start of block β: at β = 1, 2, 4, 8, … Blocks
    [r, 2r) form an epoch that uses the codebooks of the positions before block r, so the
    clustering is O(log N) batched steps, a cluster's top-k keys can be kept up to date by
    merging each new block's keys, and the rebuilds cost O(C·N) in all."""
    return beta >= 1 and beta & (beta - 1) == 0


def epoch_of(beta: int) -> int:
    """The epoch of block β: 0 for block 0, e for blocks [2^(e-1), 2^e)."""
    return 0 if beta == 0 else beta.bit_length()


def epochs(nb: int) -> list[tuple[int, int]]:
    """The (first, end) blocks of each epoch ≥ 1 for nb blocks: (1, 2), (2, 4), (4, 8), …"""
    out, r = [], 1
    while r < nb:
        out.append((r, min(2 * r, nb)))
        r *= 2
    return out


def key_epochs(nb: int, causal: bool) -> int:
    """Key assignments kept per key row: one per epoch (causal), or one (all keys)."""
    return epoch_of(nb - 1) + 1 if causal else 1


def blocks(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """(..., N, E) → (..., nb, block, E), zero-padded at the end."""
    pad = nb * block - x.shape[-2]
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], -2)
    return x.unflatten(-2, (nb, block))


def flag_blocks(x: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """(..., N) bool → (..., nb, block), False-padded at the end."""
    return blocks(x[..., None].to(torch.int8), block, nb)[..., 0].bool()


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ over the entries strictly before each one along ``dim`` (no add-then-subtract, so an
    entry never depends on itself or later ones, bit for bit)."""
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zero, x.cumsum(dim).narrow(dim, 0, x.shape[dim] - 1)], dim)


@dataclass(frozen=True)
class Plan:
    """Every random choice of one call, drawn up front on the CPU (so that every backend on
    every device makes the same choices for the same seed).

    planes (bits, D) float64: hash hyperplanes (``clustering="hamming"``; empty otherwise);
    key_priority (B·Hk, Nk), query_priority (B·H, Nq) float64 in [0, 1): the order in which
    a block's positions seed empty clusters (lowest first)."""

    planes: torch.Tensor
    key_priority: torch.Tensor
    query_priority: torch.Tensor


# (B·Hk, key rows (b·hk,), B·H, query rows (b·h,)): a call's rows among a larger batch's
DrawRows = tuple[int, torch.Tensor, int, torch.Tensor]


def draw_plan(seed: int, clustering: str, bits: int, dim: int, key_rows: int, nk: int,
              query_rows: int, nq: int, device: torch.device,
              draw_rows: DrawRows | None = None) -> Plan:
    """One generator seeded with ``seed`` (-1: torch's global RNG) draws the hyperplanes, then
    the key priorities, then the query priorities. ``draw_rows``: the call's key and query
    rows are these rows of a batch of (B·Hk, B·H) rows, and take that batch's draw (sequence
    parallelism: a Ulysses rank's heads among all heads)."""
    gen = None if seed == -1 else torch.Generator().manual_seed(seed)
    planes = torch.randn(bits if clustering == "hamming" else 0, dim, generator=gen,
                         dtype=torch.float64)
    if draw_rows is not None:
        key_total, krows, query_total, qrows = draw_rows
        if (krows.numel(), qrows.numel()) != (key_rows, query_rows):
            raise ValueError(f"draw_rows names {krows.numel()} key and {qrows.numel()} query "
                             f"rows; the call has {key_rows} and {query_rows}")
        kp = torch.rand(key_total, nk, generator=gen, dtype=torch.float64)[krows.cpu()]
        qp = torch.rand(query_total, nq, generator=gen, dtype=torch.float64)[qrows.cpu()]
        return Plan(planes.to(device), kp.to(device), qp.to(device))
    kp = torch.rand(key_rows, nk, generator=gen, dtype=torch.float64)
    qp = torch.rand(query_rows, nq, generator=gen, dtype=torch.float64)
    return Plan(planes.to(device), kp.to(device), qp.to(device))


def hash_projection(metric: torch.Tensor | None, planes: torch.Tensor, dim: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Projections ``A = L Pᵀ`` with ``L Lᵀ = M + δI`` (Cholesky; δ = 1e-6·tr(M)/D keeps it
    positive definite), so that the SimHash bits ``[(x - μ)·A_b > 0]`` follow the geometry
    ``(x - y)ᵀ M (x - y)``; without a metric ``A = Pᵀ``. A factorisation that still fails
    (non-finite M) falls back to the identity.

    Shapes: metric (..., D, D) or None, planes (bits, D) → (..., D, bits), or (D, bits).
    """
    p = planes.to(dtype).transpose(0, 1)
    if metric is None:
        return p
    eye = torch.eye(dim, dtype=dtype, device=metric.device)
    trace = metric.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    delta = 1e-6 * trace.clamp(min=0) / dim + torch.finfo(dtype).tiny
    factor, info = torch.linalg.cholesky_ex(metric + delta * eye)
    factor = torch.where((info == 0)[..., None, None], factor, eye)
    return factor @ p
