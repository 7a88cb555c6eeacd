"""Normalise `F.multi_head_attention_forward` (what dynamo keeps of `nn.MultiheadAttention`)
into explicit projections and one attention spelling the canonicaliser knows.

Before (dynamo graph):
    mha = F.multi_head_attention_forward(x, x, x, E, H, w_in, b_in, ..., need_weights=False)
    out = mha[0]
After:
    q = F.linear(x, w_in[:E], b_in[:E]) ... view/transpose to (B, H, L, hd)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)      # need_weights=False
      or softmax(q @ kᵀ · s + mask) @ v, weights = probs.mean(1)      # need_weights=True
    out = F.linear(o ... (L, B, E), w_out, b_out)

Features outside this decomposition (bias_k/bias_v, add_zero_attn, static_k/v) leave the node
as it is, with a reason recorded for the report. The fast path
(`torch._native_multi_head_attention`,
`torch._transformer_encoder_layer_fwd`) is avoided at trace time by `compile()`.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from clusterfx.config.vocabulary import Status
from clusterfx.passes.analysis.graph_utils import GraphEditor, arg, module_path, value_of
from clusterfx.passes.base import GraphPass, PassContext, PassResult
from clusterfx.passes.site import Site

MHA_FORWARD = F.multi_head_attention_forward

_NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
          "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
          "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
          "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
          "static_k", "static_v", "average_attn_weights", "is_causal")


def _args(node: fx.Node) -> dict:
    return {name: arg(node, i, name) for i, name in enumerate(_NAMES)}


def _build(flags: dict):
    """Return a function of the tensor arguments that spells MHA out. Everything that decides
    control flow (sizes, dtypes, which masks exist) is a constant in `flags`."""
    E, H = flags["E"], flags["H"]
    hd = E // H
    scale = 1.0 / math.sqrt(hd)

    def project(x, w, b, i):
        bias = None if b is None else b[i * E:(i + 1) * E]
        return F.linear(x, w if flags["separate"] else w[i * E:(i + 1) * E], bias)

    def heads(x, batch):  # (L, B, E) -> (B, H, L, hd)
        return x.reshape(x.size(0), batch, H, hd).permute(1, 2, 0, 3)

    def additive(keep_or_add, is_bool):
        if not is_bool:
            return keep_or_add.to(flags["dtype"])
        zeros = torch.zeros(keep_or_add.shape, dtype=flags["dtype"], device=keep_or_add.device)
        return zeros.masked_fill(~keep_or_add, float("-inf"))

    def fn(query, key, value, w_in, b_in, w_q, w_k, w_v, w_out, b_out, kpm, attn_mask):
        batch = query.size(1)
        q = heads(project(query, w_q if flags["separate"] else w_in, b_in, 0), batch)
        k = heads(project(key, w_k if flags["separate"] else w_in, b_in, 1), batch)
        v = heads(project(value, w_v if flags["separate"] else w_in, b_in, 2), batch)
        mask, mask_bool = None, False
        if attn_mask is not None:
            if flags["attn_mask_3d"]:  # (B*H, L, S) -> (B, H, L, S)
                attn_mask = attn_mask.reshape(batch, H, attn_mask.size(-2), attn_mask.size(-1))
            mask_bool = flags["attn_mask_bool"]
            mask = ~attn_mask if mask_bool else attn_mask  # bool: True meant "masked"
        if kpm is not None:
            kp = kpm[:, None, None, :]  # (B, 1, 1, S)
            kp = ~kp if flags["kpm_bool"] else kp
            if mask is None:
                mask, mask_bool = kp, flags["kpm_bool"]
            elif mask_bool and flags["kpm_bool"]:
                mask = mask & kp
            else:
                mask = additive(mask, mask_bool) + additive(kp, flags["kpm_bool"])
                mask_bool = False
        p = flags["dropout_p"] if flags["training"] else 0.0
        weights = None
        if not flags["need_weights"]:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            s = (q @ k.transpose(-2, -1)) * scale  # (B, H, L, S)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf")) if mask_bool else s + mask
            probs = torch.softmax(s, dim=-1)
            o = F.dropout(probs, p=p, training=flags["training"]) @ v
            weights = probs.mean(dim=1) if flags["average"] else probs
        o = o.permute(2, 0, 1, 3).reshape(o.size(2), batch, E)  # (L, B, E)
        return F.linear(o, w_out, b_out), weights

    return fn


class InlineMHA(GraphPass):
    """`F.multi_head_attention_forward` → projections + one attention spelling.
    Counters: `inlined`, `unsupported`; an MHA it cannot inline becomes an unsupported site."""

    name = "inline_mha"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        inlined, declined = inline_multi_head_attention(gm)
        result.counters["inlined"] = inlined
        for fqn, reason in declined:
            site = Site(fqn, "nn.MultiheadAttention", graph_index=ctx.graph_index)
            site.mark(Status.UNSUPPORTED, reason)
            ctx.sites.append(site)
            result.counters["unsupported"] += 1
            result.declines.append((fqn, reason))
        return result


def inline_multi_head_attention(gm: fx.GraphModule) -> tuple[int, list[tuple[str, str]]]:
    """Rewrite every `multi_head_attention_forward` call in place; return how many, and the
    (module path, reason) of the ones declined."""
    editor = GraphEditor(gm)
    inlined = 0
    declined: list[tuple[str, str]] = []
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is MHA_FORWARD):
            continue
        a = _args(node)
        reason = None
        if a["bias_k"] is not None or a["bias_v"] is not None:
            reason = "bias_k/bias_v are not supported by the decomposition"
        elif a["add_zero_attn"]:
            reason = "add_zero_attn is not supported by the decomposition"
        elif a["static_k"] is not None or a["static_v"] is not None:
            reason = "static_k/static_v are not supported by the decomposition"
        elif value_of(a["query"]) is None or value_of(a["query"]).dim() != 3:
            reason = "unbatched (2-D) input is not supported by the decomposition"
        if reason:
            declined.append((module_path(node), reason))
            continue
        inlined += 1
        mask_val, kpm_val = value_of(a["attn_mask"]), value_of(a["key_padding_mask"])
        flags = {
            "dtype": value_of(a["query"]).dtype,
            "attn_mask_bool": mask_val is not None and mask_val.dtype == torch.bool,
            "kpm_bool": kpm_val is not None and kpm_val.dtype == torch.bool,
            "E": a["embed_dim_to_check"], "H": a["num_heads"],
            "separate": bool(a["use_separate_proj_weight"]),
            "attn_mask_3d": mask_val is not None and mask_val.dim() == 3,
            "dropout_p": float(a["dropout_p"]), "training": bool(a["training"]),
            "need_weights": bool(a["need_weights"]),
            "average": bool(a["average_attn_weights"] if a["average_attn_weights"] is not None
                            else True),
        }
        tensor_names = ("query", "key", "value", "in_proj_weight", "in_proj_bias",
                        "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight",
                        "out_proj_bias", "key_padding_mask", "attn_mask")
        traced = fx.symbolic_trace(_build(flags), concrete_args={
            name: None for name, key in zip(_PARAMS, tensor_names) if a[key] is None})
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        env = {ph: a[key] for ph, key in zip(placeholders, tensor_names, strict=True)}
        with gm.graph.inserting_before(node):
            out, weights = editor.copy_graph(traced.graph, env, like=node)
        for user in list(node.users):
            if user.op == "call_function" and user.args[1] == 0:
                user.replace_all_uses_with(out)
            elif user.op == "call_function" and user.args[1] == 1 and weights is not None:
                user.replace_all_uses_with(weights)
        for user in list(node.users):
            if not user.users:
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return inlined, declined


_PARAMS = ("query", "key", "value", "w_in", "b_in", "w_q", "w_k", "w_v", "w_out", "b_out", "kpm",
           "attn_mask")
