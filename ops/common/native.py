"""Build and load the op families' C++ kernels (the fused CPU path, impl="cpu").

Each family keeps its kernels in ``<family>/csrc/*.cpp``; they include only the C++ standard
library, OpenMP and ``ops/common/csrc/cfx_native.h`` — no torch, pybind11 or Python headers —
so a plain ``g++`` (or ``$CXX``) builds them in a few seconds, with no ninja and no pip build
isolation. The kernels take raw pointers; Python calls them through ``ctypes`` (which releases
the GIL) with tensors it allocated and validated.

Build cache: one shared library per family at ``<dir>/<name>-<key>.so``, where ``<dir>`` is
``$CLUSTERFX_NATIVE_DIR`` (``scripts/env.sh`` sets ``.venv/clusterfx-native``) or
``~/.cache/clusterfx/native``, and ``<key>`` hashes the sources, the flags, the compiler's
version and this CPU's feature flags (the build uses ``-march=native``, so a cache copied to
another CPU is rebuilt, never loaded). Builds take a file lock and rename atomically, so
parallel processes build once. ``python -m clusterfx.ops.build`` builds every family (the set-up
script runs it); a library missing at first use is built then, with a line on stderr.

BLAS and LAPACK: the kernels call ``sgemm_``/``dgemm_``/``dsyevd_`` through pointers handed over
at load time, taken from torch's own ``libtorch_cpu`` (the x86 wheels link MKL statically and
export them). Without them the kernels use their portable loops (slower, same results up to
rounding); ``CLUSTERFX_NATIVE_BLAS=0`` forces that, for tests.

Threads: the libraries link ``libgomp.so.1``, which resolves to the copy torch already loaded,
so torch and the kernels share one OpenMP runtime and ``torch.set_num_threads`` holds for both.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

COMMON_CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17",
         "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter")
ENV_DIR = "CLUSTERFX_NATIVE_DIR"
ENV_BLAS = "CLUSTERFX_NATIVE_BLAS"


class NativeUnavailable(RuntimeError):
    """The fused CPU kernels cannot run here; the message says why and how to fix it."""


def build_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "clusterfx" / "native"


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def _cpu_flags() -> str:
    """This CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


_VERSIONS: dict[str, str] = {}


def _compiler_version(cxx: str) -> str:
    if cxx not in _VERSIONS:
        try:
            done = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
            _VERSIONS[cxx] = done.stdout.splitlines()[0] if done.stdout else cxx
        except (OSError, subprocess.CalledProcessError) as err:
            raise NativeUnavailable(
                f"no C++ compiler: running `{cxx} --version` failed ({err}); install g++ (or set "
                f"$CXX) to build the fused CPU kernels, or pass impl='torch'") from None
    return _VERSIONS[cxx]


class Library:
    """One family's kernels: sources compiled into one shared library, loaded once.

    ``declare`` maps each exported C function to its ctypes argument types; ``load()`` builds
    when needed and returns the ``ctypes.CDLL`` with those signatures set.
    """

    def __init__(self, name: str, sources: list[Path], declare: dict[str, list]):
        self.name, self.sources, self.declare = name, [Path(s) for s in sources], declare
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def key(self) -> str:
        h = hashlib.sha256()
        headers = sorted(COMMON_CSRC.glob("*.h"))
        for path in [*self.sources, *headers, *sorted(
                p for s in self.sources for p in s.parent.glob("*.h"))]:
            h.update(path.name.encode())
            h.update(path.read_bytes())
        cxx = compiler()
        h.update(" ".join((cxx, _compiler_version(cxx), *FLAGS, _cpu_flags(),
                           platform.machine())).encode())
        return h.hexdigest()[:16]

    def path(self) -> Path:
        return build_dir() / f"{self.name}-{self.key()}.so"

    def build(self, quiet: bool = False) -> Path:
        """Compile into the cache unless an up-to-date library is there; returns its path."""
        target = self.path()
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.exists():  # another process built it while we waited
                return target
            if not quiet:
                print(f"[clusterfx] building the fused CPU kernels '{self.name}' into "
                      f"{target.parent} (once; a few seconds)", file=sys.stderr, flush=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            cmd = [compiler(), *FLAGS, f"-I{COMMON_CSRC}", *map(str, self.sources), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                os.unlink(tmp)
                raise NativeUnavailable(
                    f"building the fused CPU kernels '{self.name}' failed (exit "
                    f"{done.returncode}):\n$ {' '.join(cmd)}\n{done.stderr[-4000:]}")
            os.replace(tmp, target)
        return target

    def load(self) -> ctypes.CDLL:
        """The loaded library (built first if needed); raises ``NativeUnavailable``."""
        if self._lib is not None:
            return self._lib
        with self._lock:
            if self._lib is None:
                if self._error is not None:
                    raise NativeUnavailable(self._error)
                try:
                    lib = ctypes.CDLL(str(self.build()))
                except NativeUnavailable as err:
                    self._error = str(err)
                    raise
                except OSError as err:
                    self._error = f"loading the fused CPU kernels '{self.name}' failed: {err}"
                    raise NativeUnavailable(self._error) from None
                for fn, argtypes in self.declare.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = None
                lib.cfx_set_lapack.argtypes = [ctypes.c_void_p] * 3
                lib.cfx_set_lapack.restype = None
                lib.cfx_set_lapack(*blas_pointers())
                self._lib = lib
        return self._lib

    def available(self) -> bool:
        try:
            self.load()
        except NativeUnavailable:
            return False
        return True


_BLAS: tuple[int | None, ...] | None = None


def blas_pointers() -> tuple[int | None, int | None, int | None]:
    """Addresses of ``sgemm_``, ``dgemm_``, ``dsyevd_`` in torch's libtorch_cpu (None where
    missing, or all None with ``CLUSTERFX_NATIVE_BLAS=0``)."""
    global _BLAS
    if os.environ.get(ENV_BLAS) == "0":
        return (None, None, None)
    if _BLAS is None:
        found: list[int | None] = [None, None, None]
        path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by torch: the same handle
            for i, name in enumerate(("sgemm_", "dgemm_", "dsyevd_")):
                fn = getattr(lib, name, None)
                found[i] = None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value
        except OSError:
            pass
        _BLAS = tuple(found)
    return _BLAS  # type: ignore[return-value]


def has_lapack() -> bool:
    return blas_pointers()[2] is not None


def unavailable_message(lib: Library) -> str:
    """Why ``lib`` cannot run, and how to build it."""
    try:
        lib.load()
    except NativeUnavailable as err:
        return (f"{err}\nBuild the kernels with `python -m clusterfx.ops.build` (scripts/env.sh "
                f"does this), or pass impl='torch' for the vectorised torch path.")
    return ""


# ----------------------------------------------------------------------- ctypes conveniences
P = ctypes.c_void_p
I64 = ctypes.c_int64
F64 = ctypes.c_double


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer (None for None); the caller keeps the tensor alive."""
    return None if t is None else t.data_ptr()


def threads() -> int:
    return max(1, torch.get_num_threads())


def have_compiler() -> bool:
    return shutil.which(compiler()) is not None
