"""Rewrite a trained dense ViT with patch-to-cluster attention and fine-tune it back.

    python examples/paca_finetune_digits.py [--dense-epochs 40] [--finetune-epochs 15]
                                            [--clusters 16] [--heatmaps DIR]

1. Train the reference ViT (dense attention) on scikit-learn's digits (no download).
2. Compile it with `cfx.PatchToCluster(clusters=M)`: every attention site becomes PaCa
   attention, and a clustering module is installed at `blocks.{i}.attn.paca_clustering`
   ("pool" initialisation: M average-pooled regions of the 8x8 patch grid).
3. Measure the accuracy right after the rewrite, then fine-tune through the compiled model with
   an optimizer built after the first call (so it holds the clustering modules), and measure
   again. With --heatmaps, write the fine-tuned assignment maps on a test digit.
"""

import argparse

import torch

import clusterfx as cfx
from clusterfx.apps.digits import accuracy, build_model, fit, load_digits
from clusterfx.apps.visualize import visualize_clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--heatmaps", metavar="DIR")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits(16)
    x_test, y_test = data[2], data[3]

    _, model = build_model("vit", 16)
    fit(model, model, data, epochs=args.dense_epochs, budget=1e9, name="dense ViT")
    dense = accuracy(model, x_test, y_test)

    compiled = cfx.compile(model, policy=cfx.PatchToCluster(clusters=args.clusters),
                           backend="eager")
    rewritten = accuracy(compiled, x_test, y_test)  # first call: installs the clustering
    print(cfx.explain(compiled))
    fit(compiled, model, data, epochs=args.finetune_epochs, budget=1e9, lr=5e-4,
        name="PaCa fine-tune")
    tuned = accuracy(compiled, x_test, y_test)
    print(f"test accuracy: dense {dense:.4f} -> rewritten, before fine-tuning {rewritten:.4f} "
          f"-> after {args.finetune_epochs} epochs of fine-tuning {tuned:.4f}")
    if args.heatmaps:
        for path in visualize_clusters(compiled, x_test[0], args.heatmaps):
            print(path)


if __name__ == "__main__":
    main()
