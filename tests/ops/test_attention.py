"""`clusterfx::attention` (the canonical node, SDPA underneath) against its float64 oracle."""

from __future__ import annotations

import pytest
import torch

from clusterfx.ops.attention import attention, attention_reference

DT = torch.float64


def _qkv(hk=4, nq=9, nk=9):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, nq, 8, dtype=DT, generator=g),
            torch.randn(2, hk, nk, 8, dtype=DT, generator=g),
            torch.randn(2, hk, nk, 6, dtype=DT, generator=g))


def _masks(nq=9, nk=9):
    keep = torch.rand(2, 1, nq, nk, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # no fully masked row
    return {"none": None, "bool": keep,
            "additive": torch.zeros(2, 1, nq, nk, dtype=DT).masked_fill(~keep, -1e9) + 0.1}


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_reference_with_gradients(mask, causal, gqa):
    q, k, v = _qkv(hk=2 if gqa else 4)
    m = _masks()[mask]
    q.requires_grad_(True)
    got = attention(q, k, v, m, 0.0, causal, 0.3, gqa)
    want = attention_reference(q, k, v, m, 0.0, causal, 0.3, gqa)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g1, = torch.autograd.grad(got.sum(), q)
    g2, = torch.autograd.grad(want.sum(), q)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_cross_attention_and_float32_mask_on_half_inputs():
    q, k, v = _qkv(nq=5, nk=11)
    torch.testing.assert_close(attention(q, k, v, None, 0.0, False, 0.3, False),
                               attention_reference(q, k, v, None, 0.0, False, 0.3, False))
    # a float32 finfo.min mask on fp16 inputs must not turn into -inf (NaN-free rows)
    keep = torch.ones(5, 11, dtype=torch.bool)
    keep[:, 3:] = False
    m = torch.zeros(5, 11).masked_fill(~keep, torch.finfo(torch.float32).min)
    out = attention(q.half(), k.half(), v.half(), m, 0.0, False, 0.3, False)
    ref = attention_reference(q, k, v, keep, 0.0, False, 0.3, False)
    assert torch.isfinite(out).all()
    # fp16 rounding of inputs, probabilities and output: a few eps of the largest value
    atol = 4 * torch.finfo(torch.float16).eps * float(v.abs().max())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
