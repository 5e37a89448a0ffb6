"""Compile a Triton kernel of the library for the H100 (sm_90) on any machine, no GPU needed, and
count its global loads: scalar `ld.global.b16`, vector `ld.global.v4`, or pipelined `cp.async`.

    python -m benchmarks.inspect_ptx --d 72 [--unit 8] [--columns]

Device time is scarce; this answers "do the loads vectorize?" for free (v6 in NOTES.md: a D=72
row stride kept every load scalar until the strides came in 16-byte units).
"""

import argparse
import re
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flash_colsum import triton_backend as tb

POINTERS = {"Q": "*fp16", "K": "*fp16", "KEY_KEEP": "*fp16", "LSE": "*fp32", "OUT": "*fp32"}


def compile_row_blocks(d: int, unit: int, columns: bool):
    kernel = tb._row_block_kernel
    names = kernel.arg_names
    block_d, block_d2 = tb._head_dim_blocks(d)
    values = dict(D=d, stride_qd=1, stride_kd=1, COLUMNS=columns, USE_MAX=False, CAUSAL=False, HAS_KEY_MASK=False,
                  SPLIT=False, STRIDE_UNIT=unit, DOT_PRECISION="tf32", UPCAST_DOT=False,
                  BLOCK_M=128, BLOCK_N=128, BLOCK_D=block_d, BLOCK_D2=block_d2)
    signature = {}
    for i, name in enumerate(names):
        if name in values:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in values.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS},  # torch allocations are aligned
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=72)
    parser.add_argument("--unit", type=int, default=8, help="STRIDE_UNIT (8: 16-byte rows in fp16, 1: none)")
    parser.add_argument("--columns", action="store_true", help="pass-2 (COLUMNS) mode instead of pass 1")
    args = parser.parse_args()
    ptx = compile_row_blocks(args.d, args.unit, args.columns).asm["ptx"]
    print(dict(Counter(re.findall(r"ld\.global[\w.]*|cp\.async\.[\w.]*", ptx))))


if __name__ == "__main__":
    main()
