#!/usr/bin/env bash
# Compiles every Triton kernel of kernels/ for sm_90 with the oldest supported Triton (3.6, what
# torch 2.11 installs): the slow compile test against a second environment, for CI.
#   bench/oldest_triton_check.sh [wheel]       # wheel: a local triton-3.6.0 wheel (offline)
# Makes (once) a virtual environment that sees this Python's packages (torch, oes_fast) with
# triton 3.6.0 installed over them; OES_FAST_TRITON36_VENV overrides its place. With --report
# as second argument it also writes the Triton 3.6 table into bench/REPORT.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OES_FAST_TRITON36_VENV:-$HOME/venv-triton36}"
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install --no-deps "${1:-triton==3.6.0}"
fi
OES_FAST_OLDEST_TRITON_PYTHON="$VENV/bin/python" python -m pytest -q -m slow tests/test_triton_compile.py -k oldest
if [ "${2:-}" = "--report" ]; then
  env -u TRITON_INTERPRET "$VENV/bin/python" bench/triton_compile_report.py --all --quiet --report bench/REPORT.md \
    --json "bench/triton_compile_sm90_triton3.6.0.json"
fi
