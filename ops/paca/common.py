"""What the implementations and the backward of the PaCa family share (not a backend)."""

from __future__ import annotations

from clusterfx.ops.common.checks import compute_dtype


def default_scale(head_dim: int, scale: float | None) -> float:
    """The score scale: ``scale``, or D**-0.5 when None."""
    return head_dim ** -0.5 if scale is None else float(scale)


def flops(b: int, h: int, n: int, d: int, dv: int, m: int, prefix: int) -> int:
    """Forward FLOPs (multiply-adds count 2): pooling K and V over the patches, the patch
    queries against P + M keys, and the prefix queries against all N keys."""
    patches = n - prefix
    pool = 2 * b * h * m * patches * (d + dv)
    attend = 2 * b * h * patches * (prefix + m) * (d + dv)
    heads = 2 * b * h * prefix * n * (d + dv)
    return pool + attend + heads


__all__ = ["compute_dtype", "default_scale", "flops"]
