"""Shared test helpers: tolerances derived from a float64 oracle, compile-and-compare through
`clusterfx.check_equivalence`, graph counts."""

from __future__ import annotations

import math
from typing import Any

import torch

import clusterfx as cfx
from clusterfx.ops.attention import attention as canonical_attention

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10,
       torch.bfloat16: 2.0**-7}


def tolerance(dtype: torch.dtype, reduction: int, factor: float = 8.0) -> float:
    """Relative tolerance between two computations of the same thing in `dtype` (e.g. compiled
    vs eager) after reductions of length `reduction`: rounding error grows like eps·sqrt(n)."""
    return factor * EPS[dtype] * max(reduction, 1) ** 0.5


def oracle_tolerance(dtype: torch.dtype, oracle: torch.Tensor | float, reduction: int = 1, *,
                     accumulation_ulps: float = 16.0, rounding_ulps: float = 2.0,
                     floor: float = 0.0) -> float:
    """The absolute error an implementation computing in `dtype` may have against the float64
    oracle: `rounding_ulps` ulps of rounding its output to `dtype`, plus float32 accumulation
    error growing like sqrt(reduction) (`accumulation_ulps` fp32 ulps per sqrt term), relative
    to the oracle's magnitude (max |oracle|, at least `floor`)."""
    scale = float(oracle.abs().max()) if isinstance(oracle, torch.Tensor) else float(oracle)
    unit = rounding_ulps * EPS[dtype] + accumulation_ulps * math.sqrt(max(reduction, 1)) * EPS[
        torch.float32]
    return unit * max(scale, floor)


def assert_within_eager_error(got: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor,
                              dtype: torch.dtype, factor: float = 2.0) -> None:
    """Against the float64 oracle, `got` errs no more than `factor` × what eager errs in `dtype`
    (plus one ulp of the oracle's magnitude): the tolerance comes from the oracle, not a guess."""
    err_eager = float((eager.double() - oracle).abs().max())
    err_got = float((got.double() - oracle).abs().max())
    eps = EPS[dtype] * float(oracle.abs().max())
    assert err_got <= factor * err_eager + eps, (err_got, err_eager)


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max |a - b| relative to max |b| (or to `scale`, e.g. the largest of a set of tensors)."""
    ref = float(b.detach().abs().max()) if scale is None else scale
    return float((a.detach() - b.detach()).abs().max()) / max(ref, 1e-30)


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict) or hasattr(x, "to_tuple"):
        x = list(x.values()) if isinstance(x, dict) else list(x.to_tuple())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _leaves(item)]
    return []


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
    """Compile `model` with clusterfx and assert, through `cfx.check_equivalence`, that its
    outputs (and the gradients of parameters and floating inputs) equal eager's within `rtol`
    (default: `tolerance` of the inputs' dtype and largest trailing dim); return the report."""
    compiled = cfx.compile(model, policy=policy, backend=backend, **kwargs)
    floats = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if grads:  # gradients w.r.t. the floating inputs too
        chosen = {id(x) for x in floats}
        inputs = tuple(x.detach().clone().requires_grad_(True) if id(x) in chosen else x
                       for x in inputs)
    if rtol is None:
        dtype = floats[0].dtype if floats else torch.float32
        rtol = tolerance(dtype, max((x.shape[-1] for x in floats if x.dim()), default=1))
    result = cfx.check_equivalence(model, compiled, inputs, grads=grads)
    assert result.ok(rtol), f"not within rtol {rtol:.3g}:\n{result}"
    return cfx.explain(compiled)


def count_targets(gm: torch.fx.GraphModule, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method")
               and (n.target in targets or str(n.target) in {str(t) for t in targets}))


def canonical_count(gm: torch.fx.GraphModule) -> int:
    return count_targets(gm, canonical_attention)


def assert_same_values_and_grads(got: torch.Tensor, want: torch.Tensor, wrt, atol: float = 1e-12
                                 ) -> None:
    """got == want (to atol) and so are their gradients with respect to ``wrt`` for one random
    output gradient (got and want must come from separate graphs)."""
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    g = torch.randn_like(want)
    grads = torch.autograd.grad((got * g).sum(), tuple(wrt))
    expected = torch.autograd.grad((want * g).sum(), tuple(wrt))
    for a, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)
