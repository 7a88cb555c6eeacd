#!/usr/bin/env bash
# The tests: set up, lint, then the default tier and the Triton tier (kernels under
# TRITON_INTERPRET=1 on CPU). Extra arguments go to both pytest runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "[test] ruff" >&2
ruff check .
echo "[test] default tier" >&2
python -m pytest -m "not triton and not slow and not bench and not gpu and not distributed" \
  -q "$@"
echo "[test] triton tier (TRITON_INTERPRET=1)" >&2
TRITON_INTERPRET=1 python -m pytest -m "triton" -q "$@"
