#!/usr/bin/env bash
# On a CUDA machine (the lent H100): the whole test suite on the GPU, then the benchmarks.
# Uses the machine's own torch and Triton (no install); logs and CSVs go to $OUT.
#   bash scripts/gpu_suite.sh [SWEEP ...]     (default: demo)
# TESTS selects test files (default: all; "none" skips the tests). Serially the suite takes ~13 min
# on an H100, mostly Triton compiles; with pytest-xdist (on the lent machines) it runs on WORKERS
# processes (default 8). The benchmarks then run alone on the GPU:
#   bash scripts/gpu_suite.sh none         # tests only
#   TESTS=none bash scripts/gpu_suite.sh all   # benchmarks only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

status=0
if [ "${TESTS:-}" != none ]; then
    # Compiles dominate: spread the tests over pytest-xdist workers where it is installed.
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")
    python3 -m pytest -q -p no:cacheprovider $workers ${TESTS:-} 2>&1 | tee "$OUT/pytest.txt" | tail -n 15
    status=${PIPESTATUS[0]}
fi

for sweep in "${@:-demo}"; do
    [ "$sweep" = none ] && continue
    python3 -m benchmarks.benchmark_colsum --sweep "$sweep" --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
done
exit "$status"
