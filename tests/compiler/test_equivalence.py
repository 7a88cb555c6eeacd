"""check_equivalence: exact agreement is zero error; output, gradient and structure differences
are caught; dropout in train mode is refused before any work."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import clusterfx as cfx
from clusterfx.compiler.equivalence import (
    EquivalenceResult,
    ErrorStats,
    check_equivalence,
    flatten_outputs,
)
from clusterfx.models import example_inputs, gpt_tiny


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class Tiny(nn.Module):
    def __init__(self, grad_factor: float = 1.0, input_grad_factor: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
        self.bias = nn.Parameter(torch.zeros(4))
        self.grad_factor, self.input_grad_factor = grad_factor, input_grad_factor

    def forward(self, x):
        w = _ScaleGrad.apply(self.weight, self.grad_factor)
        x = _ScaleGrad.apply(x, self.input_grad_factor)
        return x @ w.T + self.bias


def _x(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(
        requires_grad)


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = gpt_tiny(depth=1).eval()
    return model, example_inputs("gpt", model=model)


def test_identical_models_have_zero_error(gpt):
    model, inputs = gpt
    result = check_equivalence(model, model, inputs)
    assert set(result.outputs) == {"output"} and set(result.grads) == {"params"}
    for stats in [*result.outputs.values(), *result.grads.values()]:
        assert stats.max_abs == 0.0 and stats.max_rel == 0.0
        assert stats.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.grads["params"].count == len(list(model.parameters()))
    assert result.max_rel_error == 0.0 and result.ok(rtol=0.0)


def test_clusterfx_compiled_model_is_equivalent(gpt):
    torch._dynamo.reset()
    model, inputs = gpt
    compiled = cfx.compile(model, backend="eager")  # shares the parameters of `model`
    result = check_equivalence(model, compiled, inputs)
    assert result.ok(rtol=1e-4), str(result)
    assert result.grads["params"].count == len(list(model.parameters()))
    assert result.min_cosine > 0.999999


def test_output_offset_is_detected_and_gradients_still_agree(gpt):
    model, inputs = gpt
    shifted = lambda *args: model(*args) + 1e-3  # not a module: uses the reference's params
    result = check_equivalence(model, shifted, inputs)
    out = result.outputs["output"]
    assert out.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert out.max_rel > 1e-5
    assert not result.ok(rtol=1e-5)
    assert result.grads["params"].max_abs == 0.0  # a constant shift has the same gradients


def test_changed_weight_is_detected_and_named(gpt):
    model, inputs = gpt
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[0].attn.c_proj.weight[0, 0] += 0.05
    result = check_equivalence(model, other, inputs)
    assert result.outputs["output"].max_abs > 1e-4
    assert result.grads["params"].max_rel > 1e-4
    assert result.grads["params"].worst in dict(model.named_parameters())
    assert not result.ok()


def test_gradient_only_difference_is_detected():
    reference, compiled = Tiny(), Tiny(grad_factor=1.01)
    result = check_equivalence(reference, compiled, (_x(),))
    assert result.outputs["output"].max_abs == 0.0
    grads = result.grads["params"]
    assert grads.worst == "weight"
    assert grads.max_rel == pytest.approx(0.01, rel=1e-3)
    assert "inputs" not in result.grads  # the input does not require grad
    assert not result.ok(rtol=1e-3) and result.ok(rtol=0.02)


def test_input_gradient_difference_is_detected():
    result = check_equivalence(Tiny(), Tiny(input_grad_factor=2.0), _x(requires_grad=True))
    assert result.grads["params"].max_abs == 0.0
    assert result.grads["inputs"].worst == "0"
    assert result.grads["inputs"].max_rel == pytest.approx(1.0, rel=1e-6)
    assert not result.ok()


def test_existing_grads_are_restored():
    model = Tiny()
    marker = torch.full_like(model.weight, 7.0)
    model.weight.grad = marker
    check_equivalence(model, model, (_x(),))
    assert model.weight.grad is marker and model.bias.grad is None


def test_nan_is_never_ok():
    model = Tiny()
    broken = lambda x: model(x) * float("nan")
    result = check_equivalence(model, broken, (_x(),), grads=False)
    assert math.isnan(result.max_rel_error)
    assert not result.ok(rtol=1e9)


class Structured(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(3, 3)

    def forward(self, x, *, scale: float = 1.0):
        y = self.lin(x) * scale
        if self.kind == "dict":
            return {"a": y, "b": (y.sum(), [y * 2, None]), "n": y.argmax(-1)}
        if self.kind == "tuple":
            return y, (y + 1, y.sum())
        if self.kind == "model_output":
            from transformers.modeling_outputs import BaseModelOutput

            return BaseModelOutput(last_hidden_state=y, hidden_states=(y, y * 3))
        return "not a tensor"


@pytest.mark.parametrize("kind, leaves", [
    ("dict", ["a", "b.0", "b.1.0", "n"]),
    ("tuple", ["0", "1.0", "1.1"]),
    ("model_output", ["last_hidden_state", "hidden_states.0", "hidden_states.1"]),
])
def test_outputs_are_flattened_to_named_leaves(kind, leaves):
    if kind == "model_output":
        pytest.importorskip("transformers")
    model = Structured(kind)
    result = check_equivalence(model, model, {"x": _x(), "scale": 2.0})
    assert list(result.outputs) == leaves
    assert all(s.max_abs == 0.0 for s in result.outputs.values())
    assert result.grads["params"].count == 2
    assert set(result.to_dict()["outputs"]) == set(leaves)
    assert all(name in str(result) for name in leaves)


def test_flatten_keeps_none_and_names_a_bare_tensor():
    t = torch.ones(2)
    assert list(flatten_outputs(t)) == ["output"]
    assert flatten_outputs((t, None))["1"] is None


def test_mismatched_structures_and_shapes_are_errors():
    model = Structured("dict")
    other = Structured("tuple")
    with pytest.raises(ValueError, match="output structures differ"):
        check_equivalence(model, other, (_x(),))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        check_equivalence(Tiny(), lambda x: Tiny()(x)[:, :2], (_x(),))


def test_bad_inputs_and_outputs_are_errors():
    with pytest.raises(TypeError, match="no tensor"):
        check_equivalence(Tiny(), Tiny(), (1, 2))
    with pytest.raises(TypeError, match="must be a tensor"):
        check_equivalence(Tiny(), Tiny(), 3.0)
    with pytest.raises(TypeError, match="str"):
        check_equivalence(Structured("bad"), Structured("bad"), (_x(),))
    with pytest.raises(ValueError, match="parameters do not match"):
        check_equivalence(Tiny(), Structured("dict"), (_x(),))


def test_dropout_in_train_mode_is_refused_before_running():
    calls = []
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"1 \(Dropout\) has dropout p=0.1.*\.eval\(\)"):
        check_equivalence(model, model, (_x(),))
    assert calls == []
    assert check_equivalence(model.eval(), model, (_x(),)).ok(rtol=0.0)
    model.train()[1].p = 0.0
    assert check_equivalence(model, model, (_x(),)).ok(rtol=0.0)


def test_result_table_and_dict():
    result = EquivalenceResult(outputs={"logits": ErrorStats(1e-3, 2e-3, 0.99)},
                               grads={"params": ErrorStats(0.5, 0.25, 0.9, "w", 3)})
    assert result.max_rel_error == 0.25 and result.min_cosine == 0.9
    text = str(result)
    assert "logits" in text and "0.25" in text and text.splitlines()[0].split()[0] == "kind"
    assert result.to_dict()["grads"]["params"]["worst"] == "w"
    assert result.ok(rtol=0.3) and not result.ok(rtol=0.2)
