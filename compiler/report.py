"""`Report`: one row per attention site: what was found, what was done, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from clusterfx.config.vocabulary import Status
from clusterfx.passes.lowerings.causal_clustered import RUNNABLE_KINDS
from clusterfx.passes.site import Site

_COLUMNS = ("fqn", "spelling", "shapes", "mask", "causal", "rewrite", "status", "flops",
            "memory", "ran", "reason")


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _human(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


@dataclass
class Row:
    site: Site
    # which path the rewritten op took at run time, and how often (approximate, or exact below
    # `min_length` / for a mask that is not key padding), with the implementation that ran
    paths: dict[str, int] = field(default_factory=dict)
    # sequence parallelism: what this rank's collectives of the site sent, as counted at run
    # time ("<collective>.<phase>.bytes" / ".calls", "pairs": unmasked (q, k) pairs computed)
    traffic: dict[str, int] = field(default_factory=dict)

    @property
    def sequence_parallel(self) -> Any:
        """The site's SequenceParallelRecord (mode, collectives, planned bytes), or None."""
        return self.site.sequence_parallel

    def measured_bytes_per_step(self, phase: str) -> float | None:
        """Bytes this rank sent per step in `phase`, from the run-time counts (None before a
        run): the totals divided by the number of steps the first collective counts."""
        record = self.sequence_parallel
        if record is None or not record.collectives or not self.traffic:
            return None
        first = record.collectives[0]
        key = first.name.removeprefix("ring ")  # "all_to_all", "k,v", "all_reduce"
        calls = self.traffic.get(f"{key}.fwd.calls", 0)
        if not calls:
            return None
        steps = calls / first.count
        total = sum(v for k, v in self.traffic.items() if k.endswith(f".{phase}.bytes"))
        return total / steps

    @property
    def fqn(self) -> str:
        return self.site.fqn

    @property
    def spelling(self) -> str:
        return self.site.spelling

    @property
    def rewrite(self) -> str:
        return self.site.rewrite

    @property
    def exact_only(self) -> str:
        """Why a rewritten site's approximate path never ran on the inputs seen ("" if it
        did, or may): every call took the exact path for its mask, or (before any call) the
        mask at the observed inputs is not key padding."""
        if self.site.status is not Status.REWRITTEN:
            return ""
        if self.paths:
            if all(p.startswith("exact: mask") for p in self.paths):
                return "the approximate path never ran on the inputs seen: " + ", ".join(
                    f"{p} x{n}" for p, n in self.paths.items())
            return ""
        if self.site.mask_observed and self.site.mask_kind not in RUNNABLE_KINDS:
            return (f"at the observed inputs the mask is {self.site.mask_kind}, neither key "
                    f"padding nor causal: the op runs exact attention for such inputs")
        return ""

    @property
    def status(self) -> Status:
        return Status.RUNS_EXACT if self.exact_only else self.site.status

    @property
    def reason(self) -> str:
        why = self.exact_only
        return "; ".join(r for r in (self.site.reason, why) if r)

    def costs(self) -> dict[str, Any]:
        """Symbolic FLOPs/bytes before and after, and their values at the observed shapes."""
        out: dict[str, Any] = {}
        for when, cost in (("before", self.site.cost_before), ("after", self.site.cost_after)):
            if cost is None:
                continue
            flops, memory = cost.at(self.site.hints)
            out[f"flops_{when}"] = sympy.simplify(cost.flops)
            out[f"memory_{when}"] = sympy.simplify(cost.memory)
            out[f"flops_{when}_value"] = flops
            out[f"memory_{when}_value"] = memory
        return out

    def to_dict(self) -> dict[str, Any]:
        s = self.site
        costs = {k: (str(v) if isinstance(v, sympy.Basic) else v)
                 for k, v in self.costs().items()}
        return {
            "fqn": s.fqn, "spelling": s.spelling, "q_shape": [str(d) for d in s.q_shape],
            "k_shape": [str(d) for d in s.k_shape], "v_shape": [str(d) for d in s.v_shape],
            "dtype": s.dtype, "mask": s.mask, "causal": s.causal, "scale": _jsonable(s.scale),
            "dropout_p": s.dropout_p, "gqa_groups": s.gqa_groups, "rewrite": s.rewrite,
            "policy_key": s.policy_key, "status": self.status.value, "reason": self.reason,
            "mask_kind": s.mask_kind, "mask_observed": s.mask_observed,
            "causal_queries": s.causal_queries, "causal_why": s.causal_why,
            "probs_used_by": list(s.probs_used_by), "graph": s.graph_index,
            "config": None if s.config is None else s.config.to_dict(),
            "paths": self.paths, "min_length": s.min_length, "crossover": s.crossover, **costs,
            **({"sequence_parallel": {**s.sequence_parallel.to_dict(), "traffic": self.traffic}}
               if s.sequence_parallel is not None else {}),
        }

    def cells(self) -> list[str]:
        s = self.site
        c = self.costs()
        flops = memory = "-"
        if "flops_before_value" in c:
            flops = f"{_human(c['flops_before_value'])} -> {_human(c['flops_after_value'])}"
            memory = (f"{_human(c['memory_before_value'])}B -> "
                      f"{_human(c['memory_after_value'])}B")
        shapes = f"q{_fmt_shape(s.q_shape)} k{_fmt_shape(s.k_shape)}"
        mask = s.mask + (f"{_fmt_shape(s.mask_shape)}" if s.mask != "none" else "")
        if s.mask_kind:
            mask += f" {s.mask_kind}" + (" (observed)" if s.mask_observed else "")
        causal = "yes" if s.causal else ("queries" if s.causal_queries else "no")
        ran = ", ".join(f"{path} x{n}" for path, n in self.paths.items())
        cells = [s.fqn or "<root>", s.spelling, shapes, mask, causal,
                 s.rewrite, self.status.value, flops, memory, ran, self.reason]
        if s.sequence_parallel is not None:
            record = s.sequence_parallel
            text = record.summary()
            measured = self.measured_bytes_per_step("fwd")
            if measured is not None:
                text += (f" (ran: {_human(measured)}B fwd + "
                         f"{_human(self.measured_bytes_per_step('bwd'))}B bwd)")
            if record.reason:
                text += f"; {record.reason}"
            cells.append(text)
        return cells


def _jsonable(x: Any) -> Any:
    return x if isinstance(x, (int, float, str, type(None))) else str(x)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)
    graphs: int = 0
    compiles: int = 0
    pass_seconds: float = 0.0
    policy: dict[str, Any] = field(default_factory=dict)
    calls: int = 0  # calls of the compiled model (0 for transform / the named backend)
    # why (part of) a call ran uncompiled, dense and unreported -> number of calls
    capture_problems: dict[str, int] = field(default_factory=dict)
    # with a mesh: {"mesh": description, "seq_len": S, "outside": [what, node, collective,
    # why] the pass inserted outside the attention sites, "traffic": their run-time counts}
    sequence_parallel: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]

    def _columns(self) -> list[str]:
        sp = any(r.site.sequence_parallel is not None for r in self.rows)
        return list(_COLUMNS) + (["parallel"] if sp else [])

    def _table(self) -> list[list[str]]:
        columns = self._columns()
        return [columns] + [r.cells() + [""] * (len(columns) - len(r.cells()))
                            for r in self.rows]

    def __str__(self) -> str:
        table = self._table()
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(self._footer())
        return "\n".join(lines)

    def _footer(self) -> str:
        text = (f"{len(self.rows)} attention site(s) in {self.graphs} graph(s), "
                f"{self.compiles} compile(s); passes took {self.pass_seconds * 1e3:.1f} ms")
        if self.unmatched_keys:
            text += f"\npolicy keys that matched no site: {', '.join(self.unmatched_keys)}"
        for cause, n in self.capture_problems.items():
            text += f"\nNOT CAPTURED in {n} of {self.calls} call(s): {cause}"
        sp = self.sequence_parallel
        if sp:
            text += f"\nsequence parallel: {sp['mesh']}, sequence length {sp['seq_len']}"
            groups: dict[tuple[str, str], list[str]] = {}
            for what, node, collective, why in sp["outside"]:
                groups.setdefault((what, collective), []).append(
                    node if what == "gradient sum" else f"{node} ({why})")
            for (what, collective), nodes in groups.items():
                shown = ", ".join(nodes[:3]) + (f", ... ({len(nodes)} in all)"
                                                if len(nodes) > 3 else "")
                text += f"\n  {what}: {collective} at {shown}"
            sent = {k: v for k, v in sp.get("traffic", {}).items() if k.endswith("bytes")}
            if sent:
                text += "\n  outside the sites, sent so far: " + ", ".join(
                    f"{k[:-6]} {_human(v)}B" for k, v in sorted(sent.items()))
        return text

    def to_markdown(self) -> str:
        table = self._table()
        esc = [[cell.replace("|", "\\|") for cell in row] for row in table]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
        lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
        return "\n".join(lines) + "\n\n" + self._footer() + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [r.to_dict() for r in self.rows], "unmatched_keys": self.unmatched_keys,
                "graphs": self.graphs, "compiles": self.compiles,
                "pass_seconds": self.pass_seconds, "policy": self.policy, "calls": self.calls,
                "capture_problems": self.capture_problems,
                **({"sequence_parallel": self.sequence_parallel}
                   if self.sequence_parallel else {})}


def sequence_parallel_traffic(tag: str) -> dict[str, int]:
    """Run-time counts of the sequence-parallel collectives issued under `tag` (this rank)."""
    from clusterfx.ops.sequence_parallel import traffic

    return dict(traffic.get(tag, {}))


def sequence_parallel_summary(records: list, mesh: Any) -> dict[str, Any] | None:
    """The report's sequence-parallel section from the pass results of the graphs."""
    if mesh is None:
        return None
    outside, seq_lens, tags = [], set(), set()
    for rec in records:
        for result in rec.results:
            if hasattr(result, "outside"):
                outside += [(o.what, o.node, o.collective, o.why) for o in result.outside]
                if result.seq_len:
                    seq_lens.add(result.seq_len)
                if result.tag:
                    tags.add(result.tag)
    traffic: dict[str, int] = {}
    for tag in tags:
        for key, value in sequence_parallel_traffic(tag).items():
            traffic[key] = traffic.get(key, 0) + value
    return {"mesh": mesh.describe(), "seq_len": sorted(seq_lens) or None,
            "outside": outside, "traffic": traffic}
