"""THC on brain networks: write a synthetic connectome folder, train THC (and two baselines) on
it, print the held-out metrics, and see THC's attention sites as clusterfx finds them.

    python examples/thc_connectomes.py [--subjects 120] [--rois 48] [--epochs 30] [--out DIR]

For your own data, make a folder in the same format (one <subject>.npy N×N matrix per subject,
labels.csv with `subject,label`, optionally communities.csv with `roi,level1[,level2]`) and run
`clusterfx thc train --data DIR --out OUT`. The defaults here are small so this finishes in
well under a minute on a laptop CPU; `clusterfx thc synth --out DIR` writes the 300-subject,
100-ROI set of the README.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch_geometric.data import Batch

import clusterfx as cfx
from clusterfx.apps.thc.data import load_connectomes, synthesize
from clusterfx.apps.thc.train import TrainConfig, run
from clusterfx.models.thc import THC, from_connectivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=120)
    parser.add_argument("--rois", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="thc-"))

    # 1. Data: 4 modules × 3 submodules planted in each subject's connectivity; the label
    #    (0/1) changes the coupling of modules 0 and 1.
    folder = synthesize(out / "data", subjects=args.subjects, rois=args.rois, seed=0)
    data = load_connectomes(folder)  # validates the folder; errors name the offending file
    print(f"{len(data.subjects)} subjects, {data.num_rois} ROIs, labels {data.labels[:8]}...")

    # 2. Train THC (N → 12 → 4 clusters) and the baselines on one seeded, stratified split.
    config = TrainConfig(epochs=args.epochs, seed=0, clusters=(12, 4))
    metrics = run(data, out / "run", config)
    for name, m in metrics["models"].items():
        print(f"{name}: AUROC {m['auroc']:.3f}  accuracy {m['accuracy']:.3f}  "
              f"({m['train_seconds']:.1f}s, {m['parameters']} parameters)")
    print("THC communities vs the planted ones:", json.dumps(metrics.get("nmi")))
    print(f"pictures and per-ROI communities in {out / 'run'}")

    # 3. THC's attention is ordinary dense attention to clusterfx: compile it (PyG batches in,
    #    static shapes, one graph) and list its sites.
    model = THC(data.num_rois, (12, 4)).eval()
    batch = Batch.from_data_list([from_connectivity(m, density=0.1) for m in data.matrices[:4]])
    compiled = cfx.compile(model, policy={"levels.0": cfx.TopK(k=16)}, backend="eager",
                           fullgraph=True)
    with torch.no_grad():
        compiled(batch)
    print(cfx.explain(compiled))


if __name__ == "__main__":
    main()
