"""Your own model: attention written with einsum, and a softmax over class scores at the end.

clusterfx finds the einsum attention (one site, at module path `attn`) and leaves the
classifier's softmax alone: it is not attention (no query-key product feeds it).

    python examples/custom_model.py
    clusterfx explain examples/custom_model.py:make_model \
        --inputs examples/custom_model.py:make_inputs
"""

import math

import torch
from torch import nn

import clusterfx as cfx


class EinsumSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(D)) v per head. Shapes: x (B, N, C) -> (B, N, C), C = H * D."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H = self.heads
        q, k, v = self.qkv(x).view(B, N, 3, H, C // H).unbind(2)  # each (B, N, H, D)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(C // H)  # (B, H, N, N)
        probs = scores.softmax(dim=-1)
        y = torch.einsum("bhnm,bmhd->bnhd", probs, v)  # (B, N, H, D)
        return self.proj(y.reshape(B, N, C))  # (B, N, C)


class SequenceClassifier(nn.Module):
    """Features (B, N, F) -> class probabilities (B, classes)."""

    def __init__(self, features: int = 16, dim: int = 64, heads: int = 4, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = EinsumSelfAttention(dim, heads)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, N, dim)
        h = h + self.attn(self.norm(h))
        logits = self.head(h.mean(dim=1))  # (B, classes)
        return logits.softmax(dim=-1)  # a softmax that is not attention: must stay as written


def make_model() -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier().eval()


def make_inputs(model: SequenceClassifier) -> tuple[torch.Tensor]:
    features = model.embed.in_features
    return (torch.randn(2, 64, features, generator=torch.Generator().manual_seed(0)),)


def main() -> None:
    model = make_model()
    inputs = make_inputs(model)
    compiled = cfx.compile(model, policy={"attn": cfx.Clustered(clusters=8)}, backend="eager")
    with torch.no_grad():
        compiled(*inputs)
    report = cfx.explain(compiled)
    print(report)
    if [row.fqn for row in report] != ["attn"]:
        raise SystemExit(f"expected exactly one attention site, at 'attn'; got "
                         f"{[row.fqn for row in report]}")


if __name__ == "__main__":
    main()
