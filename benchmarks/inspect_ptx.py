"""Compile a Triton kernel of the library for the H100 (sm_90) on any machine, no GPU needed, and
count its global loads: scalar `ld.global.b16`, vector `ld.global.v4`, or pipelined `cp.async`.

    python -m benchmarks.inspect_ptx --d 72 [--unit 8] [--columns]
    python -m benchmarks.inspect_ptx --gluon --d 64 [--columns | --fused] [--causal] [--key-mask] [--window]

--gluon compiles the Hopper kernel (flash_colsum.hopper) instead and prints what ptxas (shipped with
Triton) reports: registers, spills, and warning C7514 if it serialized the asynchronous wgmmas
(then each HGMMA waits for the previous one, and the tensor cores no longer overlap the exponentials).

Device time is scarce; this answers "do the loads vectorize?" for free (v6 in NOTES.md: a D=72
row stride kept every load scalar until the strides came in 16-byte units).
"""

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flash_colsum import triton_backend as tb
from flash_colsum.utils import head_dim_blocks

POINTERS = {"Q": "*fp16", "K": "*fp16", "KEY_KEEP": "*fp16", "LSE": "*fp32", "OUT": "*fp32", "SCORES": "*fp32"}


def compile_row_blocks(d: int, unit: int, columns: bool):
    kernel = tb._row_block_kernel
    names = kernel.arg_names
    block_d, block_d2 = head_dim_blocks(d)
    values = dict(D=d, stride_qd=1, stride_kd=1, COLUMNS=columns, FUSED=False, LSE_PARTS=False, STORE_SCORES=False,
                  USE_MAX=False, CAUSAL=False, WINDOWED=False, HAS_KEY_MASK=False, SPLIT=False, STRIDE_UNIT=unit, DOT_PRECISION="tf32", UPCAST_DOT=False,
                  BLOCK_M=128, BLOCK_N=128, BLOCK_D=block_d, BLOCK_D2=block_d2, PACK=1, PACK_ROWS=128,
                  RAW_SOFTCAP=0.0)
    signature = {}
    for i, name in enumerate(names):
        if name in values:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        else:
            signature[name] = "fp32" if name in ("qk_scale", "out_scale") else "i32"
    source = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in values.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS},  # torch allocations are aligned
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, num_stages=3, enable_fp_fusion=True))  # as utils.launch


def compile_gluon(d: int, columns: bool, fused: bool = False, causal: bool = False, key_mask: bool = False,
                  window: bool = False, softcap: float = 0.0):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from flash_colsum import hopper

    kernel = hopper._stream_kernel
    names = kernel.arg_names
    maxnreg = None
    if fused:
        block_b, stages, maxnreg = hopper._fused_config(d)
        a_in_regs = False
    else:
        block_b, stages, a_in_regs = hopper._config(d, columns, causal)
    block_d, block_d2 = head_dim_blocks(d)
    tiles = dict(a_desc=(1, 1, hopper.BLOCK_ROWS, block_d), b_desc=(1, 1, block_b, block_d))
    if block_d2:
        tiles.update(a2_desc=(1, 1, hopper.BLOCK_ROWS, block_d2), b2_desc=(1, 1, block_b, block_d2))
    values = dict(COLUMNS=columns and not fused, FUSED=fused, USE_MAX=False, CAUSAL=causal or window, WINDOWED=window,
                  HAS_KEY_MASK=key_mask, STAGES=stages, A_IN_REGS=a_in_regs, RAW_SOFTCAP=softcap, num_warps=4)
    if not block_d2:  # no tail: its descriptors are None
        values.update(a2_desc=None, b2_desc=None)
    signature = {}
    for name in names:
        if name in values:
            signature[name] = "constexpr"
        elif name in tiles:
            layout = gl.NVMMASharedLayout.get_default_for(list(tiles[name]), gl.float16)
            signature[name] = f"tensordesc<fp16[{', '.join(map(str, tiles[name]))}],{layout!r}>"
        else:
            pointers = dict(POINTERS, KEY_KEEP="*u8")  # the mask as bytes
            signature[name] = pointers.get(name, "fp32" if name in ("qk_scale", "out_scale") else "i32")
    source = GluonASTSource(fn=kernel, signature=signature,
                            constexprs={(names.index(n),): v for n, v in values.items()},
                            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ("LSE", "OUT")})
    options = dict(num_warps=4, enable_fp_fusion=True)  # as utils.launch
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(ptx: str) -> str:
    """ptxas -v on the PTX for sm_90a: the lines about registers, spills and serialized wgmmas."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the one Triton itself runs for sm_90 (it changed in Triton 3.7)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        result = subprocess.run([ptxas, "-v", "-arch=sm_90a", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                                capture_output=True, text=True, check=True)
    return "\n".join(line for line in result.stderr.splitlines() if re.search(r"registers|spill|C75\d\d", line))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=72)
    parser.add_argument("--unit", type=int, default=8, help="STRIDE_UNIT (8: 16-byte rows in fp16, 1: none)")
    parser.add_argument("--columns", action="store_true", help="pass-2 (COLUMNS) mode instead of pass 1")
    parser.add_argument("--gluon", action="store_true", help="the Hopper Gluon kernel; print ptxas's report")
    parser.add_argument("--fused", action="store_true", help="with --gluon: both passes in one launch (FUSED)")
    parser.add_argument("--causal", action="store_true", help="with --gluon: the causal mask (CAUSAL)")
    parser.add_argument("--key-mask", action="store_true", help="with --gluon: a key padding mask (HAS_KEY_MASK)")
    parser.add_argument("--window", action="store_true", help="with --gluon: a causal sliding window (WINDOWED)")
    parser.add_argument("--softcap", type=float, nargs="?", const=400.0, default=0.0,
                        help="with --gluon: soft-capped raw scores, RAW_SOFTCAP (default 400: Gemma 2's 50 at D=64)")
    args = parser.parse_args()
    if args.gluon:
        print(ptxas_report(compile_gluon(args.d, args.columns, args.fused, args.causal, args.key_mask,
                                         args.window, args.softcap).asm["ptx"]))
        return
    ptx = compile_row_blocks(args.d, args.unit, args.columns).asm["ptx"]
    print(dict(Counter(re.findall(r"ld\.global[\w.]*|cp\.async\.[\w.]*", ptx))))


if __name__ == "__main__":
    main()
