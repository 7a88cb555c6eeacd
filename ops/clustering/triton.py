"""Triton backend of the clustering ops: LSH hashing and k-means in Hamming space.

    lsh_hash:          code_n = Σ_b [x_n · planes[b, :D] > planes[b, D]] · 2^b
    hamming_assign:    a_n = argmin_c popcount(h_n XOR centroid_c)   (ties -> lowest c)
    hamming_centroids: centroid_c bit b = [2 · #{n ∈ c : bit b of h_n} > |c|]  (tie -> 0)

Shapes:
    lsh_hash(x (..., N, D) float, planes (bits, D+1) float32) -> (..., N) int64
    hamming_assign(hashes (..., N) int64, centroids (..., C) int64) -> (..., N) int64
    hamming_centroids(hashes (..., N), assignments (..., N), clusters, bits)
        -> centroids (..., C) int64, counts (..., C) int64

Plain launchers around `@triton.jit` kernels, launched through `torch.library.wrap_triton` so
they trace inside a `triton_op`. Inputs are validated (ValueError) before any launch. Tensors
must be on CUDA, or on any device when TRITON_INTERPRET=1 was set before triton was imported.
Assignments outside [0, C) (the label of a padded query) are not counted as members.
This backend never imports the reference or cpu backends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from clusterfx.ops.common.triton_support import check_device, launch_ctx

__all__ = ["lsh_hash", "hamming_assign", "hamming_centroids"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BITS = 63  # codes are int64 and must stay non-negative


@triton.jit
def _popcount64(x):
    """Set bits of each int64 lane (SWAR on the uint64 view; no popcount intrinsic needed)."""
    x = x.to(tl.uint64, bitcast=True)
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return (x & 0x7F).to(tl.int32)


@triton.jit
def _lsh_hash_kernel(
    x_ptr, planes_ptr, out_ptr, M, D, BITS,
    stride_xm, stride_xd, stride_pb, stride_pd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    bits = tl.arange(0, BLOCK_B)
    row_ok = rows < M
    bit_ok = bits < BITS
    proj = tl.full([BLOCK_M, BLOCK_B], 0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(planes_ptr + bits[None, :] * stride_pb + cols[:, None] * stride_pd,
                    mask=bit_ok[None, :] & col_ok[:, None], other=0.0)
        # ieee: a tf32 product would flip bits that sit near their threshold
        proj = tl.dot(x, w, proj, input_precision="ieee")
    thresh = tl.load(planes_ptr + bits * stride_pb + D * stride_pd, mask=bit_ok, other=0.0)
    on = (proj > thresh[None, :]) & bit_ok[None, :]
    weight = tl.full([BLOCK_B], 1, tl.int64) << bits.to(tl.int64)
    code = tl.sum(tl.where(on, weight[None, :], 0), axis=1)
    tl.store(out_ptr + rows, code, mask=row_ok)


@triton.jit
def _hamming_assign_kernel(
    h_ptr, c_ptr, out_ptr, N, C,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs < N
    h = tl.load(h_ptr + row * N + offs, mask=n_ok, other=0)
    best_d = tl.full([BLOCK_N], 1 << 20, tl.int32)
    best_c = tl.full([BLOCK_N], 0, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        cen = tl.load(c_ptr + row * C + cs, mask=c_ok, other=0)
        dist = _popcount64(h[:, None] ^ cen[None, :])
        dist = tl.where(c_ok[None, :], dist, 1 << 20)
        d_min = tl.min(dist, axis=1)
        # explicit lowest-index tie break (does not rely on argmin's tie rule)
        c_min = tl.min(tl.where(dist == d_min[:, None], cs[None, :], 1 << 30), axis=1)
        better = d_min < best_d  # strict: an earlier chunk wins ties
        best_c = tl.where(better, c_min, best_c)
        best_d = tl.where(better, d_min, best_d)
    tl.store(out_ptr + row * N + offs, best_c.to(tl.int64), mask=n_ok)


@triton.jit
def _hamming_centroids_kernel(
    h_ptr, a_ptr, cen_ptr, cnt_ptr, N, C, BITS,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    bits = tl.arange(0, BLOCK_B)
    ones = tl.full([BLOCK_C, BLOCK_B], 0, tl.float32)  # members with bit b set
    count = tl.full([BLOCK_C], 0, tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs < N
        h = tl.load(h_ptr + row * N + offs, mask=n_ok, other=0)
        a = tl.load(a_ptr + row * N + offs, mask=n_ok, other=-1)
        member = cs[:, None] == a[None, :]  # (BLOCK_C, BLOCK_N)
        bit_set = (h[:, None] >> bits[None, :].to(tl.int64)) & 1  # (BLOCK_N, BLOCK_B)
        # 0/1 operands are exact in fp16 and the fp32 accumulator is exact below 2^24 members
        ones = tl.dot(member.to(tl.float16), bit_set.to(tl.float16), ones)
        count += tl.sum(member.to(tl.int32), axis=1)
    majority = (2.0 * ones > count[:, None].to(tl.float32)) & (bits[None, :] < BITS)
    weight = tl.full([BLOCK_B], 1, tl.int64) << bits.to(tl.int64)
    code = tl.sum(tl.where(majority, weight[None, :], 0), axis=1)
    tl.store(cen_ptr + row * C + cs, code, mask=c_ok)
    tl.store(cnt_ptr + row * C + cs, count.to(tl.int64), mask=c_ok)


def _check_int64(name: str, t: torch.Tensor, min_dim: int = 1) -> None:
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits ({bits!r}) must be an int in [1, {_MAX_BITS}]")


def lsh_hash(x: torch.Tensor, planes: torch.Tensor, *, block_m: int = 64,
             num_warps: int = 4) -> torch.Tensor:
    """Hash each row of x with `bits = planes.shape[0]` biased random hyperplanes.

    Bit b of the code is set iff x·planes[b, :D] > planes[b, D] (fp32 products, fp32 sum).
    Shapes: x (..., N, D) fp32/fp16/bf16, planes (bits, D+1) fp32 -> (..., N) int64.
    """
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be (..., N, D), got shape {tuple(x.shape)}")
    if planes.dtype != torch.float32 or planes.dim() != 2:
        raise ValueError(
            f"planes must be a 2-d float32 (bits, D+1) tensor, got {planes.dtype} "
            f"{tuple(planes.shape)}"
        )
    d = x.shape[-1]
    if planes.shape[1] != d + 1:
        raise ValueError(f"planes has {planes.shape[1]} columns, expected D+1 = {d + 1}")
    _check_bits(planes.shape[0])
    device = check_device(_lsh_hash_kernel, x=x, planes=planes)
    out = torch.empty(x.shape[:-1], dtype=torch.int64, device=device)
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    if m == 0:
        return out
    block_m = max(16, min(block_m, triton.next_power_of_2(m)))
    block_d = max(16, min(64, triton.next_power_of_2(d)))
    block_b = max(16, triton.next_power_of_2(planes.shape[0]))
    grid = (triton.cdiv(m, block_m),)
    with launch_ctx(device):
        wrap_triton(_lsh_hash_kernel)[grid](
            x2, planes, out, m, d, planes.shape[0],
            x2.stride(0), x2.stride(1), planes.stride(0), planes.stride(1),
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_B=block_b, num_warps=num_warps,
        )
    return out


def hamming_assign(hashes: torch.Tensor, centroids: torch.Tensor, *, block_n: int = 128,
                   block_c: int = 32, num_warps: int = 4) -> torch.Tensor:
    """Nearest centroid in Hamming distance; ties go to the lowest cluster index.

    Shapes: hashes (..., N) int64, centroids (..., C) int64 (same leading dims) -> (..., N) int64.
    """
    _check_int64("hashes", hashes)
    _check_int64("centroids", centroids)
    if hashes.shape[:-1] != centroids.shape[:-1]:
        raise ValueError(
            f"hashes {tuple(hashes.shape)} and centroids {tuple(centroids.shape)} must share "
            "their leading dims"
        )
    n, c = hashes.shape[-1], centroids.shape[-1]
    if c < 1:
        raise ValueError(f"centroids must hold at least one cluster, got shape "
                         f"{tuple(centroids.shape)}")
    device = check_device(_hamming_assign_kernel, hashes=hashes, centroids=centroids)
    h2 = hashes.reshape(-1, n).contiguous()
    c2 = centroids.reshape(-1, c).contiguous()
    out = torch.empty(hashes.shape, dtype=torch.int64, device=device)
    if out.numel() == 0:
        return out
    block_n = max(16, min(block_n, triton.next_power_of_2(n)))
    block_c = max(16, min(block_c, triton.next_power_of_2(c)))
    grid = (triton.cdiv(n, block_n), h2.shape[0])
    with launch_ctx(device):
        wrap_triton(_hamming_assign_kernel)[grid](
            h2, c2, out, n, c, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
        )
    return out


def hamming_centroids(hashes: torch.Tensor, assignments: torch.Tensor, clusters: int, bits: int,
                      *, block_n: int = 64, block_c: int = 32,
                      num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bit majority vote of each cluster's member codes (a tie gives 0), and member counts.

    Empty clusters get centroid 0 and count 0; the caller reseeds them.
    Shapes: hashes (..., N) int64, assignments (..., N) int64
        -> centroids (..., C) int64, counts (..., C) int64 with C = clusters.
    """
    _check_int64("hashes", hashes)
    _check_int64("assignments", assignments)
    if hashes.shape != assignments.shape:
        raise ValueError(f"assignments {tuple(assignments.shape)} must match hashes "
                         f"{tuple(hashes.shape)}")
    if not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters ({clusters!r}) must be a positive int")
    _check_bits(bits)
    device = check_device(_hamming_centroids_kernel, hashes=hashes, assignments=assignments)
    n = hashes.shape[-1]
    h2 = hashes.reshape(-1, n).contiguous()
    a2 = assignments.reshape(-1, n).contiguous()
    lead = hashes.shape[:-1]
    centroids = torch.empty(*lead, clusters, dtype=torch.int64, device=device)
    counts = torch.empty(*lead, clusters, dtype=torch.int64, device=device)
    if centroids.numel() == 0:
        return centroids, counts
    block_c = max(16, min(block_c, triton.next_power_of_2(clusters)))
    grid = (triton.cdiv(clusters, block_c), h2.shape[0])
    with launch_ctx(device):
        wrap_triton(_hamming_centroids_kernel)[grid](
            h2, a2, centroids, counts, n, clusters, bits,
            BLOCK_N=max(16, block_n), BLOCK_C=block_c,
            BLOCK_B=max(16, triton.next_power_of_2(bits)), num_warps=num_warps,
        )
    return centroids, counts
