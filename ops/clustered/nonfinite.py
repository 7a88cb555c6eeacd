"""Non-finite values and padded positions in clustered attention: what reaches the clustering
and the centroids, decided per call before any implementation runs (so the reference, the
vectorised CPU path and any fused kernel behind `from_assignments` all keep it).

Dense attention confines a NaN or inf to the rows it touches: a non-finite query gives a NaN
row, a non-finite key or value at a kept position gives NaN rows (or, for an infinite key,
finite rows where its score is -inf), and a masked key changes nothing — except a NaN *value*
at a masked key, which SDPA multiplies by weight 0 into NaN. Clustering pools queries, so one
bad query would poison its whole cluster (and, through the hash's centring, every cluster).
The rules here (documented in the README, tested in tests/ops/test_nonfinite.py):

1. keys and values at masked positions are replaced by 0: padding never influences anything;
2. a non-finite key or value at a kept position: the call runs exact attention (path
   "exact: non-finite keys or values"), which gives exactly dense attention's rows, NaN
   where it has NaN and finite where it is finite;
3. a query with a non-finite entry — and, in self-attention (Nq = Nk) with key padding and
   fewer clusters than queries, a query at a padded position — is *excluded*: replaced by 0
   for the clustering (so its value cannot influence any other row) and put in a spare cluster
   of its own (id C, so it is in no valid centroid). A non-finite query's output row is NaN,
   as dense attention's is (0 when its batch element has no kept key); a padded query's row is
   the spare centroid's (padded rows are not used by a model). With C = Nq nothing is pooled
   and padded queries are clustered like the others, so that C = Nq stays exact attention.

Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), keep (B, Nk) bool or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Guard:
    """What one call must do about non-finite values and padding (see the module docstring)."""

    exact: bool = False  # rule 2: a non-finite key/value at a kept position
    clean_kv: bool = False  # rule 1: something non-finite at a masked key
    excluded: Tensor | None = None  # rule 3: (B, H, Nq) queries kept out of the clustering
    bad: Tensor | None = None  # (B, H, Nq) queries with a non-finite entry

    def queries(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """(q for the clustering: excluded queries replaced by 0; q for the attention:
        non-finite queries replaced by 0, padded ones kept — i-clustered attends with each
        query's own vector, and the spare cluster keeps them out of every valid centroid)."""
        if self.excluded is None:
            return q, q
        attend = q if self.bad is None else q.masked_fill(self.bad[..., None], 0.0)
        return q.masked_fill(self.excluded[..., None], 0.0), attend

    def keys_values(self, k: Tensor, v: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """k, v with the masked positions replaced by 0 (only when something there is bad)."""
        if not self.clean_kv or keep is None:
            return k, v
        drop = ~keep[:, None, :, None]
        return k.masked_fill(drop, 0.0), v.masked_fill(drop, 0.0)

    def assign(self, assignments: Tensor, clusters: int) -> Tensor:
        """Excluded queries go to the spare cluster `clusters`."""
        if self.excluded is None:
            return assignments
        return assignments.masked_fill(self.excluded, clusters)

    def finish(self, out: Tensor, keep: Tensor | None) -> Tensor:
        """Rows of non-finite queries become NaN (0 where the batch element has no kept key)."""
        if self.bad is None:
            return out
        nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
        if keep is not None:
            has_key = keep.any(-1)[:, None, None, None]
            nan = torch.where(has_key, nan, torch.zeros((), dtype=out.dtype, device=out.device))
        return torch.where(self.bad[..., None], nan, out)


def inspect(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None,
            pooled: bool = True) -> Guard:
    """The guard of one call: three reductions over the inputs when all is finite.
    `pooled`: fewer clusters than queries (with one cluster per query nothing is pooled, and
    padded queries stay in the clustering, so that C = Nq remains exact attention)."""
    guard = Guard()
    kv_ok = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)  # (B, Hk, Nk)
    if not bool(kv_ok.all()):
        kept = kv_ok if keep is None else kv_ok | ~keep[:, None, :]
        guard.exact = not bool(kept.all())
        guard.clean_kv = keep is not None
    finite_q = torch.isfinite(q).all(-1)  # (B, H, Nq)
    excluded = None
    if not bool(finite_q.all()):
        guard.bad = ~finite_q
        excluded = guard.bad
    if pooled and keep is not None and q.shape[2] == k.shape[2] and not bool(keep.all()):
        padded = ~keep[:, None, :].expand(q.shape[:3])
        excluded = padded if excluded is None else excluded | padded
    guard.excluded = excluded
    return guard
