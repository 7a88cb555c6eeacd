"""Which attention sites see a causal query stream, and what their masks are.

A clustered rewrite averages the queries of a cluster; when query i may only see the past
(a decoder), a cluster that holds a later query j > i leaks j's content into i's row — a causal
leak. So every site carries `causal_queries` (with the reason), true when

1. the site itself is causal: `is_causal`, a causal mask built in `forward`, or an HF
   causal + key-padding mask recognised by probing (below);
2. its mask is causal at the observed inputs (a causal mask passed in, `nn.Transformer`'s
   `tgt_mask`);
3. its module, or an ancestor, declares `is_causal=True` or `is_decoder=True` (Hugging Face
   attention modules do, cross-attention of decoders included);
4. its queries are computed from the output of a site with `causal_queries` in the same graph
   (decoder cross-attention: the queries come from the causal self-attention).

Mask kinds (`Site.mask_kind`), read from the mask's value: "" (nothing masked), "key
padding" (no variation over queries or heads), "causal", "causal + key padding", "general"
(any other pattern), each with " + bias" when an additive mask also holds values other than 0
on the entries it keeps (ALiBi, relative position biases), or "bias" alone.

Recognising HF decoder masks. A decoder given an `attention_mask` builds a (B, 1, N, N) mask
from it inside `forward`: causal ∧ padding. It depends on an input, so it is not static;
instead the mask subgraph is re-evaluated with the input replaced by probe paddings (none, left,
right, ragged): when every probe gives exactly `tril ∧ probe[b, j] != 0`, the mask is the causal
+ key-padding function of that input, and the site is causal (`Site.causal`) with a key-padding
mask. Probes are evidence, not proof (documented); a mask that fails them is "general".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from clusterfx.passes.analysis.mask_analysis import evaluate_static, input_placeholders

_MASKED = -1e4  # additive values at or below this mean "masked"

NONE, KEY_PADDING, CAUSAL, CAUSAL_PADDING = "", "key padding", "causal", "causal + key padding"
GENERAL, BIAS = "general", "bias"


def keep_of(mask: torch.Tensor) -> torch.Tensor | None:
    """The keep pattern (True = attend) of a bool or additive mask (additive values at or
    below -1e4 are masked); None for other dtypes."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    return mask > _MASKED


def mask_kind(mask: torch.Tensor | None) -> str:
    """Classify a mask value broadcastable to (B, H, Nq, Nk): the kind of its keep pattern
    ("" all kept, "key padding", "causal", "causal + key padding", "general"), with " + bias"
    (or "bias" alone) when an additive mask also holds values other than 0 on kept entries."""
    if mask is None:
        return NONE
    keep = keep_of(mask)
    if keep is None:
        return GENERAL
    bias = mask.dtype != torch.bool and bool((mask[keep] != 0).any())
    pattern = _pattern(keep)
    if bias:
        return f"{pattern} + {BIAS}" if pattern else BIAS
    return pattern


def _pattern(keep: torch.Tensor) -> str:
    if keep.dim() > 4:
        return GENERAL
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    if bool(keep.all()):
        return NONE
    if bool((keep == keep[:, :1, :1, :]).all()):
        return KEY_PADDING
    nq, nk = keep.shape[-2:]
    if nq != nk or bool((keep != keep[:, :1]).any()):
        return GENERAL
    tril = torch.ones(nq, nk, dtype=torch.bool, device=keep.device).tril()
    pad = keep[:, :, -1:, :]  # the last query sees every unpadded key
    if bool((keep == (tril & pad)).all()):
        return CAUSAL if bool(pad.all()) else CAUSAL_PADDING
    return GENERAL


def is_causal_kind(kind: str) -> bool:
    return kind.startswith(CAUSAL)


def is_padding_kind(kind: str) -> bool:
    """A mask the clustered ops take as it is: none, or key padding (no bias)."""
    return kind in (NONE, KEY_PADDING)


def _probes(like: torch.Tensor) -> list[torch.Tensor]:
    """Paddings of a (B, N) attention mask: none, right, left, ragged (a row per pattern)."""
    b, n = like.shape
    idx = torch.arange(n)
    rows = [torch.ones(n, dtype=torch.bool), idx < max(1, n - n // 3), idx >= n // 3,
            (idx % 3) != 1]
    out = []
    for shift in range(len(rows)):
        keep = torch.stack([rows[(shift + r) % len(rows)] for r in range(b)])
        out.append(keep.to(like.dtype))
    return out


def probe_causal_padding(mask: fx.Node, concrete: dict[fx.Node, Any],
                         positions: dict[fx.Node, int] | None = None) -> bool:
    """Is `mask` (a node depending on one (B, N) integer/bool input, the attention mask) the
    causal + key-padding mask of that input? See the module docstring."""
    inputs = input_placeholders(mask)
    if not inputs or len(inputs) > 2:
        return False
    pads = [n for n in inputs if n in concrete and isinstance(concrete[n], torch.Tensor)
            and concrete[n].dim() == 2 and not concrete[n].is_floating_point()]
    if len(pads) != 1:
        return False
    pad = pads[0]
    for probe in _probes(concrete[pad]):
        value = evaluate_static(mask, concrete, positions, inputs=True,
                                overrides={pad: probe})
        if value is None or not is_causal_kind(mask_kind(value)):
            return False
        keep = keep_of(value)
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
        if not bool((keep[:, :, -1, :] == (probe != 0)[:, None, -keep.shape[-1]:]).all()):
            return False
    return True


def observed_kind(mask: Any, concrete: dict[fx.Node, Any],
                  positions: dict[fx.Node, int] | None = None) -> str:
    """The kind of the mask at the observed inputs ("" when it cannot be evaluated)."""
    if not isinstance(mask, fx.Node):
        return NONE
    value = evaluate_static(mask, concrete, positions, inputs=True)
    if value is None:
        return ""
    return mask_kind(value)


def declared_causal(fqn: str, modules: dict[str, str]) -> str:
    """Why the site's module or an ancestor declares a causal stream ("" if none does)."""
    parts = fqn.split(".") if fqn else []
    for i in range(len(parts), -1, -1):
        why = modules.get(".".join(parts[:i]))
        if why:
            return why
    return ""


def annotate(gm: fx.GraphModule, concrete: dict[fx.Node, Any], modules: dict[str, str],
             is_site: Any) -> None:
    """Fill `causal_queries`, `causal_why`, `mask_kind` (and `causal` for recognised HF
    causal + key-padding masks) on the Site of every canonical node, in graph order.
    `is_site(node)` returns the node's Site or None; `modules` maps module paths to why they
    declare a causal stream."""
    positions = {n: i for i, n in enumerate(gm.graph.nodes)}
    kinds: dict[fx.Node, tuple[str, bool, bool]] = {}  # mask -> (kind, structural, probed)
    stream: dict[fx.Node, str] = {}  # node -> why it is computed from a causal stream
    for node in gm.graph.nodes:
        site = is_site(node)
        if site is None:
            for x in node.all_input_nodes:
                if x in stream:
                    stream[node] = stream[x]
                    break
            continue
        q, mask, causal = node.args[0], node.args[3], node.args[5]
        if isinstance(mask, fx.Node) and mask not in kinds:
            kinds[mask] = _kind(mask, concrete, positions)
        kind, structural, probed = kinds.get(mask, (NONE, True, False))
        site.mask_kind, site.mask_observed = kind, not structural
        if probed:
            site.causal = True
        why = ""
        if causal or site.causal:
            why = "the attention is causal"
        elif is_causal_kind(kind):
            why = f"its mask is {kind} at the observed inputs"
        why = why or declared_causal(site.fqn, modules)
        if not why and isinstance(q, fx.Node) and q in stream:
            why = f"its queries are computed from {stream[q]}"
        if not why:
            for x in node.all_input_nodes:
                if x in stream:
                    stream[node] = stream[x]
                    break
            continue
        site.causal_queries, site.causal_why = True, why
        stream[node] = f"the causal attention {site.fqn or '<root>'}"


def _kind(mask: fx.Node, concrete: dict[fx.Node, Any],
          positions: dict[fx.Node, int]) -> tuple[str, bool, bool]:
    """(kind, structural, probed) of a mask node: structural when the kind holds for every
    input (a static mask, or a recognised causal + key-padding function of the input)."""
    static = evaluate_static(mask, concrete, positions)
    if static is not None:
        return mask_kind(static), True, False
    value = evaluate_static(mask, concrete, positions, inputs=True)
    kind = mask_kind(value) if value is not None else ""
    if is_causal_kind(kind) and probe_causal_padding(mask, concrete, positions):
        return kind, True, True
    return kind, False, False
