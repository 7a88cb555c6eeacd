"""Patch-to-cluster attention with Triton kernels (``triton_kernels.py``).

Three launches per call, with P prefix tokens, Np = N - P patches and M clusters::

    pool:       keys[:, :, P:], values[:, :, P:] = softmax(L) · K[P:], softmax(L) · V[P:]
    attention:  out[:, :, P:] = flash(Q[P:], keys, values)     keys = [K[:P]; Kc] (P + M rows)
    attention:  out[:, :, :P] = flash(Q[:P], K, V)             only when P > 0

The (B, H, P + M, D) pooled keys and values are the only intermediates (stored in q's dtype);
the patch×cluster scores never leave the kernel. fp16, bf16, fp32 inputs; CUDA, or CPU
tensors under TRITON_INTERPRET=1.

Kernels are wrapped with ``triton.jit`` lazily, at the first launch: Triton reads
``TRITON_INTERPRET`` when a function is decorated, not when it is called.
"""

from __future__ import annotations

import functools

import torch
import triton

from clusterfx.ops.common.triton_support import check_device, interpret_enabled, launch_ctx
from clusterfx.ops.paca import triton_kernels as tk
from clusterfx.ops.paca.checks import check_triton_dtype

BLOCK_M = 16
BLOCK_N = 32


@functools.cache
def _kernels(interpret: bool):
    """``triton.jit`` of the kernels under the current TRITON_INTERPRET (cached per setting)."""
    del interpret  # only the cache key; triton.jit reads the environment itself
    return triton.jit(tk._pool_kernel), triton.jit(tk._attention_kernel)


def _launch(kernel):
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def _modes(dtype: torch.dtype, interpret: bool) -> dict:
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": interpret or dtype == torch.float32}


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _attention(kernel, q, k, v, out, scale: float, interpret: bool) -> None:
    """out = softmax(scale q kᵀ) v. Shapes (B, H, Nq|Nk, D|Dv); strided views are fine."""
    b, h, nq, d = q.shape
    grid = (triton.cdiv(nq, BLOCK_M), b * h)
    _launch(kernel)[grid](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, nq, k.shape[2], d, v.shape[-1], float(scale), **_modes(q.dtype, interpret),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block(d), BLOCK_DV=_block(v.shape[-1]))


def paca_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          logits: torch.Tensor, *, prefix: int, scale: float) -> torch.Tensor:
    """Shapes: q, k (B, H, N, D), v (B, H, N, Dv), logits (B, M, N - prefix) -> (B, H, N, Dv)."""
    check_triton_dtype(q)
    interpret = interpret_enabled()
    pool, attention = _kernels(interpret)
    device = check_device(pool, q=q, k=k, v=v, logits=logits)
    b, h, n, d = q.shape
    dv_, m = v.shape[-1], logits.shape[1]
    keys = q.new_empty(b, h, prefix + m, d)
    values = q.new_empty(b, h, prefix + m, dv_)
    out = q.new_empty(b, h, n, dv_)
    with launch_ctx(device):
        if prefix:
            keys[:, :, :prefix] = k[:, :, :prefix]
            values[:, :, :prefix] = v[:, :, :prefix]
        kp, vp = k[:, :, prefix:], v[:, :, prefix:]
        kc, vc = keys[:, :, prefix:], values[:, :, prefix:]
        _launch(pool)[(triton.cdiv(m, BLOCK_M), b * h)](
            logits, kp, vp, kc, vc, *logits.stride(), *kp.stride(), *vp.stride(),
            *kc.stride(), *vc.stride(), h, m, n - prefix, d, dv_,
            **_modes(q.dtype, interpret), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_D=_block(d), BLOCK_DV=_block(dv_))
        _attention(attention, q[:, :, prefix:], keys, values, out[:, :, prefix:], scale,
                   interpret)
        if prefix:
            _attention(attention, q[:, :, :prefix], k, v, out[:, :, :prefix], scale, interpret)
    return out
