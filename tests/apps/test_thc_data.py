"""Connectome folders: the synthetic generator, the reader, and its errors (each names the
offending file or value)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest

from clusterfx.apps.thc import command
from clusterfx.apps.thc.data import load_connectomes, planted_communities, synthesize


def _cli(argv: list[str]) -> int:
    """The harness the real CLI will be: a root parser, `add_parser`, then the func."""
    parser = argparse.ArgumentParser(prog="clusterfx")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _folder(tmp_path: Path, matrices: dict[str, np.ndarray], labels: dict[str, object]) -> Path:
    for name, m in matrices.items():
        np.save(tmp_path / f"{name}.npy", m)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "label"])
        w.writerows(labels.items())
    return tmp_path


def _sym(n: int, seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)
    m = (m + m.T) / 2
    np.fill_diagonal(m, 0)
    return m


def test_planted_communities_nest():
    level1, level2 = planted_communities(100, 4, 3)
    assert np.bincount(level1).tolist() == [25] * 4
    assert sorted(np.bincount(level2).tolist()) == [8] * 8 + [9] * 4
    assert all(len(set(level1[level2 == c])) == 1 for c in range(12))  # level2 inside level1
    with pytest.raises(ValueError, match=r"rois \(10\) must be at least"):
        planted_communities(10, 4, 3)


def test_synth_writes_the_folder_format_through_the_cli(tmp_path):
    out = tmp_path / "syn"
    assert _cli(["thc", "synth", "--out", str(out), "--subjects", "12", "--rois", "24",
                 "--timepoints", "60", "--seed", "3"]) == 0
    data = load_connectomes(out)
    assert data.subjects[0] == "sub-0001" and len(data.subjects) == 12
    assert data.matrices.shape == (12, 24, 24) and data.matrices.dtype == np.float32
    assert np.array_equal(data.matrices[0], np.load(out / "sub-0001.npy"))
    assert np.bincount(data.labels).tolist() == [6, 6]
    assert list(data.communities) == ["level1", "level2"]
    m = data.matrices
    assert np.allclose(m, m.transpose(0, 2, 1)) and (np.diagonal(m, axis1=1, axis2=2) == 0).all()
    # Fisher z of a correlation: |z| finite and within arctanh(1 - 1e-7)
    assert np.isfinite(m).all() and np.abs(m).max() < np.arctanh(1 - 1e-7) + 1e-3


def test_synth_is_seeded_and_plants_its_communities(tmp_path):
    a = synthesize(tmp_path / "a", 40, 36, timepoints=200, seed=1)
    b = synthesize(tmp_path / "b", 40, 36, timepoints=200, seed=1)
    c = synthesize(tmp_path / "c", 40, 36, timepoints=200, seed=2)
    assert (a / "sub-0007.npy").read_bytes() == (b / "sub-0007.npy").read_bytes()
    assert (a / "sub-0007.npy").read_bytes() != (c / "sub-0007.npy").read_bytes()
    data = load_connectomes(a)
    level1, level2 = data.communities["level1"], data.communities["level2"]
    assert not np.array_equal(level1, np.sort(level1))  # ROIs are shuffled
    mean = data.matrices.mean(0)
    same_sub = level2[:, None] == level2[None, :]
    same_mod = (level1[:, None] == level1[None, :]) & ~same_sub
    other = level1[:, None] != level1[None, :]
    off = ~np.eye(36, dtype=bool)
    # nested coupling: submodule > module > rest, as planted
    assert mean[same_sub & off].mean() > mean[same_mod].mean() + 0.1
    assert mean[same_mod].mean() > mean[other].mean() + 0.1


def test_synth_label_depends_on_the_coupling_of_modules_0_and_1(tmp_path):
    data = load_connectomes(synthesize(tmp_path, 60, 24, timepoints=200, effect=0.4, seed=0))
    level1 = data.communities["level1"]
    link = data.matrices[:, level1 == 0][:, :, level1 == 1].mean(axis=(1, 2))
    control = data.matrices[:, level1 == 2][:, :, level1 == 3].mean(axis=(1, 2))
    y = data.labels
    assert link[y == 1].mean() > link[y == 0].mean() + 0.1
    assert abs(control[y == 1].mean() - control[y == 0].mean()) < 0.05


def test_npz_files_and_an_infinite_diagonal_are_read(tmp_path):
    m = _sym(5, 0)
    np.savez(tmp_path / "a.npz", m)
    np.savez(tmp_path / "b.npz", connectivity=m, timeseries=np.zeros((3, 5)))
    z = m.copy()
    np.fill_diagonal(z, np.inf)  # arctanh(1) on the diagonal
    _folder(tmp_path, {"c": z}, {"a": 0, "b": 1, "c": 1})
    data = load_connectomes(tmp_path)
    assert data.subjects == ("a", "b", "c") and data.labels.tolist() == [0, 1, 1]
    assert all(np.array_equal(data.matrices[i], m) for i in range(3))
    assert data.communities is None


def _error(tmp_path: Path, matrices: dict, labels: dict | None = None) -> str:
    labels = labels if labels is not None else {name: i % 2 for i, name in enumerate(matrices)}
    _folder(tmp_path, matrices, labels)
    with pytest.raises(ValueError) as info:
        load_connectomes(tmp_path)
    return str(info.value)


def test_non_square_matrix_names_the_file(tmp_path):
    msg = _error(tmp_path, {"ok": _sym(4, 0), "bad": np.zeros((4, 3), np.float32)})
    assert "bad.npy" in msg and "square" in msg and "(4, 3)" in msg


def test_non_symmetric_matrix_names_the_file_and_entry(tmp_path):
    m = _sym(4, 1)
    m[0, 2] += 0.5
    msg = _error(tmp_path, {"ok": _sym(4, 0), "skew": m})
    assert "skew.npy" in msg and "not symmetric" in msg and "m[0, 2]" in msg


def test_nan_names_the_file(tmp_path):
    m = _sym(4, 1)
    m[1, 3] = m[3, 1] = np.nan
    msg = _error(tmp_path, {"ok": _sym(4, 0), "holes": m})
    assert "holes.npy" in msg and "2 NaN" in msg and "(1, 3)" in msg


def test_differing_roi_count_names_the_odd_file(tmp_path):
    msg = _error(tmp_path, {"a": _sym(4, 0), "b": _sym(4, 1), "c": _sym(5, 2)})
    assert "c.npy" in msg and "5 ROIs" in msg and "have 4" in msg


def test_missing_label_names_the_subject_file(tmp_path):
    msg = _error(tmp_path, {"a": _sym(4, 0), "b": _sym(4, 1)}, {"a": 1})
    assert "labels.csv" in msg and "b.npy" in msg and "no label" in msg


def test_non_binary_label_names_subject_and_value(tmp_path):
    msg = _error(tmp_path, {"a": _sym(4, 0), "b": _sym(4, 1)}, {"a": 1, "b": "ASD"})
    assert "'ASD'" in msg and "'b'" in msg and "accepted: 0 or 1" in msg
    msg = _error(tmp_path, {"a": _sym(4, 0), "b": _sym(4, 1)}, {"a": 2, "b": 0})
    assert "'2'" in msg and "'a'" in msg


def test_unreadable_files_name_the_file(tmp_path):
    np.savez(tmp_path / "many.npz", a=_sym(4, 0), b=_sym(4, 1))
    msg = _error(tmp_path, {"ok": _sym(4, 0)}, {"ok": 0, "many": 1})
    assert "many.npz" in msg and "one named 'connectivity'" in msg and "['a', 'b']" in msg
    (tmp_path / "many.npz").unlink()
    (tmp_path / "junk.npy").write_text("not numpy")
    msg = _error(tmp_path, {"ok": _sym(4, 0)}, {"ok": 0, "junk": 1})
    assert "junk.npy" in msg and "cannot be read as a numpy array" in msg


def test_empty_folder_and_missing_labels_file(tmp_path):
    with pytest.raises(ValueError, match=f"data folder {tmp_path} holds no subject file"):
        load_connectomes(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_connectomes(tmp_path / "nowhere")
    np.save(tmp_path / "a.npy", _sym(4, 0))
    with pytest.raises(ValueError, match="labels.csv is missing"):
        load_connectomes(tmp_path)


def test_two_files_for_one_subject_and_bad_communities(tmp_path):
    _folder(tmp_path, {"a": _sym(4, 0), "b": _sym(4, 1)}, {"a": 0, "b": 1})
    (tmp_path / "communities.csv").write_text("roi,level1\n0,0\n1,0\n2,1\n7,1\n")
    with pytest.raises(ValueError, match=r"communities.csv: roi 7 is outside 0..3"):
        load_connectomes(tmp_path)
    (tmp_path / "communities.csv").write_text("roi,level1\n0,0\n1,0\n2,1\n")
    with pytest.raises(ValueError, match="level1 has no non-negative community for roi 3"):
        load_connectomes(tmp_path)
    (tmp_path / "communities.csv").write_text("roi,level1\n0,0\n1,0\n1,1\n")
    with pytest.raises(ValueError, match="roi 1 is listed twice"):
        load_connectomes(tmp_path)
    (tmp_path / "communities.csv").write_text("roi,module\n0,0\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['level1'\]"):
        load_connectomes(tmp_path)
    np.savez(tmp_path / "a.npz", _sym(4, 0))
    with pytest.raises(ValueError, match="subject 'a' has two files"):
        load_connectomes(tmp_path)


def test_module_command_maps_bad_input_to_exit_code_2(tmp_path, capsys):
    code = command.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"clusterfx: error: data folder {tmp_path} holds no subject file" in (
        capsys.readouterr().err)
