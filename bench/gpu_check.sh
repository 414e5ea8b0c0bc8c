#!/usr/bin/env bash
# The device check of issue 15 (phases and expected times: bench/gpu_check.py's docstring).
#   bench/gpu_check.sh            on a GPU machine, from a fresh checkout: < 10 minutes
#   bench/gpu_check.sh --dry-run  on any machine: the phases that need no GPU
# The Python driver keeps its own budget (570 s) and per-phase timeouts; this outer timeout
# only guards against the driver itself hanging.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec timeout --kill-after=15 600 "${PYTHON:-python}" bench/gpu_check.py "$@"
