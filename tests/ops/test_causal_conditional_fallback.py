"""The causal conditional op's path 4 (key padding, a query stream that is not causal): it runs
the pooled conditional op, and its backward must equal that op's own, for both methods (the
i-clustered backward recomputes the top-k when the caller has no forward selection)."""

from __future__ import annotations

import pytest
import torch

import clusterfx  # noqa: F401 - registers the ops


@pytest.mark.parametrize("method", ["clustered", "improved_clustered"])
def test_path_4_equals_the_conditional_op_forward_and_backward(method):
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 64, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, -5:] = False
    mask = keep[:, None, None, :]
    spec = (8, 5, 63, 0, "hamming", 1, "attention", 4)
    got = torch.ops.clusterfx.causal_conditional_attention(
        q, k, v, mask, 0.25, method, *spec, 16, False, False, 0, "auto", "")
    assert int(got[5]) == 4
    want = torch.ops.clusterfx.conditional_attention(
        q, k, v, mask, 0.25, method, *spec, 0, "auto", "")
    assert int(want[2]) == 0  # the approximate path, not exact attention
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    grads = torch.autograd.grad(got[0].square().sum(), (q, k, v))
    expected = torch.autograd.grad(want[0].square().sum(), (q, k, v))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
        assert g.abs().sum() > 0
