"""Sweep tile configurations of both Triton passes at a few shapes; print the best per shape.

    python -m benchmarks.tune [--out DIR] [--shapes 0 4 ...]

A tuning aid for choosing the heuristics in flash_colsum/triton_backend.py (`_block_sizes`,
`_row_block_sizes`), not part of the library: the shipped configuration is a pure function of
the head dim and dtype, so results are reproducible across processes.
"""

import argparse
import itertools
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks.benchmark_colsum import write_csv
from flash_colsum import triton_backend as tb
from flash_colsum.utils import head_dim_blocks, make_problem

SHAPES = [  # (B, H, Sq, Sk, D, causal)
    (1, 16, 16384, 16384, 64, False),
    (8, 16, 1024, 1024, 64, False),
    (1, 16, 16384, 16384, 72, False),
    (1, 16, 16384, 16384, 128, False),
    (1, 32, 128, 65536, 128, True),
    (1, 32, 128, 262144, 128, True),
    (1, 32, 512, 65536, 128, True),
]


def configs(block_d, block_d2, lse_pass):
    width = block_d + block_d2
    for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        if bm * width + bn * width > 128 * 256 or (not lse_pass and bn == 32):  # register budget / too thin
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_D2=block_d2, num_warps=warps, num_stages=stages)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--shapes", type=int, nargs="+", default=range(len(SHAPES)), help="indices into SHAPES")
    args = parser.parse_args()
    rows = []
    for b, h, sq, sk, d, causal in [SHAPES[i] for i in args.shapes]:
        q = torch.randn(b, h, sq, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, h, sk, d, device="cuda", dtype=torch.float16)
        p = make_problem(q, k, None, causal, "triton")
        lse = tb.row_lse(q, k, p)
        block_d, block_d2 = head_dim_blocks(d)
        for name, lse_pass in (("lse", True), ("col", False)):
            best = None
            for cfg in configs(block_d, block_d2, lse_pass):
                fn = (lambda: tb.row_lse(q, k, p, config=cfg)) if lse_pass else (lambda: tb.col_reduce(q, k, lse, p, 1, False, config=cfg))
                try:
                    ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                except Exception as exc:  # out of shared memory / registers
                    torch.cuda.synchronize()
                    print("skip", cfg, type(exc).__name__)
                    continue
                rows.append(dict(shape=f"{b}x{h}x{sq}x{sk}x{d}{'c' if causal else ''}", pass_=name, ms=ms, **cfg))
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            default = tb._row_block_sizes(d, q.dtype, sq, columns=False) if lse_pass else "library's choice"
            fn = (lambda: tb.row_lse(q, k, p)) if lse_pass else (lambda: tb.col_reduce(q, k, lse, p, 1, False))
            print(f"{b}x{h}x{sq}x{sk}x{d} causal={causal} {name}: best {best[0]:.3f} ms {best[1]}; "
                  f"default {do_bench(fn, warmup=10, rep=40, return_mode='median'):.3f} ms {default}", flush=True)
    write_csv(rows, args.out / "tune.csv")


if __name__ == "__main__":
    main()
