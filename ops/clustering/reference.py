"""Reference (oracle) query clustering: plain eager torch, one row at a time, float64-capable.

Written for obviousness, not speed: Hamming distances come from unpacked bits, the centroid vote
loops over clusters, and each (batch, head) row is clustered in its own Python loop. All
randomness is drawn by the public API (``clusterfx.ops.clustering``) and handed in as positions,
so this module and the fast CPU path are deterministic functions of the same inputs.

The k-means contract shared with ``cpu.py`` (the paper's code, §1.1 of the reference notes):

* ``init_idx[r, j]`` is the query whose code/vector seeds centroid ``j`` of row ``r``;
  ``active[r, j]`` is False for clusters beyond the row's number of valid queries (C > N).
* ``iterations - 1`` rounds of (assign, recompute), then a final assign.
* assign: argmin distance, ties to the lowest cluster index; inactive clusters never win.
* recompute: Hamming — each bit is the majority vote of the members (a tie gives 0);
  Euclidean — the mean of the members. An active cluster left empty in round ``t`` takes the
  code/vector of query ``reseed_idx[t, r, j]`` (a valid query drawn at random).
* invalid (padded) queries take part in no vote or mean and no count; they get assignment 0.
"""

from __future__ import annotations

import torch


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 (two's complement, so -1 has 64).

    Shapes: x (...) int64 → (...) int64.
    """
    shifts = torch.arange(64, device=x.device)
    return ((x.unsqueeze(-1) >> shifts) & 1).sum(-1)


def lsh_hash(x: torch.Tensor, planes: torch.Tensor, root: torch.Tensor | None = None,
             centre_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Random-hyperplane hash with a bias: bit b of h(x) is ``[x·a_b[:D] > a_b[D]]``.

    With ``root`` (a symmetric square root of a metric M): the queries are mapped to
    ``y = x root`` (where Euclidean distance is M's), centred on the mean of the row's queries
    that ``centre_mask`` marks (default: all; none marked: no centring), and bit b is
    ``[y·a_b[:D] > 0]`` (SimHash; the bias column is not used).

    Computed in float64 for float64 inputs and float32 otherwise.

    Shapes: x (..., N, D), planes (bits, D+1), root (..., D, D) → (..., N) int64 in
    [0, 2**bits).
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    planes = planes.to(device=x.device, dtype=cdt)
    if root is None:
        proj = x.to(cdt) @ planes[:, :-1].T  # (..., N, bits)
        bit_set = proj > planes[:, -1]
    else:
        y = x.to(cdt) @ root.to(cdt)
        marked = torch.ones(y.shape[:-1], dtype=torch.bool, device=y.device) \
            if centre_mask is None else centre_mask.expand(y.shape[:-1])
        centre = torch.stack([row[m].mean(0) if m.any() else row.new_zeros(row.shape[-1])
                              for row, m in zip(y.reshape(-1, *y.shape[-2:]),
                                                marked.reshape(-1, y.shape[-2]), strict=True)])
        centre = centre.view(*y.shape[:-2], 1, y.shape[-1])
        bit_set = (y - centre) @ planes[:, :-1].T > 0
    weights = torch.ones((), dtype=torch.int64, device=x.device) << torch.arange(
        planes.shape[0], device=x.device)
    return (bit_set.long() * weights).sum(-1)


def _majority_code(member_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bitwise majority vote of a set of codes; a tie (or no member) gives 0."""
    shifts = torch.arange(bits, device=member_codes.device)
    ones = ((member_codes.unsqueeze(-1) >> shifts) & 1).sum(0)  # (bits,)
    majority = 2 * ones > member_codes.shape[0]
    return (majority.long() << shifts).sum()


def hamming_kmeans(hashes: torch.Tensor, init_idx: torch.Tensor, reseed_idx: torch.Tensor,
                   active: torch.Tensor, valid: torch.Tensor,
                   bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means on hash codes under the Hamming distance ``popcount(h XOR c)``.

    Shapes: hashes (R, N) int64, init_idx (R, C), reseed_idx (iterations-1, R, C),
    active (R, C) bool, valid (R, N) bool → assignments (R, N) int64, counts (R, C) int64.
    """
    R, N = hashes.shape
    C = init_idx.shape[-1]
    iterations = reseed_idx.shape[0] + 1
    codes = hashes & ((1 << bits) - 1)  # only the low `bits` bits take part
    assignments = torch.zeros(R, N, dtype=torch.int64, device=hashes.device)
    counts = torch.zeros(R, C, dtype=torch.int64, device=hashes.device)
    for r in range(R):
        h, act, ok = codes[r], active[r], valid[r]
        cent = h[init_idx[r]].clone()
        for t in range(iterations):
            cent[~act] = cent[0]  # duplicates of cluster 0 lose every tie to it
            dist = popcount(h[:, None] ^ cent[None, :])  # (N, C)
            assign = dist.argmin(-1)  # first minimum = lowest cluster index
            if t == iterations - 1:
                break
            for j in range(C):
                members = h[(assign == j) & ok]
                if not act[j]:
                    continue
                if members.numel() == 0:
                    cent[j] = h[reseed_idx[t, r, j]]
                else:
                    cent[j] = _majority_code(members, bits)
        if act.any():
            assignments[r] = torch.where(ok, assign, 0)
            counts[r] = torch.bincount(assign[ok], minlength=C)
    return assignments, counts


def euclidean_kmeans(x: torch.Tensor, init_idx: torch.Tensor, reseed_idx: torch.Tensor,
                     active: torch.Tensor,
                     valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means under the squared Euclidean distance ``Σ_d (x_d - c_d)²``.

    Computed in float64 for float64 inputs and float32 otherwise.

    Shapes: x (R, N, D), init_idx (R, C), reseed_idx (iterations-1, R, C), active (R, C) bool,
    valid (R, N) bool → assignments (R, N) int64, counts (R, C) int64.
    """
    R, N, _ = x.shape
    C = init_idx.shape[-1]
    iterations = reseed_idx.shape[0] + 1
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    assignments = torch.zeros(R, N, dtype=torch.int64, device=x.device)
    counts = torch.zeros(R, C, dtype=torch.int64, device=x.device)
    for r in range(R):
        xr, act, ok = x[r], active[r], valid[r]
        cent = xr[init_idx[r]].clone()
        for t in range(iterations):
            dist = ((xr[:, None, :] - cent[None, :, :]) ** 2).sum(-1)  # (N, C)
            dist[:, ~act] = float("inf")
            assign = dist.argmin(-1)
            if t == iterations - 1:
                break
            for j in range(C):
                members = xr[(assign == j) & ok]
                if not act[j]:
                    continue
                cent[j] = xr[reseed_idx[t, r, j]] if members.shape[0] == 0 else members.mean(0)
        if act.any():
            assignments[r] = torch.where(ok, assign, 0)
            counts[r] = torch.bincount(assign[ok], minlength=C)
    return assignments, counts
