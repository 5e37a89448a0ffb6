"""Where the time of a small call goes: GPU kernel time of each pass vs host time per call.

    python -m benchmarks.overhead

For small shapes (B=8, H=16, S=1024) a call can be bound by Python and launch overhead rather
than by the GPU; this prints both, plus the top host-side functions (cProfile).
"""

import cProfile
import pstats
import time

import torch
from triton.testing import do_bench

from flash_colsum import flash_colsum
from flash_colsum import triton_backend as tb
from flash_colsum.utils import make_problem


def main():
    for causal in (False, True):
        q = torch.randn(8, 16, 1024, 64, device="cuda", dtype=torch.float16)
        k = torch.randn(8, 16, 1024, 64, device="cuda", dtype=torch.float16)
        p = make_problem(q, k, None, causal, "triton")
        lse = tb.row_lse(q, k, p)
        t_lse = do_bench(lambda: tb.row_lse(q, k, p), return_mode="median")
        t_col = do_bench(lambda: tb.col_reduce(q, k, lse, p, 1, False), return_mode="median")
        t_all = do_bench(lambda: flash_colsum(q, k, is_causal=causal), return_mode="median")
        flash_colsum(q, k, is_causal=causal)
        torch.cuda.synchronize()
        n = 300
        start = time.perf_counter()
        for _ in range(n):
            flash_colsum(q, k, is_causal=causal)
        host = (time.perf_counter() - start) / n * 1e3
        torch.cuda.synchronize()
        print(f"causal={causal}: pass 1 {t_lse:.4f} ms, pass 2 {t_col:.4f} ms, flash_colsum {t_all:.4f} ms, "
              f"host time per call (no sync) {host:.4f} ms")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(300):
        flash_colsum(q, k, is_causal=True)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
