"""`clusterfx::attention`, the canonical attention node every spelling is reduced to.

    attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=1.0,
              enable_gqa=False) -> Tensor

Same meaning as `F.scaled_dot_product_attention` except that `scale` is always explicit and
`attn_mask` and `is_causal` may be given together (they combine). Layout of the family:
`registration.py` (schema; CompositeImplicitAutograd), `sdpa.py` (the implementation: SDPA on
any device), `reference.py` (the float64-capable oracle), `checks.py`.
"""

from __future__ import annotations

from clusterfx.ops.attention.checks import check_qkv
from clusterfx.ops.attention.reference import attention_reference, repeat_kv
from clusterfx.ops.attention.registration import attention
from clusterfx.ops.attention.sdpa import causal_keep, dense_attention

__all__ = ["attention", "attention_reference", "dense_attention", "check_qkv", "causal_keep",
           "repeat_kv"]
