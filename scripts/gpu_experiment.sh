#!/usr/bin/env bash
# One device call for a kernel change: correctness of the Triton kernels on CUDA, then A/B timings
# of the switches, a tile sweep and the host-overhead profile. Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_core.py tests/test_stats.py -k "triton or layouts" 2>&1 | tee "$OUT/pytest.txt" | tail -n 5
python3 -m benchmarks.ab --out "$OUT" 2>&1 | tee "$OUT/ab.txt"
python3 -m benchmarks.overhead 2>&1 | tee "$OUT/overhead.txt" | head -n 40
[ -n "${TUNE_SHAPES:-}" ] && python3 -m benchmarks.tune --out "$OUT" --shapes $TUNE_SHAPES 2>&1 | grep -v "^skip" | tee "$OUT/tune.txt"
exit 0
