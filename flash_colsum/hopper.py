"""Hopper (sm_90) fast path for both passes: one Gluon kernel with TMA loads and asynchronous wgmma.

The portable Triton kernels (triton_backend) load tiles through registers and wait for each score
tile's matmul before its exponentials start. Here TMA streams the tiles into a ring of STAGES
shared-memory buffers (one mbarrier each), and each tile's wgmma is issued asynchronously one step
before the exponentials of the previous one, as in FlashAttention-3's intra-warpgroup pipelining.
Measured on an H100 (benchmarks/NOTES.md v10): 3-15% faster than the portable kernels; the
overlap itself bought little, halving the L2 traffic of the streamed operand most of it.

One kernel serves both passes. A block of BLOCK_A = 128 "stationary" rows stays in shared memory,
as two 64-row halves of one warpgroup, while BLOCK_B-row tiles of the "streaming" operand pass;
S = A . B^T is [BLOCK_A, BLOCK_B]:
- pass 1 (COLUMNS=False): A = query rows, B = keys; the online log-sum-exp of each row (base 2
  inside, natural log out), float32 (B, H, n_rows), as triton_backend's pass 1.
- pass 2 (COLUMNS=True): A = keys, B = selected query rows of the chunk's heads, with their LSE
  (base 2, padded to whole tiles); each key's sum (or max) of exp(scale * s - lse) over those rows,
  float32 (B, n_chunks, Sk).
- both passes (FUSED=True, for small calls): pass 1 as above, then, with the rows' LSE kept on chip,
  the same key tiles stream past again as the A operand (two 64-key halves) against the stationary
  rows as B, S^T = K . Q^T; each program writes its row block's column sums (maxima), float32
  (B, H, row blocks, Sk). The ring runs on across the two phases: the first key tiles of the
  second are in flight while the first ends.
Head dims that are not a power of two load as a main block and a tail block (72 = 64 + 16, 192 =
128 + 64), each a TMA box, or padded to the next power of two where that is less work (224 -> 256);
columns past D arrive as zeros.
CAUSAL (the two passes, not FUSED; Sq <= Sk): pass 1's row block streams keys up to its last row's
diagonal, pass 2's key block starts at the row tile of its first key's diagonal (skipping whole
tiles, per head of the chunk); only the tiles the diagonal crosses pay a mask. The blocks launch
longest first.

SOFT CAP (RAW_SOFTCAP > 0; the two passes, not FUSED): each tile's raw scores are capped as in the
portable kernels (triton_backend._soft_cap) before any mask.

KEY PADDING MASK (HAS_KEY_MASK, pass 1 and FUSED's first phase): dropped keys' scores become -inf,
so a row may see no key (its LSE is then +inf); pass 2 needs no mask, its caller zeroes the columns.
Scope (`supports`): CUDA capability 9.0, fp16/bf16, D a multiple of 8 (16-byte rows) from 16 to
256, a causal mask only with Sq <= Sk (and pass 2 not between D=80 and 128, nor above 192), a
causal sliding window (WINDOWED: pass 1's keys start at the row block's first window, pass 2's rows
end where the window leaves the key block; its lower edge masked like the diagonal) up to D=192
(D=128 with a soft cap),
Q and K with D contiguous and 16-byte strides (read in place through 4-D TMA descriptors:
contiguous tensors and transposed (B, S, H, D) views alike);
the caller (triton_backend._fast_path) also wants all selected rows and 2**29 scores or more per
pass, or, for FUSED (triton_backend.fused_reduce's small calls), 2**27.
Everything else, and every CPU/interpreter run, takes the portable kernels, against which the GPU
suite checks this path. Gluon does not run in the interpreter: this module is imported only on a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import utils
from .triton_backend import _soft_cap
from .utils import LOG2E, Problem, cdiv, head_dim_blocks

# TMA's global-to-shared copy: async_load from Triton 3.7 on (the old name raises there), the old name before.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# A CTA-wide barrier: thread_barrier up to Triton 3.6, barrier from 3.7 on.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

_TRITON_BEFORE_3_7 = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7)

_LN2 = gl.constexpr(0.6931471805599453)
# Pass 1's lazy max keeps a key tile's row sums against the max so far while they stay within 2**100
# (scores up to ~93 above that max, base 2): a running sum then stays below 2**124 over 2**24 tiles,
# inside float32's range, and a larger (or inf, or NaN) sum sends the tile through the exact update.
_LAZY_LIMIT = gl.constexpr(2.0 ** 100)
_LOG2E = gl.constexpr(LOG2E)


@gluon.jit
def _lse_tile(s, m_i, l_i, n0, n_valid, qk_scale, BLOCK_B: gl.constexpr, layout: gl.constexpr,
              LAST: gl.constexpr, MAY_SEE_NONE: gl.constexpr, LAZY: gl.constexpr):
    """Fold one [BLOCK_A, BLOCK_B] tile of raw scores (keys n0 onwards) into the rows' running
    (max, sum), base 2: l_i = sum over the keys so far of exp2(qk_scale * s - m_i), where with LAZY
    m_i is a lower bound of the rows' max rather than the max itself (only the reference point
    lags; the LSE m_i + log2(l_i) is the same). Only the LAST tile can run past the key range: the
    others skip the mask, which ptxas would otherwise turn into selects on every tile (128 FSEL per
    thread and tile at D=64)."""
    if LAST and n0 + BLOCK_B > n_valid:  # the rows past the key range belong to the next head
        offs_n = n0 + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, layout))
        s = gl.where(offs_n[None, :] < n_valid, s, float("-inf"))
    # LAZY max: after the first tile, try the tile against the max so far, which needs no max of
    # the scores (that max and the exponentials that wait on it cost 9% of pass 1: NOTES.md v22).
    # The sums stay exact, only their reference point lags; the tile is redone with a new max when
    # a row's sum passes LAZY_LIMIT (a score far above the rows' max so far; inf included) or is
    # NaN (a row that has seen no key yet: -inf - -inf). One CTA-wide branch per tile and half.
    lazy = n0 < 0  # False, as a runtime flag like the one below
    tile_sum = l_i
    if LAZY:
        if n0 > 0:
            tile_sum = gl.sum(gl.exp2(s * qk_scale - m_i[:, None]), axis=1)
            lazy = gl.min((tile_sum <= _LAZY_LIMIT).to(gl.int32), axis=0) == 1
    m_new = m_i
    if lazy:
        l_i = l_i + tile_sum
    else:
        # qk_scale > 0, so the max of the raw scores gives the max of the scaled ones. Without a
        # key mask every row sees a key in its first tile, so m_new is finite from then on; with
        # one (MAY_SEE_NONE) a row may have seen none yet, and exp2(-inf - -inf) would be NaN.
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        m_ref = m_new
        if MAY_SEE_NONE:
            m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * gl.exp2(m_i - m_ref) + gl.sum(gl.exp2(s * qk_scale - m_ref[:, None]), axis=1)
    return m_new, l_i


@gluon.jit
def _lse2(m_i, l_i, MAY_SEE_NONE: gl.constexpr):
    """A row's base-2 LSE from its running (max, sum); +inf (weight 0) for a row that saw no key."""
    lse2 = m_i + gl.log2(l_i)
    if MAY_SEE_NONE:
        lse2 = gl.where(l_i > 0, lse2, float("inf"))
    return lse2


@gluon.jit
def _load_keep(keep_base, stride_keep_n, n0, Sk, BLOCK_B: gl.constexpr):
    """The key padding mask's bytes of keys n0 .. n0 + BLOCK_B (0 past Sk), one per thread, coalesced.
    The kernel loads each tile's one tile ahead, so the load's latency hides behind a tile's work."""
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    offs_n = n0 + gl.arange(0, BLOCK_B, layout=flat)
    return gl.load(keep_base + offs_n * stride_keep_n, mask=offs_n < Sk, other=0)


@gluon.jit
def _key_mask(s, keep, drops, layout: gl.constexpr):
    """-inf where ``keep`` (`_load_keep`'s bytes of the tile's keys) drops a key of a [rows, keys]
    tile. Only tiles that drop a key (``drops``, uniform over the CTA; padding drops whole runs of
    keys) pay the conversion and the selects."""
    if drops:
        # To the score columns through shared memory: a load in the accumulator's column layout
        # would hold 32 64-bit addresses per thread.
        seen = gl.convert_layout(keep != 0, gl.SliceLayout(0, layout))
        s = gl.where(seen[None, :], s, float("-inf"))
    return s


@gluon.jit
def _col_tile(s, col, lse2, qk_scale, USE_MAX: gl.constexpr):
    """Fold one [keys, rows] tile into the keys' column sums (maxima); lse2 is the rows' base-2 LSE."""
    p = gl.exp2(s * qk_scale - lse2[None, :])  # rows past the selection carry +inf: weight 0
    if USE_MAX:
        return gl.maximum(col, gl.max(p, axis=1))
    return col + gl.sum(p, axis=1)


@gluon.jit
def _causal_mask(s, a0, b0, causal_offset, window, COLUMNS: gl.constexpr, WINDOWED: gl.constexpr,
                 layout: gl.constexpr):
    """-inf where the causal mask hides a score of the [rows a0.., rows b0..] tile (query i sees key j
    iff j <= i + causal_offset, and with WINDOWED j > i + causal_offset - window): pass 1's A rows
    are queries and B rows keys, pass 2's the reverse. Only tiles the diagonal (or the window's
    lower edge) crosses pay the selects; a branch uniform over the CTA skips the rest."""
    HALF: gl.constexpr = s.shape[0]
    BLOCK_B: gl.constexpr = s.shape[1]
    if COLUMNS:
        crossed = a0 + HALF - 1 > b0 + causal_offset  # the half's last key against the tile's first row
        if WINDOWED:  # the tile's last row against the half's first key
            crossed = crossed | (b0 + BLOCK_B - 1 >= a0 - causal_offset + window)
    else:
        crossed = b0 + BLOCK_B - 1 > a0 + causal_offset  # the tile's last key against the half's first row
        if WINDOWED:  # the tile's first key against the half's last row
            crossed = crossed | (b0 <= a0 + HALF - 1 + causal_offset - window)
    if crossed:
        offs_a = a0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, layout))
        # Register-lean forms found with ptxas (benchmarks/NOTES.md v17): pass 2 compares the tile's
        # column numbers against one threshold per stationary row (164 registers at D=64 instead of
        # 180); pass 1 offsets its columns (163 instead of 191).
        if COLUMNS:
            seen = cols[None, :] >= (offs_a - causal_offset - b0)[:, None]  # key a <= row b + offset
            if WINDOWED:  # key a > row b + offset - window
                seen = seen & (cols[None, :] < (offs_a - causal_offset + window - b0)[:, None])
        else:
            seen = (b0 + cols)[None, :] <= (offs_a + causal_offset)[:, None]  # key b <= row a + offset
            if WINDOWED:
                seen = seen & ((b0 + cols)[None, :] > (offs_a + causal_offset - window)[:, None])
        s = gl.where(seen, s, float("-inf"))
    return s


@gluon.jit
def _fold_tile(s, m_i, l_i, col, lse2, t, Sk, qk_scale, a0, b0, causal_offset, window, keep, drops,
               COLUMNS: gl.constexpr, USE_MAX: gl.constexpr, CAUSAL: gl.constexpr, WINDOWED: gl.constexpr,
               HAS_KEY_MASK: gl.constexpr, BLOCK_B: gl.constexpr, layout: gl.constexpr, LAST: gl.constexpr,
               LAZY: gl.constexpr, RAW_SOFTCAP: gl.constexpr):
    """Fold tile t's scores into the pass's state: (m_i, l_i) for pass 1, col for pass 2. With CAUSAL,
    a0 is the half's first stationary row and b0 the tile's first streamed row (absolute indices).
    The key padding mask (``keep``, ``drops``: `_key_mask`) applies to pass 1 only: pass 2's caller
    zeroes the dropped keys' columns. With RAW_SOFTCAP > 0 the raw scores are soft-capped first (before
    any mask: a capped -inf would be a finite -R)."""
    if RAW_SOFTCAP > 0:
        s = _soft_cap(s, RAW_SOFTCAP)
    if CAUSAL:  # keys past Sk are masked too: j <= i + Sk - Sq < Sk for every query row i < Sq
        s = _causal_mask(s, a0, b0, causal_offset, window, COLUMNS, WINDOWED, layout)
    if COLUMNS:
        col = _col_tile(s, col, lse2, qk_scale, USE_MAX)
    else:
        if HAS_KEY_MASK:  # keys past Sk are masked too
            s = _key_mask(s, keep, drops, layout)
        # A window may leave a row no key in its first tiles: then, as with a key mask, the max may be -inf.
        m_i, l_i = _lse_tile(s, m_i, l_i, t * BLOCK_B, Sk, qk_scale, BLOCK_B, layout,
                             LAST and not (CAUSAL or HAS_KEY_MASK), HAS_KEY_MASK or WINDOWED, LAZY)
    return m_i, l_i, col


@gluon.constexpr_function
def _tile_layout(box_layout):
    """The [rows, cols] shared-memory layout of a descriptor's [1, 1, rows, cols] box: same bytes, same swizzle."""
    return gl.NVMMASharedLayout(box_layout.swizzle_byte_width, box_layout.element_bitwidth, 2)


@gluon.jit
def _issue(a_half, a2_half, b_smem, b2_smem, ready, t, zero, WAIT: gl.constexpr, STAGES: gl.constexpr,
           HAS_TAIL: gl.constexpr):
    """Start one half's scores against tile t, [64, D] @ [D, BB] -> [64, BB] (after tile t lands, if WAIT):
    one wgmma over the main head-dim block, and a second accumulating the tail block, if any."""
    if WAIT:
        mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
    acc = warpgroup_mma(a_half, b_smem.index(t % STAGES).permute((1, 0)), zero, use_acc=False, is_async=True)
    if HAS_TAIL:
        acc = warpgroup_mma(a2_half, b2_smem.index(t % STAGES).permute((1, 0)), acc, is_async=True)
    return acc


@gluon.jit
def _load_rows(desc, desc2, b, h, s, bar, smem, smem2, pred, HAS_TAIL: gl.constexpr):
    """TMA rows s, s + 1, ... of (batch b, head h) into smem (head-dim columns [0, BLOCK_D)) and smem2
    (the tail block after them), completing on bar. Rows past the head's end and columns past D
    arrive as zeros. smem/smem2 are [rows, cols] views; TMA sees them as the [1, 1, rows, cols] box."""
    if HAS_TAIL:
        mbarrier.expect(bar, desc.block_type.nbytes + desc2.block_type.nbytes, pred=pred)
        _tma_load(desc, [b, h, s, 0], bar, smem.reshape(desc.block_type.shape), pred=pred)
        _tma_load(desc2, [b, h, s, desc.block_type.shape[3]], bar, smem2.reshape(desc2.block_type.shape), pred=pred)
    else:
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [b, h, s, 0], bar, smem.reshape(desc.block_type.shape), pred=pred)


@gluon.jit
def _issue_keys(q_op, q2_op, k_smem, k2_smem, ready, t, start, zero, WAIT: gl.constexpr, STAGES: gl.constexpr,
                HAS_TAIL: gl.constexpr, HALF: gl.constexpr):
    """FUSED's second phase: start one 64-key half of ring tile t (from row ``start``) against the
    stationary rows, [64, D] @ [D, BLOCK_A] -> [64, BLOCK_A] (after tile t lands, if WAIT)."""
    if WAIT:
        mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
    acc = warpgroup_mma(k_smem.index(t % STAGES).slice(start, HALF), q_op, zero, use_acc=False, is_async=True)
    if HAS_TAIL:
        acc = warpgroup_mma(k2_smem.index(t % STAGES).slice(start, HALF), q2_op, acc, is_async=True)
    return acc


@gluon.jit
def _store_columns(s, lse2, out_base, stride_on, n0, Sk, qk_scale, out_scale, USE_MAX: gl.constexpr,
                   HALF: gl.constexpr, layout: gl.constexpr, RAW_SOFTCAP: gl.constexpr):
    """Store the column sums (maxima) of one [keys, rows] tile of raw scores (soft-capped here if
    RAW_SOFTCAP > 0), keys n0 onwards; lse2 is the rows' base-2 LSE (+inf past the selection: weight
    0). Keys past Sk are dropped."""
    if RAW_SOFTCAP > 0:
        s = _soft_cap(s, RAW_SOFTCAP)
    # Not _col_tile from zeros: adding the zeros costs an FADD per key and half (0.3% at B=8 S=1024, NOTES.md v16).
    p = gl.exp2(s * qk_scale - lse2[None, :])
    if USE_MAX:
        col = gl.max(p, axis=1)
    else:
        col = gl.sum(p, axis=1)
    offs_n = n0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, layout))
    gl.store(out_base + offs_n * stride_on, col * out_scale, mask=offs_n < Sk)


@gluon.jit
def _fused_columns(q_smem, q2_smem, k_smem, k2_smem, ready, lse2, out_base, stride_on, n_tiles, Sk, qk_scale,
                   out_scale, USE_MAX: gl.constexpr, STAGES: gl.constexpr, HAS_TAIL: gl.constexpr,
                   BLOCK_A: gl.constexpr, BLOCK_B: gl.constexpr, layout: gl.constexpr, k_desc, k2_desc, k_batch, k_head,
                   RAW_SOFTCAP: gl.constexpr):
    """FUSED's second phase: the n_tiles key tiles stream through the ring again (tiles n_tiles ...
    2 * n_tiles - 1 of it, the first STAGES already in flight), each as two 64-key halves against the
    stationary rows, [64, D] @ [D, BLOCK_A]; each half's column sums (maxima) go to out_base."""
    HALF: gl.constexpr = BLOCK_B // 2
    q_op = q_smem.permute((1, 0))  # [D, BLOCK_A]
    q2_op = q2_smem.permute((1, 0))
    zero = gl.zeros([HALF, BLOCK_A], gl.float32, layout=layout)
    # As in the first phase: each half is issued one step ahead of its exponentials, and a tile's
    # buffer is refilled once both its halves are done.
    acc_lo = _issue_keys(q_op, q2_op, k_smem, k2_smem, ready, n_tiles, 0, zero, True, STAGES, HAS_TAIL, HALF)
    for t in range(n_tiles - 1):
        acc_hi = _issue_keys(q_op, q2_op, k_smem, k2_smem, ready, n_tiles + t, HALF, zero, False, STAGES, HAS_TAIL,
                             HALF)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(acc_lo, ))
        _store_columns(s, lse2, out_base, stride_on, t * BLOCK_B, Sk, qk_scale, out_scale, USE_MAX, HALF, layout,
                       RAW_SOFTCAP)
        acc_lo = _issue_keys(q_op, q2_op, k_smem, k2_smem, ready, n_tiles + t + 1, 0, zero, True, STAGES, HAS_TAIL,
                             HALF)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(acc_hi, ))
        slot = (n_tiles + t) % STAGES
        _load_rows(k_desc, k2_desc, k_batch, k_head, (t + STAGES) * BLOCK_B, ready.index(slot), k_smem.index(slot),
                   k2_smem.index(slot), t + STAGES < n_tiles, HAS_TAIL)
        _store_columns(s, lse2, out_base, stride_on, t * BLOCK_B + HALF, Sk, qk_scale, out_scale, USE_MAX, HALF,
                       layout, RAW_SOFTCAP)
    t = n_tiles - 1
    if t >= 0:  # always; the else branch keeps ptxas from serializing the wgmmas (see _stream_kernel)
        acc_hi = _issue_keys(q_op, q2_op, k_smem, k2_smem, ready, n_tiles + t, HALF, zero, False, STAGES, HAS_TAIL,
                             HALF)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(acc_lo, ))
        _store_columns(s, lse2, out_base, stride_on, t * BLOCK_B, Sk, qk_scale, out_scale, USE_MAX, HALF, layout,
                       RAW_SOFTCAP)
        # As in _stream_kernel: the buffers stay allocated until the last wgmma is done with them.
        s = warpgroup_mma_wait(num_outstanding=0, deps=(acc_hi, q_smem, q2_smem, k_smem, k2_smem))[0]
        _store_columns(s, lse2, out_base, stride_on, t * BLOCK_B + HALF, Sk, qk_scale, out_scale, USE_MAX, HALF,
                       layout, RAW_SOFTCAP)
    else:
        warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, ))


@gluon.jit
def _next_fill(head, tile, tile0, n_row_tiles, h0, s0, head_step, BLOCK_B: gl.constexpr):
    """(head, row tile) of the streamed tile after (head, tile), and its (head, first row) coordinates:
    pass 2 streams row tiles tile0 ... n_row_tiles - 1 of one head (tile0 > 0: the causal mask hides
    the first rows), then of the next head of the chunk (head_step 1); pass 1 one head's keys
    (n_row_tiles = all its tiles, tile0 = 0, head_step 0). Counting, not dividing: a division by a
    runtime value costs ~20 instructions per tile."""
    tile += 1
    if tile == n_row_tiles:
        tile = tile0
        head += 1
    return head, tile, h0 + head * head_step, s0 + tile * BLOCK_B


@gluon.jit
def _stream_kernel(
    a_desc, a2_desc, b_desc, b2_desc, LSE, OUT, KEY_KEEP,
    stride_lb, stride_lh, stride_lm, stride_ob, stride_oc, stride_on, stride_keep_b, stride_keep_n,
    H, GROUP, HEADS_PER_PROGRAM, Sk, row_start, row_end, n_a_blocks, causal_offset, window, qk_scale, out_scale,
    COLUMNS: gl.constexpr, FUSED: gl.constexpr, USE_MAX: gl.constexpr, CAUSAL: gl.constexpr, WINDOWED: gl.constexpr,
    HAS_KEY_MASK: gl.constexpr, STAGES: gl.constexpr, A_IN_REGS: gl.constexpr, RAW_SOFTCAP: gl.constexpr,
    num_warps: gl.constexpr,
):
    # Descriptors over (B, heads, rows, D) with boxes [1, 1, rows, cols]; the tiles are [rows, cols].
    BLOCK_A: gl.constexpr = a_desc.block_type.shape[2]  # 128: two halves of 64, one wgmma each
    HALF: gl.constexpr = BLOCK_A // 2
    # Pass 1's lazy max (_lse_tile) is off in FUSED: its loops are short (8 key tiles at S=1024, the
    # first exact anyway), it gained nothing there (0.99-1.03, noise) and spilled more under the
    # register cap (28 bytes instead of 12 at D=64, Triton 3.6; NOTES.md v22).
    LAZY: gl.constexpr = not FUSED
    BLOCK_B: gl.constexpr = b_desc.block_type.shape[2]
    BLOCK_D: gl.constexpr = a_desc.block_type.shape[3]  # the main head-dim block; a2/b2: the tail
    HAS_TAIL: gl.constexpr = a2_desc is not None  # None (a constexpr) when D is a power of two
    # One warpgroup; wgmma's instruction N spans the whole streamed tile.
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BLOCK_B, 16])
    rows_layout: gl.constexpr = gl.SliceLayout(1, layout)  # one value per stationary row
    cols_layout: gl.constexpr = gl.SliceLayout(0, layout)  # one value per streaming row

    # 1-D grid, stationary blocks fastest: neighbours stream the same tiles through L2. Causal
    # blocks differ in work (pass 1's last row blocks see the most keys, pass 2's first key blocks
    # the most rows), so there the blocks go slowest, the longest of every head first, and the last
    # wave is short work.
    pid = gl.program_id(0)
    a_block = pid % n_a_blocks
    rest = pid // n_a_blocks
    if CAUSAL:
        n_rest = gl.num_programs(0) // n_a_blocks
        a_block = pid // n_rest
        rest = pid % n_rest
        if not COLUMNS:
            a_block = n_a_blocks - 1 - a_block
    if COLUMNS:
        # rest = (batch, head chunk); A = key block, B = query rows of the chunk's heads.
        n_chunks = H // HEADS_PER_PROGRAM
        b = rest // n_chunks
        chunk = rest % n_chunks
        h_first = chunk * HEADS_PER_PROGRAM
        a_head = h_first // GROUP
        a_row0 = a_block * BLOCK_A
        b_head0 = h_first
        b_row0 = row_start
        n_row_tiles = (row_end - row_start + BLOCK_B - 1) // BLOCK_B
        tile0 = 0
        if CAUSAL:  # rows before a_row0 - causal_offset see none of the block's keys: skip their tiles
            tile0 = gl.minimum(gl.maximum(a_row0 - causal_offset - row_start, 0) // BLOCK_B, n_row_tiles - 1)
        tile_end = n_row_tiles  # one past the last row tile streamed per head
        if WINDOWED:  # rows from a_row0 + BLOCK_A - 1 - causal_offset + window on see none of them
            last_row = gl.minimum(a_row0 + BLOCK_A - 1 - causal_offset + window, row_end) - row_start
            tile_end = gl.maximum(gl.minimum((last_row + BLOCK_B - 1) // BLOCK_B, n_row_tiles), tile0 + 1)
        n_tiles = HEADS_PER_PROGRAM * (tile_end - tile0)
        head_step = 1
    else:
        # rest = (batch, head); A = query rows, B = the head's keys.
        b = rest // H
        h = rest % H
        a_head = h
        a_row0 = row_start + a_block * BLOCK_A
        b_head0 = h // GROUP
        b_row0 = 0
        n_keys = Sk
        if CAUSAL:  # the block's last row sees keys up to it + causal_offset
            n_keys = gl.minimum(Sk, gl.minimum(a_row0 + BLOCK_A, row_end) + causal_offset)
        if WINDOWED:  # ... and its first row none before a_row0 + 1 + causal_offset - window
            b_row0 = gl.minimum(gl.maximum(a_row0 + 1 + causal_offset - window, 0), n_keys - 1) // BLOCK_B * BLOCK_B
        n_tiles = (n_keys - b_row0 + BLOCK_B - 1) // BLOCK_B
        n_row_tiles = n_tiles  # the fill counter wraps to the first key tile: FUSED streams them twice
        tile_end = n_row_tiles
        tile0 = 0
        head_step = 0
    n_fills = 2 * n_tiles if FUSED else n_tiles  # tiles through the ring
    keep_base = KEY_KEEP + b.to(gl.int64) * stride_keep_b  # the batch row's key padding mask (pass 1)

    a_smem = gl.allocate_shared_memory(a_desc.dtype, [BLOCK_A, BLOCK_D], _tile_layout(a_desc.layout))
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_B, BLOCK_D], _tile_layout(b_desc.layout))
    a2_smem = a_smem  # unused without a tail
    b2_smem = b_smem
    if HAS_TAIL:
        BLOCK_D2: gl.constexpr = a2_desc.block_type.shape[3]
        a2_smem = gl.allocate_shared_memory(a2_desc.dtype, [BLOCK_A, BLOCK_D2], _tile_layout(a2_desc.layout))
        b2_smem = gl.allocate_shared_memory(b2_desc.dtype, [STAGES, BLOCK_B, BLOCK_D2], _tile_layout(b2_desc.layout))
    a_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(a_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)

    _load_rows(a_desc, a2_desc, b, a_head, a_row0, a_bar, a_smem, a2_smem, True, HAS_TAIL)
    fill_head = 0  # (head, row tile) of the next streamed tile to load, and its coordinates
    fill_tile = tile0
    fill_h = b_head0
    fill_s = b_row0 + tile0 * BLOCK_B
    for i in gl.static_range(STAGES):
        _load_rows(b_desc, b2_desc, b, fill_h, fill_s, ready.index(i), b_smem.index(i), b2_smem.index(i), i < n_fills,
                   HAS_TAIL)
        fill_head, fill_tile, fill_h, fill_s = _next_fill(fill_head, fill_tile, tile0, tile_end, b_head0, b_row0,
                                                          head_step, BLOCK_B)

    zero = gl.zeros([HALF, BLOCK_B], gl.float32, layout=layout)
    # Per half: the running (max, sum) of pass 1, or the column sums (maxima) of pass 2.
    m_lo = gl.full([HALF], float("-inf"), gl.float32, layout=rows_layout)
    m_hi = m_lo
    l_lo = gl.zeros([HALF], gl.float32, layout=rows_layout)
    l_hi = l_lo
    col_lo = gl.zeros([HALF], gl.float32, layout=rows_layout)  # weights are >= 0: 0 also starts a max
    col_hi = col_lo
    offs_b = gl.arange(0, BLOCK_B, layout=cols_layout)
    lse_ptrs = LSE + offs_b
    lse2 = gl.zeros([BLOCK_B], gl.float32, layout=cols_layout)
    # (head, row tile) of the tile being folded, and (_, first row) relative to b_row0: the causal mask's coordinates
    fold_head = 0
    fold_tile = tile0
    fold_s = tile0 * BLOCK_B
    if COLUMNS:
        # Pass 2 reads the rows' base-2 LSE from a copy padded with +inf to whole row tiles per head
        # (col_reduce): tile t's values are the BLOCK_B after t * BLOCK_B, with no mask (after
        # tile0 * BLOCK_B and skipping tile0 tiles per head when causal).
        lse_ptrs = LSE + (b.to(gl.int64) * H + h_first) * (n_row_tiles * BLOCK_B) + offs_b
        lse2 = gl.load(lse_ptrs + fold_s)

    # Pass 1's key padding mask: the bytes of the tile to fold next, and whether it drops a key (one
    # CTA-wide reduction per tile, shared by both halves).
    keep = 0
    drops = False
    if HAS_KEY_MASK:
        keep = _load_keep(keep_base, stride_keep_n, b_row0, Sk, BLOCK_B)
    mbarrier.wait(a_bar, 0)
    if HAS_KEY_MASK:
        drops = gl.min(keep, axis=0) == 0
    a_lo = a_smem.slice(0, HALF)
    a_hi = a_smem.slice(HALF, HALF)
    a2_lo = a2_smem.slice(0, HALF)
    a2_hi = a2_smem.slice(HALF, HALF)
    if A_IN_REGS:  # the stationary operand from registers: each wgmma then reads only B from shared memory
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=layout, k_width=2)
        a_lo = a_lo.load(a_op)
        a_hi = a_hi.load(a_op)
        a2_lo = a2_lo.load(a_op)
        a2_hi = a2_hi.load(a_op)
    # Each tile's two halves are issued one step ahead of their exponentials, so the tensor cores
    # compute the next scores while the warps exponentiate these. Two accumulators alternate
    # (acc_lo, acc_hi) and no register copy reads one in flight, which would make ptxas serialize
    # the wgmmas. Both halves share each streamed tile: K (or Q) crosses L2 once per 128 rows.
    # Causal coordinates: the halves' first stationary rows; the tile's first streamed row is b_row0 + fold_s.
    a0_lo = a_row0
    a0_hi = a0_lo + HALF
    acc_lo = _issue(a_lo, a2_lo, b_smem, b2_smem, ready, 0, zero, True, STAGES, HAS_TAIL)
    for t in range(n_tiles - 1):
        acc_hi = _issue(a_hi, a2_hi, b_smem, b2_smem, ready, t, zero, False, STAGES, HAS_TAIL)
        if HAS_KEY_MASK:  # the next tile's mask bytes, in flight while both halves fold this one
            keep_next = _load_keep(keep_base, stride_keep_n, b_row0 + (t + 1) * BLOCK_B, Sk, BLOCK_B)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(acc_lo, ))
        m_lo, l_lo, col_lo = _fold_tile(s, m_lo, l_lo, col_lo, lse2, t, Sk, qk_scale, a0_lo, b_row0 + fold_s,
                                        causal_offset, window, keep, drops, COLUMNS, USE_MAX, CAUSAL, WINDOWED,
                                        HAS_KEY_MASK,
                                        BLOCK_B, layout, False, LAZY, RAW_SOFTCAP)
        acc_lo = _issue(a_lo, a2_lo, b_smem, b2_smem, ready, t + 1, zero, True, STAGES, HAS_TAIL)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(acc_hi, ))
        # Both halves are done with tile t: its buffer takes tile t + STAGES.
        _load_rows(b_desc, b2_desc, b, fill_h, fill_s, ready.index(t % STAGES), b_smem.index(t % STAGES),
                   b2_smem.index(t % STAGES), t + STAGES < n_fills, HAS_TAIL)
        fill_head, fill_tile, fill_h, fill_s = _next_fill(fill_head, fill_tile, tile0, tile_end, b_head0, b_row0,
                                                          head_step, BLOCK_B)
        b0_hi = b_row0 + fold_s
        lse2_next = lse2
        if CAUSAL:  # the next folded tile, whose row tiles may skip tile0 per head
            fold_head, fold_tile, fold_h, fold_s = _next_fill(fold_head, fold_tile, tile0, tile_end, 0, 0, 1, BLOCK_B)
            if COLUMNS:
                lse2_next = gl.load(lse_ptrs + fold_h * (n_row_tiles * BLOCK_B) + fold_s)
        elif COLUMNS:
            lse2_next = gl.load(lse_ptrs + (t + 1) * BLOCK_B)
        m_hi, l_hi, col_hi = _fold_tile(s, m_hi, l_hi, col_hi, lse2, t, Sk, qk_scale, a0_hi, b0_hi, causal_offset,
                                        window, keep, drops, COLUMNS, USE_MAX, CAUSAL, WINDOWED, HAS_KEY_MASK,
                                        BLOCK_B, layout, False, LAZY, RAW_SOFTCAP)
        lse2 = lse2_next
        if HAS_KEY_MASK:
            keep = keep_next
            drops = gl.min(keep, axis=0) == 0
    t = n_tiles - 1
    # n_tiles >= 1, so the else branch never runs; without it ptxas serializes every wgmma of the
    # kernel (warning C7514, each HGMMA followed by a full wait), as seen in benchmarks/NOTES.md v10.
    if t >= 0:
        acc_hi = _issue(a_hi, a2_hi, b_smem, b2_smem, ready, t, zero, False, STAGES, HAS_TAIL)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(acc_lo, ))
        m_lo, l_lo, col_lo = _fold_tile(s, m_lo, l_lo, col_lo, lse2, t, Sk, qk_scale, a0_lo, b_row0 + fold_s,
                                        causal_offset, window, keep, drops, COLUMNS, USE_MAX, CAUSAL, WINDOWED,
                                        HAS_KEY_MASK,
                                        BLOCK_B, layout, True, LAZY, RAW_SOFTCAP)
        # The buffers the last wgmma reads stay allocated until it is done: after their last issue
        # the allocator would otherwise hand them to the fold's scratch (the key mask's conversion through
        # shared memory), which then overwrote the keys that wgmma was still reading.
        s = warpgroup_mma_wait(num_outstanding=0, deps=(acc_hi, a_smem, a2_smem, b_smem, b2_smem))[0]
        if FUSED:  # the last tile's buffer takes the second phase's tile STAGES - 1
            _load_rows(b_desc, b2_desc, b, fill_h, fill_s, ready.index(t % STAGES), b_smem.index(t % STAGES),
                       b2_smem.index(t % STAGES), t + STAGES < n_fills, HAS_TAIL)
        m_hi, l_hi, col_hi = _fold_tile(s, m_hi, l_hi, col_hi, lse2, t, Sk, qk_scale, a0_hi, b_row0 + fold_s,
                                        causal_offset, window, keep, drops, COLUMNS, USE_MAX, CAUSAL, WINDOWED,
                                        HAS_KEY_MASK,
                                        BLOCK_B, layout, True, LAZY, RAW_SOFTCAP)
    else:
        warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, ))

    offs_lo = a_block * BLOCK_A + gl.arange(0, HALF, layout=rows_layout)
    offs_hi = offs_lo + HALF
    if FUSED:
        # The rows' base-2 LSE, +inf (weight 0) past the selection, moved through shared memory from
        # one value per stationary row of each half to one per column of the second phase's tiles.
        keys_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                              instr_shape=[16, BLOCK_A, 16])
        lse_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_A], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        lse_smem.slice(0, HALF).store(gl.where(row_start + offs_lo < row_end, _lse2(m_lo, l_lo, HAS_KEY_MASK),
                                               float("inf")))
        lse_smem.slice(HALF, HALF).store(gl.where(row_start + offs_hi < row_end, _lse2(m_hi, l_hi, HAS_KEY_MASK),
                                                  float("inf")))
        _cta_barrier()
        lse2 = lse_smem.load(gl.SliceLayout(0, keys_layout))
        _fused_columns(a_smem, a2_smem, b_smem, b2_smem, ready, lse2, OUT + pid.to(gl.int64) * stride_ob, stride_on,
                       n_tiles, Sk, qk_scale, out_scale, USE_MAX, STAGES, HAS_TAIL, BLOCK_A, BLOCK_B, keys_layout,
                       b_desc, b2_desc, b, b_head0, RAW_SOFTCAP)
    mbarrier.invalidate(a_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    if COLUMNS:
        out_base = OUT + b.to(gl.int64) * stride_ob + chunk.to(gl.int64) * stride_oc
        gl.store(out_base + offs_lo * stride_on, col_lo * out_scale, mask=offs_lo < Sk)
        gl.store(out_base + offs_hi * stride_on, col_hi * out_scale, mask=offs_hi < Sk)
    elif not FUSED:  # FUSED stored its column sums above
        lse_base = LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
        # base 2 -> natural
        lse_lo = _lse2(m_lo, l_lo, HAS_KEY_MASK) * _LN2
        lse_hi = _lse2(m_hi, l_hi, HAS_KEY_MASK) * _LN2
        gl.store(lse_base + offs_lo * stride_lm, lse_lo, mask=row_start + offs_lo < row_end)
        gl.store(lse_base + offs_hi * stride_lm, lse_hi, mask=row_start + offs_hi < row_end)


# The stationary block: 128 rows, two halves of one warpgroup. The streamed tiles, ring depth and
# operand source per pass come from `python -m benchmarks.tune_hopper` on an H100 (NOTES.md v10).
BLOCK_ROWS = 128


def _config(head_dim: int, columns: bool, causal: bool = False) -> tuple[int, int, bool]:
    """(BLOCK_B, STAGES, A_IN_REGS) for a pass (results/tune_hopper_h100_v10*.csv, v12 for D=72-96,
    v16 for D=96-128, v17 for causal pass 2, v23 for pass 1 at D=128, v28 above D=128)."""
    if head_dim > 128:
        return _wide_config(head_dim, columns, causal)
    if columns and head_dim <= 64:
        return 64, 3, False
    # The causal mask costs pass 2 ~50 registers: at D=72/80 the keys from shared memory and 2 stages
    # fit three CTAs per SM, 0.95-0.98 ms against 1.02-1.04 for these tiles (S=16384, H=16).
    if columns and causal and head_dim <= 80:
        return 64, 2, False
    # Pass 2 above D=64 reads the stationary keys from registers: D=72 1.89 vs 1.98 ms, D=80 1.85
    # vs 1.99, D=96 1.98 vs 2.14, D=128 2.08 vs 2.21. Its streamed tiles are 64 rows: at D=128
    # 2.111 vs 2.160 ms for 128 rows (D=96 1.914 vs 1.930); 3 stages up to D=80 (D=128: 2.223).
    if columns:
        return 64, 3 if head_dim <= 80 else 2, True
    # Pass 1 above D=96 (non-causal) reads the stationary rows from registers too: at D=128 a median
    # per-call ratio of 0.974 over 300 interleaved calls (2.118 vs 2.190 ms); at D=96 it is 1.10.
    # Only where it was measured: Triton 3.6's ptxas fits it in 240 registers, 3.9's spills 84 bytes.
    if head_dim > 96 and not causal and _TRITON_BEFORE_3_7:
        return 128, 2, True
    return 128, 2, False


def _wide_config(head_dim: int, columns: bool, causal: bool) -> tuple[int, int, bool]:
    """Rows over 256 bytes (results/wide_tune_v28_h100.txt: B=1, H=16, S=16384, against the portable
    kernels' own wide tiles). Each pass runs one or two CTAs per SM here, and shared memory decides:
    - split rows (D=129-192, 128 + a tail): 64-key tiles, the stationary operand from registers
      but for causal masks. D=192: pass 1 3.18 vs 3.68 ms, pass 2 2.76 vs 3.82; causal 1.82 vs
      1.99 and 1.65 vs 2.00. (128-key tiles: D=136 pass 1 2.56 ms against 2.91, D=160 3.91 against 3.04.)
    - padded rows (D=193-256, one 256-column block): 128-key tiles, one CTA per SM either way. D=256:
      pass 1 4.30 vs 4.85 ms, pass 2 3.85 vs 5.24; causal pass 1 2.29 vs 2.61 (Triton 3.6's ptxas
      spills 36 bytes there). The causal pass 2 gains nothing (2.41 vs 2.44 in 64-key tiles): it
      stays portable (CAUSAL_COLUMNS_SLOWER)."""
    if head_dim > 192:
        return 128, 2, False
    return 64, 2, not causal


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


# A causal pass 2 lost to the portable kernel at D=96 (1.07-1.10 vs 1.05-1.07 ms, S=16384, H=16;
# results/causal_tune_v17_h100.txt) and gains nothing above D=192 (`_wide_config`): between D=80 and
# 128, and above 192, the Hopper path runs causal pass 1 only.
CAUSAL_COLUMNS_SLOWER = frozenset((*range(81, 128), *range(193, 257)))


def supports(query: torch.Tensor, key: torch.Tensor, p: Problem, mode: str = "lse") -> bool:
    """Whether this path can run the problem (with or without a key padding mask) in ``mode``:
    ``"lse"`` (`row_lse`), ``"columns"`` (`col_reduce`) or ``"fused"`` (`fused_columns`, no causal
    mask). A causal mask needs Sq <= Sk, so that every row sees key 0."""
    if p.window and p.head_dim > 192:  # the window's masks spill at 256-column rows (84 bytes, Triton 3.6)
        return False
    if p.softcap and (mode == "fused" or (p.window and p.head_dim > 128)):
        # Capped, the fused launch spills under its register cap up to D=96 (68-80 bytes) and lost to
        # the portable one at D=128 (B=8, S=1024: 0.52 vs 0.30 ms); a capped window's pass 2 spills at
        # D=192 (180 bytes, Triton 3.9). NOTES.md v30.
        return False
    if p.causal and (mode == "fused" or p.causal_offset < 0
                     or (mode == "columns" and p.head_dim in CAUSAL_COLUMNS_SLOWER)):
        return False
    return (
        query.is_cuda
        and _capability(query.device) == (9, 0)
        and query.dtype in _GL_DTYPES
        and p.head_dim % 8 == 0  # 16-byte rows for TMA
        and 16 <= p.head_dim <= 256
        and _tma_strides(query)
        and _tma_strides(key)
    )


def _tma_strides(t: torch.Tensor) -> bool:
    """Whether TMA can read t (B, heads, rows, D) in place: D contiguous, every other stride positive
    and, like the base, a multiple of 16 bytes. Covers contiguous tensors and the (B, S, H, D) memory
    that transformers' attention layers pass as transposed views; not broadcast (stride 0) ones."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride > 0 and stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1]))


@functools.lru_cache(maxsize=None)
def _shared_layout(rows: int, cols: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, cols], _GL_DTYPES[dtype])


def _rows_views(t: torch.Tensor, block_rows: int) -> tuple:
    """TMA descriptors over t (B, heads, rows, D) with its own strides, in [1, 1, block_rows, cols]
    boxes: (main, tail) head-dim blocks as triton_backend splits D (72 = 64 + 16; tile widths are
    powers of two), the tail read from column BLOCK_D on. TMA zero-fills rows past a head's end and
    columns past D. Without a tail, None (a constexpr to the kernel: each descriptor argument costs
    host time at every launch, which small fused calls feel)."""
    shape, strides = list(t.shape), list(t.stride())
    return tuple(None if not cols else
                 TensorDescriptor(t, shape, strides, [1, 1, block_rows, cols], _shared_layout(block_rows, cols, t.dtype))
                 for cols in head_dim_blocks(t.shape[-1]))


def row_lse(query, key, p: Problem, key_keep=None, config=None) -> torch.Tensor:
    """Pass 1 over the selected rows: natural-log LSE, float32 (B, H, n_rows); key_keep: optional
    (B, Sk) bool, False drops a key from every softmax. A row that sees no key gets +inf."""
    block_b, stages, a_in_regs = config or _config(p.head_dim, columns=False, causal=p.causal)
    lse = utils.new_output((p.batch, p.heads, p.n_rows), query.device)
    n_a_blocks = cdiv(p.n_rows, BLOCK_ROWS)
    grid = (p.batch * p.heads * n_a_blocks,)
    keep, stride_keep_b, stride_keep_n = utils.key_keep_args(key_keep, lse)
    utils.launch(
        _stream_kernel, grid,
        *_rows_views(query, BLOCK_ROWS), *_rows_views(key, block_b), lse, lse, keep,
        *lse.stride(), 0, 0, 0, stride_keep_b, stride_keep_n,
        p.heads, p.group, 1, p.k_len, p.row_start, p.row_end, n_a_blocks, p.causal_offset, p.window, p.scale * LOG2E,
        1.0, COLUMNS=False, FUSED=False, USE_MAX=False, CAUSAL=p.causal, WINDOWED=p.window > 0,
        HAS_KEY_MASK=key_keep is not None,
        STAGES=stages, A_IN_REGS=a_in_regs, RAW_SOFTCAP=p.raw_softcap, num_warps=4,
    )
    return lse


def col_reduce(query, key, lse, p: Problem, heads_per_chunk: int, use_max: bool, config=None,
               divisor: float = 1.0) -> torch.Tensor:
    """Pass 2, key-centric: (B, H // heads_per_chunk, Sk) float32 over divisor, as triton_backend.col_reduce.
    Adds one temporary: the LSE in base 2, padded to whole row tiles, float32 (B, H, ~n_rows)."""
    block_b, stages, a_in_regs = config or _config(p.head_dim, columns=True, causal=p.causal)
    n_chunks = p.heads // heads_per_chunk
    out = utils.new_output((p.batch, n_chunks, p.k_len), query.device)
    lse2 = utils.padded_lse2(lse, cdiv(p.n_rows, block_b) * block_b)  # whole row tiles per head
    n_a_blocks = cdiv(p.k_len, BLOCK_ROWS)
    grid = (p.batch * n_chunks * n_a_blocks,)
    utils.launch(
        _stream_kernel, grid,
        *_rows_views(key, BLOCK_ROWS), *_rows_views(query, block_b), lse2, out, out,
        *lse2.stride(), *out.stride(), 0, 0,
        p.heads, p.group, heads_per_chunk, p.k_len, p.row_start, p.row_end, n_a_blocks, p.causal_offset, p.window,
        p.scale * LOG2E, 1.0 / divisor,
        COLUMNS=True, FUSED=False, USE_MAX=use_max, CAUSAL=p.causal, WINDOWED=p.window > 0, HAS_KEY_MASK=False,
        STAGES=stages, A_IN_REGS=a_in_regs, RAW_SOFTCAP=p.raw_softcap, num_warps=4,
    )
    return out


def _fused_config(head_dim: int) -> tuple[int, int, int | None]:
    """(BLOCK_B, STAGES, maxnreg) for both passes in one launch. The ring's key tiles serve as the
    second phase's 64-key halves, so they are pass 1's 128-key tiles; 2 stages (3: same time, 4:
    slower; at D=128 3 and 4 cost a CTA per SM, 142 -> 182 us at B=8 S=1024). Up to D=96 a cap of
    168 registers (173-183 uncapped, 4-20 bytes spilled) fits three CTAs per SM instead of two:
    B=8 S=1024 D=64 116.6 -> 109.2 us; B=16 D=72/80/96 250 -> 225, 247 -> 222, 256 -> 238 us. At
    D=128 shared memory holds two CTAs anyway, and the cap lost (142 -> 147; NOTES.md v15, v16).
    Above D=128 the same tiles beat the portable kernels' two passes at every size they fuse: B=8
    S=1024 D=136/192/256 0.171/0.243/0.269 ms against 0.235/0.291/0.426 (results/wide_tune_v28_h100.txt)."""
    return 128, 2, 168 if head_dim <= 96 else None


def fused_columns(query, key, p: Problem, use_max: bool, divisor: float = 1.0, key_keep=None,
                  config=None) -> torch.Tensor:
    """Both passes in one launch (small calls): each program's block of BLOCK_ROWS selected rows
    gets its LSE over all keys (but those key_keep drops), then its column sums (maxima) of
    exp(scale * s - lse) over divisor. Returns the partials, float32 (B, H, cdiv(n_rows, BLOCK_ROWS),
    Sk), for the caller to reduce over row blocks (and heads); dropped keys' columns are not zeroed."""
    block_b, stages, maxnreg = config or _fused_config(p.head_dim)
    n_a_blocks = cdiv(p.n_rows, BLOCK_ROWS)
    parts = utils.new_output((p.batch, p.heads, n_a_blocks, p.k_len), query.device)
    grid = (p.batch * p.heads * n_a_blocks,)  # program pid writes plane pid of parts
    keep, stride_keep_b, stride_keep_n = utils.key_keep_args(key_keep, parts)
    utils.launch(
        _stream_kernel, grid,
        *_rows_views(query, BLOCK_ROWS), *_rows_views(key, block_b), parts, parts, keep,
        0, 0, 0, p.k_len, 0, 1, stride_keep_b, stride_keep_n,
        p.heads, p.group, 1, p.k_len, p.row_start, p.row_end, n_a_blocks, 0, 0, p.scale * LOG2E, 1.0 / divisor,
        COLUMNS=False, FUSED=True, USE_MAX=use_max, CAUSAL=False, WINDOWED=False, HAS_KEY_MASK=key_keep is not None,
        STAGES=stages, A_IN_REGS=False, RAW_SOFTCAP=p.raw_softcap, num_warps=4,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)),
    )
    return parts
