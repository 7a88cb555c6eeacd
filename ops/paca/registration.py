"""torch.library registration of ``clusterfx::paca_attention`` and its backward op: schema,
fake kernels, autograd, FLOP formula, and dispatch to the implementations (``reference``,
``cpu``, ``triton``). See the family's ``__init__`` for the math. ``site``: a telemetry tag (a
rewritten site's op counts its calls and implementation for its compile's report)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from clusterfx.ops.common import telemetry
from clusterfx.ops.common.dispatch import resolve_impl
from clusterfx.ops.paca.backward import paca_attention_backward
from clusterfx.ops.paca.checks import validate
from clusterfx.ops.paca.common import default_scale, flops
from clusterfx.ops.paca.cpu import paca_attention_cpu
from clusterfx.ops.paca.reference import paca_attention_reference


@torch.library.custom_op("clusterfx::paca_attention", mutates_args=())
def _paca_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       logits: torch.Tensor, prefix: int = 0, scale: float | None = None,
                       impl: str = "auto", site: str = "") -> torch.Tensor:
    validate(q, k, v, logits, prefix, scale, impl)
    name = resolve_impl(impl, q.device)
    telemetry.record("paca_attention", name, site=site, path=f"patch-to-cluster [{name}]")
    args = dict(prefix=prefix, scale=default_scale(q.shape[-1], scale))
    if name == "reference":
        out = paca_attention_reference(q, k, v, logits, **args)
    elif name == "cpu":
        out = paca_attention_cpu(q, k, v, logits, **args)
    else:  # imported when used, so that this module imports without Triton
        from clusterfx.ops.paca.triton import paca_attention_triton

        out = paca_attention_triton(q, k, v, logits, **args)
    return out.contiguous()  # the fake kernel's layout


@_paca_attention_op.register_fake
def _paca_attention_fake(q, k, v, logits, prefix=0, scale=None, impl="auto", site=""):
    validate(q, k, v, logits, prefix, scale, impl)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("clusterfx::paca_attention_backward", mutates_args=())
def _paca_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, logits: torch.Tensor, prefix: int,
                                scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    grads = paca_attention_backward(grad, q, k, v, logits, prefix=prefix, scale=scale)
    return tuple(t.contiguous() for t in grads)  # the fake kernel's layout


@_paca_attention_backward_op.register_fake
def _paca_attention_backward_fake(grad, q, k, v, logits, prefix, scale):
    contiguous = torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=contiguous) for t in (q, k, v, logits))


def _setup_context(ctx, inputs, output):
    q, k, v, logits, prefix, scale, _impl, _site = inputs
    ctx.save_for_backward(q, k, v, logits)
    ctx.params = (prefix, default_scale(q.shape[-1], scale))


def _backward(ctx, grad):
    q, k, v, logits = ctx.saved_tensors
    prefix, scale = ctx.params
    dq, dk, dv, dlogits = torch.ops.clusterfx.paca_attention_backward(
        grad, q, k, v, logits, prefix, scale)
    return dq, dk, dv, dlogits, None, None, None, None


_paca_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.clusterfx.paca_attention)
def _paca_flops(q_shape, k_shape, v_shape, logits_shape, prefix=0, *args, out_shape=None,
                **kwargs) -> int:
    b, h, n, d = q_shape
    return flops(b, h, n, d, v_shape[-1], logits_shape[1], prefix)


@register_flop_formula(torch.ops.clusterfx.paca_attention_backward)
def _paca_backward_flops(grad_shape, q_shape, k_shape, v_shape, logits_shape, prefix, *args,
                         out_shape=None, **kwargs) -> int:
    b, h, n, d = q_shape
    return 2 * flops(b, h, n, d, v_shape[-1], logits_shape[1], prefix)
