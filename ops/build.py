"""Build (or find up to date) every op family's fused C++ CPU kernels.

    python -m clusterfx.ops.build [--quiet]

``scripts/env.sh`` runs this during set-up, so that ``scripts/test.sh`` and ``scripts/demo.sh``
(and CI) build the kernels once, before any test or timing; later runs find them in the cache
(``$CLUSTERFX_NATIVE_DIR``, see ``clusterfx.ops.common.native``) and only rebuild when a source,
the flags, the compiler or the CPU changed. Exit status 1 (with the compiler's message) when a
build fails: the fused path must not go missing silently.
"""

from __future__ import annotations

import argparse
import sys
import time

from clusterfx.ops.clustered import NATIVE_LIBRARY as CLUSTERED
from clusterfx.ops.clustering import NATIVE_LIBRARY as CLUSTERING
from clusterfx.ops.common.native import Library, NativeUnavailable, build_dir
from clusterfx.ops.paca import NATIVE_LIBRARY as PACA
from clusterfx.ops.topk import NATIVE_LIBRARY as TOPK

LIBRARIES: tuple[Library, ...] = (CLUSTERING, CLUSTERED, TOPK, PACA)


def build_all(quiet: bool = False) -> list[str]:
    """Build every library; returns one status line per library. Raises NativeUnavailable."""
    lines = []
    for lib in LIBRARIES:
        start = time.perf_counter()
        existed = lib.path().exists()
        path = lib.build(quiet=True)
        lib.load()  # a library that builds but does not load is as missing
        what = "up to date" if existed else f"built in {time.perf_counter() - start:.1f}s"
        lines.append(f"[build] fused CPU kernels '{lib.name}': {what} ({path.name})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterfx.ops.build", description=__doc__)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    try:
        lines = build_all()
    except NativeUnavailable as err:
        print(f"[build] {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print("\n".join(lines + [f"[build] cache: {build_dir()}"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
