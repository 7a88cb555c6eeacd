"""Input limits shared by the benchmarks: refuse, before any work, a size whose tensors
cannot fit in the device's memory (a ValueError the CLI turns into exit 2)."""

from __future__ import annotations

import os

import torch

_TENSORS = 8  # q, k, v, out, and their gradients: what one fwd+bwd pass holds at least


def device_memory(device: str) -> int | None:
    """Bytes of memory of `device` ("cpu": physical RAM), or None when unknown."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_sizes(sizes: list[int], batch: int, heads: int, dim: int, dtype: str,
                device: str) -> None:
    """Each N in `sizes` must leave q, k, v, out (and gradients) of (B, H, N, D) in memory."""
    memory = device_memory(device)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    for n in sizes:
        need = _TENSORS * batch * heads * n * dim * itemsize
        if memory is not None and need > memory:
            raise ValueError(
                f"--sizes {n}: its attention tensors (B={batch}, H={heads}, N={n}, D={dim}, "
                f"{dtype}) need at least {need / 2**30:.1f} GiB, more than the "
                f"{memory / 2**30:.1f} GiB of {device} memory; use a smaller N")
