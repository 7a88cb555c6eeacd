"""Top-k attention with a Triton kernel for the gathered part.

Selection runs on the host: per chunk of queries, torch computes the masked scores and
``torch.topk`` picks the indices (``selection.py``, the same code as the cpu path), keeping
O(C*Nk) scores alive at a time. Sorting-based top-k inside a kernel is not worth it here: the
selection needs every score anyway. The kernel then does the gathered part for all queries::

    s_ij  = scale * <q_i, k[idx_ij]> + bias_ij        j < k, bias = gathered additive mask,
                                                      -inf for a selected key that is masked
    out_i = sum_j softmax_j(s_i)_j * v[idx_ij]        online softmax over blocks of j;
                                                      a row with no finite s_ij -> 0

one program per (block of BLOCK_M queries, batch * head), fp32 accumulation (fp64 for fp64).
It takes arbitrary per-query key indices, so it also serves gather-sparse attention whose indices
come from elsewhere (e.g. the i-clustered top-k).

The kernel is wrapped with ``triton.jit`` lazily, at the first launch: Triton reads
``TRITON_INTERPRET`` when a function is decorated, not when it is called, so decorating at import
would freeze whatever the environment said then. On CPU tensors it therefore runs whenever
TRITON_INTERPRET=1 is set before the call.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from clusterfx.ops.common.triton_support import interpret_enabled
from clusterfx.ops.topk.common import (
    chunk_scores,
    compute_dtype,
    mask_rows,
    query_chunks,
    select_topk,
)

BLOCK_M = 16  # queries per program
BLOCK_K = 16  # selected keys per online-softmax step

# tl.sum / tl.max / tl.zeros are themselves @triton.jit functions, decorated when
# triton.language is imported; if that import happened before TRITON_INTERPRET was set (torch
# and pytest plugins import triton early), the interpreter cannot call them ("Cannot call
# @triton.jit'd outside of the scope of a kernel"). The kernel therefore reduces with
# tl.reduce and triton's own combine functions, which the interpreter recognises by identity
# and runs in numpy, and which compile to the same reductions on GPU.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


def _gathered_attention_kernel(
    Q, K, V, IDX, BIAS, OUT,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sib, sih, sim, sij, sbb, sbh, sbm, sbj, sob, soh, som, sod,
    H, G, NQ, KSEL, D, DV, scale,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G  # GQA: G query heads share one kv head
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < NQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.full([BLOCK_M], 0.0, ACC)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, ACC)
    for j0 in range(0, KSEL, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (offs_j[None, :] < KSEL)  # (BLOCK_M, BLOCK_K)
        idx = tl.load(IDX + b * sib + h * sih + offs_m[:, None] * sim + offs_j[None, :] * sij,
                      mask=ok, other=0)
        bias = tl.load(BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_j[None, :] * sbj,
                       mask=ok, other=float("-inf")).to(ACC)
        k_ptr = K + b * skb + hk * skh + idx[:, :, None] * skn + offs_d[None, None, :] * skd
        k_sel = tl.load(k_ptr, mask=ok[:, :, None] & (offs_d[None, None, :] < D),
                        other=0.0).to(ACC)  # (BLOCK_M, BLOCK_K, BLOCK_D)
        s = tl.reduce(q[:, None, :] * k_sel, 2, _SUM) * scale + bias
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        # A row with no finite score yet keeps m = -inf; subtract 0 instead so exp gives 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v_ptr = V + b * svb + hk * svh + idx[:, :, None] * svn + offs_dv[None, None, :] * svd
        v_sel = tl.load(v_ptr, mask=ok[:, :, None] & (offs_dv[None, None, :] < DV),
                        other=0.0).to(ACC)  # (BLOCK_M, BLOCK_K, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.reduce(p[:, :, None] * v_sel, 1, _SUM)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@functools.cache
def _kernel(interpret: bool):
    """``triton.jit`` of the kernel under the current TRITON_INTERPRET (cached per setting)."""
    del interpret  # only the cache key; triton.jit reads the environment itself
    return triton.jit(_gathered_attention_kernel)


def _launcher(kernel):
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def gathered_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              idx: torch.Tensor, bias: torch.Tensor, scale: float
                              ) -> torch.Tensor:
    """Softmax-weighted sum of the V rows picked by ``idx``, scores recomputed from q and k.

    Shapes: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), idx int (B, H, Nq, k),
    bias (B, H, Nq, k) float (-inf = excluded) -> (B, H, Nq, Dv) in q's dtype.
    """
    b, h, nq, d = q.shape
    dv_ = v.shape[-1]
    out = q.new_empty(b, h, nq, dv_)
    acc = tl.float64 if compute_dtype(q.dtype) == torch.float64 else tl.float32
    grid = (triton.cdiv(nq, BLOCK_M), b * h)
    _launcher(_kernel(interpret_enabled()))[grid](
        q, k, v, idx, bias, out,
        *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *bias.stride(), *out.stride(),
        h, h // k.shape[1], nq, idx.shape[-1], d, dv_, float(scale),
        ACC=acc, BLOCK_M=BLOCK_M, BLOCK_K=min(BLOCK_K, triton.next_power_of_2(idx.shape[-1])),
        BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv_),
    )
    return out


def topk_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int,
                          attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                          scale: float, chunk_size: int = 256) -> torch.Tensor:
    """Host-side chunked selection, then one launch of the gathered kernel.

    Shapes: as ``topk_attention_cpu``: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv),
    attn_mask None or rank 4 -> (B, H, Nq, Dv). Extra memory: O(C*Nk) scores per chunk plus the
    (B, H, Nq, k) indices and biases.
    """
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    work = compute_dtype(q.dtype)
    k_c = k.to(work)
    ksel = min(topk, nk)
    idx = torch.empty(b, h, nq, ksel, dtype=torch.int32, device=q.device)
    bias = torch.empty(b, h, nq, ksel, dtype=work, device=q.device)
    for start, end in query_chunks(nq, chunk_size):
        scores = chunk_scores(q, k_c, attn_mask, start, end, is_causal, scale)
        values, chosen = select_topk(scores, topk)
        del scores
        idx[:, :, start:end] = chosen
        m = mask_rows(attn_mask, start, end)
        if m is None or m.dtype == torch.bool:
            picked = torch.zeros_like(values)
        else:  # the additive mask at the selected keys; the kernel re-adds it to q.k
            picked = m.to(work).expand(b, h, end - start, nk).gather(-1, chosen)
        bias[:, :, start:end] = torch.where(values == float("-inf"), values, picked)
    return gathered_attention_triton(q, k, v, idx, bias, scale)
