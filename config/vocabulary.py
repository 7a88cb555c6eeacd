"""The words every layer uses for what happened to an attention site, and the errors users see.

- `Status`: what a site's report row says (a `str` enum, so it compares equal to its text).
- `Decline`: raised by a pass or a lowering that cannot apply to one site; the message is the
  reason. The site stays as it was (dense, or as written) and the report shows the reason.
- `PolicyError`: a user-facing error for a policy that cannot be honoured under `strict=True`.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """What became of one attention site."""

    CANONICAL = "canonical"  # found and canonicalised; not lowered yet (transform stop_after)
    REWRITTEN = "rewritten"  # the policy's rewrite is in the graph
    # rewritten, but on the inputs seen its approximate path never ran (the op chose exact
    # attention every call: the mask was not key padding)
    RUNS_EXACT = "rewritten, runs exact"
    KEPT_DENSE = "kept dense"  # the policy chose exact attention (Dense or None)
    DECLINED = "declined"  # the policy's rewrite cannot apply here; exact attention, with why
    UNSUPPORTED = "unsupported"  # attention-shaped but not readable exactly; left as written

    def __str__(self) -> str:
        return self.value


class Decline(Exception):
    """A rewrite (or a reading of a spelling) that does not apply to one site: the message is
    the reason, shown in the report."""


class PolicyError(ValueError):
    """Raised under `strict=True` when a policy entry cannot be honoured."""


__all__ = ["Decline", "PolicyError", "Status"]
