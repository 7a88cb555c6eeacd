#!/usr/bin/env bash
# The main job: set up, then `clusterfx demo` (extra arguments are passed on).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# OpenMP threads sleep instead of spinning when they wait at a barrier: on a shared machine
# (another process busy on a core) spinning threads steal the core the others need. Applies to
# torch, Inductor's kernels and clusterfx's fused kernels alike (all share torch's libgomp).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec clusterfx demo "$@"
