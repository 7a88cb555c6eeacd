"""Cluster heat maps on a real photograph (scikit-image's `astronaut`, shipped in the package):
TCFormer's token clusters, PaCa-ViT's assignment maps, and those of a ViT rewritten with
`cfx.PatchToCluster`.

    python examples/cluster_heatmaps.py [--out clusterfx-heatmaps]

The models are untrained (no weights are downloaded): TCFormer's DPC-kNN clusters the features
of its convolutional stem, so its regions already follow colour and texture; PaCa-ViT's maps
show the soft assignments of its randomly initialised clustering heads (colour scale per map);
the rewritten ViT starts from the "pool" initialisation, M average-pooled regions. Trained
models (`clusterfx train digits --heatmaps DIR`) show learned clusters.
"""

import argparse

import numpy as np
import torch
from skimage import data
from skimage.transform import resize

import clusterfx as cfx
from clusterfx.apps.visualize import visualize_clusters
from clusterfx.models import paca_vit_tiny, tcformer_light, vit_tiny

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="clusterfx-heatmaps")
    args = parser.parse_args()
    torch.manual_seed(0)
    photo = resize(data.astronaut(), (224, 224), anti_aliasing=True)  # (224, 224, 3) in [0, 1]
    image = torch.from_numpy(((photo - MEAN) / STD).transpose(2, 0, 1)).float()  # (3, 224, 224)

    written = visualize_clusters(tcformer_light(), image, f"{args.out}/tcformer", display=photo)
    written += visualize_clusters(paca_vit_tiny(), image, f"{args.out}/paca_vit", display=photo)

    vit = vit_tiny(image_size=224, patch_size=16, dim=96, depth=2, heads=4, dropout=0.0).eval()
    compiled = cfx.compile(vit, policy=cfx.PatchToCluster(clusters=49), backend="eager")
    with torch.no_grad():
        compiled(image[None])  # installs blocks.{0,1}.attn.paca_clustering
    written += visualize_clusters(compiled, image, f"{args.out}/vit_rewritten", display=photo,
                                  max_maps=49)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
