"""Inputs the causal clustered ops answer as exact attention does: zero-size dimensions,
cluster counts larger than the sequence, and non-finite values (decided per call before any
implementation runs, in the forward and again, identically, in the backward).

1. A zero-size dimension (batch, heads, queries, keys, head dims): the answer of
   ``ops/common/degenerate.py`` (an empty output; zeros with no key; with D = 0 the mean of the
   visible values), differentiable.
2. ``clusters`` beyond max(Nq, Nk) is clamped to it: one position per cluster already gives
   exact attention, and no buffer is sized by the requested count (10**7 clusters on 16
   positions would otherwise allocate gigabytes).
3. Non-finite values. Dense attention confines a NaN or inf to the rows that see it. The
   causal ops never pool queries, but the key metric (the queries' second moment) and the
   query codebooks of i-clustered attention are computed from earlier queries, so one bad
   query would spoil every later row. So:
   - a query with a non-finite entry is replaced by 0 for everything, and its output row is
     NaN, as dense attention's (0 for a row that sees no key, as the ops give such rows);
   - keys and values at padded positions are replaced by 0 when something there is not finite
     (padding never influences a valid row);
   - a non-finite key or value at a kept position: the call runs exact attention (causal and
     key padding as the op's), which gives dense attention's rows exactly — NaN where it has
     NaN, finite where it is finite.

Rows that see no key (a left-padded query under causality, or a batch element with no kept
key) are 0, as in the op's approximate paths.

Shapes: q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv), keep (B,Nk) bool or None → (B,H,Nq,Dv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterfx.ops.common.degenerate import is_degenerate

__all__ = ["Guard", "clamp_clusters", "exact_attention", "inspect", "is_degenerate"]


def clamp_clusters(clusters, nq, nk):
    """At most one cluster per position (symbolic sizes stay symbolic, with no guard)."""
    return torch.sym_max(1, torch.sym_min(clusters, torch.sym_max(nq, nk)))


def visible(keep: Tensor | None, batch: int, nq: int, nk: int, causal: bool,
            device: torch.device) -> Tensor:
    """Which keys each query sees: (B, 1, Nq, Nk) bool."""
    see = torch.ones(batch, 1, nq, nk, dtype=torch.bool, device=device)
    if keep is not None:
        see = see & keep[:, None, None, :]
    if causal:
        see = see & torch.ones(nq, nk, dtype=torch.bool, device=device).tril()
    return see


def exact_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float,
                    causal: bool) -> Tensor:
    """Exact attention with the op's causality and key padding; 0 for rows that see no key.
    Rows with nothing visible attend to every key before being zeroed, so that no 0·NaN of
    an all-masked softmax reaches the gradients of the other rows."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if is_degenerate(q, k, v):
        if 0 in (B, H, Nq, v.shape[-1]) or Nk == 0:
            return q.new_zeros(B, H, Nq, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
        scale = 1.0  # D = 0: every score is 0
    see = visible(keep, B, Nq, Nk, causal, q.device)
    any_key = see.any(-1, keepdim=True)  # (B, 1, Nq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=see | ~any_key, scale=scale,
                                         enable_gqa=H != k.shape[1])
    return torch.where(any_key, out, torch.zeros((), dtype=out.dtype, device=out.device))


@dataclass
class Guard:
    """What one call must do about non-finite values (rule 3 of the module docstring)."""

    exact: bool = False  # a non-finite key or value at a kept position
    clean_kv: bool = False  # something non-finite at a padded key
    bad: Tensor | None = None  # (B, H, Nq) queries with a non-finite entry

    def inputs(self, q: Tensor, k: Tensor, v: Tensor,
               keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q with bad queries replaced by 0; k, v with padded positions replaced by 0 (only
        when something there is not finite). Differentiable."""
        if self.bad is not None:
            q = q.masked_fill(self.bad[..., None], 0.0)
        if self.clean_kv and keep is not None:
            drop = ~keep[:, None, :, None]
            k, v = k.masked_fill(drop, 0.0), v.masked_fill(drop, 0.0)
        return q, k, v

    def finish(self, out: Tensor, keep: Tensor | None, causal: bool) -> Tensor:
        """Rows of bad queries become NaN where they see a key (0 where they see none)."""
        if self.bad is None:
            return out
        B, _, Nq = out.shape[:3]
        nk = Nq if keep is None else keep.shape[-1]
        sees = visible(keep, B, Nq, nk, causal, out.device).any(-1)  # (B, 1, Nq)
        nan = torch.where(sees[..., None], float("nan"), 0.0).to(out.dtype)
        return torch.where(self.bad[..., None], nan, out)


def inspect(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Guard:
    """The guard of one call: three reductions over the inputs when all is finite."""
    guard = Guard()
    kv_ok = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)  # (B, Hk, Nk)
    if not bool(kv_ok.all()):
        kept = kv_ok if keep is None else kv_ok | ~keep[:, None, :]
        guard.exact = not bool(kept.all())
        guard.clean_kv = keep is not None
    finite_q = torch.isfinite(q).all(-1)
    if not bool(finite_q.all()):
        guard.bad = ~finite_q
    return guard
