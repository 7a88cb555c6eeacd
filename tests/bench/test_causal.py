"""`clusterfx bench causal` on tiny sizes, in-process through `main([...])`: the speed table,
a training segment that resumes, and the perplexity table with its JSON."""

import json

import torch

from clusterfx.bench import causal_lm
from clusterfx.cli import main


def test_speed_table_covers_every_size(capsys, tmp_path):
    js = tmp_path / "s.json"
    code = main(["bench", "causal", "--part", "speed", "--sizes", "256", "512", "--runs", "1",
                 "--clusters", "8", "--iclusters", "4", "--topk", "4", "--block", "64",
                 "--json", str(js)])
    assert code == 0
    out = capsys.readouterr().out
    assert "B=1 H=8 D=64" in out and "threads" in out
    rows = [line for line in out.splitlines() if line.startswith("| 256 ") or
            line.startswith("| 512 ")]
    assert len(rows) == 2
    data = json.loads(js.read_text())["speed"]
    assert [r["n"] for r in data] == [256, 512]
    assert all(r["dense_s"] > 0 and r["clustered_s"] > 0 and r["i-clustered_s"] > 0
               for r in data)


def test_training_resumes_and_quality_compares_three_policies(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(causal_lm, "MODEL", dict(dim=16, depth=1, n_head=2))
    monkeypatch.setattr(causal_lm, "TRAIN_BACKEND", "eager")
    ckpt = tmp_path / "lm.pt"
    args = ["bench", "causal", "--part", "train", "--checkpoint", str(ckpt),
            "--train-minutes", "1", "--segment-minutes", "0.001"]  # a step or so a segment
    assert main(args) == 0
    first = torch.load(ckpt, weights_only=False)["state"]["step"]
    second = causal_lm.train_segment(ckpt, 1, 0.001)
    assert first >= 1 and second["step"] > first  # the second segment continued the first
    js = tmp_path / "q.json"
    assert main(["bench", "causal", "--part", "quality", "--checkpoint", str(ckpt),
                 "--contexts", "128", "--eval-tokens", "256", "--clusters", "4",
                 "--iclusters", "2", "--topk", "4", "--block", "32", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "| context | dense | causal clustered | causal i-clustered |" in out
    row = json.loads(js.read_text())["quality"][0]
    assert row["context"] == 128
    for name in ("dense", "causal clustered", "causal i-clustered"):
        assert row[name]["ppl"] > 1 and row[name]["tokens"] == 256


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "causal", "--block", "0"]) == 2
    assert "--block (0) must be >= 1" in capsys.readouterr().err
    assert main(["bench", "causal", "--part", "quality", "--contexts", "8192"]) == 2
