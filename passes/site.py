"""`Site`: what the passes know and decide about one attention in a captured graph.

The canonicaliser creates it (shapes, mask, causality, spelling), the lowering pass fills in the
rewrite, status, reason, effective config and cost estimates; the report prints it. Every field
is typed: there is no free-form dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from clusterfx.config.configs import AttentionConfig
from clusterfx.config.vocabulary import Status

if TYPE_CHECKING:
    from clusterfx.passes.cost_model import Cost

SITE_META = "clusterfx_site"


def shape_of(val: Any) -> tuple:
    """Shape with symbolic dims as their sympy expressions (`s0`), static dims as ints."""
    if not isinstance(val, torch.Tensor):
        return ()
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in val.shape)


def hints_of(*vals: Any) -> dict:
    """{symbol: observed value} for the symbolic dims of the given tensors."""
    hints = {}
    for val in vals:
        if isinstance(val, torch.Tensor):
            for d in val.shape:
                if isinstance(d, torch.SymInt) and d.node.hint is not None:
                    for sym in d.node.expr.free_symbols:
                        hint = d.node.shape_env.backed_var_to_val.get(sym)
                        if hint is not None:
                            hints[sym] = int(hint)
    return hints


@dataclass
class Site:
    """One attention site. Shapes are q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv), with
    symbolic dims as sympy expressions and `hints` their observed values."""

    fqn: str
    spelling: str
    q_shape: tuple = ()
    k_shape: tuple = ()
    v_shape: tuple = ()
    hints: dict = field(default_factory=dict)
    dtype: str = ""
    mask: str = "none"  # "none" | "boolean" | "additive"
    mask_shape: tuple = ()
    causal: bool = False
    scale: Any = None
    dropout_p: float = 0.0
    gqa_groups: int = 1
    # "" (no mask) | "key padding" | "causal" | "causal + key padding" | "general" | "bias"
    # (passes/analysis/causality.py); `mask_observed`: read off the observed inputs only (the
    # mask depends on an input), not known for every input
    mask_kind: str = ""
    mask_observed: bool = False
    # the query stream is causal (a decoder): a rewrite must never pool queries across
    # positions; `causal_why` says how it was found
    causal_queries: bool = False
    causal_why: str = ""
    probs_used_by: tuple[str, ...] = ()
    graph_index: int = 0
    node_name: str = ""
    # filled by the lowering pass
    rewrite: str = "dense"
    policy_key: str | None = None
    status: Status = Status.CANONICAL
    reason: str = ""
    config: AttentionConfig | None = None  # what runs at the observed shapes (None: exact)
    cost_before: Cost | None = None
    cost_after: Cost | None = None
    min_length: int | None = None  # keys below which the rewritten op runs exact attention
    crossover: int | None = None  # Auto: the cost model's crossover length
    runtime_tag: str | None = None  # the telemetry name of the site's op (run-time paths)
    # filled by the sequence-parallel pass (a SequenceParallelRecord): mode, collectives, bytes
    sequence_parallel: Any = None

    def mark(self, status: Status, reason: str = "", rewrite: str | None = None) -> None:
        self.status = status
        self.reason = reason
        if rewrite is not None:
            self.rewrite = rewrite
