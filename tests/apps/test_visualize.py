"""visualize_clusters writes PNG heat maps for PaCa-ViT, TCFormer and PatchToCluster-rewritten
models, and refuses models without clustering attention."""

from __future__ import annotations

import pytest
import torch

import clusterfx as cfx
from clusterfx.apps.visualize import visualize_clusters
from clusterfx.models import PaCaViT, TCFormer, vit_tiny

pytest.importorskip("matplotlib")
PNG = b"\x89PNG"


def _pngs(paths):
    assert paths and all(p.read_bytes()[:4] == PNG for p in paths)
    return sorted(p.name for p in paths)


def test_paca_vit_maps(tmp_path):
    torch.manual_seed(0)
    model = PaCaViT(dims=(16, 32), heads=(2, 2), depths=(2, 1), clusters=(4, 3),
                    num_classes=10)
    names = _pngs(visualize_clusters(model, torch.randn(3, 32, 32), tmp_path))
    assert names == ["paca_stage1_block1.png", "paca_stage1_block1_argmax.png",
                     "paca_stage2_block1.png", "paca_stage2_block1_argmax.png"]
    assert all(not b.attn.record_assignment for s in model.stages for b in s)


def test_tcformer_token_clusters(tmp_path):
    torch.manual_seed(0)
    model = TCFormer(image_size=32, dims=(16, 32, 64), heads=(1, 2, 4), depths=(1, 1, 1),
                     mlp_ratios=(2, 2, 2), sr_ratios=(2, 1, 1), regions=((2, 2), (1, 1)),
                     stem_stride=2, num_classes=10)
    display = torch.rand(32, 32, 3).numpy()
    names = _pngs(visualize_clusters(model, torch.randn(1, 3, 32, 32), tmp_path,
                                     display=display))
    assert names == ["tcformer_clusters.png", "tcformer_stage2.png", "tcformer_stage3.png"]


def test_rewritten_vit_maps_through_the_compiled_model(tmp_path):
    torch.manual_seed(0)
    model = vit_tiny(image_size=32, patch_size=8, dim=32, depth=2, heads=4, dropout=0.0)
    compiled = cfx.compile(model, policy={"blocks.1": cfx.PatchToCluster(clusters=4)},
                           backend="eager")
    x = torch.randn(1, 3, 32, 32)
    compiled(x)
    names = _pngs(visualize_clusters(compiled, x[0], tmp_path))
    assert names == ["paca_blocks_1_attn.png", "paca_blocks_1_attn_argmax.png"]


def test_models_without_clustering_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no clustering attention"):
        visualize_clusters(vit_tiny(), torch.randn(3, 32, 32), tmp_path)
    with pytest.raises(ValueError, match="give one image"):
        visualize_clusters(vit_tiny(), torch.randn(2, 3, 32, 32), tmp_path)
