"""Does a compiled model compute what its reference computes? Outputs and gradients, compared.

For a compiled leaf `a` and the reference leaf `b` (both taken to float64):

    max_abs = max |a - b|
    max_rel = max |a - b| / max(max |B|, tiny)        (B: the reference's peak over the group)
    cosine  = <a, b> / (|a| |b|)                       (1 when both are zero, 0 when one is)

Equal entries (infinities included) count as zero difference; a NaN makes the error NaN, which
`ok()` rejects. With `grads=True` both runs go backward with the same random cotangent per
floating output (seeded), and the gradients are compared per group: "params" (by parameter
name) and "inputs" (floating inputs that require grad); relative errors in a group are taken
against the group's largest reference gradient (a gradient that is analytically zero, such as a
key bias under softmax's shift invariance, holds only rounding noise), max_abs / max_rel are the
maxima over its tensors, its cosine is taken over all of them concatenated, and `worst` names
the tensor with the largest relative error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    max_rel: float
    cosine: float
    worst: str = ""  # gradient groups: the tensor with the largest max_rel
    count: int = 1  # tensors compared


@dataclass
class EquivalenceResult:
    outputs: dict[str, ErrorStats] = field(default_factory=dict)
    grads: dict[str, ErrorStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _all(self) -> list[ErrorStats]:
        return [*self.outputs.values(), *self.grads.values()]

    @property
    def max_rel_error(self) -> float:
        return _nanmax([s.max_rel for s in self._all()])

    @property
    def min_cosine(self) -> float:
        cosines = [s.cosine for s in self._all()]
        return float("nan") if any(map(math.isnan, cosines)) else min(cosines, default=1.0)

    def ok(self, rtol: float = 1e-4) -> bool:
        """Every output and gradient within `rtol` relative error (NaN never is)."""
        return all(s.max_rel <= rtol for s in self._all())

    def to_dict(self) -> dict:
        return {"outputs": {k: asdict(s) for k, s in self.outputs.items()},
                "grads": {k: asdict(s) for k, s in self.grads.items()},
                "max_rel_error": self.max_rel_error, "min_cosine": self.min_cosine,
                "notes": list(self.notes)}

    def __str__(self) -> str:
        rows = [["kind", "name", "max_abs", "max_rel", "cosine", "worst"]]
        for kind, stats in (("output", self.outputs), ("grad", self.grads)):
            rows += [[kind, name, f"{s.max_abs:.3g}", f"{s.max_rel:.3g}", f"{s.cosine:.6f}",
                      s.worst] for name, s in stats.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"max relative error {self.max_rel_error:.3g}, "
                     f"min cosine {self.min_cosine:.6f}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def check_equivalence(reference_model: Any, compiled: Any, inputs: Any, *, grads: bool = True,
                      cotangent_seed: int = 0) -> EquivalenceResult:
    """Run `reference_model` and `compiled` on `inputs` and compare outputs (and gradients).

    `inputs`: a tuple/list of positional arguments, a single tensor, or a dict of keyword
    arguments. Outputs may be tensors, tuples/lists/dicts, dataclasses or HF ModelOutputs of
    them; leaves are named by their path (`last_hidden_state`, `0`, `1.2`). Parameters are
    matched by name (`_orig_mod` wrappers, as `clusterfx.compile` returns, are looked through)
    or, failing that, by identity; a `compiled` that is not a module is taken to use the
    reference's parameters. Existing `.grad`s are restored afterwards.
    """
    _check_no_dropout(reference_model, "reference_model")
    _check_no_dropout(_unwrap(compiled), "compiled")
    args, kwargs = _as_call(inputs)
    ref_params = _named_params(reference_model)
    cmp_params = _match_params(ref_params, _named_params(compiled)) if isinstance(
        _unwrap(compiled), nn.Module) else ref_params
    saved = {id(p): (p, p.grad) for p in [*ref_params.values(), *cmp_params.values()]}
    try:
        ref = _run(reference_model, args, kwargs, ref_params, grads, cotangent_seed, None)
        out = _run(compiled, args, kwargs, cmp_params, grads, cotangent_seed, ref)
    finally:
        for p, grad in saved.values():
            p.grad = grad
    result = EquivalenceResult()
    for name, b in ref.outputs.items():
        a = out.outputs[name]
        if b is not None:
            result.outputs[name] = _group({name: a}, {name: b}, name_worst=False)
            if a.dtype != b.dtype:
                result.notes.append(f"output {name}: dtype {a.dtype} vs reference {b.dtype}")
    if grads and not ref.differentiable:
        result.notes.append("no floating output requires grad: gradients were not compared")
    for group, (ga, gb) in {"params": (out.param_grads, ref.param_grads),
                            "inputs": (out.input_grads, ref.input_grads)}.items():
        if grads and ref.differentiable and (ga or gb):
            result.grads[group] = _group(ga, gb)
    return result


# --------------------------------------------------------------------------- running

@dataclass
class _Run:
    outputs: dict[str, torch.Tensor | None]
    param_grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    input_grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    differentiable: bool = False


def _run(model, args, kwargs, params: dict[str, nn.Parameter], grads: bool, seed: int,
         reference: _Run | None) -> _Run:
    for p in params.values():
        p.grad = None
    leaves: dict[str, torch.Tensor] = {}
    if grads:
        args = _fresh(args, "", leaves)
        kwargs = _fresh(kwargs, "", leaves)
    with torch.enable_grad() if grads else torch.no_grad():
        flat = flatten_outputs(model(*args, **kwargs))
    if reference is not None:
        _check_same_structure(reference.outputs, flat)
    run = _Run({k: v.detach().clone() if v is not None else None for k, v in flat.items()})
    if not grads:
        return run
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for t in flat.values():  # the same order, shapes and draws in both runs
        if t is None or not t.is_floating_point():
            continue
        cotangent = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        if t.requires_grad:
            pairs.append((t, cotangent.to(device=t.device, dtype=t.dtype)))
    run.differentiable = bool(pairs)
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [c for _, c in pairs])
    run.param_grads = {n: _clone(p.grad) for n, p in params.items() if p.requires_grad}
    run.input_grads = {n: _clone(x.grad) for n, x in leaves.items()}
    for p in params.values():
        p.grad = None
    return run


def _clone(grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.detach().clone()


def _fresh(value: Any, path: str, leaves: dict[str, torch.Tensor]) -> Any:
    """`value` with each floating tensor that requires grad replaced by a fresh leaf."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.requires_grad:
            leaves[path] = value.detach().clone().requires_grad_(True)
            return leaves[path]
        return value
    if isinstance(value, Mapping):
        return type(value)({k: _fresh(v, _join(path, k), leaves) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v, _join(path, i), leaves) for i, v in enumerate(value))
    return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _as_call(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"keyword inputs must have str keys, got {bad!r}")
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        raise TypeError(f"inputs ({type(inputs).__name__}) must be a tensor, a tuple/list of "
                        f"positional arguments, or a dict of keyword arguments")
    # objects pytree cannot see into (a PyG Batch, a custom input class) are passed as they
    # are: their outputs and the parameter gradients are compared, not gradients inside them
    plain = (int, float, bool, complex, str, type(None))
    if all(isinstance(x, plain) for x in torch.utils._pytree.tree_leaves((args, kwargs))):
        raise TypeError(f"inputs contain no tensor: got {_describe(inputs)}")
    return args, kwargs


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- outputs

def flatten_outputs(value: Any, path: str = "") -> dict[str, torch.Tensor | None]:
    """{leaf path: tensor or None}: `output` for a bare tensor, `0`, `1.2`, `logits`..."""
    if isinstance(value, torch.Tensor) or value is None:
        return {path or "output": value}
    if isinstance(value, (bool, int, float)):
        return {path or "output": torch.tensor(value)}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, (tuple, list)):
        items = list(enumerate(value))
    else:
        raise TypeError(f"output {path or 'output'!r} is a {type(value).__name__} "
                        f"({_describe(value)}); outputs must be tensors, numbers or None, in "
                        f"tuples, lists, dicts or ModelOutputs")
    flat: dict[str, torch.Tensor | None] = {}
    for key, item in items:
        flat.update(flatten_outputs(item, _join(path, key)))
    return flat


def _check_same_structure(ref: Mapping[str, Any], out: Mapping[str, Any]) -> None:
    if list(ref) != list(out):
        raise ValueError(f"output structures differ: the reference gives leaves {list(ref)}, "
                         f"compiled gives {list(out)}")
    for name, b in ref.items():
        a = out[name]
        if (a is None) != (b is None):
            raise ValueError(f"output {name!r} is {'None' if a is None else 'a tensor'} in "
                             f"compiled but {'None' if b is None else 'a tensor'} in the reference")
        if a is not None and a.shape != b.shape:
            raise ValueError(f"output {name!r} has shape {tuple(a.shape)} in compiled but "
                             f"{tuple(b.shape)} in the reference")


# --------------------------------------------------------------------------- parameters

def _unwrap(model: Any) -> Any:
    while getattr(model, "_orig_mod", None) is not None:  # CompiledModule, OptimizedModule
        model = model._orig_mod
    return model


def _named_params(model: Any) -> dict[str, nn.Parameter]:
    model = _unwrap(model)
    return dict(model.named_parameters()) if isinstance(model, nn.Module) else {}


def _match_params(ref: dict[str, nn.Parameter], cmp: dict[str, nn.Parameter]
                  ) -> dict[str, nn.Parameter]:
    """The compiled model's parameters under the reference's names."""
    if set(cmp) == set(ref):
        return cmp
    by_id = {id(p): name for name, p in ref.items()}
    if len(cmp) == len(ref) and all(id(p) in by_id for p in cmp.values()):
        return {by_id[id(p)]: p for p in cmp.values()}
    missing, extra = sorted(set(ref) - set(cmp)), sorted(set(cmp) - set(ref))
    raise ValueError(f"compiled's parameters do not match the reference's: missing {missing[:5]}"
                     f", extra {extra[:5]} (names must match, or the parameters be shared)")


def _check_no_dropout(model: Any, role: str) -> None:
    if not isinstance(model, nn.Module) or not model.training:
        return
    for name, m in model.named_modules():
        if not m.training:  # a submodule put in eval mode draws no mask
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            p = m.p
        elif isinstance(m, nn.MultiheadAttention):
            p = m.dropout
        else:
            continue
        if p > 0:
            raise ValueError(
                f"{role} is in train mode and {name or '<root>'} ({type(m).__name__}) has "
                f"dropout p={p}: the two runs would draw different masks. Call .eval() on the "
                f"model, or set p=0")


# --------------------------------------------------------------------------- statistics

def _nanmax(values: list[float]) -> float:
    return float("nan") if any(map(math.isnan, values)) else max(values, default=0.0)


def _group(got: Mapping[str, torch.Tensor | None], want: Mapping[str, torch.Tensor | None],
           name_worst: bool = True) -> ErrorStats:
    """Errors of the tensors `got` against `want`, by name; a missing gradient counts as 0."""
    per: dict[str, tuple[float, float]] = {}
    dot = norm_a = norm_b = 0.0
    scale = max([float(b.detach().abs().max()) for b in want.values()
                 if b is not None and b.numel()] + [TINY])
    for name in dict.fromkeys([*want, *got]):
        a, b = got.get(name), want.get(name)
        if a is None and b is None:
            continue
        a = (a if a is not None else torch.zeros_like(b)).detach().to(torch.float64)
        b = (b if b is not None else torch.zeros_like(a)).detach().to(a.device, torch.float64)
        diff = torch.where(a == b, 0.0, (a - b).abs())
        max_abs = float(diff.max()) if diff.numel() else 0.0
        per[name] = (max_abs, max_abs / scale)
        dot += float((a * b).sum())
        norm_a += float((a * a).sum())
        norm_b += float((b * b).sum())
    if norm_a == 0.0 and norm_b == 0.0:
        cosine = 1.0
    elif norm_a == 0.0 or norm_b == 0.0:
        cosine = 0.0
    else:
        cosine = dot / math.sqrt(norm_a * norm_b)
    rels = {n: r for n, (_, r) in per.items()}
    worst = next((n for n, r in rels.items() if math.isnan(r)), None) or max(
        rels, key=rels.__getitem__, default="")
    return ErrorStats(_nanmax([a for a, _ in per.values()]), _nanmax(list(rels.values())),
                      cosine, worst if name_worst else "", len(per))
