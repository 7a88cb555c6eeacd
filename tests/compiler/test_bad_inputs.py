"""Bad input at the user-facing layer gets a clear error before any work: a ValueError that
names the value and what is accepted (and exit 2 from the command line)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clusterfx as cfx
from clusterfx.cli import main as cli_main
from clusterfx.ops.clustered import clustered_attention


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("seed", [2**63, -2, 1.5, True])
def test_seeds_outside_int64_are_refused_where_they_are_written(seed):
    with pytest.raises(ValueError, match=rf"seed \({seed!r}\).*\[0, 2\*\*63\)"):
        cfx.Clustered(seed=seed)
    with pytest.raises(ValueError, match=rf"seed \({seed!r}\)"):
        cfx.Policy.from_dict({"_default": {"type": "clustered", "seed": seed}})
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"seed .*2\*\*63"):
        clustered_attention(q, q, q, clusters=2, seed=seed)


def test_the_largest_seed_compiles_and_runs():
    q = torch.randn(1, 2, 8, 4)
    compiled = cfx.compile(_Attention(), policy=cfx.Clustered(clusters=2, seed=2**63 - 1),
                           backend="eager")
    assert compiled(q, q, q).shape == q.shape
    assert cfx.explain(compiled)[0].status == "rewritten"


def test_dump_dir_that_is_a_file(tmp_path):
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"dump_dir \('.*not-a-folder'\) is an existing file"):
        cfx.compile(_Attention(), dump_dir=file)
    with pytest.raises(ValueError, match=r"dump_dir \('.*not-a-folder/below'\) cannot be"):
        cfx.compile(_Attention(), dump_dir=file / "below")


def test_policy_from_dict_names_the_field_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"no field\(s\) \['cluster'\]; its fields are \[.*"
                                         r"'clusters'.*\]"):
        cfx.Policy.from_dict({"encoder": {"type": "clustered", "cluster": 3}})
    with pytest.raises(ValueError, match=r"config type \('clusterd'\) must be one of \[.*"
                                         r"'clustered'"):
        cfx.Policy.from_dict({"encoder": {"type": "clusterd"}})
    with pytest.raises(ValueError, match=r"policy value for 'encoder' \(3\) must be a config"):
        cfx.Policy.from_dict({"encoder": 3})
    with pytest.raises(ValueError, match=r"must be a dict of key -> config dict, got list"):
        cfx.Policy.from_dict([("encoder", None)])


def test_compile_refuses_its_own_keywords():
    with pytest.raises(TypeError, match="isolate_recompiles"):
        cfx.compile(_Attention(), isolate_recompiles=False)


def test_bench_attention_with_an_impossible_size_exits_2(capsys):
    assert cli_main(["bench", "attention", "--sizes", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert "--sizes 1000000000" in err and "GiB" in err
