"""Plain-torch reference models with dense attention (and THC with its PyG frontend). Import
only torch and torch_geometric; never the rest of clusterfx."""

from __future__ import annotations

import torch

from .bert import Bert, bert_tiny
from .gpt import GPT, gpt_tiny
from .paca_vit import PaCaViT, paca_vit_small, paca_vit_tiny
from .tcformer import MTANeck, TCFormer, tcformer, tcformer_light
from .thc import (
    GCN,
    THC,
    FlatTransformer,
    THCOutput,
    cluster_loss,
    dense_connectivity,
    from_connectivity,
    from_networkx_graph,
    thc_small,
)
from .vit import ViT, vit_tiny

__all__ = [
    "MODEL_FACTORIES",
    "GCN",
    "GPT",
    "THC",
    "Bert",
    "MTANeck",
    "PaCaViT",
    "TCFormer",
    "FlatTransformer",
    "THCOutput",
    "ViT",
    "cluster_loss",
    "dense_connectivity",
    "from_connectivity",
    "from_networkx_graph",
    "thc_small",
    "bert_tiny",
    "example_inputs",
    "gpt_tiny",
    "paca_vit_small",
    "paca_vit_tiny",
    "tcformer",
    "tcformer_light",
    "vit_tiny",
]

MODEL_FACTORIES = {"vit": vit_tiny, "bert": bert_tiny, "gpt": gpt_tiny}


def example_inputs(
    name: str,
    batch: int = 2,
    seq_len: int = 16,
    *,
    model: torch.nn.Module | None = None,
    image_size: int = 32,
    vocab_size: int = 1000,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs for the model `name` (a key of MODEL_FACTORIES).

    vit: (images (batch, 3, S, S),) with S = model.image_size if `model` is given, else image_size;
    seq_len is unused. bert: (input_ids (batch, seq_len), attention_mask (batch, seq_len)) where
    the last row ends in padding (mask 0, id 0). gpt: (idx (batch, seq_len),). Token ids are drawn
    below model.vocab_size if `model` is given, else below vocab_size.
    """
    if name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_FACTORIES)}")
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch ({batch}) must be >= 1 and seq_len ({seq_len}) >= 2")
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        size = getattr(model, "image_size", image_size)
        return (torch.randn(batch, 3, size, size, generator=gen),)
    vocab = getattr(model, "vocab_size", vocab_size)
    ids = torch.randint(1, vocab, (batch, seq_len), generator=gen)  # 0 is kept for padding
    if name == "gpt":
        return (ids,)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    pad = max(1, seq_len // 4)
    mask[-1, -pad:] = 0
    ids[-1, -pad:] = 0
    return ids, mask
