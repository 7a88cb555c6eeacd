"""`clusterfx train digits --model {vit,paca_vit,vit_paca_rewrite,tcformer}`: train a small
vision transformer on scikit-learn's handwritten digits (in the package: no download) on CPU,
and report test accuracy, parameters, FLOPs and training time.

Data: the 1797 8×8 digits, scaled to [0, 1], upsampled (bilinear) to `--size` pixels, split
80/20 stratified with a fixed seed (1437 train, 360 test). Training: AdamW (lr 2e-3, weight
decay 0.05, cosine schedule with warm-up), label smoothing 0.1, batch 64, random shifts of up
to `--size`/8 pixels, for `--epochs` epochs or until `--budget` seconds of training, whichever
comes first. The accuracy is the last epoch's, on the 360 held-out test digits.

Models (about 0.2-0.3 M parameters each):
- vit: the reference ViT (models/vit.py), patch 2 (64 patches + class token), dim 64, depth 4.
- paca_vit: PaCa-ViT (models/paca_vit.py), two stages (dims 48/96), M = 16 clusters in
  stage 1 (64 tokens), dense stage 2 (16 tokens), conv clustering, stage-wise assignment.
- vit_paca_rewrite: the same ViT as `vit`, compiled with `cfx.PatchToCluster(clusters=16)`
  before training (conv clustering, "pool" init), trained through the compiled model; the
  optimizer is built after the first call so it holds the installed clustering modules.
- tcformer: TCFormer (models/tcformer.py), three stages (dims 32/64/128) on 64 -> 16 -> 4
  tokens, local DPC-kNN over 2×2 regions in the first CTM, global in the second.

FLOPs: `torch.utils.flop_counter` on one test image (forward; multiply-add = 2 FLOPs;
clusterfx's PaCa op has a registered formula).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clusterfx.apps.common import machine_load
from clusterfx.compiler.api import compile as cfx_compile
from clusterfx.config.configs import PatchToCluster
from clusterfx.models import PaCaViT, TCFormer, ViT

MODELS = ("vit", "paca_vit", "vit_paca_rewrite", "tcformer")


def load_digits(size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train (1437, 1, S, S), y_train, x_test (360, 1, S, S), y_test)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    train, test = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target,
                                   random_state=seed)
    x = (x - 0.5) / 0.5
    return x[train], y[train], x[test], y[test]


def build_model(name: str, size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to train and call, the nn.Module holding the parameters)."""
    if name in ("vit", "vit_paca_rewrite"):
        model = ViT(image_size=size, patch_size=size // 8, dim=64, depth=4, heads=4,
                    num_classes=10, in_chans=1, mlp_ratio=2.0, dropout=0.0)
        if name == "vit":
            return model, model
        return cfx_compile(model, policy=PatchToCluster(clusters=16), backend="eager"), model
    if name == "paca_vit":
        model = PaCaViT(dims=(48, 96), heads=(2, 4), depths=(2, 2), clusters=(16, 0),
                        num_classes=10, in_chans=1, mlp_ratio=2.0, drop_path=0.0,
                        stem_stride=size // 8)
        return model, model
    if name == "tcformer":
        model = TCFormer(image_size=size, in_chans=1, num_classes=10, dims=(32, 64, 128),
                         heads=(1, 2, 4), depths=(2, 2, 1), mlp_ratios=(2, 2, 2),
                         sr_ratios=(2, 1, 1), regions=((2, 2), (1, 1)), k=5,
                         stem_stride=size // 8)
        return model, model
    raise ValueError(f"--model ({name!r}) must be one of {MODELS}")


def shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translations of up to max_shift pixels (zero background = the padding value)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(b, h, w)
    batch = torch.arange(b)[:, None, None].expand(b, h, w)
    return padded[batch, 0, rows, cols][:, None]


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
                   for i in range(0, len(y), batch))
    return hits / len(y)


def count_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    """Forward FLOPs of a plain (uncompiled) model on one image."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return int(counter.get_total_flops())


def rewritten_flops(model: ViT, image: torch.Tensor) -> int:
    """Forward FLOPs of the ViT as rewritten by PatchToCluster. torch.compile does not run
    under FlopCounterMode (it falls back to the eager, dense model), so: the dense model's
    count, minus each rewritten site's two attention matmuls (4·N²·C), plus its PaCa op (the
    op's FLOP formula) and its clustering module (counted on a (1, Np, C) input)."""
    from clusterfx.ops.paca import PatchClustering
    from clusterfx.ops.paca.common import flops as paca_flops

    total = count_flops(model, image)
    n = model.num_patches + 1
    for name, module in model.named_modules():
        if isinstance(module, PatchClustering):
            attn = model.get_submodule(name.rsplit(".", 1)[0])
            c, h = module.dim, attn.heads
            patches = module.grid[0] * module.grid[1]
            total += count_flops(module, torch.zeros(1, patches, c)) - 4 * n * n * c
            total += paca_flops(1, h, n, c // h, c // h, module.clusters, n - patches)
    return total


def fit(call, model: torch.nn.Module, data: tuple[torch.Tensor, ...], *, epochs: int,
        budget: float, seed: int = 0, batch: int = 64, lr: float = 2e-3, name: str = "model",
        log=print) -> tuple[int, float]:
    """Train `model` (called through `call`) on the digits `data`; returns (epochs run,
    seconds). The optimizer is built here, after the caller's first call of `call`, so it
    holds any module a rewrite installed."""
    x_train, y_train, x_test, y_test = data
    size = x_train.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(y_train) / batch)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    start = time.perf_counter()
    done = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(call(shift(x_train[idx], size // 8, gen)), y_train[idx],
                                   label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        done = epoch + 1
        elapsed = time.perf_counter() - start
        if done % 10 == 0 or done == epochs:
            model.eval()
            log(f"[{elapsed:6.1f}s] {name} epoch {done}: loss {loss.item():.3f}, test accuracy "
                f"{accuracy(call, x_test, y_test):.4f}")
        if elapsed > budget:
            log(f"{name}: stopping after epoch {done}: training budget {budget:.0f}s spent")
            break
    model.eval()
    return done, time.perf_counter() - start


def train(name: str, *, size: int = 16, epochs: int = 60, budget: float = 280.0,
          seed: int = 0, threads: int | None = None, heatmaps: str | None = None,
          log=print) -> dict[str, Any]:
    """Train one of MODELS from scratch; returns the table row as a dict. With `heatmaps`, the
    trained model's cluster maps on the first test digit are written there (not for vit)."""
    if name not in MODELS:
        raise ValueError(f"--model ({name!r}) must be one of {MODELS}")
    if size % 8 or size < 8:
        raise ValueError(f"--size ({size}) must be a positive multiple of 8")
    if epochs < 1 or budget <= 0:
        raise ValueError(f"--epochs ({epochs}) must be >= 1 and --budget ({budget}) > 0")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = load_digits(size)
    call, model = build_model(name, size)
    model.train()
    call(data[0][:2])  # a first call: the PatchToCluster rewrite installs its modules now
    params = sum(p.numel() for p in model.parameters())
    done, seconds = fit(call, model, data, epochs=epochs, budget=budget, seed=seed, name=name,
                        log=log)
    x_test, y_test = data[2], data[3]
    flops = (rewritten_flops(model, x_test[:1]) if name == "vit_paca_rewrite"
             else count_flops(model, x_test[:1]))
    if heatmaps and name != "vit":
        from clusterfx.apps.visualize import visualize_clusters

        for path in visualize_clusters(call, x_test[0], heatmaps):
            log(f"wrote {path}")
    return {"model": name, "test_accuracy": accuracy(call, x_test, y_test),
            "parameters": params, "flops_per_image": flops, "train_seconds": round(seconds, 1),
            "epochs": done, "image_size": size, "threads": torch.get_num_threads(),
            "machine": machine_load(), "seed": seed}


def markdown_row(r: dict[str, Any]) -> str:
    return (f"| {r['model']} | {100 * r['test_accuracy']:.1f}% | {r['parameters'] / 1e3:.0f}k | "
            f"{r['flops_per_image'] / 1e6:.1f} M | {r['train_seconds']:.0f} s "
            f"({r['epochs']} epochs) |")


def run(args: argparse.Namespace) -> int:
    result = train(args.model, size=args.size, epochs=args.epochs, budget=args.budget,
                   seed=args.seed, threads=args.threads, heatmaps=args.heatmaps)
    print(json.dumps(result, indent=2))
    print(markdown_row(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["test_accuracy"] >= args.target else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train digits` to the `clusterfx` command line."""
    train_cmd = subparsers.add_parser("train", help="train models on built-in data sets")
    sub = train_cmd.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    p = sub.add_parser("digits", help="scikit-learn's handwritten digits on CPU (no download)")
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--size", type=int, default=16, help="image side in pixels (multiple of 8)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--budget", type=float, default=280.0,
                   help="stop after the epoch that passes this many training seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--target", type=float, default=0.97,
                   help="exit 1 when the test accuracy is below this (default 0.97)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.add_argument("--heatmaps", metavar="DIR",
                   help="write the trained model's cluster maps on a test digit (not for vit)")
    p.set_defaults(func=run)
    return train_cmd
