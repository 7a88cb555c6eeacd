"""Which implementation of an op runs: ``impl`` resolution, once for every family.

"auto" picks "triton" on CUDA and "cpu" elsewhere. An explicit choice never falls back: an
``impl`` that cannot run raises, naming what is missing.

Families with fused C++ kernels (``native``, see ``ops/common/native.py``) accept
``NATIVE_IMPLS``: "cpu" is then the fused kernels (CPU tensors only) and "torch" the vectorised
torch code (any device). "auto" on CPU runs the fused kernels, or — only when they cannot be
built or loaded here — "torch", with one warning; the op's telemetry records the one that ran.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .checks import IMPLS, check_impl

_WARNED: set[str] = set()


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device, impls: tuple[str, ...] = IMPLS,
                 native=None) -> str:
    """Map ``impl`` to the implementation that will run on ``device``.

    ``impls``: the names the family accepts; ``native``: the family's ``native.Library`` when it
    has fused CPU kernels (then "cpu" means them).
    """
    check_impl(impl, impls)
    if impl == "auto":
        if device.type == "cuda":
            return "triton"
        if native is not None and not native.available():
            if native.name not in _WARNED:
                _WARNED.add(native.name)
                from .native import unavailable_message

                warnings.warn(f"impl='auto' runs the vectorised torch path (impl='torch') for "
                              f"'{native.name}': {unavailable_message(native)}", stacklevel=3)
            return "torch"
        return "cpu"
    if impl == "cpu" and native is not None:
        if device.type != "cpu":
            raise RuntimeError(f"impl='cpu' runs the fused CPU kernels and needs CPU tensors "
                               f"(inputs are on {device}); use impl='torch', 'triton' or 'auto'")
        if not native.available():
            from .native import unavailable_message

            raise RuntimeError(f"impl='cpu': {unavailable_message(native)}")
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("impl='triton' needs the triton package, which is not "
                               "installed; pass impl='cpu' or 'reference'")
        if device.type != "cuda" and not interpreter_requested():
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (inputs are on "
                f"{device}); use impl='cpu', 'reference' or 'auto'")
    return impl
