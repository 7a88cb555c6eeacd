"""Triton kernels of patch-to-cluster attention (plain functions: ``triton.py`` decorates them
with ``triton.jit`` at the first launch, so that TRITON_INTERPRET set after import applies).

    _pool_kernel:      Kc[m] = Σ_n softmax_n(L[m, :])_n K[P + n],  Vc[m] likewise
                       online softmax over blocks of patches, exactly as flash attention with
                       the scores read from L instead of computed; one program per (block of
                       BLOCK_M clusters, batch·head); each head re-reads L (cheap: M·Np).
    _attention_kernel: O[i] = Σ_j softmax_j(scale q_i·k_j)_j v_j   flash-attention forward, one
                       program per (block of BLOCK_M queries, batch·head); serves the patch
                       queries against the P + M pooled keys and the prefix queries against
                       all N keys.

Numerics: fp32 statistics and accumulators. fp32 operands use ieee dot products (never tf32);
on fp16/bf16 the probabilities are rounded to the value dtype before P·V, as FlashAttention
does. In the interpreter, operands are upcast to fp32 (it multiplies bf16 as raw integers).
Reductions use ``tl.reduce`` with triton's own combine functions: tl.sum / tl.max are
themselves jit functions, decorated when triton.language is imported, which the interpreter
cannot call if that happened before TRITON_INTERPRET was set.
"""

from __future__ import annotations

import triton.language as tl

_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


def _pool_kernel(
    L, K, V, KC, VC,
    s_lb, s_lm, s_ln,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_cb, s_ch, s_cm, s_cd,
    s_wb, s_wh, s_wm, s_wd,
    H, M, NP, D, DV,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < M
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc_k = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    acc_v = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for n0 in range(0, NP, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NP
        s = tl.load(L + b * s_lb + rows[:, None] * s_lm + cols[None, :] * s_ln,
                    mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: avoid inf - inf
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        kb = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kn + dk[None, :] * s_kd,
                     mask=col_ok[:, None] & (dk < D)[None, :], other=0.0)
        vb = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dv[None, :] * s_vd,
                     mask=col_ok[:, None] & (dv < DV)[None, :], other=0.0)
        if UPCAST:
            acc_k = tl.dot(p, kb.to(tl.float32), acc_k * alpha[:, None], input_precision="ieee")
            acc_v = tl.dot(p, vb.to(tl.float32), acc_v * alpha[:, None], input_precision="ieee")
        else:
            acc_k = tl.dot(p.to(kb.dtype), kb, acc_k * alpha[:, None],
                           input_precision=PRECISION)
            acc_v = tl.dot(p.to(vb.dtype), vb, acc_v * alpha[:, None],
                           input_precision=PRECISION)
        m_i = m_new
    norm = tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(KC + b * s_cb + h * s_ch + rows[:, None] * s_cm + dk[None, :] * s_cd,
             (acc_k / norm).to(KC.dtype.element_ty), mask=row_ok[:, None] & (dk < D)[None, :])
    tl.store(VC + b * s_wb + h * s_wh + rows[:, None] * s_wm + dv[None, :] * s_wd,
             (acc_v / norm).to(VC.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])


def _attention_kernel(
    Q, K, V, OUT,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    H, NQ, NK, D, DV, scale,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < NQ
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + dq[None, :] * s_qd,
                mask=row_ok[:, None] & (dq < D)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        kt = tl.load(K + b * s_kb + h * s_kh + cols[None, :] * s_kn + dq[:, None] * s_kd,
                     mask=col_ok[None, :] & (dq < D)[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        vb = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dv[None, :] * s_vd,
                     mask=col_ok[:, None] & (dv < DV)[None, :], other=0.0)
        zero = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        if UPCAST:
            s = tl.dot(q, kt.to(tl.float32), zero, input_precision="ieee") * scale
        else:
            s = tl.dot(q, kt, zero, input_precision=PRECISION) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if UPCAST:
            acc = tl.dot(p, vb.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + rows[:, None] * s_om + dv[None, :] * s_od,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
