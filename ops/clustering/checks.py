"""Argument validation shared by the clustering and clustered-attention op families.

Every check raises ``ValueError`` naming the offending value and what would be accepted, and runs
before any work is done (STYLE principle 6). The checks read shapes, dtypes and Python scalars
only, never tensor data, so they are safe to call on fake tensors while tracing.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("auto", "reference", "cpu", "triton")
MAX_BITS = 63


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    """``value`` must be a Python int ≥ 1 (``bool`` is rejected)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive integer (>= 1)")


def check_refine(refine) -> None:
    """Lloyd refinement steps: a Python int ≥ 0 (``bool`` is rejected)."""
    if not _is_int(refine) or refine < 0:
        raise ValueError(f"refine ({refine!r}) must be an int >= 0")


def check_bits(bits) -> None:
    """Hash codes live in an int64, so 1..63 bits (the sign bit stays clear)."""
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits ({bits!r}) must be an integer in 1..{MAX_BITS}")


def check_seed(seed) -> None:
    """A seed is an int ≥ 0, or -1 for "draw from torch's global RNG"."""
    if not _is_int(seed) or seed < -1:
        raise ValueError(f"seed ({seed!r}) must be an integer >= 0, or -1 for torch's global RNG")


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl ({impl!r}) must be one of {IMPLS}")


def check_float(name: str, t: torch.Tensor, min_rank: int, exact_rank: bool = False) -> None:
    """``t`` is a floating tensor of a supported dtype and rank (≥ ``min_rank``, or exactly)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype ({t.dtype}) is not supported; expected one of "
                         f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    if (t.dim() != min_rank) if exact_rank else (t.dim() < min_rank):
        want = f"exactly {min_rank}" if exact_rank else f"at least {min_rank}"
        raise ValueError(f"{name} has rank {t.dim()} (shape {tuple(t.shape)}); expected {want}")


def check_hashes(hashes: torch.Tensor) -> None:
    if not isinstance(hashes, torch.Tensor) or hashes.dtype != torch.int64 or hashes.dim() < 1:
        got = f"{hashes.dtype}, rank {hashes.dim()}" if isinstance(hashes, torch.Tensor) else hashes
        raise ValueError(f"hashes ({got}) must be an int64 tensor of shape (..., N)")


def check_valid(valid: torch.Tensor | None, shape: torch.Size, what: str = "valid") -> None:
    """``valid`` is ``None`` or a bool tensor with exactly ``shape`` (True = keep)."""
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"{what} ({got}) must be a bool tensor (True = keep)")
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(valid.shape)}; expected {tuple(shape)}")


def check_planes(planes: torch.Tensor, dim: int) -> None:
    if not isinstance(planes, torch.Tensor) or planes.dim() != 2 or planes.shape[1] != dim + 1:
        got = tuple(planes.shape) if isinstance(planes, torch.Tensor) else planes
        raise ValueError(f"planes ({got}) must have shape (bits, {dim + 1}) for inputs of "
                         f"dim {dim}")
    check_bits(planes.shape[0])
    if not planes.is_floating_point():
        raise ValueError(f"planes.dtype ({planes.dtype}) must be floating point")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to a backend: "auto" → "triton" on CUDA, else "cpu".

    An explicit choice never falls back: "triton" on a CPU tensor needs ``TRITON_INTERPRET=1``.
    """
    check_impl(impl)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (inputs are on {device}); "
            "use impl='cpu', 'reference' or 'auto'")
    return impl
