#!/usr/bin/env bash
# The main job: set up, then `clusterfx demo` (extra arguments are passed on).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec clusterfx demo "$@"
