"""Hardware ceilings measured on the GPU at hand, and the floor they put under a column-sum call.

A floor is the time the call would take if its three costs overlapped perfectly and each ran at
its measured ceiling: the exponentials (one per visible score and pass; the special-function
units, not the tensor cores, limit softmax-like kernels at small head dims), the two matmul passes,
and reading Q and K once per pass. `pct_of_floor` = floor / measured time says how much of the
hardware a kernel uses; it is a bound, not a target that can be reached.

The serial model (`model_ms`) is what the H100 does instead (benchmarks/NOTES.md v11): a pass
costs as if the exponentials and the tensor-core work of a tile did not overlap. The reason (v13,
`python -m benchmarks.power`): with both busy the card runs at its 700 W cap and lowers its clock,
so a pass costs energy per score, which grows with both terms. Both are priced at the SM clock, an
H100 SM doing 4096 dense fp16/bf16 FLOP per clock against 16 exp2, so the matmul is priced at 256x
the measured exp2 rate and a score costs (1 + K / 128) exp2-times per pass, K being the head dim the
matmul computes. Our two passes reach 95-103% of it at the large non-causal points
(FlashAttention-3's published forward numbers reach ~93% of the same model), so `pct_of_model`
says how far from that hardware behaviour a point is, where `pct_of_floor` cannot.
"""

from __future__ import annotations

import torch

from flash_colsum.utils import head_dim_blocks

# Dense fp16/bf16 tensor-core FLOP per MUFU exp2, per SM and clock (H100: 4096 / 16).
TENSOR_FLOP_PER_EXP2 = 256

try:
    import triton
    import triton.language as tl
except ImportError:  # the floor formula needs no Triton; only measure_ceilings does
    triton = None

EXP2_BLOCK = 1024
EXP2_PER_ELEMENT = 64  # independent exp2 per element and program


def measure_ceilings(device: str = "cuda") -> dict[str, float]:
    """Median throughputs: fp16 matmul FLOP/s, device copy bytes/s (read + write), exp2/s."""
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    matmul_ms = do_bench(lambda: a @ b, return_mode="median")
    del a, b

    src = torch.empty(2**30, device=device, dtype=torch.uint8)  # 1 GiB: far past any cache
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst

    programs = 64 * 1024
    sink = torch.empty(programs, device=device, dtype=torch.float32)
    exp2_ms = do_bench(lambda: _exp2_kernel[(programs,)](sink, BLOCK=EXP2_BLOCK, N_EXP=EXP2_PER_ELEMENT),
                       return_mode="median")
    return dict(
        matmul_flops=2 * n**3 / (matmul_ms * 1e-3),
        copy_bytes_per_s=2 * 2**30 / (copy_ms * 1e-3),
        exp2_per_s=programs * EXP2_BLOCK * EXP2_PER_ELEMENT / (exp2_ms * 1e-3),
    )


if triton is not None:

    @triton.jit
    def _exp2_kernel(sink_ptr, BLOCK: tl.constexpr, N_EXP: tl.constexpr):
        """N_EXP exp2 per element of values that depend only on the loop index, so they issue back
        to back; only their sum is stored (one float per program): memory traffic stays negligible."""
        pid = tl.program_id(0)
        x = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.float32) * 1e-7
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(N_EXP):
            acc += tl.exp2(x - i * 0.01)
        tl.store(sink_ptr + pid, tl.sum(acc, axis=0))


def visible_fraction(sq: int, sk: int, causal: bool) -> float:
    """Share of the Sq x Sk scores a row can see; causal is bottom-right aligned (j <= i + Sk - Sq)."""
    if not causal:
        return 1.0
    visible = sum(min(sk, max(0, i + sk - sq + 1)) for i in range(sq))
    return visible / (sq * sk)


def floor_ms(pt, ceilings: dict[str, float], lse_given: bool = False) -> float:
    """Floor of one call at point `pt` (b, h, hk, sq, sk, d, causal, dtype) under `ceilings`.

    Two passes (LSE, then column sums), each with one exp2 and a 2*D-FLOP dot product per visible
    score and a read of Q and K; with the LSE given only the second pass is left.
    """
    passes = 1 if lse_given else 2
    scores, qk_bytes = _scores_and_bytes(pt)
    seconds = max(
        passes * scores / ceilings["exp2_per_s"],
        passes * 2 * scores * pt.d / ceilings["matmul_flops"],
        passes * qk_bytes / ceilings["copy_bytes_per_s"],
    )
    return seconds * 1e3


def _scores_and_bytes(pt) -> tuple[float, float]:
    """Visible scores of one pass, and the bytes of Q and K it reads."""
    scores = pt.b * pt.h * pt.sq * pt.sk * visible_fraction(pt.sq, pt.sk, pt.causal)
    elem = torch.finfo(getattr(torch, pt.dtype)).bits // 8
    return scores, elem * pt.b * pt.d * (pt.h * pt.sq + (pt.hk or pt.h) * pt.sk)


def model_ms(pt, ceilings: dict[str, float], lse_given: bool = False) -> float:
    """Serial model of one call: per pass and score one exp2 plus the matmul's 2*K FLOP at 256x the
    exp2 rate (K: the head dim as the kernels compute it, 72 -> 64 + 16), one after the other; or
    the reads of Q and K at the copy ceiling when they take longer (memory-bound points)."""
    passes = 1 if lse_given else 2
    scores, qk_bytes = _scores_and_bytes(pt)
    k = sum(head_dim_blocks(pt.d))
    compute = scores * (1 + 2 * k / TENSOR_FLOP_PER_EXP2) / ceilings["exp2_per_s"]
    return passes * max(compute, qk_bytes / ceilings["copy_bytes_per_s"]) * 1e3
