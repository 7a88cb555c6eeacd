"""Argument checks for ``paca_attention`` (generic ones from ``clusterfx.ops.common``), run
before any work, eagerly and under fake tensors (they read metadata only).

Every error names the offending value and what would be accepted.
"""

from __future__ import annotations

import torch

from clusterfx.ops.common.checks import check_float, check_impl, check_int, check_scale


def validate(q, k, v, logits, prefix, scale, impl) -> None:
    """Raise ValueError for anything ``paca_attention`` does not accept.

    q (B, H, N, D), k (B, H, N, D), v (B, H, N, Dv) of one float dtype and device (self-attention:
    one sequence); logits (B, M, N - prefix) floating, M >= 1, on the same device; 0 <= prefix < N.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, 4, exact_rank=True)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes ({q.dtype}, {k.dtype}, {v.dtype}) must be the same")
    check_float("logits", logits, 3, exact_rank=True)
    devices = {t.device for t in (q, k, v, logits)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, logits must be on one device, got {sorted(map(str, devices))}")
    b, h, n, d = q.shape
    if tuple(k.shape) != (b, h, n, d):
        raise ValueError(f"k {tuple(k.shape)} must have q's shape {tuple(q.shape)}: patch-to-"
                         f"cluster attention is self-attention over one sequence, one kv head "
                         f"per query head")
    if tuple(v.shape[:3]) != (b, h, n):
        raise ValueError(f"v {tuple(v.shape)} must share (B, H, N) = {(b, h, n)} with q")
    check_int("prefix", prefix, 0)
    if prefix >= n:
        raise ValueError(f"prefix ({prefix}) must be below the sequence length N ({n}): at least "
                         f"one patch must follow the class/register tokens")
    if logits.shape[0] != b or logits.shape[2] != n - prefix:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, M, N - prefix) = "
                         f"({b}, M, {n - prefix})")
    if logits.shape[1] < 1:
        raise ValueError(f"logits have M = {logits.shape[1]} clusters; M must be >= 1")
    check_scale(scale, positive=True)
    check_impl(impl)


def check_triton_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"impl='triton' takes float32, float16 or bfloat16 inputs, got "
                         f"{q.dtype}; use impl='reference' or 'cpu' for float64")


LAYER_IMPLS = ("auto", "reference", "cpu")
HEAD_PARAMS = {"conv": 5, "mlp": 4, "linear": 1}  # parameters of each clustering head


def validate_layer(x, grid, kind, head, q, kv, proj, heads, norm, prior, impl) -> None:
    """Raise ValueError for anything ``paca_layer`` does not accept (its docstring)."""
    if impl not in LAYER_IMPLS:
        raise ValueError(f"paca_layer: impl ({impl!r}) must be one of {LAYER_IMPLS}")
    if kind not in HEAD_PARAMS:
        raise ValueError(f"paca_layer: kind ({kind!r}) must be one of {tuple(HEAD_PARAMS)}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"paca_layer: x must be a floating (B, N, C) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    b, n, c = x.shape
    if (len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0
                              for g in grid) or grid[0] * grid[1] != n):
        raise ValueError(f"paca_layer: grid {tuple(grid)} must be two positive ints with "
                         f"H·W = N = {n}")
    want = HEAD_PARAMS[kind]
    if len(head) != want:
        raise ValueError(f"paca_layer: a {kind!r} head takes {want} parameters (see "
                         f"clustering.cluster_logits), got {len(head)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or c % heads:
        raise ValueError(f"paca_layer: heads ({heads!r}) must be a positive int dividing C = "
                         f"{c}")
    if tuple(q[0].shape) != (c, c) or tuple(proj[0].shape) != (c, c):
        raise ValueError(f"paca_layer: q and proj weights must be (C, C) = ({c}, {c}), got "
                         f"{tuple(q[0].shape)} and {tuple(proj[0].shape)}")
    if tuple(kv[0].shape) != (2 * c, c):
        raise ValueError(f"paca_layer: the kv weight must be (2C, C) = ({2 * c}, {c}), got "
                         f"{tuple(kv[0].shape)}")
    if norm is not None and len(norm) != 3:
        raise ValueError("paca_layer: norm must be (weight, bias, eps) or None")
    named = [*(("head", t) for t in head), *(("q", t) for t in q), *(("kv", t) for t in kv),
             *(("proj", t) for t in proj), ("prior", prior),
             *(("norm", t) for t in (norm[:2] if norm else ()))]
    for name, t in named:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"paca_layer: a {name} parameter is {t.dtype} on {t.device}; "
                             f"every parameter must match x ({x.dtype} on {x.device})")
    m = _check_head(kind, head, c)
    if prior is not None and tuple(prior.shape) != (m, n):
        raise ValueError(f"paca_layer: prior {tuple(prior.shape)} must be (M, N) = ({m}, {n})")
    for name, (_, bias), rows in (("q", q, c), ("kv", kv, 2 * c), ("proj", proj, c)):
        _check_shape(f"{name} bias", bias, (rows,))
    if norm is not None:
        for t in norm[:2]:
            _check_shape("norm weight/bias", t, (c,))


def _check_shape(name: str, t, shape: tuple, optional: bool = True) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
        raise ValueError(f"paca_layer: the {name} must be {shape}, got {got}")


def _check_head(kind: str, head, c: int) -> int:
    """Check the clustering head's parameter shapes (the fused kernels read them by pointer);
    returns M."""
    if kind == "conv":
        w_dw, b_dw, w_pw, b_pw, w_out = head
        k = w_dw.shape[-1] if w_dw.dim() == 4 else 0
        if w_dw.dim() != 4 or tuple(w_dw.shape) != (c, 1, k, k) or k % 2 == 0:
            raise ValueError(f"paca_layer: the depthwise weight must be (C, 1, k, k) with C = "
                             f"{c} and k odd, got {tuple(w_dw.shape)}")
        _check_shape("depthwise bias", b_dw, (c,))
        hidden = w_pw.shape[0]
        _check_shape("hidden weight", w_pw.reshape(w_pw.shape[0], -1) if w_pw.dim() == 4 else
                     w_pw, (hidden, c), optional=False)
        _check_shape("hidden bias", b_pw, (hidden,))
        m = w_out.shape[0]
        _check_shape("logits weight", w_out.reshape(m, -1) if w_out.dim() == 4 else w_out,
                     (m, hidden), optional=False)
        return m
    if kind == "mlp":
        w1, b1, w2, b2 = head
        hidden, m = w1.shape[0], w2.shape[0]
        _check_shape("hidden weight", w1, (hidden, c), optional=False)
        _check_shape("hidden bias", b1, (hidden,))
        _check_shape("logits weight", w2, (m, hidden), optional=False)
        _check_shape("logits bias", b2, (m,))
        return m
    (w,) = head
    _check_shape("logits weight", w, (w.shape[0], c), optional=False)
    return w.shape[0]
