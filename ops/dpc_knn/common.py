"""What the DPC-kNN implementations share (not a backend)."""

from __future__ import annotations

from collections.abc import Iterator


def chunk_rows(rows: int, row_cost: int, budget: int) -> list[tuple[int, int]]:
    """(start, end) chunks of `rows` so that a chunk costs at most `budget` (>= 1 row), where
    one row costs `row_cost` elements."""
    size = max(1, budget // max(row_cost, 1))
    return list(_ranges(rows, size))


def _ranges(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def flops(b: int, n: int, c: int, clusters: int, regions: int) -> int:
    """Pairwise work of DPC-kNN: two n×n distance passes (the second halved) and the n×c
    assignment GEMM per region, 2 FLOPs per multiply-add."""
    per = n // regions
    return 2 * b * regions * c * (per * per + per * per // 2 + per * (clusters // regions))
