"""The collectives of sequence parallelism, on torch.distributed process groups (NCCL on GPUs,
gloo on CPU), each bounded in time and counted.

Every collective is issued asynchronously and waited for with the groups' `timeout`: a peer
that failed or never arrives ends this rank with a `SequenceParallelTimeout` naming the
collective, the site and the ranks, instead of a hang.

Traffic: `traffic[tag]` counts, per site tag, the calls and the bytes this rank put on the
wire per collective and phase ("fwd"/"bwd"), under the bandwidth-optimal algorithms:
all-to-all sends (g-1)/g of its input, an all-gather (g-1) times its local part, an
all-reduce 2(g-1)/g of its input, a ring hop the whole tensor (g: the group size).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

traffic: defaultdict[str, Counter[str]] = defaultdict(Counter)


class SequenceParallelTimeout(RuntimeError):
    """A collective did not complete in time: a peer failed or never arrived.

    Once raised, the process ends with exit status 1 when the interpreter exits: a process
    group with an unfinished collective would otherwise block the exit until the peer comes
    back (with torchrun, the launcher then stops the other ranks)."""


_exit_armed = [False]


def _exit_hard_at_exit() -> None:
    """Arm (once) an atexit hook that ends the process instead of letting the process
    group's teardown wait for a peer that never comes."""
    if _exit_armed[0]:
        return
    _exit_armed[0] = True

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(leave)


@dataclass(frozen=True)
class Groups:
    """The process groups one sequence is spread over, by name (as custom-op arguments must
    be primitives): `ulysses_group` ("" when u = 1) and `ring_group` ("" when r = 1)."""

    ulysses: int
    ring: int
    ulysses_group: str
    ring_group: str
    timeout: float

    def to_args(self) -> tuple:
        return (self.ulysses, self.ring, self.ulysses_group, self.ring_group, self.timeout)

    @classmethod
    def from_args(cls, *args) -> Groups:
        return cls(*args)

    def ulysses_pg(self):
        return resolve(self.ulysses_group)

    def ring_pg(self):
        return resolve(self.ring_group)

    def ulysses_rank(self) -> int:
        return dist.get_rank(self.ulysses_pg()) if self.ulysses > 1 else 0

    def ring_rank(self) -> int:
        return dist.get_rank(self.ring_pg()) if self.ring > 1 else 0


def resolve(name: str):
    """The process group registered under `name` (c10d's group names)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _ranks(pg) -> list[int]:
    return dist.get_process_group_ranks(pg)


def _wait(work, what: str, tag: str, pg, timeout: float) -> None:
    try:
        ok = work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        _exit_hard_at_exit()
        raise SequenceParallelTimeout(
            f"sequence parallel: {what} at site {tag or '?'} over ranks {_ranks(pg)} failed "
            f"within {timeout:g}s (a peer failed or never arrived): {exc}") from None
    if ok is False:
        _exit_hard_at_exit()
        raise SequenceParallelTimeout(
            f"sequence parallel: {what} at site {tag or '?'} over ranks {_ranks(pg)} did not "
            f"complete within {timeout:g}s (a peer failed or never arrived)")


def count(tag: str, what: str, phase: str, nbytes: int) -> None:
    key = f"{what}.{phase}"
    traffic[tag][key + ".calls"] += 1
    traffic[tag][key + ".bytes"] += int(nbytes)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all(x: torch.Tensor, pg, size: int, timeout: float, tag: str,
               phase: str) -> torch.Tensor:
    """`all_to_all_single` on dim 0 (equal splits): part j of x goes to group rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x, group=pg, async_op=True)
    _wait(work, "all_to_all", tag, pg, timeout)
    count(tag, "all_to_all", phase, _bytes(x) * (size - 1) // size)
    return out


def all_gather(x: torch.Tensor, pg, size: int, timeout: float, tag: str,
               phase: str) -> torch.Tensor:
    """Concatenate the group's `x` along dim 0, in group-rank order."""
    x = x.contiguous()
    out = x.new_empty(size * x.shape[0], *x.shape[1:])
    work = dist.all_gather_into_tensor(out, x, group=pg, async_op=True)
    _wait(work, "all_gather", tag, pg, timeout)
    count(tag, "all_gather", phase, _bytes(x) * (size - 1))
    return out


def all_reduce(x: torch.Tensor, pg, size: int, timeout: float, tag: str,
               phase: str, op: str = "sum") -> torch.Tensor:
    """Sum (``op="sum"``) or maximum (``op="max"``) over the group (a new tensor)."""
    out = x.contiguous().clone()
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    work = dist.all_reduce(out, op=reduce_op, group=pg, async_op=True)
    _wait(work, "all_reduce", tag, pg, timeout)
    count(tag, "all_reduce", phase, 2 * _bytes(x) * (size - 1) // size)
    return out


class RingShift:
    """Send tensors to the next ring rank and receive the previous rank's, asynchronously:
    `start(tensors)` posts the exchange, `finish()` waits and returns the received ones.

    The compute of a ring step runs between the two, overlapping the transfer."""

    def __init__(self, pg, size: int, timeout: float, tag: str, phase: str, what: str):
        me = dist.get_rank(pg)
        self.pg, self.timeout, self.tag, self.phase, self.what = pg, timeout, tag, phase, what
        self.next = dist.get_global_rank(pg, (me + 1) % size)
        self.prev = dist.get_global_rank(pg, (me - 1) % size)
        self.works: list = []
        self.received: list[torch.Tensor] = []

    def start(self, tensors: list[torch.Tensor]) -> None:
        ops = []
        self.received = []
        for t in tensors:
            t = t.contiguous()
            buf = torch.empty_like(t)
            ops.append(dist.P2POp(dist.isend, t, self.next, group=self.pg))
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, group=self.pg))
            self.received.append(buf)
            count(self.tag, self.what, self.phase, _bytes(t))
        self.works = dist.batch_isend_irecv(ops)

    def finish(self) -> list[torch.Tensor]:
        for work in self.works:
            _wait(work, f"ring exchange of {self.what}", self.tag, self.pg, self.timeout)
        self.works = []
        return self.received
