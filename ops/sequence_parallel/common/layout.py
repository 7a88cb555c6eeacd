"""Where the tokens of one sequence live when it is spread over u·r ranks (USP layout).

The ranks sharing a sequence form a u × r grid: Ulysses rank j ∈ [0, u) (group-local rank in
the Ulysses group), ring rank i ∈ [0, r) (group-local rank in the ring group). The sequence of
S tokens is cut into r *ring blocks*, one per ring rank, and each ring block into u equal
parts, one per Ulysses rank, so every rank holds L = S/(u·r) tokens::

    none:    ring block i = tokens [i·S/r, (i+1)·S/r)
    zigzag:  S cut into 2r chunks of c = S/(2r); ring block i = chunk i ++ chunk 2r-1-i
    rank (i, j) holds part j of ring block i (contiguous within the block)

After the Ulysses all-to-all (sequence ↔ heads) a rank holds its whole ring block for H/u
heads. Zigzag pairs an early chunk with a late one, so under a causal mask every ring rank
sees the same number of (query, key) pairs: 2r·c² + c pairs per ring block (u = 1).

"Layout order" is the order of all-gathering the local shards over the Ulysses group and
then the ring group: ring block 0, ring block 1, ...; `order()` maps it to token positions.

Shapes: positions are int64 tensors of token indices in [0, S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOAD_BALANCES = ("zigzag", "none")


@dataclass(frozen=True)
class SeqLayout:
    """S tokens over `ulysses` × `ring` ranks; `zigzag` pairs chunks i and 2r-1-i."""

    seq_len: int
    ulysses: int
    ring: int
    zigzag: bool

    def __post_init__(self) -> None:
        for name in ("seq_len", "ulysses", "ring"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an int >= 1")
        if self.seq_len % self.multiple:
            raise ValueError(self.divisibility_message(self.seq_len))

    @property
    def degree(self) -> int:
        """Ranks per sequence, u·r."""
        return self.ulysses * self.ring

    @property
    def multiple(self) -> int:
        """S must be a multiple of this: u·r, or 2·u·r with zigzag over a ring."""
        return self.degree * (2 if self.zigzag and self.ring > 1 else 1)

    def divisibility_message(self, seq_len: int) -> str:
        why = (f"2·ulysses·ring = 2·{self.ulysses}·{self.ring} (zigzag)"
               if self.multiple != self.degree else
               f"ulysses·ring = {self.ulysses}·{self.ring}")
        return (f"sequence length ({seq_len}) must be divisible by {why} = {self.multiple}; "
                f"pad the sequence to a multiple of {self.multiple} (with a key padding mask)")

    @property
    def local_len(self) -> int:
        """L = S/(u·r) tokens per rank."""
        return self.seq_len // self.degree

    @property
    def block_len(self) -> int:
        """S/r tokens per ring block."""
        return self.seq_len // self.ring

    def chunks(self, ring_rank: int) -> list[tuple[int, int]]:
        """The contiguous [start, stop) token ranges of ring block `ring_rank`, in order."""
        r, S = self.ring, self.seq_len
        if self.zigzag and r > 1:
            c = S // (2 * r)
            i = ring_rank
            return [(i * c, (i + 1) * c), ((2 * r - 1 - i) * c, (2 * r - i) * c)]
        return [(ring_rank * S // r, (ring_rank + 1) * S // r)]

    def block_positions(self, ring_rank: int, device=None) -> torch.Tensor:
        """Token positions of ring block `ring_rank`, (S/r,)."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.chunks(ring_rank)])

    def positions(self, ring_rank: int, ulysses_rank: int, device=None) -> torch.Tensor:
        """Token positions held by rank (ring_rank, ulysses_rank), (L,)."""
        L = self.local_len
        return self.block_positions(ring_rank, device)[ulysses_rank * L:(ulysses_rank + 1) * L]

    def order(self, device=None) -> torch.Tensor:
        """Token position of each slot in layout order (ring blocks one after another), (S,)."""
        return torch.cat([self.block_positions(i, device) for i in range(self.ring)])

    def inverse_order(self, device=None) -> torch.Tensor:
        """Slot in layout order of each token position, (S,): `x_layout[inv] = x_tokens`."""
        return torch.argsort(self.order(device))

    def causal_pairs(self, ring_rank: int) -> int:
        """Unmasked (query, key) pairs of one head over ring block `ring_rank` under a causal
        mask (what that ring rank computes per head, summed over the ring steps)."""
        total = 0
        for a, b in self.chunks(ring_rank):
            n = b - a
            total += n * a + n * (n + 1) // 2  # all earlier keys, plus the triangle
        return total


def check_load_balance(name: str) -> None:
    if name not in LOAD_BALANCES:
        raise ValueError(f"load_balance ({name!r}) must be one of {LOAD_BALANCES}")
