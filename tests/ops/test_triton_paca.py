"""The Triton PaCa kernels on CPU under TRITON_INTERPRET=1 (set by the test before the first
launch; ops/paca/triton.py decorates its kernels lazily), against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

from clusterfx.ops.paca import paca_attention, paca_attention_reference
from tests.helpers import tolerance

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 2, 37, 8, 5, 0, 8), (1, 3, 50, 16, 17, 2, 12),
                                   (2, 1, 9, 4, 1, 1, 4), (1, 2, 70, 8, 40, 5, 8)])
def test_triton_matches_reference(dtype, shape):
    b, h, n, d, m, prefix, dv = shape
    gen = torch.Generator().manual_seed(n)
    q, k = (torch.randn(b, h, n, d, generator=gen) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=gen)
    logits = 2 * torch.randn(b, m, n - prefix, generator=gen)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = paca_attention(q, k, v, logits, prefix=prefix, impl="triton")
    want = paca_attention_reference(q.double(), k.double(), v.double(), logits.double(),
                                    prefix=prefix, scale=d ** -0.5)
    assert out.dtype == dtype and out.shape == want.shape
    err = float((out.double() - want).abs().max() / want.abs().max())
    # pooled keys and probabilities are rounded to the storage dtype once each
    assert err <= tolerance(dtype, max(n, m), factor=32), err


def test_triton_rejects_float64():
    q = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        paca_attention(q, q, q, torch.randn(1, 2, 5, dtype=torch.float64), impl="triton")
