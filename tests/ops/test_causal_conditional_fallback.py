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


@pytest.mark.parametrize("method", ["clustered", "improved_clustered"])
@pytest.mark.parametrize("padded", [False, True])
def test_one_causal_block_is_reported_exact_and_equals_dense(method, padded):
    """With Nq <= block every query's causal block holds all its keys: the causal variant
    would be exact, so the op says so (path 5) and equals dense causal attention, forward and
    backward; one query more than the block takes the approximate path."""
    from clusterfx.ops.common import telemetry

    torch.manual_seed(0)
    b, h, d, block = 2, 2, 16, 32
    spec = (4, 5, 63, 0, "hamming", 1, "attention", 4)
    for n, path in ((block, 5), (block + 1, 0)):
        q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
                   for _ in range(3))
        keep = torch.ones(b, n, dtype=torch.bool)
        if padded:
            keep[1, -3:] = False
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool)) & keep[:, None, None, :]
        sink = telemetry.new_sink()
        got = torch.ops.clusterfx.causal_conditional_attention(
            q, k, v, mask, 0.25, method, *spec, block, False, False, 0, "auto", sink.tag("s"))
        assert int(got[5]) == path
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=0.25)
        rows = keep[:, None, :, None].expand_as(want)  # fully masked rows are not compared
        if path == 0:
            assert (got[0] - want)[rows].abs().max() > 1e-6  # really an approximation
            continue
        assert sink.paths("s") == {"exact: within one causal block": 1}, sink.paths("s")
        torch.testing.assert_close(got[0][rows], want[rows], rtol=0, atol=1e-12)
        g = torch.randn_like(want) * rows
        grads = torch.autograd.grad((got[0] * g).sum(), (q, k, v))
        expected = torch.autograd.grad((want * g).sum(), (q, k, v))
        for a, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
