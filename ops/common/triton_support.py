"""Launch support for the Triton implementations (imported only by them): one device check
and one launch context, and whether kernels run in Triton's CPU interpreter."""

from __future__ import annotations

import contextlib

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


def interpret_enabled() -> bool:
    """True when Triton would run kernels decorated now in its CPU interpreter."""
    return bool(triton.knobs.runtime.interpret)


def check_device(kernel, **tensors: torch.Tensor | None) -> torch.device:
    """The one device of the given tensors (None entries skipped); CUDA unless ``kernel`` runs
    in the interpreter (it was decorated with TRITON_INTERPRET=1)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    device = next(iter(devices.values()))
    if any(d != device for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if device.type != "cuda" and not isinstance(kernel, InterpretedFunction):
        raise ValueError(
            f"Triton kernels need CUDA tensors, got {device}; set TRITON_INTERPRET=1 before "
            "importing triton to run them on CPU")
    return device


def launch_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
