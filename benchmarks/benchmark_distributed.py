"""Context-parallel scaling on several GPUs (NCCL), one process per GPU:

    torchrun --nproc-per-node 2 -m benchmarks.benchmark_distributed [--seq 131072 262144 524288] [--out DIR]
    torchrun --nproc-per-node 2 -m benchmarks.benchmark_distributed --backend gloo --seq 256 --heads 4 --dim 16   # CPU smoke run

For B=1, H=32, D=128 (non-causal and causal, fp16 and bf16) and each sequence length, rank 0's
single-device result on the whole sequence is the reference for every strategy (relative L2 of
each rank's key shard). fp16 runs are timed: the single-device call, each strategy, and the
strategy's communication alone (the same transfers with no kernels), as medians with all ranks
synchronized. Bytes sent per rank come from the formulas in flash_colsum/distributed.py. Rank 0
prints each row and writes distributed_{world}.csv. NVLink multicast stays off (NCCL_NVLS_ENABLE=0),
as the lent machines require.
"""

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from flash_colsum import column_stats  # noqa: E402
from flash_colsum.distributed import _circulate, _seq_to_heads, context_parallel_column_stats  # noqa: E402


def timed(fn, device, repeats):
    """Median milliseconds of fn over all ranks' synchronized runs (two warm-ups)."""
    times = []
    for _ in range(repeats + 2):
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def comm_only(strategy, q, k, world, rank, lens):
    """The strategy's transfers without its kernels."""
    if strategy == "heads":
        _seq_to_heads(q, None, world, lens)
        _seq_to_heads(k, None, world, lens)
        dist.all_reduce(q.new_zeros((q.shape[0], sum(lens)), dtype=torch.float32))
        return
    lse = q.new_zeros(q.shape[:3], dtype=torch.float32)
    for _ in _circulate([k], None, world, rank, lens):
        pass
    for _ in _circulate([q, lse], None, world, rank, lens):
        pass


def bytes_sent(strategy, b, h, hk, s, d, world, elem=2):
    shard = s // world
    if strategy == "heads":
        return (world - 1) / world * b * (h + hk) * shard * d * elem + b * s * 4
    return (world - 1) * (b * hk * shard * d * elem + b * h * shard * (d * elem + 4))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[131072, 262144, 524288])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")))
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if args.backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    b, h, d = 1, args.heads, args.dim
    rows = []
    for s in args.seq:
        lens = [(r + 1) * s // world - r * s // world for r in range(world)]
        shard = slice(rank * s // world, (rank + 1) * s // world)
        for causal in (False, True):
            for dtype in (torch.float16, torch.bfloat16):
                torch.manual_seed(s)  # the same full tensors on every rank
                q = torch.randn(b, h, s, d, device=device, dtype=dtype)
                k = torch.randn(b, h, s, d, device=device, dtype=dtype)
                reference = column_stats(q, k, is_causal=causal)[:, shard]
                timing = dtype == torch.float16
                single_ms = timed(lambda: column_stats(q, k, is_causal=causal), device, args.repeats) if timing else None
                q_local, k_local = q[:, :, shard].contiguous(), k[:, :, shard].contiguous()
                del q, k
                for strategy in ("heads", "ring"):
                    run = lambda: context_parallel_column_stats(q_local, k_local, strategy=strategy, is_causal=causal)  # noqa: E731
                    err = ((run() - reference).norm() / reference.norm()).item()
                    ms = timed(run, device, args.repeats) if timing else None
                    comm_ms = timed(lambda: comm_only(strategy, q_local, k_local, world, rank, lens), device, args.repeats) if timing else None
                    sent = bytes_sent(strategy, b, h, h, s, d, world)
                    rows.append(dict(
                        seq=s, causal=causal, dtype=str(dtype).replace("torch.", ""), strategy=strategy, world=world,
                        rel_l2=err, ms=ms, single_device_ms=single_ms,
                        speedup=None if not timing else single_ms / ms, comm_ms=comm_ms,
                        comm_share=None if not timing else comm_ms / ms,  # transfers alone over the whole call
                        mib_sent_per_rank=sent / 2**20,
                        comm_gb_per_s=None if not timing else sent / comm_ms / 1e6,
                    ))
                    if rank == 0:
                        print(rows[-1], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    if rank == 0:
        print(f"\n{'S':>7} {'causal':>6} {'dtype':>8} {'strategy':>8} {'rel_l2':>8} {'1 GPU ms':>9} "
              f"{f'{world} GPUs ms':>10} {'speedup':>7} {'comm ms':>8} {'share':>6} {'MiB sent':>9}")
        for r in rows:
            t = r["ms"] is not None
            print(f"{r['seq']:>7} {str(r['causal']):>6} {r['dtype']:>8} {r['strategy']:>8} {r['rel_l2']:>8.1e} "
                  + (f"{r['single_device_ms']:>9.1f} {r['ms']:>10.1f} {r['speedup']:>7.2f} {r['comm_ms']:>8.1f} "
                     f"{r['comm_share']:>6.1%}" if t else " " * 46) + f" {r['mib_sent_per_rank']:>9.1f}")
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / f"distributed_{world}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
