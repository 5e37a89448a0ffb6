#!/usr/bin/env bash
# On a machine with two or more GPUs: context-parallel statistics over NCCL, one process per GPU.
# The distributed tests (NCCL against one GPU, plus the gloo ones), then the scaling benchmark.
#   bash scripts/gpu_distributed.sh [benchmark args...]     e.g. --seq 131072 262144 524288 --repeats 3
# Logs and distributed_{world}.csv go to $OUT. NVLink multicast stays off: the lent machines require it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
n_gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvidia-smi topo -m
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
} 2>&1 | tee "$OUT/env_distributed.txt"

python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py 2>&1 | tee "$OUT/pytest_distributed.txt" | tail -n 15
status=${PIPESTATUS[0]}
torchrun --standalone --nproc-per-node "$n_gpus" -m benchmarks.benchmark_distributed --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_distributed.txt"
exit $(( status || PIPESTATUS[0] ))
