"""The sequence-parallel spec: how a compiled model's attention is spread over processes.

`SequenceParallel(ulysses=u, ring=r)` describes USP over the default process group: u·r ranks
per sequence (times `data_parallel` replicas = the world size). Ulysses groups are contiguous
ranks, ring groups strided (USP's layout), so the all-to-all stays inside the fastest links.
It is plain data (no torch.distributed here); the compiler resolves it against the process
group (into a `ResolvedMesh`: group names and degrees), and it hashes into the compile cache
key.

`sequence_inputs` names the model inputs that carry the sequence, with their sequence dim
(`{"input_ids": 1, "labels": 1}`), when finding them by size is ambiguous; by default every
input with exactly one dim of the attention's sequence length is sharded along it.
`timeout`: seconds any collective may take before every rank ends with an error.
`impl`: the ring blocks' implementation ("auto", "cpu", "reference").
`ring_clustering`: how clustered attention (`Clustered` policies) is spread over the mesh:

- "global" (the default): the queries of the whole sequence (all S positions, all H heads)
  are clustered exactly as one process clusters them with the same seed — every rank draws
  the hyperplanes and k-means choices of the whole sequence and keeps its part, and each Lloyd
  round all-reduces per-cluster votes (or sums) and counts over the ring; the C centroids,
  identical on every ring rank, attend to each rank's *local* keys and the ring merges them by
  log-sum-exp with all-reduces. K/V never rotate: a layer sends O(C·(D + Dv)) numbers per head
  (plus O(iterations·C·bits) for the clustering) instead of (r-1) hops of the whole K and V,
  and the result equals single-process clustered attention. Hence the default.
- "local": each ring rank clusters only its own block's queries (r·C clusters in all) and the
  centroids attend to all keys by ring attention (K/V rotate); equal to one process only given
  the same assignments. Kept for comparison and for runs recorded with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

LOAD_BALANCES = ("zigzag", "none")
IMPLS = ("auto", "cpu", "reference")
RING_CLUSTERINGS = ("global", "local")


def _inputs(value: Any) -> tuple[tuple[str, int], ...] | None:
    """`{name: dim}` (or pairs) as a sorted tuple; ValueError naming what is accepted."""
    if value is None:
        return None
    pairs = list(value.items()) if isinstance(value, dict) else list(value)
    ok = all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
             and isinstance(p[1], int) and not isinstance(p[1], bool) for p in pairs)
    if not ok or not pairs:
        raise ValueError(f"SequenceParallel: sequence_inputs ({value!r}) must be a non-empty "
                         f"dict {{input name: sequence dim}}, e.g. {{'input_ids': 1}}")
    return tuple(sorted((str(n), int(d)) for n, d in pairs))


def _degree(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SequenceParallel: {name} ({value!r}) must be an int >= 1")


@dataclass(frozen=True)
class SequenceParallel:
    """Ulysses degree × ring degree ranks per sequence; `data_parallel` replicas of that."""

    ulysses: int = 1
    ring: int = 1
    load_balance: str = "zigzag"
    gather_output: bool = True
    data_parallel: int = 1
    sequence_inputs: Any = None  # {name: dim}; stored as a sorted tuple of (name, dim)
    timeout: float = 300.0
    impl: str = "auto"
    ring_clustering: str = "global"

    def __post_init__(self) -> None:
        _degree("ulysses", self.ulysses)
        _degree("ring", self.ring)
        _degree("data_parallel", self.data_parallel)
        if self.load_balance not in LOAD_BALANCES:
            raise ValueError(f"SequenceParallel: load_balance ({self.load_balance!r}) must be "
                             f"one of {LOAD_BALANCES}")
        if not isinstance(self.gather_output, bool):
            raise ValueError(f"SequenceParallel: gather_output ({self.gather_output!r}) must "
                             f"be a bool")
        object.__setattr__(self, "sequence_inputs", _inputs(self.sequence_inputs))
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or (
                not 0 < self.timeout < float("inf")):
            raise ValueError(f"SequenceParallel: timeout ({self.timeout!r}) must be a positive "
                             f"number of seconds")
        object.__setattr__(self, "timeout", float(self.timeout))
        if self.impl not in IMPLS:
            raise ValueError(f"SequenceParallel: impl ({self.impl!r}) must be one of {IMPLS}")
        if self.ring_clustering not in RING_CLUSTERINGS:
            raise ValueError(f"SequenceParallel: ring_clustering ({self.ring_clustering!r}) "
                             f"must be one of {RING_CLUSTERINGS}")

    @property
    def sequence_degree(self) -> int:
        """Ranks that share one sequence (u·r)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence_degree * self.data_parallel

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.sequence_inputs is not None:
            d["sequence_inputs"] = dict(self.sequence_inputs)
        return {"type": "sequence_parallel", **d}

    def cache_key(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ResolvedMesh:
    """A mesh resolved against the running process group: what the sequence-parallel pass
    needs, by value. Group names are c10d's (`ProcessGroup.group_name`); "" for a degree of 1.
    `ranks` lists the global ranks sharing this rank's sequence in (ring, ulysses) order."""

    ulysses: int
    ring: int
    ulysses_group: str
    ring_group: str
    load_balance: str = "zigzag"
    gather_output: bool = True
    sequence_inputs: tuple[tuple[str, int], ...] | None = None
    timeout: float = 300.0
    impl: str = "auto"
    ranks: tuple[int, ...] = ()
    world_size: int = 1
    ring_clustering: str = "global"

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def zigzag(self) -> bool:
        return self.load_balance == "zigzag"

    def describe(self) -> str:
        return (f"ulysses={self.ulysses} x ring={self.ring} over ranks {list(self.ranks)} "
                f"(load_balance={self.load_balance}, ring_clustering={self.ring_clustering})")


__all__ = ["IMPLS", "LOAD_BALANCES", "RING_CLUSTERINGS", "ResolvedMesh", "SequenceParallel"]
