"""Which implementation of an op runs: ``impl`` resolution, once for every family.

"auto" picks "triton" on CUDA and "cpu" elsewhere. An explicit choice never falls back: an
``impl`` that cannot run raises, naming what is missing.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .checks import check_impl


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to the implementation that will run on ``device``."""
    check_impl(impl)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("impl='triton' needs the triton package, which is not "
                               "installed; pass impl='cpu' or 'reference'")
        if device.type != "cuda" and not interpreter_requested():
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (inputs are on "
                f"{device}); use impl='cpu', 'reference' or 'auto'")
    return impl
