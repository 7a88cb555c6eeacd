"""Triton backend of the clustered-attention ops.

    centroid_attention:    out_j = Σ_l softmax_l(qc_j · k_l · scale + mask_l) v_l,
                           lse_j = log Σ_l exp(qc_j · k_l · scale + mask_l)
    topk_gather_attention: out_i = mass_i · Σ_{l ∈ idx_i} softmax_l(q_i · k_l · scale) v_l
    cluster_broadcast:     out_i = values_{a_i}
    cluster_mean:          mean_c = (1 / |c|) Σ_{i: a_i = c} x_i,   count_c = |c|

Shapes (GQA: query head h reads kv head h // (H // Hk)):
    centroid_attention(qc (B, H, C, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv),
                       key_padding_mask (B, Nk) bool, True = keep, or None, scale)
        -> out (B, H, C, Dv) in qc's dtype, lse (B, H, C) float32
    topk_gather_attention(q (B, H, Nq, D), k, v, idx (B, H, Nq, K) int64, scale,
                          mass (B, H, Nq) float32 or None) -> (B, H, Nq, Dv)
    cluster_broadcast(values (B, H, C, Dv), assignments (B, H, Nq) int64) -> (B, H, Nq, Dv)
    cluster_mean(x (B, H, N, D), assignments (B, H, N) int64, clusters)
        -> means (B, H, C, D) in x's dtype, counts (B, H, C) int64

Conventions: a centroid row with no valid key gets out 0 and lse -inf; idx entries outside
[0, Nk) (-1 is the padding value) are skipped, and a row with none left gets 0; duplicate idx
entries count as often as they appear; an assignment outside [0, C) (a padded query) gets a
zero row from cluster_broadcast and is no member in cluster_mean; an empty cluster's mean is 0.

Numerics: fp32/fp16/bf16 in, fp32 softmax statistics and accumulators. fp32 operands use ieee
dot products (never tf32). On fp16/bf16 inputs the probabilities are rounded to the value dtype
before the P·V product, as FlashAttention does, so the tensor cores serve both products.
topk_gather_attention gathers different keys per query, so it multiplies in fp32 with
broadcast-and-sum on CUDA cores rather than tl.dot.

Plain launchers around `@triton.jit` kernels, launched through `torch.library.wrap_triton`;
block sizes are keyword arguments (defaults for an H100). Inputs are validated (ValueError)
before any launch. Strided inputs are read in place. This backend never imports the reference
or cpu backends.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from clusterfx.ops.common.triton_support import check_device, launch_ctx

__all__ = ["centroid_attention", "topk_gather_attention", "cluster_broadcast", "cluster_mean"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b + acc with fp32 accumulation. UPCAST feeds fp32 operands instead: the interpreter
    (triton 3.9) stores bf16 as uint16 and multiplies the raw integers in tl.dot."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _centroid_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn,
    s_ob, s_oh, s_om, s_od,
    H, GROUP, M, NK, D, DV, qk_scale,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < M
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qm + dq[None, :] * s_qd,
                mask=row_ok[:, None] & (dq < D)[None, :], other=0.0)
    k_base = k_ptr + b * s_kb + hk * s_kh
    v_base = v_ptr + b * s_vb + hk * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0, tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = cols < NK
        kt = tl.load(k_base + cols[None, :] * s_kn + dq[:, None] * s_kd,
                     mask=valid[None, :] & (dq < D)[:, None], other=0.0)
        s = _dot(q, kt, tl.full([BLOCK_M, BLOCK_N], 0, tl.float32), PRECISION, UPCAST) * qk_scale
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * s_mb + cols * s_mn, mask=valid, other=0)
            valid = valid & (keep != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid inf-inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_base + cols[:, None] * s_vn + dv[None, :] * s_vd,
                     mask=valid[:, None] & (dv < DV)[None, :], other=0.0)
        acc = _dot(p.to(vb.dtype), vb, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(out_ptr + b * s_ob + h * s_oh + rows[:, None] * s_om + dv[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(lse_ptr + (b * H + h) * M + rows, lse, mask=row_ok)


@triton.jit
def _topk_gather_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, mass_ptr, out_ptr,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ib, s_ih, s_im, s_ik,
    s_sb, s_sh, s_sm,
    s_ob, s_oh, s_om, s_od,
    H, GROUP, M, NK, K, D, DV, qk_scale,
    HAS_MASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < M
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qm + dq[None, :] * s_qd,
                mask=row_ok[:, None] & (dq < D)[None, :], other=0.0).to(tl.float32)
    k_base = k_ptr + b * s_kb + hk * s_kh
    v_base = v_ptr + b * s_vb + hk * s_vh
    idx_base = idx_ptr + b * s_ib + h * s_ih
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_base + rows[:, None] * s_im + ks[None, :] * s_ik,
                      mask=row_ok[:, None] & (ks < K)[None, :], other=-1)
        valid = (ids >= 0) & (ids < NK)  # (BLOCK_M, BLOCK_K)
        ids = tl.where(valid, ids, 0)
        # gathered rows differ per query, so the products are broadcast-and-sum, not tl.dot
        kg = tl.load(k_base + ids[:, :, None] * s_kn + dq[None, None, :] * s_kd,
                     mask=valid[:, :, None] & (dq < D)[None, None, :], other=0.0)
        s = tl.sum(q[:, None, :] * kg.to(tl.float32), axis=2) * qk_scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vg = tl.load(v_base + ids[:, :, None] * s_vn + dv[None, None, :] * s_vd,
                     mask=valid[:, :, None] & (dv < DV)[None, None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vg.to(tl.float32), axis=1)
        m_i = m_new
    scale_out = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    if HAS_MASS:
        scale_out *= tl.load(mass_ptr + b * s_sb + h * s_sh + rows * s_sm, mask=row_ok, other=0.0)
    out = acc * scale_out[:, None]
    tl.store(out_ptr + b * s_ob + h * s_oh + rows[:, None] * s_om + dv[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _cluster_broadcast_kernel(
    val_ptr, a_ptr, out_ptr,
    s_vb, s_vh, s_vc, s_vd,
    s_ab, s_ah, s_am,
    s_ob, s_oh, s_om, s_od,
    H, M, C, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < M
    a = tl.load(a_ptr + b * s_ab + h * s_ah + rows * s_am, mask=row_ok, other=-1)
    member = (a >= 0) & (a < C)
    a = tl.where(member, a, 0)
    vals = tl.load(val_ptr + b * s_vb + h * s_vh + a[:, None] * s_vc + dv[None, :] * s_vd,
                   mask=member[:, None] & (dv < DV)[None, :], other=0.0)
    tl.store(out_ptr + b * s_ob + h * s_oh + rows[:, None] * s_om + dv[None, :] * s_od,
             vals, mask=row_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _cluster_mean_kernel(
    x_ptr, a_ptr, mean_ptr, cnt_ptr,
    s_xb, s_xh, s_xn, s_xd,
    s_ab, s_ah, s_an,
    H, N, C, D,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ds = tl.arange(0, BLOCK_D)
    c_ok = cs < C
    acc = tl.full([BLOCK_C, BLOCK_D], 0, tl.float32)
    count = tl.full([BLOCK_C], 0, tl.int32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        a = tl.load(a_ptr + b * s_ab + h * s_ah + ns * s_an, mask=n_ok, other=-1)
        x = tl.load(x_ptr + b * s_xb + h * s_xh + ns[:, None] * s_xn + ds[None, :] * s_xd,
                    mask=n_ok[:, None] & (ds < D)[None, :], other=0.0)
        member = cs[:, None] == a[None, :]  # (BLOCK_C, BLOCK_N)
        # a 0/1 matrix is exact in every float dtype: the segment sum becomes one dot
        # via fp32: the interpreter converts int1 -> bf16 as raw integers
        acc = _dot(tl.where(member, 1.0, 0.0).to(x.dtype), x, acc, PRECISION, UPCAST)
        count += tl.sum(member.to(tl.int32), axis=1)
    mean = acc / tl.maximum(count, 1).to(tl.float32)[:, None]
    out_rows = (b * H + h) * C + cs
    tl.store(mean_ptr + out_rows[:, None] * D + ds[None, :], mean.to(mean_ptr.dtype.element_ty),
             mask=c_ok[:, None] & (ds < D)[None, :])
    tl.store(cnt_ptr + out_rows, count.to(tl.int64), mask=c_ok)


# ---------------------------------------------------------------------------------------------
# validation and launch helpers


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_float(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {_shape(t)}")


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale ({scale!r}) must be a finite Python float")
    return float(scale)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_name: str) -> int:
    """Validate (B, H, M, D) queries against (B, Hk, Nk, D) keys and (B, Hk, Nk, Dv) values;
    return the GQA group size H // Hk."""
    _check_float(q_name, q, 4)
    _check_float("k", k, 4)
    _check_float("v", v, 4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{q_name}, k and v must share a dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    (b, h, _, d), (bk, hk, nk, dk) = q.shape, k.shape
    if bk != b or dk != d:
        raise ValueError(f"k {_shape(k)} must be (B={b}, Hk, Nk, D={d}) to match {q_name} "
                         f"{_shape(q)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {_shape(v)} must be (B, Hk, Nk, Dv) = ({b}, {hk}, {nk}, Dv) to "
                         "match k")
    if hk < 1 or h % hk != 0:
        raise ValueError(f"heads ({h}) must be divisible by kv heads ({hk})")
    for name, size in (("D", d), ("Dv", v.shape[3])):
        if not 1 <= size <= _MAX_HEAD_DIM:
            raise ValueError(f"head dim {name} ({size}) must be in [1, {_MAX_HEAD_DIM}]")
    return h // hk


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands must not silently drop to tf32; half operands have exact fp32 products
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(kernel, dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and isinstance(kernel, InterpretedFunction)


def _head_block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


# ---------------------------------------------------------------------------------------------
# public launchers


def centroid_attention(qc: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_padding_mask: torch.Tensor | None, scale: float, *,
                       block_m: int = 64, block_n: int | None = None,
                       num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of the C centroid queries over all keys (online softmax over key
    blocks); returns the output in qc's dtype and the fp32 log-sum-exp of the scaled logits.

    block_n defaults to 64 for fp16/bf16 and 32 for fp32, whose ieee operand tiles are twice as
    large (64 x 64 at D = 256 would need 336 KiB of shared memory on sm_90, over its 227 KiB).
    """
    group = _check_qkv(qc, k, v, "qc")
    scale = _check_scale(scale)
    b, h, c, d = qc.shape
    nk, dv = k.shape[2], v.shape[3]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or _shape(key_padding_mask) != (b, nk):
            raise ValueError(f"key_padding_mask must be bool (B, Nk) = ({b}, {nk}), got "
                             f"{key_padding_mask.dtype} {_shape(key_padding_mask)}")
    device = check_device(_centroid_attention_kernel, qc=qc, k=k, v=v,
                           key_padding_mask=key_padding_mask)
    out = torch.empty(b, h, c, dv, dtype=qc.dtype, device=device)
    lse = torch.empty(b, h, c, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    block_m = max(16, min(block_m, triton.next_power_of_2(c)))
    if block_n is None:
        block_n = 32 if qc.dtype == torch.float32 else 64
    block_n = max(16, min(block_n, triton.next_power_of_2(max(nk, 1))))
    grid = (triton.cdiv(c, block_m), b * h)
    with launch_ctx(device):
        wrap_triton(_centroid_attention_kernel)[grid](
            qc, k, v, mask if mask is not None else k, out, lse,
            *qc.stride(), *k.stride(), *v.stride(),
            *(mask.stride() if mask is not None else (0, 0)), *out.stride(),
            h, group, c, nk, d, dv, scale * _LOG2E,
            HAS_MASK=mask is not None, PRECISION=_precision(qc.dtype),
            UPCAST=_upcast(_centroid_attention_kernel, qc.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_head_block(d), BLOCK_DV=_head_block(dv),
            num_warps=num_warps,
        )
    return out, lse


def topk_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                          scale: float, mass: torch.Tensor | None = None, *, block_m: int = 4,
                          block_k: int = 16, num_warps: int = 4) -> torch.Tensor:
    """Each query attends only to its K gathered keys (softmax renormalised over them), scaled
    by `mass` (the centroid probability of those keys in improved-clustered attention)."""
    group = _check_qkv(q, k, v, "q")
    scale = _check_scale(scale)
    b, h, nq, _ = q.shape
    if idx.dtype != torch.int64 or idx.dim() != 4 or idx.shape[:3] != q.shape[:3]:
        raise ValueError(f"idx must be int64 (B, H, Nq, K) = ({b}, {h}, {nq}, K), got "
                         f"{idx.dtype} {_shape(idx)}")
    if mass is not None and (mass.dtype != torch.float32 or _shape(mass) != (b, h, nq)):
        raise ValueError(f"mass must be float32 (B, H, Nq) = ({b}, {h}, {nq}) or None, got "
                         f"{mass.dtype} {_shape(mass)}")
    device = check_device(_topk_gather_kernel, q=q, k=k, v=v, idx=idx, mass=mass)
    nk, kk, dv = k.shape[2], idx.shape[3], v.shape[3]
    out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=device)
    if out.numel() == 0:
        return out
    block_m = max(1, min(block_m, triton.next_power_of_2(nq)))
    block_k = max(1, min(block_k, triton.next_power_of_2(max(kk, 1))))
    grid = (triton.cdiv(nq, block_m), b * h)
    with launch_ctx(device):
        wrap_triton(_topk_gather_kernel)[grid](
            q, k, v, idx, mass if mass is not None else q, out,
            *q.stride(), *k.stride(), *v.stride(), *idx.stride(),
            *(mass.stride() if mass is not None else (0, 0, 0)), *out.stride(),
            h, group, nq, nk, kk, q.shape[3], dv, scale * _LOG2E,
            HAS_MASS=mass is not None,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=_head_block(q.shape[3]),
            BLOCK_DV=_head_block(dv), num_warps=num_warps,
        )
    return out


def cluster_broadcast(values: torch.Tensor, assignments: torch.Tensor, *, block_m: int = 64,
                      num_warps: int = 4) -> torch.Tensor:
    """Copy each cluster's row to its members: out[b, h, i] = values[b, h, assignments[b, h, i]]
    (a zero row where the assignment is outside [0, C))."""
    _check_float("values", values, 4)
    b, h, c, dv = values.shape
    if assignments.dtype != torch.int64 or assignments.dim() != 3 \
            or assignments.shape[:2] != values.shape[:2]:
        raise ValueError(f"assignments must be int64 (B, H, Nq) = ({b}, {h}, Nq), got "
                         f"{assignments.dtype} {_shape(assignments)}")
    if not 1 <= dv <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim Dv ({dv}) must be in [1, {_MAX_HEAD_DIM}]")
    device = check_device(_cluster_broadcast_kernel, values=values, assignments=assignments)
    nq = assignments.shape[2]
    out = torch.empty(b, h, nq, dv, dtype=values.dtype, device=device)
    if out.numel() == 0:
        return out
    block_m = max(1, min(block_m, triton.next_power_of_2(nq)))
    grid = (triton.cdiv(nq, block_m), b * h)
    with launch_ctx(device):
        wrap_triton(_cluster_broadcast_kernel)[grid](
            values, assignments, out, *values.stride(), *assignments.stride(), *out.stride(),
            h, nq, c, dv, BLOCK_M=block_m, BLOCK_DV=_head_block(dv), num_warps=num_warps,
        )
    return out


def cluster_mean(x: torch.Tensor, assignments: torch.Tensor, clusters: int, *,
                 block_c: int = 32, block_n: int = 64,
                 num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's member rows (fp32 accumulation; 0 for an empty cluster) and the
    member counts."""
    _check_float("x", x, 4)
    b, h, n, d = x.shape
    if assignments.dtype != torch.int64 or _shape(assignments) != (b, h, n):
        raise ValueError(f"assignments must be int64 (B, H, N) = ({b}, {h}, {n}), got "
                         f"{assignments.dtype} {_shape(assignments)}")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters ({clusters!r}) must be a positive int")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim D ({d}) must be in [1, {_MAX_HEAD_DIM}]")
    device = check_device(_cluster_mean_kernel, x=x, assignments=assignments)
    means = torch.empty(b, h, clusters, d, dtype=x.dtype, device=device)
    counts = torch.empty(b, h, clusters, dtype=torch.int64, device=device)
    if means.numel() == 0:
        return means, counts
    block_c = max(16, min(block_c, triton.next_power_of_2(clusters)))
    block_n = max(16, min(block_n, triton.next_power_of_2(max(n, 1))))
    grid = (triton.cdiv(clusters, block_c), b * h)
    with launch_ctx(device):
        wrap_triton(_cluster_mean_kernel)[grid](
            x, assignments, means, counts, *x.stride(), *assignments.stride(),
            h, n, clusters, d, PRECISION=_precision(x.dtype),
            UPCAST=_upcast(_cluster_mean_kernel, x.dtype),
            BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_D=_head_block(d), num_warps=num_warps,
        )
    return means, counts
