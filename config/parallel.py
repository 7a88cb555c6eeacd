"""The sequence-parallel spec: how a compiled model's attention is spread over processes.

`SequenceParallel(ulysses=u, ring=r)` describes USP over the default process group: u·r ranks
per sequence (times `data_parallel` replicas = the world size). Ulysses groups are contiguous
ranks, ring groups strided (USP's layout), so the all-to-all stays inside the fastest links.
It is plain data (no torch.distributed here); the compiler resolves it against the process
group, and it hashes into the compile cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

LOAD_BALANCES = ("zigzag", "none")


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

    @property
    def sequence_degree(self) -> int:
        """Ranks that share one sequence (u·r)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence_degree * self.data_parallel

    def to_dict(self) -> dict[str, Any]:
        return {"type": "sequence_parallel", **dataclasses.asdict(self)}

    def cache_key(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["LOAD_BALANCES", "SequenceParallel"]
