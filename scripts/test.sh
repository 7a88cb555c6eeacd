#!/usr/bin/env bash
# The tests: set up, lint, then the default tier, the Triton tier (kernels under
# TRITON_INTERPRET=1 on CPU) and the distributed tier (2 and 4 gloo processes on 127.0.0.1, a
# free port per launch, each launch bounded in time; ~4 min on 2 loaded cores; the longer
# distributed cases are also marked slow). Extra arguments go to every pytest run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "[test] ruff" >&2
ruff check .
echo "[test] default tier" >&2
python -m pytest -m "not triton and not slow and not bench and not gpu and not distributed" \
  -q "$@"
echo "[test] triton tier (TRITON_INTERPRET=1)" >&2
TRITON_INTERPRET=1 python -m pytest -m "triton" -q "$@"
echo "[test] distributed tier (gloo processes on this machine)" >&2
python -m pytest -m "distributed and not slow and not gpu" -q "$@"
