"""Top-k attention with non-finite inputs spreads NaN/inf exactly as dense attention does, on
the default CPU path (the fused kernel hands such calls to the vectorised path) and with
k = Nk, where top-k attention is exact attention: the same rows are non-finite, and the
finite rows equal dense attention's."""

from __future__ import annotations

import pytest
import torch

from clusterfx.ops.topk import topk_attention


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("where, value", [("q", float("nan")), ("k", float("nan")),
                                          ("k", float("inf")), ("v", float("nan"))])
def test_non_finite_rows_are_dense_rows(where, value):
    q, k, v = _qkv()
    {"q": q, "k": k, "v": v}[where][0, 1, 5, 3] = value
    out = topk_attention(q, k, v, topk=12)  # k = Nk: exact attention
    # the textbook formula (SDPA's fused CPU kernel returns finite rows for a NaN query)
    dense = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    bad_out, bad_dense = ~torch.isfinite(out), ~torch.isfinite(dense)
    assert torch.equal(bad_out, bad_dense)
    assert bad_dense.any()  # the case does produce non-finite rows
    torch.testing.assert_close(out[~bad_out], dense[~bad_dense], rtol=1e-5, atol=1e-5)
