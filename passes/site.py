"""`Site`: what the passes know and decide about one attention in a captured graph.

The canonicaliser creates it (shapes, mask, causality, spelling), the lowering pass fills in the
rewrite, status and reason, the cost model the FLOP and memory estimates; the report prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SITE_META = "clusterfx_site"

# Status values, as the report prints them.
CANONICAL = "canonical"
REWRITTEN = "rewritten"
KEPT_DENSE = "kept dense"
UNSUPPORTED = "unsupported"


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
    fqn: str
    spelling: str
    q_shape: tuple = ()
    k_shape: tuple = ()
    v_shape: tuple = ()
    dtype: str = ""
    mask: str = "none"  # "none" | "boolean" | "additive"
    mask_shape: tuple = ()
    causal: bool = False
    scale: Any = None
    dropout_p: float = 0.0
    gqa_groups: int = 1
    probs_used_by: tuple[str, ...] = ()
    rewrite: str = "dense"
    policy_key: str | None = None
    status: str = CANONICAL
    reason: str = ""
    graph_index: int = 0
    node_name: str = ""
    extra: dict = field(default_factory=dict)

    def mark(self, status: str, reason: str = "", rewrite: str | None = None) -> None:
        self.status = status
        self.reason = reason
        if rewrite is not None:
            self.rewrite = rewrite
