"""Shared test helpers: tolerances from a float64 oracle, compile-and-compare, graph counts."""

from __future__ import annotations

from typing import Any

import torch

import clusterfx as cfx
from clusterfx.ops.attention import attention as canonical_attention

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10,
       torch.bfloat16: 2.0**-7}


def tolerance(dtype: torch.dtype, reduction: int, factor: float = 8.0) -> float:
    """Relative tolerance for results of `dtype` after reductions of length `reduction`:
    rounding error grows like eps * sqrt(n) for the sums in attention."""
    return factor * EPS[dtype] * max(reduction, 1) ** 0.5


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict) or hasattr(x, "to_tuple"):
        x = list(x.values()) if isinstance(x, dict) else list(x.to_tuple())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _leaves(item)]
    return []


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max |a - b| relative to max |b| (or to `scale`, e.g. the largest of a set of tensors)."""
    ref = float(b.detach().abs().max()) if scale is None else scale
    return float((a.detach() - b.detach()).abs().max()) / max(ref, 1e-30)


def run_with_grads(fn, inputs: tuple, params: list[torch.nn.Parameter], seed: int = 0):
    """Outputs, and gradients of a fixed random projection of them w.r.t. params + inputs."""
    for p in params:
        p.grad = None
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(
        x, torch.Tensor) else x for x in inputs]
    out = fn(*xs)
    leaves = [t for t in _leaves(out) if t.is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in leaves)
    wrt = [p for p in params if p.requires_grad] + [
        x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if (
        wrt and loss.requires_grad) else []
    return [t.detach() for t in leaves], [g for g in grads if g is not None]


def compile_and_compare(model, inputs: tuple, policy=None, backend: str = "eager",
                        rtol: float | None = None, grads: bool = True, **kwargs):
    """Compile `model` with clusterfx, assert outputs (and gradients) equal eager's;
    return the report."""
    compiled = cfx.compile(model, policy=policy, backend=backend, **kwargs)
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    if grads:
        ref_out, ref_grads = run_with_grads(model, inputs, params)
        out, out_grads = run_with_grads(compiled, inputs, params)
    else:
        with torch.no_grad():
            ref_out, ref_grads = _leaves(model(*inputs)), []
            out, out_grads = _leaves(compiled(*inputs)), []
    assert len(out) == len(ref_out) and len(out_grads) == len(ref_grads)
    # Gradients are compared relative to the largest gradient: some are analytically zero
    # (a key bias under softmax's shift invariance) and hold only rounding noise.
    grad_scale = max((float(g.abs().max()) for g in ref_grads), default=None)
    pairs = [(a, b, None) for a, b in zip(out, ref_out)] + [
        (a, b, grad_scale) for a, b in zip(out_grads, ref_grads)]
    for a, b, scale in pairs:
        tol = rtol if rtol is not None else tolerance(b.dtype, b.shape[-1] if b.dim() else 1)
        assert a.shape == b.shape
        err = rel_err(a, b, scale)
        assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"
    return cfx.explain(compiled)


def count_targets(gm: torch.fx.GraphModule, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method")
               and (n.target in targets or str(n.target) in {str(t) for t in targets}))


def canonical_count(gm: torch.fx.GraphModule) -> int:
    return count_targets(gm, canonical_attention)
