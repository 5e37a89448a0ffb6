"""How far the H100 overlaps tensor-core and exponential work: the ceiling of every pass here.

    python -m benchmarks.overlap            # on a Hopper GPU (Gluon: no interpreter)

One Gluon loop per mode, one warpgroup per CTA, 1-3 CTAs per SM (grid 132 x k). An iteration is
what a pass does per 64-row half of a 128 x 128 tile at D=64: T issues its wgmmas, [64, 64] @
[64, 128] from shared memory (4 x HGMMA.64x128x16, asynchronous, one in flight), E computes 64
exp2 per thread (exp2(x * c) - c': FFMA, MUFU, FADD) on a register tile, F the same number of
elements through 4 FMAs instead. TE/TF do both, the elementwise work independent of the matmul:
the best case for overlap, which the real passes (whose exponentials wait on the scores) cannot
beat. Prints us per launch and clocks per CTA-iteration at 1.98 GHz; NOTES.md v27 has the reading.
"""

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

MODES = dict(T=(True, False, False), E=(False, True, False), TE=(True, True, False), F=(False, True, True),
             TF=(True, True, True))


@gluon.jit
def _overlap_kernel(out, n_iter, DO_T: gl.constexpr, DO_E: gl.constexpr, FMA: gl.constexpr, num_warps: gl.constexpr):
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16])
    fill: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    swizzled: gl.constexpr = gl.NVMMASharedLayout(128, 16, 2)
    a = gl.allocate_shared_memory(gl.float16, [64, 64], swizzled)
    b = gl.allocate_shared_memory(gl.float16, [128, 64], swizzled)
    a.store(gl.full([64, 64], 0.01, gl.float16, layout=fill))
    b.store(gl.full([128, 64], 0.02, gl.float16, layout=fill))
    fence_async_shared()
    acc = gl.zeros([64, 128], gl.float32, layout=layout)
    x = gl.full([64, 128], 0.25, gl.float32, layout=layout)
    for _ in range(n_iter):
        if DO_T:
            acc = warpgroup_mma(a, b.permute((1, 0)), acc, is_async=True)  # [64, 64] @ [64, 128] -> [64, 128]
        if DO_E:
            if FMA:
                x = ((x * 0.5 + 0.125) * 0.5 + 0.0625) * 0.5 + 0.03125
            else:
                x = gl.exp2(x * -0.5) - 0.5
        if DO_T:
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, b))[0]
    gl.store(out + gl.program_id(0), gl.sum(gl.sum(acc + x, axis=1), axis=0))  # keeps both alive


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=4000)
    parser.add_argument("--ghz", type=float, default=1.98, help="SM clock for the clocks column")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(3 * sms, device="cuda")
    print(f"us per launch, clocks per CTA-iteration at {args.ghz} GHz")
    for per_sm in (1, 2, 3):
        cells = []
        for name, (t, e, fma) in MODES.items():
            def launch():
                _overlap_kernel[(per_sm * sms,)](out, args.iters, DO_T=t, DO_E=e, FMA=fma, num_warps=4)
            ms = triton.testing.do_bench(launch, warmup=5, rep=50, return_mode="median")
            cells.append(f"{name} {ms * 1e3:7.1f} us {ms * 1e6 * args.ghz / args.iters / per_sm:5.0f} clk")
        print(f"{per_sm} CTA/SM: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
