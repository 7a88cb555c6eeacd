#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) and install what is missing.
# - An already-installed torch is kept (the venv sees the system site-packages).
# - Without one, torch==2.13.0 is installed (on these machines: the CPU build). No CUDA wheels
#   are requested on a machine without a GPU.
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0" >&2
  "${PIP[@]}" "torch==2.13.0"
fi
# Reinstall the package and its extras only when pyproject.toml changed.
STAMP="$VENV/.clusterfx-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing clusterfx (editable) with test extras" >&2
  "${PIP[@]}" -e ".[test]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# The fused C++ CPU kernels (ops/*/csrc): built with the system C++ compiler into a cache under
# the venv, keyed by sources, flags, compiler and CPU, so an unchanged checkout rebuilds nothing.
export CLUSTERFX_NATIVE_DIR="${CLUSTERFX_NATIVE_DIR:-$VENV/clusterfx-native}"
"$VENV/bin/python" -m clusterfx.ops.build
