"""Fast query clustering: vectorised torch over all (batch, head) rows, no per-row Python loops.

Same contract and same results as ``reference.py`` (bit for bit on the Hamming path): see that
module's docstring. The speed comes from turning the Hamming assignment into a GEMM. With
signs s = 2·bit - 1 ∈ {±1}^bits, ``popcount(h XOR c) = (bits - s_h·s_c) / 2``, so the nearest
centroid is the one with the largest dot product. The index is folded into the same product so
that one ``amax`` replaces the slower ``argmax``::

    key(h, c) = M·(s_h·s_c) + (M - 1 - c),   M ≥ C,   argmin_c dist = M - 1 - (max_c key mod M)

which also makes ties go to the lowest index. Every term is a small integer, so the GEMM is
exact: int8 × int8 → int32 (``torch._int_mm``, VNNI on x86) for large rows on CPU, float32
elsewhere. Devices other than CPU run the float32 form, which is plain batched matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_FP32_EXACT = 2**24  # float32 represents every integer below this exactly
_INT8_MIN_WORK = 2**16  # per-row N·C above which one int8 GEMM per row beats a batched fp32 GEMM
# Distances are computed in blocks of queries of about this many bytes, so that the block the
# GEMM writes is still in cache when argmin reads it (at N=16k, R=8, C=100 this halves the
# time of a nearest-centroid step: the whole (R, N, C) matrix is 52 MB).
_DIST_BLOCK_BYTES = 4 << 20


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 by SWAR bit tricks (two's complement, so -1 has 64).

    Shapes: x (...) int64 → (...) int64.
    """
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F  # one count per byte, each ≤ 8
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def lsh_signs(x: torch.Tensor, planes: torch.Tensor, root: torch.Tensor | None = None,
              centre_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hash bits as ±1 int8: ``s_b = +1`` iff ``x·a_b[:D] > a_b[D]`` (same arithmetic as the
    reference ``lsh_hash``, float64 for float64 inputs, float32 otherwise).

    With ``root`` (a symmetric square root of a metric M) the queries are hashed in M's
    geometry, centred, without the bias: ``s_b = +1`` iff ``(x - x̄)·(root a_b) > 0``, where x̄
    is the mean query of the row, over the queries ``centre_mask`` marks (default: all)
    (SimHash of ``(x - x̄) root``; the centring is folded into a per-row threshold
    ``x̄·(root a_b)`` and ``root`` into the planes, so the cost is that of the plain hash).

    Shapes: x (..., N, D), planes (bits, D+1), root (..., D, D), centre_mask (..., N) bool →
    (..., N, bits) int8.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    planes = planes.to(device=x.device, dtype=cdt)
    if root is None:
        proj = x.to(cdt) @ planes[:, :-1].T  # (..., N, bits)
        return (proj > planes[:, -1]).to(torch.int8) * 2 - 1
    x = x.to(cdt)
    rotated = root.to(cdt) @ planes[:, :-1].T  # (..., D, bits)
    proj = x @ rotated  # (..., N, bits)
    return (proj > _centre(x, centre_mask) @ rotated).to(torch.int8) * 2 - 1


def _centre(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the rows of x (..., N, D) that ``mask`` (..., N) marks → (..., 1, D); a row
    with none marked gets 0."""
    if mask is None:
        return x.mean(-2, keepdim=True)
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1)


def lsh_hash(x: torch.Tensor, planes: torch.Tensor, root: torch.Tensor | None = None,
             centre_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Packed hash codes. Shapes: x (..., N, D), planes (bits, D+1) → (..., N) int64."""
    return pack_signs(lsh_signs(x, planes, root, centre_mask))


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 bits (..., bits) → int64 codes (...), bit b set where ``signs[..., b] > 0``."""
    shifts = torch.arange(signs.shape[-1], device=signs.device)
    return ((signs > 0).long() << shifts).sum(-1)


def unpack_signs(hashes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes (...) → ±1 int8 bits (..., bits) of the low ``bits`` bits."""
    shifts = torch.arange(bits, device=hashes.device)
    return (((hashes.unsqueeze(-1) >> shifts) & 1) * 2 - 1).to(torch.int8)


def _index_columns(C: int, M: int, device: torch.device, per_col: int) -> torch.Tensor:
    """(E, C) rows whose column sums are M - 1 - c, every entry in 0..per_col."""
    total = M - 1 - torch.arange(C, device=device)
    E = max(1, math.ceil((M - 1) / per_col))
    lo = torch.arange(E, device=device)[:, None] * per_col
    return (total[None, :] - lo).clamp(0, per_col)


def _row_int_mm(lhs: torch.Tensor, rhs: torch.Tensor, reduce=None) -> torch.Tensor:
    """Exact int8 GEMM per row, (R, n, K) @ (R, K, m) → (R, n, m) int32, optionally reduced
    row by row (``reduce``) so that the full product is never held at once."""
    reduce = reduce or (lambda x: x)
    return torch.stack([reduce(torch._int_mm(lhs[r], rhs[r])) for r in range(lhs.shape[0])])


class _HammingGemm:
    """Nearest-centroid search and majority votes as exact GEMMs over ±1 signs.

    Built once per k-means call (the query-side operands do not change between rounds).
    Shapes: signs (R, N, bits) int8 ±1, valid (R, N) bool; ``clusters`` = C.
    """

    def __init__(self, signs: torch.Tensor, valid: torch.Tensor, clusters: int):
        R, N, bits = signs.shape
        self.C, self.valid = clusters, valid
        self.a = math.isqrt(clusters - 1) + 1 if clusters > 1 else 1  # M = a² ≥ C
        self.int8 = (signs.device.type == "cpu" and R > 0 and self.a <= 127
                     and N * clusters >= _INT8_MIN_WORK and hasattr(torch, "_int_mm"))
        # vote operand: the signs plus a column of ones, whose vote is the member count
        ext = torch.cat([signs, signs.new_ones(R, N, 1)], -1)
        if self.int8:
            M = self.a * self.a
            self.M = M
            self.idx_cols = _index_columns(clusters, M, signs.device, 127).to(torch.int8)
            self.lhs = torch.cat([signs * self.a, signs.new_ones(R, N, self.idx_cols.shape[0])],
                                 -1)
            self.ext = ext
        else:
            self.M = clusters
            self.lhs = torch.cat([signs.float(), signs.new_ones(R, N, 1, dtype=torch.float32)],
                                 -1)
            self.ext = ext.float()

    def nearest(self, cent: torch.Tensor) -> torch.Tensor:
        """argmin_c popcount distance, ties to the lowest c. cent (R, C, bits) → (R, N)."""
        R, C, bits = cent.shape
        M = self.M
        if self.int8:
            rhs = torch.cat([cent.transpose(1, 2) * self.a, self.idx_cols.expand(R, -1, -1)], 1)
            key = _row_int_mm(self.lhs, rhs.contiguous(), lambda x: x.amax(-1))
        elif C * (bits + 1) < _FP32_EXACT:
            idx_col = (M - 1 - torch.arange(C, device=cent.device, dtype=torch.float32))
            rhs = torch.cat([cent.float().transpose(1, 2) * M, idx_col.expand(R, 1, C)], 1)
            key = torch.bmm(self.lhs, rhs).amax(-1)
        else:
            return torch.bmm(self.lhs[..., :-1], cent.float().transpose(1, 2)).argmax(-1)
        return (M - 1) - torch.remainder(key.long(), M)

    def votes(self, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per cluster, Σ of member signs (R, C, bits) and member counts (R, C), valid only."""
        R, N = assign.shape
        dtype = torch.int8 if self.int8 else torch.float32
        one_hot = torch.zeros(R, self.C, N, dtype=dtype, device=assign.device)
        one_hot.scatter_(1, assign[:, None, :], self.valid[:, None, :].to(dtype))
        sums = _row_int_mm(one_hot, self.ext) if self.int8 else torch.bmm(one_hot, self.ext)
        return sums[..., :-1], sums[..., -1].long()


def _counts(assign: torch.Tensor, valid: torch.Tensor, C: int) -> torch.Tensor:
    """Valid members per cluster. (R, N) → (R, C) int64."""
    R = assign.shape[0]
    offsets = torch.arange(R, device=assign.device)[:, None] * C
    flat = torch.where(valid, assign + offsets, R * C).reshape(-1)
    return torch.bincount(flat, minlength=R * C + 1)[: R * C].view(R, C)


def hamming_kmeans_signs(
    signs: torch.Tensor, init_idx: torch.Tensor, reseed_idx: torch.Tensor, active: torch.Tensor,
    valid: torch.Tensor, assign_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hamming k-means on ±1 bits (contract: ``reference.hamming_kmeans``).

    ``assign_fn(cent_signs (R, C, bits)) -> (R, N)`` replaces the nearest-centroid step (the
    Triton path plugs its kernel in here).

    Shapes: signs (R, N, bits) int8, init_idx (R, C), reseed_idx (iterations-1, R, C),
    active (R, C), valid (R, N) → assignments (R, N) int64, counts (R, C) int64.
    """
    R, N, bits = signs.shape
    C = init_idx.shape[-1]
    gemm = _HammingGemm(signs, valid, C)
    assign_fn = assign_fn or gemm.nearest
    gather_rows = lambda idx: torch.gather(signs, 1, idx[..., None].expand(-1, -1, bits))
    cent = gather_rows(init_idx)  # (R, C, bits)
    for t in range(reseed_idx.shape[0] + 1):
        cent = torch.where(active[..., None], cent, cent[:, :1])  # inactive: copies of cluster 0
        assign = assign_fn(cent)
        if t == reseed_idx.shape[0]:
            break
        sums, counts = gemm.votes(assign)
        voted = (sums > 0).to(torch.int8) * 2 - 1  # majority; a tie gives bit 0
        empty = (counts == 0) & active
        cent = torch.where(empty[..., None], gather_rows(reseed_idx[t]), voted)
    return torch.where(valid, assign, 0), _counts(assign, valid, C)


def hamming_kmeans(hashes: torch.Tensor, init_idx: torch.Tensor, reseed_idx: torch.Tensor,
                   active: torch.Tensor, valid: torch.Tensor,
                   bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hamming k-means on packed int64 codes. Shapes as in ``reference.hamming_kmeans``."""
    return hamming_kmeans_signs(unpack_signs(hashes, bits), init_idx, reseed_idx, active, valid)


def nearest_centroids(x: torch.Tensor, cent: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """``argmin_c (const[r, c] - 2·x·cent[r, c])`` for every query (ties to the lowest c): the
    nearest centroid when ``const = |c|²`` (or ``cᵀMc`` with ``cent = M c``), ``|x|²`` being
    the same for every c. ``const = +inf`` keeps a cluster out. Blocked over the queries.

    Shapes: x (R, N, D), cent (R, C, D), const (R, C) → (R, N) int64.
    """
    R, N, _ = x.shape
    C = cent.shape[1]
    ct = cent.transpose(1, 2)
    chunk = max(256, _DIST_BLOCK_BYTES // (x.element_size() * R * C))
    if chunk >= N:
        return torch.baddbmm(const[:, None, :], x, ct, alpha=-2.0).argmin(-1)
    return torch.cat([torch.baddbmm(const[:, None, :], x[:, s:s + chunk], ct, alpha=-2.0)
                      .argmin(-1) for s in range(0, N, chunk)], 1)


def euclidean_kmeans(x: torch.Tensor, init_idx: torch.Tensor, reseed_idx: torch.Tensor,
                     active: torch.Tensor,
                     valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with GEMM distances ``|x|² - 2x·cᵀ + |c|²`` (the ``|x|²`` term is
    constant per query and left out of the argmin).

    Shapes: x (R, N, D), init_idx (R, C), reseed_idx (iterations-1, R, C), active (R, C),
    valid (R, N) → assignments (R, N) int64, counts (R, C) int64.
    """
    R, N, D = x.shape
    C = init_idx.shape[-1]
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    gather_rows = lambda idx: torch.gather(x, 1, idx[..., None].expand(-1, -1, D))
    x_flat = x.reshape(R * N, D)
    cent = gather_rows(init_idx)
    for t in range(reseed_idx.shape[0] + 1):
        const = (cent * cent).sum(-1).masked_fill(~active, float("inf"))
        assign = nearest_centroids(x, cent, const)
        if t == reseed_idx.shape[0]:
            break
        offsets = torch.arange(R, device=x.device)[:, None] * C
        flat = torch.where(valid, assign + offsets, R * C).reshape(-1)
        sums = x_flat.new_zeros(R * C + 1, D).index_add_(0, flat, x_flat)[: R * C].view(R, C, D)
        counts = _counts(assign, valid, C)
        means = sums / counts.clamp(min=1)[..., None].to(sums.dtype)
        cent = torch.where(((counts == 0) & active)[..., None], gather_rows(reseed_idx[t]), means)
    return torch.where(valid, assign, 0), _counts(assign, valid, C)
