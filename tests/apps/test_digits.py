"""The digits trainer: data split, augmentation, every model builds and trains an epoch, FLOP
counts, and the `clusterfx train digits` command line."""

from __future__ import annotations

import pytest
import torch

from clusterfx.apps.digits import (
    MODELS,
    build_model,
    count_flops,
    load_digits,
    rewritten_flops,
    shift,
    train,
)
from clusterfx.cli import main

pytest.importorskip("sklearn")


def test_split_and_scaling():
    x, y, xt, yt = load_digits(16)
    assert x.shape == (1437, 1, 16, 16) and xt.shape == (360, 1, 16, 16)
    assert len(y) == 1437 and len(yt) == 360
    assert x.min() >= -1 and x.max() <= 1
    assert sorted(torch.bincount(yt).tolist())[0] >= 35  # stratified: every class is there


def test_shift_moves_images_by_at_most_the_limit():
    x = torch.zeros(8, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    out = shift(x, 2, torch.Generator().manual_seed(0))
    for img in out[:, 0]:
        r, c = (img == 1.0).nonzero()[0].tolist()
        assert abs(r - 4) <= 2 and abs(c - 4) <= 2
    assert torch.equal(shift(x, 0, torch.Generator()), x)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_and_classifies(name):
    call, model = build_model(name, 16)
    assert call(torch.randn(3, 1, 16, 16)).shape == (3, 10)


def test_rewritten_flops_swap_dense_attention_for_paca():
    call, model = build_model("vit_paca_rewrite", 16)
    image = torch.randn(1, 1, 16, 16)
    call(image)
    dense = count_flops(model, image)
    rewritten = rewritten_flops(model, image)
    assert rewritten != dense
    # four sites: minus 4·N²·C each, plus the op and the clustering head
    sites = sum(1 for n, _ in model.named_modules() if n.endswith("paca_clustering"))
    assert sites == 4


def test_one_epoch_of_the_rewritten_vit(tmp_path):
    result = train("vit_paca_rewrite", size=8, epochs=1, budget=60, heatmaps=str(tmp_path),
                   log=lambda *_: None)
    assert set(result) >= {"test_accuracy", "parameters", "flops_per_image", "train_seconds"}
    assert result["epochs"] == 1 and 0.0 <= result["test_accuracy"] <= 1.0
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_command_line_errors_exit_2(capsys):
    assert main(["train", "digits", "--model", "vit", "--size", "12"]) == 2
    assert "--size (12) must be a positive multiple of 8" in capsys.readouterr().err
    assert main(["train", "digits", "--model", "resnet"]) == 2
