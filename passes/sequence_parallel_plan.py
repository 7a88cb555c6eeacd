"""The pieces of the sequence-parallel pass: finding the sites and the sequence inputs, the
node builder for the sequence-parallel ops, the per-site rewrite, and what each site's report
says (`SequenceParallelRecord`: mode, reason, and every collective with its bytes per step).

Bytes per step are those this rank sends, from the site's global shapes (see
`ops.sequence_parallel.common.comm` for the per-collective convention): Ulysses (u-1)/u of
each of q, k, v, out (and again backward); a ring (r-1) hops of K and V forward, again
backward, plus r hops of dK, dV in the compute dtype; the key mask's all-gathers.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from clusterfx.config.parallel import ResolvedMesh
from clusterfx.ops import sequence_parallel as sp
from clusterfx.ops.common.checks import compute_dtype
from clusterfx.passes.analysis.sequence_shards import Shard, Unsupported, gshape, gval
from clusterfx.passes.sequence_parallel_sites import SITE_OPS, AttentionOp
from clusterfx.passes.site import SITE_META, Site


class GraphDecline(Exception):
    """The whole graph cannot be sharded: it runs unsharded, every site with this reason."""


@dataclass(frozen=True)
class Collective:
    """One collective a site issues per step: what, over which group, when, bytes sent."""

    name: str
    group: str  # "ulysses" | "ring" | "sequence"
    phase: str  # "fwd" | "bwd"
    count: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.name}x{self.count} {self.group} {self.phase} {_human(self.bytes)}B"


@dataclass
class SequenceParallelRecord:
    """What the sequence-parallel pass did at one site.

    mode: "ulysses" | "ring" | "usp" (both) | "gathered" (ran on the gathered sequence, with
    the reason) | "whole" (its inputs were not sharded) | "unsharded" (the graph declined)."""

    mode: str
    reason: str = ""
    collectives: list[Collective] = field(default_factory=list)
    tag: str = ""
    kv_replication: int = 1
    # causal over a ring: unmasked (query, key) pairs per head each ring rank computes
    ring_work: list[int] = field(default_factory=list)
    detail: str = ""  # what the site's op runs there (e.g. global or local clustering)

    @property
    def imbalance(self) -> float:
        """Most over least causal work of the ring ranks (1.0 = balanced)."""
        return max(self.ring_work) / min(self.ring_work) if self.ring_work else 1.0

    def bytes_per_step(self, phase: str | None = None) -> int:
        return sum(c.bytes for c in self.collectives if phase in (None, c.phase))

    def summary(self) -> str:
        if not self.collectives:
            return self.mode
        rep = f", kv heads x{self.kv_replication}" if self.kv_replication > 1 else ""
        work = ""
        if self.ring_work:
            work = (f", causal work per ring rank {self.ring_work} ("
                    + ("balanced" if self.imbalance == 1.0 else
                       f"imbalance {self.imbalance:.2f}x: use load_balance='zigzag'") + ")")
        detail = f" [{self.detail}]" if self.detail else ""
        return (f"{self.mode}{rep}{detail}: {_human(self.bytes_per_step('fwd'))}B fwd + "
                f"{_human(self.bytes_per_step('bwd'))}B bwd per step{work}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "detail": self.detail,
                "kv_replication": self.kv_replication,
                "ring_work": self.ring_work,
                "collectives": [c.__dict__ for c in self.collectives],
                "bytes_fwd": self.bytes_per_step("fwd"), "bytes_bwd": self.bytes_per_step("bwd")}


@dataclass(frozen=True)
class Outside:
    """A collective (or local slice) the pass inserted outside the attention sites."""

    what: str
    node: str
    collective: str
    why: str


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


# ------------------------------------------------------------------------ finding things

def find_site_ops(graph: fx.Graph) -> dict[fx.Node, Site]:
    """The op node of each lowered site this pass knows (`SITE_OPS`)."""
    found = {}
    for node in graph.nodes:
        site = node.meta.get(SITE_META)
        if site is None:
            continue
        op = node
        if node.op == "call_function" and node.target is operator.getitem:
            op = node.args[0]
        if isinstance(op, fx.Node) and op.op == "call_function" and op.target in SITE_OPS:
            found[op] = site
    return found


def sequence_length(site_ops: dict[fx.Node, Site]) -> int | None:
    """S: the most common (then largest) length of the self-attention sites."""
    lengths = Counter()
    for op in site_ops:
        q, k = gshape(op.args[0]), gshape(op.args[1])
        if len(q) == 4 and len(k) == 4 and q[2] == k[2] and isinstance(q[2], int):
            lengths[q[2]] += 1
    if not lengths:
        return None
    return max(lengths, key=lambda n: (lengths[n], n))


def _input_name(node: fx.Node) -> str:
    name = node.name
    name = name[2:] if name[:2].lower() == "l_" else name
    return name[:-1] if name.endswith("_") else name


def _is_state(node: fx.Node, value: Any) -> bool:
    return isinstance(value, torch.nn.Parameter) or "_parameters_" in node.name or (
        "_buffers_" in node.name)


def sequence_inputs(graph: fx.Graph, concrete: dict, seq_len: int,
                    named: tuple[tuple[str, int], ...] | None) -> dict[fx.Node, int]:
    """{input placeholder: its sequence dim}. By default every model input (not a parameter
    or buffer) with exactly one dim of size S; ValueError when one has several (name it)."""
    wanted = dict(named or ())
    found: dict[fx.Node, int] = {}
    names = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = concrete.get(node, gval(node))
        if not isinstance(value, torch.Tensor) or _is_state(node, value):
            continue
        name = _input_name(node)
        names.append(name)
        match = next((n for n in wanted if name in (n, f"kwargs_{n}")), None)
        if wanted:
            if match is None:
                continue
            dim = wanted[match] % value.dim()
            if value.shape[dim] != seq_len:
                raise ValueError(f"sequence input {match!r}: dim {wanted[match]} of shape "
                                 f"{tuple(value.shape)} is not the sequence length {seq_len}")
            found[node] = dim
            continue
        dims = [d for d, n in enumerate(value.shape) if n == seq_len]
        if len(dims) > 1:
            raise ValueError(f"input {name!r} of shape {tuple(value.shape)} has several dims of "
                             f"the sequence length {seq_len}; name its sequence dim: "
                             f"SequenceParallel(sequence_inputs={{{name!r}: dim}})")
        if dims:
            found[node] = dims[0]
    missing = [n for n in wanted if not any(x in (n, f"kwargs_{n}") for x in names)]
    if missing:
        raise ValueError(f"sequence_inputs {missing} are not inputs of the graph; its inputs "
                         f"are {names}")
    return found


# ------------------------------------------------------------------------------- builder

class Builder:
    """Inserts the sequence-parallel ops at the graph's insertion point, with the global
    example value of what they stand for in `meta["sp_global"]` (the pass's rules read the
    single-process shapes; every example value is recomputed at the local shapes at the end)."""

    def __init__(self, graph: fx.Graph, layout: sp.SeqLayout, mesh: ResolvedMesh, tag: str):
        self.graph, self.layout, self.mesh = graph, layout, mesh
        self.groups = sp.Groups(mesh.ulysses, mesh.ring, mesh.ulysses_group, mesh.ring_group,
                                mesh.timeout)
        self.mesh_args = (layout.seq_len, layout.zigzag, *self.groups.to_args())
        self.impl = mesh.impl
        self.base_tag = tag
        self.tag = tag

    def call(self, target: Any, args: tuple, like: Any = None, method: bool = False) -> fx.Node:
        node = (self.graph.call_method if method else self.graph.call_function)(target, args)
        if like is not None:
            node.meta["sp_global"] = like
            node.meta["example_value"] = like
        return node

    def take_local(self, x: fx.Node, s: Shard, tag: str) -> fx.Node:
        return self.call(torch.ops.clusterfx.sp_take_local.default,
                         (x, s.dim, s.outer, s.inner, *self.mesh_args, self._tag(tag)),
                         like=gval(x))

    def gather(self, x: fx.Node, s: Shard, tag: str) -> fx.Node:
        return self.call(torch.ops.clusterfx.sp_gather.default,
                         (x, s.dim, s.outer, s.inner, *self.mesh_args, self._tag(tag), "fwd"),
                         like=gval(x))

    def grad_sync(self, x: fx.Node) -> fx.Node:
        return self.call(sp.grad_sync, (x, *self.mesh_args, self._tag("graph")), like=gval(x))

    def all_to_all(self, x: fx.Node, to_heads: bool, like: Any) -> fx.Node:
        return self.call(torch.ops.clusterfx.sp_all_to_all.default,
                         (x, to_heads, *self.mesh_args, self.tag, "fwd"), like=like)

    def _tag(self, name: str) -> str:
        return f"{self.base_tag}-{name}"

    def global_shape(self, node: Any) -> tuple:
        return gshape(node)


# ----------------------------------------------------------------------------- the sites

def rewrite_site(rw, node: fx.Node, site: Site, number: int):
    """Rewrite one site op; (record, new output node or None, its shard)."""
    op: AttentionOp = SITE_OPS[node.target]
    b: Builder = rw.builder
    q, k, v, mask = op.operands(node)
    shards = [rw.cx.shard(x) for x in (q, k, v)]
    if all(s is None for s in shards) and rw.cx.shard(mask) is None:
        return SequenceParallelRecord("whole", "its inputs do not depend on the sequence"), \
            None, None
    b.tag = b._tag(f"site{number}")
    try:
        _check_site(rw, node, op, q, k, v, mask, shards, site)
    except Unsupported as why:
        first = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        rw._run_gathered(node, str(why), first[0] if op.tuple_output and first else None)
        for user in node.users if op.tuple_output else ():
            rw.cx.shards.setdefault(user, None)
        return SequenceParallelRecord("gathered", f"runs on the gathered sequence: {why}"), \
            None, None
    return _rewrite(rw, node, op, q, k, v, mask)


def _check_site(rw, node, op, q, k, v, mask, shards, site: Site) -> None:
    if any(s != Shard(2) for s in shards):
        raise Unsupported("q, k, v are not (B, H, S, D) tensors sharded along S")
    qs, ks = gshape(q), gshape(k)
    if len(qs) != 4 or qs[2] != rw.seq_len or ks[2] != rw.seq_len or ks[0] != qs[0]:
        raise Unsupported(f"q {qs} / k {ks} are not self-attention over the sequence")
    if op.tuple_output and any(
            user.users for user in node.users
            if not (user.target is operator.getitem and user.args[1] == 0)):
        raise Unsupported("outputs other than the attention are used")
    try:
        sp.check_heads(qs[1], ks[1], rw.mesh.ulysses)
    except ValueError as exc:
        raise ValueError(f"site {site.fqn or '<root>'}: {exc}") from None
    if mask is not None:
        m = gval(mask)
        if not isinstance(m, torch.Tensor):
            raise Unsupported("a mask that is not a tensor")
        if m.requires_grad:
            raise Unsupported("the mask requires grad (a learned bias)")
        if m.dim() >= 3 and m.shape[-3] > 1:
            raise Unsupported(f"the mask varies over {m.shape[-3]} heads")
        if m.shape[-1] != rw.seq_len or (m.dim() >= 2 and m.shape[-2] not in (1, rw.seq_len)):
            raise Unsupported(f"mask {tuple(m.shape)} is not over the sequence's positions")
    if rw.mesh.ring > 1:
        if op.ring is None:
            raise Unsupported(op.no_ring)
        op.ring_check(node)


def _rewrite(rw, node: fx.Node, op: AttentionOp, q, k, v, mask):
    b: Builder = rw.builder
    u, r = rw.mesh.ulysses, rw.mesh.ring
    qs, ks, vs = gshape(q), gshape(k), gshape(v)
    rep = sp.kv_replication(ks[1], u)
    out_global = gval(node)[0] if op.tuple_output else gval(node)
    outputs = [x for x in node.users if x.target is operator.getitem and x.args[1] == 0] \
        if op.tuple_output else [node]
    dtype = gval(q).dtype
    with rw.graph.inserting_before(node):
        full_mask = None if mask is None or rw.cx.shard(mask) is None else rw._gather(
            mask, "the attention mask, over all key positions")
        full_mask = mask if full_mask is None else full_mask
        if rep > 1:
            k = b.call("repeat_interleave", (k, rep, 1), like=gval(k), method=True)
            v = b.call("repeat_interleave", (v, rep, 1), like=gval(v), method=True)
        if u > 1:
            q, k, v = (b.all_to_all(x, True, gval(x)) for x in (q, k, v))
        result = None
        if r > 1:
            result = op.ring(b, node, q, k, v, full_mask)
        elif u > 1:
            result = op.ulysses(b, node, q, k, v, full_mask)
        replaced = result is not None
        if replaced:
            result.meta["sp_global"] = out_global
    if not replaced:
        op.set_operands(node, q, k, v, full_mask)
        result = node
        if op.tuple_output:
            with rw.graph.inserting_after(node):
                result = b.call(operator.getitem, (node, 0), like=out_global)
    final = result
    if u > 1:
        with rw.graph.inserting_after(result):
            final = b.all_to_all(result, False, out_global)
    for old in outputs:
        if old is result:
            old.replace_all_uses_with(final, delete_user_cb=lambda user: user is not final)
        else:
            old.replace_all_uses_with(final)
            rw.dead.add(old)
    if replaced:
        rw.dead.add(node)
        rw.dead.update(node.users)
    mode = "usp" if u > 1 and r > 1 else "ulysses" if u > 1 else "ring"
    item, cd = itemsizes(dtype)
    own = result.meta.get("sp_collectives") if replaced else None  # replaces the K/V ring
    planned = volumes(qs, ks, vs, rep, u, r if own is None else 1, rw.layout.local_len,
                      rw.seq_len, item, cd)
    if own is not None:
        planned += [Collective(*c) for c in own]
    elif r > 1:
        planned += [Collective(*c) for c in op.ring_volumes(
            node, qs[0], ks[1] * rep // u, qs[3], r, rw.seq_len)]
    record = SequenceParallelRecord(mode, "", planned, b.tag, rep,
                                    detail=result.meta.get("sp_detail", "") if replaced else "")
    if r > 1 and op.causal(node):
        record.ring_work = [rw.layout.causal_pairs(i) for i in range(r)]
    return record, final, Shard(2)


def volumes(qs, ks, vs, rep, u, r, L, S, itemsize, cd_size) -> list[Collective]:
    """The collectives of one site per step and the bytes this rank sends (module doc)."""
    B, H, _, D = qs
    Hk, Dv = ks[1] * rep, vs[3]
    out: list[Collective] = []
    if u > 1:
        per = (u - 1) * B * L * (H * D + Hk * D + Hk * Dv + H * Dv) * itemsize // u
        for phase in ("fwd", "bwd"):
            out.append(Collective("all_to_all", "ulysses", phase, 4, per))
    if r > 1:
        block = B * (Hk // u) * (S // r)
        kv = (r - 1) * block * (D + Dv) * itemsize
        out.append(Collective("ring k,v", "ring", "fwd", 2 * (r - 1), kv))
        out.append(Collective("ring k,v", "ring", "bwd", 2 * (r - 1), kv))
        out.append(Collective("ring dk,dv", "ring", "bwd", 2 * r, r * block * (D + Dv) * cd_size))
    return out


def itemsizes(dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of an element of `dtype` and of its compute dtype."""
    return (torch.empty((), dtype=dtype).element_size(),
            torch.empty((), dtype=compute_dtype(dtype)).element_size())
