"""Argument validation shared by every op family.

Every check raises ``ValueError`` naming the offending value and what would be accepted, before
any work is done (STYLE principle 6). The checks read shapes, dtypes and Python scalars only,
never tensor data, so they are safe on fake tensors while tracing.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("auto", "reference", "cpu", "triton")
# Families with fused C++ CPU kernels: "cpu" is the fused kernels, "torch" the vectorised torch
# code they replaced (kept for comparison, and as what "auto" runs when the kernels are missing).
NATIVE_IMPLS = ("auto", "reference", "cpu", "torch", "triton")
MAX_BITS = 63
SEED_LIMIT = 2**63  # seeds travel through int64 op arguments


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: both a TypeError and a ValueError, so a caller catching
    either (as the op schemas and the CLI do) sees it."""


def is_int(value) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1) -> None:
    """``value`` must be a Python int ≥ ``minimum`` (``bool`` is rejected): a wrong type raises
    ``ArgumentTypeError``, a value out of range ``ValueError``."""
    what = "a positive int (>= 1)" if minimum == 1 else f"an int >= {minimum}"
    if not is_int(value):
        raise ArgumentTypeError(f"{name} ({value!r}) must be {what}, not "
                                f"{type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} ({value!r}) must be {what}")


def check_positive_int(name: str, value) -> None:
    check_int(name, value, 1)


def check_bits(bits) -> None:
    """Hash codes live in an int64, so 1..63 bits (the sign bit stays clear)."""
    if not is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits ({bits!r}) must be an integer in 1..{MAX_BITS}")


def check_seed(seed) -> None:
    """A seed is an int in [0, 2**63), or -1 for "draw from torch's global RNG"."""
    if not is_int(seed) or not -1 <= seed < SEED_LIMIT:
        raise ValueError(f"seed ({seed!r}) must be an integer in [0, 2**63), or -1 for "
                         f"torch's global RNG")


def check_impl(impl, impls: tuple[str, ...] = IMPLS) -> None:
    """``impl`` is one of ``impls`` (a family's accepted implementation names)."""
    if impl not in impls:
        raise ValueError(f"impl ({impl!r}) must be one of {impls}")


def check_scale(scale, positive: bool = False) -> None:
    """None (= D**-0.5) or a finite number (and > 0 when ``positive``)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat)) or (
            not math.isfinite(scale)) or (positive and scale <= 0):
        what = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"scale ({scale!r}) must be {what} or None (= D**-0.5)")


def check_float(name: str, t, min_rank: int, exact_rank: bool = False) -> None:
    """``t`` is a floating tensor of a supported dtype and rank (≥ ``min_rank``, or exactly)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype ({t.dtype}) is not supported; expected one of "
                         f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    if (t.dim() != min_rank) if exact_rank else (t.dim() < min_rank):
        want = f"exactly {min_rank}" if exact_rank else f"at least {min_rank}"
        raise ValueError(f"{name} has rank {t.dim()} (shape {tuple(t.shape)}); expected {want}")


def check_valid(valid, shape, what: str = "valid") -> None:
    """``valid`` is ``None`` or a bool tensor with exactly ``shape`` (True = keep)."""
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"{what} ({got}) must be a bool tensor (True = keep)")
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(valid.shape)}; expected {tuple(shape)}")


def check_same(what: str, q, k, v) -> None:
    """q, k, v share one dtype and one device."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes ({q.dtype}, {k.dtype}, {v.dtype}) must be the same")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v devices ({q.device}, {k.device}, {v.device}) must match")


def compute_dtype(t: torch.Tensor | torch.dtype) -> torch.dtype:
    """The working precision of an op: float64 for float64 inputs, float32 otherwise (fp16 and
    bf16 accumulate in fp32)."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_key_value_attention(q, k, v, key_padding_mask, scale) -> None:
    """q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv) of one float dtype and device (any size may
    be 0: the ops answer zero-size dims as exact attention does), H a multiple of Hk,
    key_padding_mask None or bool (B,Nk) on q's device, scale None or a finite number."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, 4, exact_rank=True)
    check_same("q, k, v", q, k, v)
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes of q, k, v ({B}, {k.shape[0]}, {v.shape[0]}) must match")
    if k.shape[-1] != D:
        raise ValueError(f"head dim of k ({k.shape[-1]}) must equal that of q ({D})")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share (Hk, Nk)")
    Hk = k.shape[1]
    if (Hk == 0 and H != 0) or (Hk > 0 and H % Hk != 0):
        raise ValueError(f"heads of q ({H}) must be a multiple of the heads of k/v ({Hk})")
    check_valid(key_padding_mask, (B, k.shape[2]), "key_padding_mask")
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    check_scale(scale)
