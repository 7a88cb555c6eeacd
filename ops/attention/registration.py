"""Registration of `clusterfx::attention`, the canonical node every spelling is reduced to.

A CompositeImplicitAutograd op whose implementation is SDPA (`sdpa.py`), so a canonicalised
graph runs, differentiates and compiles as it is; the lowering pass replaces it per policy.
The project's op namespace `clusterfx` is created here (other families' `custom_op`s add to it).
"""

from __future__ import annotations

import torch

from clusterfx.ops.attention.sdpa import dense_attention

_lib = torch.library.Library("clusterfx", "DEF")  # noqa: TOR901 - the project's namespace
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float dropout_p=0.0, "
    "bool is_causal=False, float scale=1.0, bool enable_gqa=False) -> Tensor"
)
_lib.impl("attention", dense_attention, "CompositeImplicitAutograd")
attention = torch.ops.clusterfx.attention.default
