"""Argument validation for the causal clustered-attention ops (ValueError naming the value and
what is accepted, before any work). Shape/dtype checks read metadata only, so they also run on
fake tensors while tracing."""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import (
    check_impl,
    check_int,
    check_key_value_attention,
    check_positive_int,
)

__all__ = ["check_block", "check_choice_values", "check_choices", "check_impl", "check_inputs",
           "check_topk"]


def check_inputs(q, k, v, key_padding_mask, scale, causal) -> None:
    """q (B,H,Nq,D), k (B,Hk,Nk,D), v (B,Hk,Nk,Dv) of one float dtype and device (any size
    may be 0: guard.py answers them as exact attention does), H a multiple of Hk,
    key_padding_mask None or bool (B,Nk), scale None or finite, and Nq == Nk when ``causal``
    (self-attention: query i and key i are the same position)."""
    if not isinstance(causal, bool):
        raise ValueError(f"causal ({causal!r}) must be a bool")
    check_key_value_attention(q, k, v, key_padding_mask, scale)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal=True is self-attention: Nq ({q.shape[2]}) must equal Nk "
                         f"({k.shape[2]}); use causal=False for keys every query may see")


def check_block(block) -> None:
    check_positive_int("block", block)


def check_topk(topk) -> None:
    """0 (clustered) or a positive int (i-clustered)."""
    check_int("topk", topk, 0)


def check_choices(key_assign, query_assign, topk_idx, q, k, clusters, block, causal) -> None:
    """The discrete choices of one call: key assignments (B,Hk,E,Nk) (E: one per epoch when
    causal, else 1), query assignments (B,H,Nq), top-k indices (B,H,ceil(Nq/block),clusters,k)
    with -1 for "none", all int64."""
    check_positive_int("clusters", clusters)
    check_block(block)
    B, H, Nq = q.shape[:3]
    nb = (Nq + block - 1) // block
    epochs = (nb - 1).bit_length() + 1 if causal else 1
    for name, t, shape in (("key_assign", key_assign, (B, k.shape[1], epochs, k.shape[2])),
                           ("query_assign", query_assign, (B, H, Nq))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or (
            topk_idx.dim() != 5 or tuple(topk_idx.shape[:4]) != (B, H, nb, clusters)):
        got = tuple(topk_idx.shape) if isinstance(topk_idx, torch.Tensor) else topk_idx
        raise ValueError(f"topk_idx {got} must be int64 of shape (B, H, ceil(Nq/block), "
                         f"clusters, k) = ({B}, {H}, {nb}, {clusters}, k)")


def check_choice_values(key_assign, query_assign, topk_idx, clusters, nk) -> None:
    """Assignments lie in [0, clusters); top-k entries are -1 or distinct keys in [0, Nk)
    (reads the data: eager only)."""
    for name, t in (("key_assign", key_assign), ("query_assign", query_assign)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= clusters):
            raise ValueError(f"{name} holds values in [{int(t.min())}, {int(t.max())}]; "
                             f"expected [0, {clusters})")
    if topk_idx.numel():
        if int(topk_idx.min()) < -1 or int(topk_idx.max()) >= nk:
            raise ValueError(f"topk_idx holds values in [{int(topk_idx.min())}, "
                             f"{int(topk_idx.max())}]; expected -1 (none) or [0, {nk})")
        s = topk_idx.sort(-1).values
        if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
            raise ValueError("topk_idx repeats a key within one (block, cluster) row; the "
                             "selected keys of a row must be distinct")
