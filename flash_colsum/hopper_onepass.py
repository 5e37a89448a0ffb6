"""Hopper (sm_90) single pass for short key ranges: each score exponentiated once, kept in shared memory.

Two passes pay every score's matmul and exponential twice: once for the rows' log-sum-exp, once
for the column sums that need it. When a head has at most MAX_KEYS keys, a block of 64 query rows
can keep all of its probabilities in shared memory instead (64 x 1024 fp16 = 128 KiB), so the
second pass becomes a read of that memory:

1. For each 128-key tile t: S = Q K_t^T on the tensor cores (async wgmma), the rows' running max
   m_t and sum l as in pass 1, and P_t = exp2(S - m_t) stored as fp16 (each entry in (0, 1]).
2. With the rows' final base-2 LSE known, every tile's weights are P_t * f_t, f_t = exp2(m_t - lse)
   per row (<= 1): column t's sums (maxima) read P_t back and reduce it over the 64 rows.

fp16 keeps 11 bits of each weight relative to its row's running max, and an entry below 2^-24 of
it flushes to zero: an absolute error of at most 2^-25 of the row's total mass per entry.
A program runs `blocks_per_group` row blocks of one head one after the other and accumulates
their column sums in its own row of the (B, H, G, Sk) float32 partials, so the partials stay
small (G is chosen to fill the GPU) and no atomics are needed.

Scope (`supports`): CUDA capability 9.0, fp16/bf16, D in {16, 32, 64, 128}, 1 <= Sk <= MAX_KEYS, no
causal mask, no key padding mask, contiguous Q and K; every row of the selection. The portable
kernels (triton_backend) serve everything else and every CPU run; the GPU suite checks this path
against them and against float64. Gluon does not run in the interpreter: imported only on a GPU.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from . import utils
from .utils import Problem, cdiv

# A CTA barrier: thread_barrier up to Triton 3.8, barrier from 3.9 on.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# cp.async, global to shared memory without registers: async_load from Triton 3.9 on.
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

LOG2E = 1.4426950408889634
BLOCK_M = gl.constexpr(64)  # query rows per block: one warpgroup, one wgmma row tile
BLOCK_N = gl.constexpr(128)  # keys per tile
MAX_KEYS = 1024  # 64 x 1024 fp16 probabilities: 128 KiB of the SM's 227 KiB of shared memory


@gluon.jit
def _rows_ptrs(base, row0, n_valid, stride_row, BLOCK_R: gl.constexpr, D: gl.constexpr, layout: gl.constexpr):
    """Pointers to [BLOCK_R, D] rows starting at row0, and the mask of rows before n_valid."""
    offs_r = row0 + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    ptrs = base + offs_r.to(gl.int64)[:, None] * stride_row + offs_d[None, :]
    # The row mask broadcast over a constant tile, so it stays uniform along each 16-byte row piece.
    rows = offs_r[:, None] + gl.zeros([BLOCK_R, D], gl.int32, layout=layout)
    return ptrs, rows < n_valid


@gluon.jit
def _copy_keys(k_smem, k_base, t, Sk, stride_kn, BLOCK_N: gl.constexpr, D: gl.constexpr, layout: gl.constexpr):
    """Start copying key tile t into k_smem (zeros past Sk), as one cp.async group."""
    ptrs, mask = _rows_ptrs(k_base, t * BLOCK_N, Sk, stride_kn, BLOCK_N, D, layout)
    _cp_async(k_smem, ptrs, mask=mask)
    async_copy.commit_group()


@gluon.jit
def _one_pass_kernel(
    Q, K, OUT,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_og,
    H, GROUP, Sk, row_start, row_end, n_groups, blocks_per_group, qk_scale, out_scale,
    D: gl.constexpr, N_TILES: gl.constexpr, USE_MAX: gl.constexpr, LOAD_TPW_D: gl.constexpr,
    Q_SMEM: gl.constexpr, K_SMEM: gl.constexpr, P_SMEM: gl.constexpr, num_warps: gl.constexpr,
):
    """OUT[b, h, g, :] = sum (max) over the rows of row blocks g * blocks_per_group ... of head (b, h)
    of exp(scale * q.k - lse(q)), times out_scale; D and the 128-key tiles as constexprs."""
    # The scores' layout: one warpgroup, wgmma's instruction N spans the key tile.
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    rows_mma: gl.constexpr = gl.SliceLayout(1, mma)
    keys_mma: gl.constexpr = gl.SliceLayout(0, mma)
    # Global loads of Q and K rows, 8 fp16 (16 bytes) per thread and access.
    load: gl.constexpr = gl.BlockedLayout([1, 8], [32 // LOAD_TPW_D, LOAD_TPW_D], [num_warps, 1], [1, 0])
    # Reading P back: 8 rows x 8 keys per thread, so most of the row reduction stays in registers.
    cols: gl.constexpr = gl.BlockedLayout([8, 8], [2, 16], [num_warps, 1], [1, 0])
    rows_cols: gl.constexpr = gl.SliceLayout(1, cols)
    # The column sums: one key per thread, so each thread re-reads only what it wrote.
    keys_one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])

    pid = gl.program_id(0)
    g = pid % n_groups
    bh = pid // n_groups
    b = bh // H
    h = bh % H
    q_base = Q + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh
    k_base = K + b.to(gl.int64) * stride_kb + (h // GROUP).to(gl.int64) * stride_kh
    out_base = OUT + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + g.to(gl.int64) * stride_og

    # NVMMA (swizzled) layouts from the host: wgmma reads Q and K there, and P's fp16 rows store
    # without bank conflicts from the wgmma accumulator layout.
    q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, D], Q_SMEM)
    k_smem = gl.allocate_shared_memory(K.dtype.element_ty, [2, BLOCK_N, D], K_SMEM)  # double buffer
    p_smem = gl.allocate_shared_memory(gl.float16, [N_TILES, BLOCK_M, BLOCK_N], P_SMEM)
    m_smem = gl.allocate_shared_memory(gl.float32, [N_TILES, BLOCK_M],
                                       gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))

    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    offs_key = gl.arange(0, BLOCK_N, layout=keys_mma)
    offs_one = gl.arange(0, BLOCK_N, layout=keys_one)
    first = g * blocks_per_group
    n_blocks = gl.minimum(blocks_per_group, gl.cdiv(row_end - row_start, BLOCK_M) - first)
    for rb in range(n_blocks):
        m0 = row_start + (first + rb) * BLOCK_M
        # The previous block's column phase has read p_smem and m_smem in every warp.
        _cta_barrier()
        _copy_keys(k_smem.index(0), k_base, 0, Sk, stride_kn, BLOCK_N, D, load)
        q_ptrs, q_mask = _rows_ptrs(q_base, m0, row_end, stride_qm, BLOCK_M, D, load)
        q_smem.store(gl.load(q_ptrs, mask=q_mask, other=0.0))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_mma)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_mma)
        for t in range(N_TILES):
            # The next tile's copy runs while this one is multiplied and exponentiated (past the
            # last tile it copies nothing: every row masked).
            _copy_keys(k_smem.index((t + 1) % 2), k_base, t + 1, gl.minimum(Sk, N_TILES * BLOCK_N), stride_kn,
                       BLOCK_N, D, load)
            async_copy.wait_group(1)  # this thread's part of tile t has landed
            # Generic-proxy writes become visible to the tensor cores' async proxy, in every warp.
            fence_async_shared()
            _cta_barrier()
            # [BM, D] @ [D, BN] -> [BM, BN]
            acc = warpgroup_mma(q_smem, k_smem.index(t % 2).permute((1, 0)), zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            if (t + 1) * BLOCK_N > Sk:  # the last tile: keys past Sk weigh 0
                s = gl.where((t * BLOCK_N + offs_key)[None, :] < Sk, s, float("-inf"))
            # qk_scale > 0: the max of the raw scores gives the max of the scaled ones. Every row
            # sees a key in tile 0, so m_new is finite from there on.
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - m_new[:, None])  # in (0, 1]: fp16 holds it
            l_i = l_i * gl.exp2(m_i - m_new) + gl.sum(p, axis=1)
            m_i = m_new
            p_smem.index(t).store(p.to(gl.float16))
            m_smem.index(t).store(m_i)
            _cta_barrier()  # every warp's wgmma has read tile t before tile t + 2 is copied over it
        async_copy.wait_group(0)

        # Column phase: the rows' base-2 LSE, +inf (weight 0) for rows past the selection.
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=rows_mma)
        lse2 = gl.where(offs_m < row_end, m_i + gl.log2(l_i), float("inf"))
        lse2 = gl.convert_layout(lse2, rows_cols)
        for t in range(N_TILES):
            f = gl.exp2(m_smem.index(t).load(rows_cols) - lse2) * out_scale  # [BM]
            w = p_smem.index(t).load(cols).to(gl.float32) * f[:, None]  # [BM, BN]
            if USE_MAX:
                c = gl.convert_layout(gl.max(w, axis=0), keys_one)
            else:
                c = gl.convert_layout(gl.sum(w, axis=0), keys_one)
            offs_n = t * BLOCK_N + offs_one
            mask_n = offs_n < Sk
            prev = gl.load(out_base + offs_n, mask=mask_n & (rb > 0), other=0.0)
            if USE_MAX:
                c = gl.maximum(prev, c)  # weights are >= 0: 0 also starts a max
            else:
                c = prev + c
            gl.store(out_base + offs_n, c, mask=mask_n)


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(query: torch.Tensor, key: torch.Tensor, p: Problem) -> bool:
    """Whether this path can run the problem (the caller also requires no key mask and no row mask)."""
    return (
        1 <= p.k_len <= MAX_KEYS
        and p.n_rows >= 1
        and not p.causal
        and p.head_dim in (16, 32, 64, 128)
        and query.is_cuda
        and query.dtype in _GL_DTYPES
        and _capability(query.device) == (9, 0)
        and query.stride(-1) == 1
        and key.stride(-1) == 1
        and query.data_ptr() % 16 == 0
        and key.data_ptr() % 16 == 0
        and all(s % 8 == 0 for s in query.stride()[:3] + key.stride()[:3])  # 16-byte rows
    )


@functools.lru_cache(maxsize=None)
def _smem_layouts(head_dim: int, dtype: torch.dtype) -> dict:
    return dict(Q_SMEM=gl.NVMMASharedLayout.get_default_for([BLOCK_M.value, head_dim], _GL_DTYPES[dtype]),
                K_SMEM=gl.NVMMASharedLayout.get_default_for([BLOCK_N.value, head_dim], _GL_DTYPES[dtype]),
                P_SMEM=gl.NVMMASharedLayout.get_default_for([BLOCK_M.value, BLOCK_N.value], gl.float16))


def n_groups(p: Problem, device: torch.device) -> int:
    """Row-block groups per head: enough programs for ~2 per SM, each group at least one row block."""
    n_blocks = cdiv(p.n_rows, BLOCK_M.value)
    return max(1, min(n_blocks, cdiv(2 * _sm_count(device), p.batch * p.heads)))


def reduce(query, key, p: Problem, use_max: bool, divisor: float = 1.0, groups: int | None = None) -> torch.Tensor:
    """Column sums (maxima) over the selected rows, divided by ``divisor``: float32 partials (B, H, G, Sk),
    one per group of row blocks of each query head; their sum (max) over G is the head's result."""
    groups = groups or n_groups(p, query.device)
    n_blocks = cdiv(p.n_rows, BLOCK_M.value)
    blocks_per_group = cdiv(n_blocks, groups)
    groups = cdiv(n_blocks, blocks_per_group)  # none empty
    out = utils.new_output((p.batch, p.heads, groups, p.k_len), query.device)
    grid = (p.batch * p.heads * groups,)
    _one_pass_kernel[grid](
        query, key, out,
        *query.stride()[:3], *key.stride()[:3], *out.stride()[:3],
        p.heads, p.group, p.k_len, p.row_start, p.row_end, groups, blocks_per_group, p.scale * LOG2E, 1.0 / divisor,
        D=p.head_dim, N_TILES=cdiv(p.k_len, BLOCK_N.value), USE_MAX=use_max, LOAD_TPW_D=min(p.head_dim // 8, 32),
        **_smem_layouts(p.head_dim, query.dtype), num_warps=4,
    )
    return out
