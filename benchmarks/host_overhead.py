"""Host time of our own Python around the kernels, on any machine: the Triton kernels are replaced
by no-ops and the inputs live on the CPU, so what is timed is validation, planning and launch
argument building (plus the small torch reductions on CPU tensors).

    python -m benchmarks.host_overhead

Small calls (B=8, H=16, S=1024) are host-bound on the H100 (results/overhead_h100_v5.txt); this
measures the part we control without spending device time. The fused small-call path's partial
sums (B, H, 8, Sk) are reduced by torch on the CPU here, a cost that is one kernel launch on a GPU.
"""

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402

import flash_colsum.triton_backend as tb  # noqa: E402
from flash_colsum import flash_colsum  # noqa: E402



class NoLaunch:
    """Stands in for a JIT kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    import cProfile
    import pstats

    tb._row_block_kernel = tb._col_reduce_kernel = NoLaunch()
    tb.interpreting = lambda: False  # the GPU's tile choices
    tb._sm_count = lambda device: 132  # an H100
    q = torch.randn(8, 16, 1024, 64, dtype=torch.float16)
    k = torch.randn(8, 16, 1024, 64, dtype=torch.float16)
    use_fused = tb._use_fused
    for fused in (True, False):  # one launch (small calls' default), or two
        tb._use_fused = lambda *args, _fused=fused: _fused
        for causal in (False, True):
            call = lambda: flash_colsum(q, k, is_causal=causal, backend="triton")  # noqa: E731
            for _ in range(50):
                call()
            times = []
            for _ in range(2000):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            print(f"fused={fused} causal={causal}: {statistics.median(times) * 1e6:.1f} us per call (median of 2000)")
    tb._use_fused = use_fused
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        flash_colsum(q, k, backend="triton")
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
