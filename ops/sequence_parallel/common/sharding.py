"""Moving a sequence dimension between "whole on every rank" and "this rank's L tokens", and
the Ulysses all-to-all. Plain functions on tensors; the custom ops of `registration` wrap them.

A sequence dim is described by (dim, outer, inner): its size is outer·S·inner, laid out as
[outer][token][inner] (e.g. (B·S, C) after flattening batch and sequence: outer = B), and
locally outer·L·inner.

- `take_local`: the local tokens (no communication).
- `gather`: all-gather over the Ulysses group, then over the ring group (layout order), then
  back to token order.
- `seq_to_heads` / `heads_to_seq`: the Ulysses all-to-all on (B, H, N, D) tensors:
  (B, H, L, D) → (B, H/u, u·L, D) (rank j gets head group j, the group's tokens in rank
  order) and back.
"""

from __future__ import annotations

import torch

from clusterfx.ops.sequence_parallel.common import comm
from clusterfx.ops.sequence_parallel.common.layout import SeqLayout


def _split(x: torch.Tensor, dim: int, outer: int, inner: int, tokens: int) -> torch.Tensor:
    """x with `dim` (size outer·tokens·inner) moved to the front as (tokens, outer, inner, ...)."""
    y = x.movedim(dim, 0)
    rest = y.shape[1:]
    return y.reshape(outer, tokens, inner, *rest).transpose(0, 1), rest


def _join(y: torch.Tensor, dim: int, rest) -> torch.Tensor:
    tokens, outer, inner = y.shape[:3]
    z = y.transpose(0, 1).reshape(outer * tokens * inner, *rest)
    return z.movedim(0, dim)


def check_sequence_dim(x: torch.Tensor, dim: int, outer: int, inner: int, tokens: int,
                       what: str) -> None:
    if x.shape[dim] != outer * tokens * inner:
        raise ValueError(f"{what}: dim {dim} of shape {tuple(x.shape)} has size {x.shape[dim]}; "
                         f"expected {outer}·{tokens}·{inner} = {outer * tokens * inner} "
                         f"(outer·tokens·inner)")


def local_positions(layout: SeqLayout, groups: comm.Groups, device=None) -> torch.Tensor:
    return layout.positions(groups.ring_rank(), groups.ulysses_rank(), device)


def take_local(x: torch.Tensor, dim: int, outer: int, inner: int, layout: SeqLayout,
               groups: comm.Groups) -> torch.Tensor:
    dim = dim % x.dim()
    check_sequence_dim(x, dim, outer, inner, layout.seq_len, "take_local")
    y, rest = _split(x, dim, outer, inner, layout.seq_len)
    y = y.index_select(0, local_positions(layout, groups, x.device))
    return _join(y, dim, rest).contiguous()


def gather(x: torch.Tensor, dim: int, outer: int, inner: int, layout: SeqLayout,
           groups: comm.Groups, tag: str, phase: str) -> torch.Tensor:
    dim = dim % x.dim()
    check_sequence_dim(x, dim, outer, inner, layout.local_len, "gather")
    y, rest = _split(x, dim, outer, inner, layout.local_len)
    y = y.contiguous()
    if groups.ulysses > 1:
        y = comm.all_gather(y, groups.ulysses_pg(), groups.ulysses, groups.timeout, tag, phase)
    if groups.ring > 1:
        y = comm.all_gather(y, groups.ring_pg(), groups.ring, groups.timeout, tag, phase)
    y = y.index_select(0, layout.inverse_order(x.device))
    return _join(y, dim, rest).contiguous()


def all_reduce(x: torch.Tensor, groups: comm.Groups, tag: str, phase: str) -> torch.Tensor:
    """Sum over the u·r ranks of the sequence (Ulysses group, then ring group)."""
    if groups.ulysses > 1:
        x = comm.all_reduce(x, groups.ulysses_pg(), groups.ulysses, groups.timeout, tag, phase)
    if groups.ring > 1:
        x = comm.all_reduce(x, groups.ring_pg(), groups.ring, groups.timeout, tag, phase)
    return x


def seq_to_heads(x: torch.Tensor, groups: comm.Groups, tag: str, phase: str) -> torch.Tensor:
    u = groups.ulysses
    B, H, L, D = x.shape
    parts = x.reshape(B, u, H // u, L, D).transpose(0, 1)  # (u, B, H/u, L, D): part j → rank j
    got = comm.all_to_all(parts, groups.ulysses_pg(), u, groups.timeout, tag, phase)
    return got.permute(1, 2, 0, 3, 4).reshape(B, H // u, u * L, D)  # sources in rank order


def heads_to_seq(x: torch.Tensor, groups: comm.Groups, tag: str, phase: str) -> torch.Tensor:
    u = groups.ulysses
    B, h, N, D = x.shape
    L = N // u
    parts = x.reshape(B, h, u, L, D).permute(2, 0, 1, 3, 4)  # (u, B, h, L, D): tokens of rank j
    got = comm.all_to_all(parts, groups.ulysses_pg(), u, groups.timeout, tag, phase)
    return got.transpose(0, 1).reshape(B, u * h, L, D)  # head groups in rank order
