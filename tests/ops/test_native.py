"""The fused C++ kernels' build, load and dispatch (``clusterfx.ops.common.native``): the cache,
honest dispatch (an explicit impl="cpu" that cannot run raises; "auto" says what ran), the
portable loops without torch's BLAS, and one OpenMP runtime shared with torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import clusterfx.ops.clustered as ca
from clusterfx.ops import build
from clusterfx.ops.clustered import fused as clustered_fused
from clusterfx.ops.common import dispatch, native
from clusterfx.ops.common.telemetry import counters
from clusterfx.ops.topk import fused as topk_fused
from clusterfx.ops.topk import topk_attention

ROOT = Path(__file__).resolve().parents[2]

SOURCE = """
#include "cfx_native.h"
CFX_NATIVE_ENTRY()
extern "C" void cfx_add(const double* a, double* out) { out[0] = a[0] + %s; }
"""


def _library(tmp_path: Path, body: str = "1.0") -> native.Library:
    src = tmp_path / "src" / "add.cpp"
    src.parent.mkdir(exist_ok=True)
    src.write_text(SOURCE % body)
    return native.Library("add", [src], {"cfx_add": [native.P, native.P]})


def test_build_is_cached_and_keyed_by_the_sources(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path / "cache"))
    lib = _library(tmp_path)
    path = lib.build(quiet=True)
    assert path.parent == tmp_path / "cache" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert lib.build(quiet=True) == path and path.stat().st_mtime_ns == stamp  # no rebuild
    a, out = torch.tensor([2.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    lib.load().cfx_add(a.data_ptr(), out.data_ptr())
    assert out.item() == 3.0
    changed = _library(tmp_path, "5.0")  # same name, other source: another key, another file
    assert changed.path() != path
    changed.load().cfx_add(a.data_ptr(), out.data_ptr())
    assert out.item() == 7.0


def test_a_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path / "cache"))
    lib = _library(tmp_path, "not_a_symbol")
    with pytest.raises(native.NativeUnavailable, match="(?s)building the fused CPU kernels 'add' "
                                                      "failed.*not_a_symbol"):
        lib.load()
    assert not lib.available()
    assert list((tmp_path / "cache").glob("*.so")) == []  # nothing half-written is left


def _broken(tmp_path, monkeypatch) -> native.Library:
    """A library that cannot be built here (no compiler), registered for both families."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path / "cache"))
    src = ROOT / "ops" / "topk" / "csrc" / "topk.cpp"
    lib = native.Library(f"broken-{tmp_path.name}", [src], {})
    monkeypatch.setattr(topk_fused, "LIB", lib)
    monkeypatch.setattr(clustered_fused, "LIB", lib)
    return lib


def test_explicit_cpu_without_kernels_raises_and_auto_reports_torch(tmp_path, monkeypatch):
    _broken(tmp_path, monkeypatch)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"(?s)impl='cpu'.*no C\+\+ compiler.*python -m "
                                           r"clusterfx.ops.build.*impl='torch'"):
        topk_attention(q, k, v, topk=2, impl="cpu")
    with pytest.raises(RuntimeError, match="impl='cpu'.*no C\\+\\+ compiler"):
        ca.clustered_attention(q, k, v, clusters=2, seed=0, impl="cpu")
    before = counters["topk_attention.torch"]
    with pytest.warns(UserWarning, match="impl='auto' runs the vectorised torch path"):
        out = topk_attention(q, k, v, topk=2)
    assert counters["topk_attention.torch"] == before + 1  # the report says torch ran
    torch.testing.assert_close(out, topk_attention(q, k, v, topk=2, impl="torch"))
    before = counters["clustered_attention.torch"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per library and process, not per call
        ca.clustered_attention(q, k, v, clusters=2, seed=0)
    assert counters["clustered_attention.torch"] == before + 1


def test_cpu_impl_needs_cpu_tensors():
    with pytest.raises(RuntimeError, match="impl='cpu' runs the fused CPU kernels and needs CPU "
                                           "tensors .*meta"):
        dispatch.resolve_impl("cpu", torch.device("meta"), native=clustered_fused.LIB)
    with pytest.raises(ValueError, match=r"impl \('torch'\) must be one of \('auto', "
                                         r"'reference', 'cpu', 'triton'\)"):
        dispatch.resolve_impl("torch", torch.device("cpu"))  # families without kernels


def test_build_command_builds_every_family():
    lines = build.build_all()
    assert [line.split("'")[1] for line in lines] == ["clustering", "clustered", "topk", "paca"]
    assert all(lib.available() for lib in build.LIBRARIES)


_GOMP = textwrap.dedent("""
    from pathlib import Path
    import torch
    from clusterfx.ops import build
    for lib in build.LIBRARIES:
        lib.load()
    maps = Path("/proc/self/maps").read_text().splitlines()
    print(sorted({line.split()[-1] for line in maps if "libgomp" in line}))
""")


def test_one_openmp_runtime_is_shared_with_torch():
    """In a fresh process (other packages, e.g. scikit-learn, load their own vendored libgomp
    into a test session): torch plus the kernels map exactly one OpenMP runtime, torch's."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc")
    done = subprocess.run([sys.executable, "-c", _GOMP], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    gomp = ast.literal_eval(done.stdout.strip().splitlines()[-1])  # the paths the child printed
    assert len(gomp) == 1 and Path(gomp[0]).is_relative_to(Path(torch.__file__).parent), gomp


_PORTABLE = textwrap.dedent("""
    import torch
    import clusterfx.ops.clustered as ca
    from clusterfx.ops.common import native
    from clusterfx.ops.topk import topk_attention
    assert native.blas_pointers() == (None, None, None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = ca.improved_clustered_attention(q, k, v, clusters=4, topk=5, seed=1, impl="cpu")
    ref = ca.improved_clustered_attention(q, k, v, clusters=4, topk=5, seed=1,
                                          impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    qg = q.clone().requires_grad_()
    o = ca.clustered_attention(qg, k, v, clusters=4, seed=1, impl="cpu")
    torch.autograd.grad(o.sum(), qg)
    torch.testing.assert_close(topk_attention(q, k, v, topk=6, impl="cpu"),
                               topk_attention(q, k, v, topk=6, impl="reference"),
                               atol=1e-12, rtol=0)
    print("ok")
""")


def test_portable_loops_without_torch_blas_match_the_oracle():
    """CLUSTERFX_NATIVE_BLAS=0: the kernels' own GEMM loops, and the metric root computed by
    torch instead of LAPACK inside the kernel (a fresh process: the pointers are read once)."""
    env = {**os.environ, native.ENV_BLAS: "0"}
    done = subprocess.run([sys.executable, "-c", _PORTABLE], env=env, capture_output=True,
                          text=True, cwd=ROOT, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
