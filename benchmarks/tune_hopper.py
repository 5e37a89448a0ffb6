"""Time the Hopper Gluon kernels (flash_colsum.hopper) over tile configurations, each pass alone.

    python -m benchmarks.tune_hopper [--s 16384] [--d 64] [--out DIR]

Prints and writes tune_hopper.csv: per (BLOCK_B, STAGES, A_IN_REGS), the median time of
pass 1 and pass 2 (triton.testing.do_bench) and the relative difference from the portable kernels.
"""

import argparse
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks.benchmark_colsum import write_csv
from flash_colsum import hopper
from flash_colsum import triton_backend as tb
from flash_colsum.utils import make_problem

# (BLOCK_B, STAGES, A_IN_REGS); 4 stages lost everywhere (NOTES.md v10)
CONFIGS = [(b, stages, regs) for regs in (False, True) for b, stages in ((128, 2), (64, 2), (64, 3))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--s", type=int, default=16384)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    q = torch.randn(args.b, 16, args.s, args.d, device="cuda", dtype=torch.float16)
    k = torch.randn_like(q)
    p = make_problem(q, k, None, False, "triton")
    # The portable kernels, pinned by passing their configs (a config bypasses the fast path).
    portable_lse = lambda: tb.row_lse(q, k, p, config=tb._row_block_sizes(args.d, q.dtype, args.s, False))  # noqa: E731
    portable_col = lambda: tb.col_reduce(q, k, lse, p, 1, False, config=tb._block_sizes(args.d, q.dtype))  # noqa: E731
    lse = portable_lse()
    col = portable_col()
    rows = []
    base = dict(config="portable", pass1_ms=do_bench(portable_lse, return_mode="median"),
                pass2_ms=do_bench(portable_col, return_mode="median"), lse_diff=0.0, col_diff=0.0)
    rows.append(base)
    print(base, flush=True)
    for cfg in CONFIGS:
        try:
            fast_lse = hopper.row_lse(q, k, p, config=cfg)
            fast_col = hopper.col_reduce(q, k, lse, p, 1, False, config=cfg)
            row = dict(config=str(cfg),
                       pass1_ms=do_bench(lambda: hopper.row_lse(q, k, p, config=cfg), return_mode="median"),
                       pass2_ms=do_bench(lambda: hopper.col_reduce(q, k, lse, p, 1, False, config=cfg),
                                         return_mode="median"),
                       lse_diff=((fast_lse - lse).norm() / lse.norm()).item(),
                       col_diff=((fast_col - col).norm() / col.norm()).item())
        except Exception as e:  # out of shared memory or registers
            row = dict(config=str(cfg), error=type(e).__name__)
        rows.append(row)
        print(row, flush=True)
    write_csv(rows, args.out / f"tune_hopper_s{args.s}_d{args.d}.csv")


if __name__ == "__main__":
    main()
