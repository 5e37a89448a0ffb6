"""Triton back end: two passes that never build the Sq x Sk attention matrix.

Pass 1 (`_row_block_kernel` in LSE mode, row-stationary): for each selected query row i, the
log-sum-exp of its scaled scores over the keys it may see, lse[i] = log(sum_j exp(scale * q_i . k_j)),
natural log, float32, shape (B, H, n_rows). Rows that see no key get +inf (as FlashAttention does),
so that every weight exp(s - lse) they would contribute is exactly 0.

Pass 2 (`_col_reduce_kernel`, key-centric): each program owns BLOCK_N keys of one key head and
streams over the selected query rows of a chunk of that key head's query heads. It computes the
transposed score tile K . Q^T, so the reduction over query rows is a row sum of a register tile,
and writes its BLOCK_N column sums (or maxima) once: no atomics, bitwise reproducible. When the
selected rows are few (`_use_row_stationary`: up to four row blocks), pass 2 instead runs the
row-stationary kernel in COLUMNS mode: keys stream past the rows in registers, as in pass 1, and
each row block writes its own partial column sums, added here. Few rows of grouped-query heads
whose keys split are packed (`_pack_heads`): one row block holds the rows of the query heads that
share a key head, so each key tile read feeds all of them.

Small calls run both passes in one launch (FUSED). Few rows over long keys (`_keeps_scores`) skip
the second pass over K: pass 1 stores their scaled scores and `_scores_reduce_kernel` turns them
into the column statistics. Short key ranges (`_one_pass_fits`: up to 512 keys) take one pass with
one exponential per score on large GPU calls (`_one_pass_kernel`: a head's keys stay in the
program while its query rows stream past in groups whose row max and sum are exact at once).

Masking convention: query i sees key j iff j <= i + causal_offset when causal; the offset is
Sk - Sq (bottom-right aligned, as FlashAttention) unless a caller (context parallelism) sets it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from . import utils
from .utils import LOG2E, Problem, cdiv, head_dim_blocks, interpreting

_LOG2E = tl.constexpr(LOG2E)  # log2(e), usable inside kernels
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def _load_tile(base, offs_row, stride_row, mask_row, stride_d,
               D_START: tl.constexpr, BLOCK_D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr):
    """Load a [ROWS, BLOCK_D] tile of head-dim columns D_START ... D_START + BLOCK_D - 1, zero outside
    [D_LO, D_HI). The head-dim mask is emitted only where the bounds cut the tile (compile-time).

    Row offsets are int64 so tensors of more than 2**31 elements index safely.
    """
    offs_d = D_START + tl.arange(0, BLOCK_D)
    mask = mask_row[:, None]
    if D_LO > D_START:
        mask = mask & (offs_d[None, :] >= D_LO)
    if D_HI < D_START + BLOCK_D:
        mask = mask & (offs_d[None, :] < D_HI)
    ptrs = base + offs_row.to(tl.int64)[:, None] * stride_row + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0)


# Head dims that are not a power of two run as a power-of-two main block [0, BLOCK_D) plus a tail
# block of BLOCK_D2 columns ending at D (72 = 64 + 16: columns 56...71). The streaming operand
# (loaded every iteration) reads its tail with no head-dim mask; the stationary operand (loaded
# once) zeroes the columns the two blocks share, so each product counts once.
@triton.jit
def _load_main(base, offs_row, stride_row, mask_row, stride_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    return _load_tile(base, offs_row, stride_row, mask_row, stride_d, 0, BLOCK_D, 0, D)


@triton.jit
def _load_tail(base, offs_row, stride_row, mask_row, stride_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_D2: tl.constexpr, STATIONARY: tl.constexpr):
    d_lo: tl.constexpr = BLOCK_D if STATIONARY else D - BLOCK_D2
    return _load_tile(base, offs_row, stride_row, mask_row, stride_d, D - BLOCK_D2, BLOCK_D2, d_lo, D)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        # Triton 3.9's CPU interpreter multiplies bf16 tiles wrongly; bf16 products are exact in fp32.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _key_block_scores(q, q_tail, k_base, stride_kn, stride_kd, offs_n, Sk,
                      D: tl.constexpr, TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, RAW_SOFTCAP: tl.constexpr):
    """Unscaled scores of the rows held in registers (q, q_tail) against the keys offs_n:
    [BM, BN] = Q . K^T, or [BN, BM] = K . Q^T when TRANSPOSED; soft-capped if RAW_SOFTCAP > 0."""
    k = _load_main(k_base, offs_n, stride_kn, offs_n < Sk, stride_kd, D, BLOCK_D)  # [BN, BD]
    if TRANSPOSED:
        s = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT)  # [BN, BD] @ [BD, BM] -> [BN, BM]
    else:
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT)  # [BM, BD] @ [BD, BN] -> [BM, BN]
    if BLOCK_D2 > 0:
        k_tail = _load_tail(k_base, offs_n, stride_kn, offs_n < Sk, stride_kd, D, BLOCK_D, BLOCK_D2, False)
        if TRANSPOSED:
            s += _dot(k_tail, tl.trans(q_tail), DOT_PRECISION, UPCAST_DOT)  # [BN, BD2] @ [BD2, BM]
        else:
            s += _dot(q_tail, tl.trans(k_tail), DOT_PRECISION, UPCAST_DOT)  # [BM, BD2] @ [BD2, BN]
    if RAW_SOFTCAP > 0:
        s = _soft_cap(s, RAW_SOFTCAP)
    return s


@triton.jit
def _soft_cap(s, RAW_SOFTCAP: tl.constexpr):
    """R * tanh(s / R) for raw scores s (R = softcap / scale: Gemma 2's logit soft-capping before the
    scale, so the exp2 after needs no change), through one exp2: tanh|y| = 2 / (1 + t) - 1 with
    t = exp2(-2 log2(e) |y|) in (0, 1], which cannot overflow; NaN stays NaN.

    The reciprocal of 1 + t (in [1, 2]) is Newton's method on the FMA units, not a division: a
    division's reciprocal runs on the MUFU, next to the two exp2, and made a capped score cost three
    MUFU operations per pass instead of two. The linear first guess 24/17 - 8/17 d is at most 1/17
    off on [1, 2]; each step squares the error: 3.5e-3, 1.2e-5, then below float32's rounding."""
    t = tl.exp2(tl.abs(s) * (-2.0 * _LOG2E / RAW_SOFTCAP))
    d = 1.0 + t
    r = 24.0 / 17.0 - (8.0 / 17.0) * d
    for _ in tl.static_range(3):
        r = r + r * (1.0 - d * r)
    capped = (2.0 * RAW_SOFTCAP) * r - RAW_SOFTCAP
    return tl.where(s < 0, -capped, capped)


@triton.jit
def _in_window(row, key, causal_offset, window, WINDOWED: tl.constexpr):
    """Query row sees key: at or before its diagonal (causal), and with WINDOWED among the
    ``window`` keys up to it (a sliding window)."""
    visible = key <= row + causal_offset
    if WINDOWED:
        visible = visible & (key > row + causal_offset - window)
    return visible


@triton.jit
def _lse_update(m_i, l_i, q, q_tail, k_base, stride_kn, stride_kd, KEEP_ROW, stride_keep_n,
                offs_m, n0, n_hi, Sk, causal_offset, window, WINDOWED: tl.constexpr, D: tl.constexpr, qk_scale,
                scores_ptrs, mask_m,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, STORE_SCORES: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, RAW_SOFTCAP: tl.constexpr):
    """Fold one block of BLOCK_N keys into the running (max, sum) of each row, in base 2; with
    STORE_SCORES, also store the block's scaled base-2 scores (-inf where masked) at scores_ptrs."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    s = _key_block_scores(q, q_tail, k_base, stride_kn, stride_kd, offs_n, Sk, D, False,
                          DOT_PRECISION, UPCAST_DOT, BLOCK_D, BLOCK_D2, RAW_SOFTCAP)  # [BM, BN]
    if MASK:
        visible = offs_n[None, :] < n_hi
        if CAUSAL:
            visible = visible & _in_window(offs_m[:, None], offs_n[None, :], causal_offset, window, WINDOWED)
        s = tl.where(visible, s, float("-inf"))
    if HAS_KEY_MASK:  # padded keys (keep == 0) leave the softmax denominator
        keep = tl.load(KEEP_ROW + offs_n * stride_keep_n, mask=offs_n < Sk, other=0)
        s = tl.where(keep[None, :] != 0, s, float("-inf"))
    if STORE_SCORES:
        ptrs = scores_ptrs[:, None] + offs_n[None, :]
        if MASK:  # the tail block may end past Sk
            tl.store(ptrs, s * qk_scale, mask=mask_m[:, None] & (offs_n[None, :] < Sk))
        else:  # a row mask only: the stores vectorize along the keys
            tl.store(ptrs, s * qk_scale, mask=mask_m[:, None])
    # qk_scale > 0, so the max of the raw scores gives the max of the scaled ones.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    # A row with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s * qk_scale - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _col_block(q, q_tail, k_base, stride_kn, stride_kd, lse2, out_ptrs, offs_m, n0, Sk, causal_offset, window,
               WINDOWED: tl.constexpr,
               D: tl.constexpr, qk_scale, out_scale, MASK: tl.constexpr, USE_MAX: tl.constexpr,
               DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, RAW_SOFTCAP: tl.constexpr):
    """Store the column sums (or maxima) of one block of BLOCK_N keys over the block's rows.

    The score tile is computed transposed, K . Q^T, so the sum over rows runs along a tile row,
    inside each warp, rather than across warps through shared memory.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    s = _key_block_scores(q, q_tail, k_base, stride_kn, stride_kd, offs_n, Sk, D, True,
                          DOT_PRECISION, UPCAST_DOT, BLOCK_D, BLOCK_D2, RAW_SOFTCAP)  # [BN, BM]
    # Rows past the selection carry lse = +inf: their weights are exactly 0 without a row mask.
    p = tl.exp2(s * qk_scale - lse2[None, :])
    if MASK:  # the causal diagonal and the window's lower edge
        p = tl.where(_in_window(offs_m[None, :], offs_n[:, None], causal_offset, window, WINDOWED), p, 0.0)
    col = tl.max(p, axis=1) if USE_MAX else tl.sum(p, axis=1)
    tl.store(out_ptrs + n0, col * out_scale, mask=offs_n < Sk)


@triton.jit
def _combined_lse2(lse_ptrs, stride_lp, n_parts, mask_m, BLOCK_M: tl.constexpr):
    """The rows' LSE in base 2 from pass 1's n_parts key-split partials (natural log; -inf where a
    split saw none of a row's keys): their log-sum-exp, +inf (weight 0) for rows that saw no key."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for part_index in range(n_parts):
        part = tl.load(lse_ptrs + part_index * stride_lp, mask=mask_m, other=float("-inf")) * _LOG2E
        m_new = tl.maximum(m, part)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while nothing is seen
        l = l * tl.exp2(m - m_safe) + tl.exp2(part - m_safe)
        m = m_new
    return tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))


@triton.jit
def _rows_lse(q, q_tail, k_base, stride_kn, stride_kd, KEEP_ROW, stride_keep_n, offs_m, n_lo, n_mid, n_full, n_hi,
              Sk, causal_offset, window, WINDOWED: tl.constexpr, D: tl.constexpr, qk_scale, scores_ptrs, mask_m,
              CAUSAL: tl.constexpr,
              HAS_KEY_MASK: tl.constexpr, STORE_SCORES: tl.constexpr, DOT_PRECISION: tl.constexpr,
              UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, RAW_SOFTCAP: tl.constexpr):
    """The rows' running (max, sum) in base 2 over keys [n_lo, n_hi); the blocks in [n_mid, n_full)
    unmasked, those before (a sliding window's lower edge) and after (the diagonal, the tail) masked
    (and, with STORE_SCORES, their scaled scores stored).

    Online log-sum-exp: scale * log2(e) is folded into qk_scale, so each score costs one fused
    multiply-add and one exp2.
    """
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if WINDOWED:  # the window's lower edge: masked
        for n0 in range(n_lo, n_mid, BLOCK_N):
            m_i, l_i = _lse_update(m_i, l_i, q, q_tail, k_base, stride_kn, stride_kd, KEEP_ROW, stride_keep_n,
                                   offs_m, n0, n_hi, Sk, causal_offset, window, WINDOWED, D, qk_scale, scores_ptrs,
                                   mask_m, True, CAUSAL, HAS_KEY_MASK, STORE_SCORES, DOT_PRECISION, UPCAST_DOT, BLOCK_N,
                                   BLOCK_D, BLOCK_D2, RAW_SOFTCAP)
    for n0 in range(n_mid, n_full, BLOCK_N):
        m_i, l_i = _lse_update(m_i, l_i, q, q_tail, k_base, stride_kn, stride_kd, KEEP_ROW, stride_keep_n,
                               offs_m, n0, n_hi, Sk, causal_offset, window, WINDOWED, D, qk_scale, scores_ptrs,
                               mask_m, False, CAUSAL, HAS_KEY_MASK, STORE_SCORES, DOT_PRECISION, UPCAST_DOT, BLOCK_N,
                               BLOCK_D, BLOCK_D2, RAW_SOFTCAP)
    for n0 in range(n_full, n_hi, BLOCK_N):
        m_i, l_i = _lse_update(m_i, l_i, q, q_tail, k_base, stride_kn, stride_kd, KEEP_ROW, stride_keep_n,
                               offs_m, n0, n_hi, Sk, causal_offset, window, WINDOWED, D, qk_scale, scores_ptrs,
                               mask_m, True, CAUSAL, HAS_KEY_MASK, STORE_SCORES, DOT_PRECISION, UPCAST_DOT, BLOCK_N,
                               BLOCK_D, BLOCK_D2, RAW_SOFTCAP)
    return m_i, l_i


@triton.jit
def _fill_scores(scores_ptrs, mask_m, n_lo, n_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """-inf into the stored scores of keys [n_lo, n_hi), which no row of the block sees."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(scores_ptrs[:, None] + offs_n[None, :], tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32),
                 mask=mask_m[:, None] & (offs_n[None, :] < n_hi))


@triton.jit
def _fill_columns(out_ptrs, n_lo, n_hi, BLOCK_N: tl.constexpr):
    """0 into the column sums (maxima) of keys [n_lo, n_hi), which no row of the block sees."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        tl.store(out_ptrs + n0, tl.zeros([BLOCK_N], tl.float32), mask=n0 + tl.arange(0, BLOCK_N) < n_hi)


@triton.jit
def _row_block_kernel(
    Q, K, KEY_KEEP, LSE, OUT, SCORES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_keep_b, stride_keep_n,
    stride_ls, stride_lb, stride_lh, stride_lm, stride_lp, n_lse_parts,
    stride_or, stride_ob, stride_oh, stride_on,
    stride_sb, stride_sh, stride_sm,
    BH, H, GROUP, causal_offset, window, Sk, row_start, row_end, n_row_blocks, key_start, keys_per_split,
    qk_scale, out_scale,
    D: tl.constexpr, COLUMNS: tl.constexpr, FUSED: tl.constexpr, LSE_PARTS: tl.constexpr, USE_MAX: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, SPLIT: tl.constexpr,
    STORE_SCORES: tl.constexpr,
    STRIDE_UNIT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    PACK: tl.constexpr, PACK_ROWS: tl.constexpr, RAW_SOFTCAP: tl.constexpr,
):
    """Row-stationary: a block of BLOCK_M query rows of one head stays in registers while a range of
    keys streams past (the keys split among programs when rows are few, as in flash-decoding).

    PACK > 1 (few rows, grouped-query attention): the block holds PACK_ROWS rows of each of PACK query
    heads that share a key head (row i of the block: head i // PACK_ROWS, row i % PACK_ROWS), so each
    key block loaded feeds PACK heads; H and BH then count packs of heads, and COLUMNS sums over them.
    PACK = 1: PACK_ROWS = BLOCK_M rows of one head.

    COLUMNS=False (pass 1): the rows' log-sum-exp over the range, into LSE[split, b, h, row].
    COLUMNS=True (pass 2 for few rows): with the rows' final LSE given, each key block's column sums
    (maxima) over the block's rows, into OUT[row block, b, h, key]; keys no row of the block sees get 0.
    FUSED=True (with COLUMNS, one unsplit key range): both passes in one program, the LSE kept in
    registers between them; small calls then pay one launch instead of two.
    LSE_PARTS=True (with COLUMNS): LSE holds pass 1's n_lse_parts key-split partials (stride_lp
    apart), combined here rather than by three torch kernels between the passes.
    STORE_SCORES=True (pass 1): also SCORES[b, h, row, key] = scale * log2(e) * q.k, float32, -inf
    where masked, for every key of the program's range; few rows then need no second pass over K.
    """
    # 1-D grid (no 65535 limit); fastest to slowest: row block, (batch, head), key split. Row
    # blocks of one head are neighbours, so they share K in L2.
    pid = tl.program_id(0)
    rest = pid // n_row_blocks
    bh = rest % BH
    split = rest // BH
    b = bh // H
    pack = bh % H  # the head, or the pack of heads
    h = pack * PACK  # the (first) query head
    row_block = pid % n_row_blocks
    m0 = row_start + row_block * PACK_ROWS
    stride_qb, stride_qh, stride_qm = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qm * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    if PACK > 1:
        head_of_row = (tl.arange(0, BLOCK_M) // PACK_ROWS).to(tl.int64)  # [BM], from 0; past PACK - 1: padding
        offs_m = m0 + tl.arange(0, BLOCK_M) % PACK_ROWS
        mask_m = (offs_m < row_end) & (head_of_row < PACK)
        q_rows = head_of_row * stride_qh + offs_m.to(tl.int64) * stride_qm  # offsets, in elements
        q_stride_row = 1
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        q_rows = offs_m
        q_stride_row = stride_qm
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    # Q is the stationary operand here: its tail block zeroes the columns the main block has.
    q = _load_main(q_base, q_rows, q_stride_row, mask_m, stride_qd, D, BLOCK_D)  # [BM, BD]
    q_tail = q  # unused unless BLOCK_D2 > 0
    if BLOCK_D2 > 0:
        q_tail = _load_tail(q_base, q_rows, q_stride_row, mask_m, stride_qd, D, BLOCK_D, BLOCK_D2, True)  # [BM, BD2]
    KEY_KEEP = KEY_KEEP + b.to(tl.int64) * stride_keep_b
    lse_ptrs = LSE + split.to(tl.int64) * stride_ls + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    lse_ptrs += (offs_m - row_start) * stride_lm
    scores_ptrs = SCORES + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    scores_ptrs += (offs_m - row_start).to(tl.int64) * stride_sm  # [BM]
    if PACK > 1:
        lse_ptrs += head_of_row * stride_lh
        scores_ptrs += head_of_row * stride_sh

    # This program's keys: its split's range (the splits share keys key_start.. Sk, the keys some
    # selected row sees), cut at the causal limit of the block's last row and at the sliding window's
    # lower edge for its first row.
    n_split = key_start + split * keys_per_split
    n_end = tl.minimum(Sk, n_split + keys_per_split)
    n_lo = n_split
    n_hi = n_end
    if WINDOWED:
        n_lo = tl.minimum(tl.maximum(n_lo, m0 + 1 + causal_offset - window), n_end)
    if CAUSAL:
        n_hi = tl.minimum(n_hi, m0 + PACK_ROWS + causal_offset)  # the last row sees keys < m0 + PACK_ROWS + offset
        n_hi = tl.maximum(n_hi, n_lo)
    # Blocks that every row of the block sees in full (all but the tail, the causal diagonal and a
    # window's lower edge) skip the masking, an ALU op per score fewer.
    n_full = n_hi
    n_mid = n_lo
    if CAUSAL:
        n_full = tl.minimum(n_full, m0 + 1 + causal_offset)  # the block's first row sees keys < m0 + 1 + offset
    if WINDOWED:  # ... and its last row keys >= m0 + PACK_ROWS + offset - window
        n_mid = n_lo + tl.cdiv(tl.maximum(m0 + PACK_ROWS + causal_offset - window - n_lo, 0), BLOCK_N) * BLOCK_N
    n_full = n_lo + tl.maximum(n_full - n_lo, 0) // BLOCK_N * BLOCK_N
    n_mid = tl.minimum(n_mid, n_full)
    # Blocks from n_seen on hold keys past the causal limit of every row of the block; keys from
    # n_unseen (0 in the first split: it also covers the keys before key_start) to n_lo, keys
    # before the window of every row.
    n_seen = n_lo + tl.cdiv(n_hi - n_lo, BLOCK_N) * BLOCK_N
    n_unseen = tl.where(split == 0, 0, n_split)

    if FUSED:
        m_i, l_i = _rows_lse(q, q_tail, k_base, stride_kn, stride_kd, KEY_KEEP, stride_keep_n, offs_m,
                             n_lo, n_mid, n_full, n_hi, Sk, causal_offset, window, WINDOWED, D, qk_scale, scores_ptrs,
                             mask_m, CAUSAL,
                             HAS_KEY_MASK, False, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2,
                             RAW_SOFTCAP)
        # The rows' final LSE, base 2; +inf (weight 0) for rows past the selection or seeing no key.
        lse2 = tl.where(mask_m & (l_i > 0), m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    elif LSE_PARTS:
        lse2 = _combined_lse2(lse_ptrs, stride_lp, n_lse_parts, mask_m, BLOCK_M)  # [BM], base 2
    elif COLUMNS:
        lse2 = tl.load(lse_ptrs, mask=mask_m, other=float("inf")) * _LOG2E  # [BM], base 2
    else:
        m_i, l_i = _rows_lse(q, q_tail, k_base, stride_kn, stride_kd, KEY_KEEP, stride_keep_n, offs_m,
                             n_lo, n_mid, n_full, n_hi, Sk, causal_offset, window, WINDOWED, D, qk_scale, scores_ptrs,
                             mask_m, CAUSAL,
                             HAS_KEY_MASK, STORE_SCORES, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_D,
                             BLOCK_D2, RAW_SOFTCAP)
        seen = l_i > 0
        lse = (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2  # base 2 -> natural
        # A split's partial for a row that saw none of its keys is -inf (neutral in the combining
        # log-sum-exp); a final value for a row that sees no key at all is +inf (weight 0 in pass 2).
        lse = tl.where(seen, lse, float("-inf") if SPLIT else float("inf"))
        tl.store(lse_ptrs, lse, mask=mask_m)
        if STORE_SCORES:  # keys no row of the block sees score -inf
            if WINDOWED:
                _fill_scores(scores_ptrs, mask_m, n_unseen, n_lo, BLOCK_M, BLOCK_N)
            _fill_scores(scores_ptrs, mask_m, n_seen, n_end, BLOCK_M, BLOCK_N)
    if COLUMNS:
        out_ptrs = OUT + row_block.to(tl.int64) * stride_or + b.to(tl.int64) * stride_ob + pack.to(tl.int64) * stride_oh
        out_ptrs += tl.arange(0, BLOCK_N) * stride_on
        if WINDOWED:  # the window's lower edge
            for n0 in range(n_lo, n_mid, BLOCK_N):
                _col_block(q, q_tail, k_base, stride_kn, stride_kd, lse2, out_ptrs, offs_m, n0, Sk, causal_offset,
                           window, WINDOWED, D, qk_scale, out_scale, True, USE_MAX, DOT_PRECISION, UPCAST_DOT, BLOCK_N,
                           BLOCK_D, BLOCK_D2, RAW_SOFTCAP)
        for n0 in range(n_mid, n_full, BLOCK_N):
            _col_block(q, q_tail, k_base, stride_kn, stride_kd, lse2, out_ptrs, offs_m, n0, Sk, causal_offset, window,
                       WINDOWED, D, qk_scale, out_scale, False, USE_MAX, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_D,
                       BLOCK_D2, RAW_SOFTCAP)
        for n0 in range(n_full, n_hi, BLOCK_N):
            _col_block(q, q_tail, k_base, stride_kn, stride_kd, lse2, out_ptrs, offs_m, n0, Sk, causal_offset, window,
                       WINDOWED, D, qk_scale, out_scale, CAUSAL, USE_MAX, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_D,
                       BLOCK_D2, RAW_SOFTCAP)
        # Keys no row of the block sees: weight 0 (the output is not pre-zeroed).
        if WINDOWED:
            _fill_columns(out_ptrs, n_unseen, n_lo, BLOCK_N)
        _fill_columns(out_ptrs, n_seen, n_end, BLOCK_N)


@triton.jit
def _col_update(col, k, k_tail, q_base, stride_qm, stride_qd, lse_base, stride_lm, offs_n, m0,
                row_start, row_end, Sk, causal_offset, window, WINDOWED: tl.constexpr, D: tl.constexpr, qk_scale,
                CAUSAL_MASK: tl.constexpr, USE_MAX: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, RAW_SOFTCAP: tl.constexpr):
    """Fold the weights of BLOCK_M query rows into the block's column sums (or maxima)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    q = _load_main(q_base, offs_m, stride_qm, mask_m, stride_qd, D, BLOCK_D)  # [BM, BD]
    s = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT)  # [BN, BD] @ [BD, BM] -> [BN, BM]
    if BLOCK_D2 > 0:
        q_tail = _load_tail(q_base, offs_m, stride_qm, mask_m, stride_qd, D, BLOCK_D, BLOCK_D2, False)
        s += _dot(k_tail, tl.trans(q_tail), DOT_PRECISION, UPCAST_DOT)  # [BN, BD2] @ [BD2, BM]
    if RAW_SOFTCAP > 0:
        s = _soft_cap(s, RAW_SOFTCAP)
    # Rows past row_end load lse = +inf, so their weights are exactly 0: no score mask needed.
    lse2 = tl.load(lse_base + (offs_m - row_start) * stride_lm, mask=mask_m, other=float("inf")) * _LOG2E
    p = tl.exp2(s * qk_scale - lse2[None, :])
    if CAUSAL_MASK:
        p = tl.where(_in_window(offs_m[None, :], offs_n[:, None], causal_offset, window, WINDOWED), p, 0.0)
    if USE_MAX:
        return tl.maximum(col, tl.max(p, axis=1))
    return col + tl.sum(p, axis=1)


@triton.jit
def _col_reduce_kernel(
    Q, K, LSE, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oc, stride_on,
    H, GROUP, HEADS_PER_PROGRAM, causal_offset, window, Sk, D: tl.constexpr, row_start, row_end, n_key_blocks, qk_scale,
    out_scale, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, USE_MAX: tl.constexpr, STRIDE_UNIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    RAW_SOFTCAP: tl.constexpr,
):
    # 1-D grid: key blocks of one (batch, head chunk) are neighbours, sharing Q and lse in L2.
    pid = tl.program_id(0)
    n_chunks = H // HEADS_PER_PROGRAM
    bc = pid // n_key_blocks
    b = bc // n_chunks
    chunk = bc % n_chunks
    h_first = chunk * HEADS_PER_PROGRAM  # the chunk's heads all read key head h_first // GROUP
    n0 = (pid % n_key_blocks) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Sk
    stride_qb, stride_qh, stride_qm = stride_qb * STRIDE_UNIT, stride_qh * STRIDE_UNIT, stride_qm * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    k_base = K + b.to(tl.int64) * stride_kb + (h_first // GROUP).to(tl.int64) * stride_kh
    k = _load_main(k_base, offs_n, stride_kn, mask_n, stride_kd, D, BLOCK_D)  # [BN, BD], loaded once
    k_tail = k  # unused unless BLOCK_D2 > 0
    if BLOCK_D2 > 0:
        k_tail = _load_tail(k_base, offs_n, stride_kn, mask_n, stride_kd, D, BLOCK_D, BLOCK_D2, True)  # [BN, BD2]

    col = tl.zeros([BLOCK_N], tl.float32)  # weights are >= 0, so 0 also starts a max
    m_lo = row_start
    m_unmasked = row_start  # rows from here to m_edge see every key of the block: no causal mask
    m_edge = row_end
    m_hi = row_end
    if CAUSAL:
        # Rows before n0 - causal_offset see none of this block's keys: skip them. Rows from
        # n0 + BLOCK_N - 1 - causal_offset on see all of them; only the diagonal band between is masked.
        m_lo = tl.maximum(row_start, n0 - causal_offset)
        m_diag = tl.minimum(tl.maximum(m_lo, n0 + BLOCK_N - 1 - causal_offset), row_end)
        m_unmasked = m_lo + tl.cdiv(m_diag - m_lo, BLOCK_M) * BLOCK_M
    if WINDOWED:
        # A sliding window: rows from n0 - causal_offset + window on have the block's first key
        # outside their window (the lower edge, masked), and rows from m_hi on all its keys (skipped).
        m_hi = tl.minimum(row_end, n0 + BLOCK_N - 1 - causal_offset + window)
        m_edge = tl.minimum(row_end, n0 - causal_offset + window)
        if m_edge < row_end:  # else unmasked to the end: rows past row_end weigh 0 (their lse is +inf)
            m_edge = m_unmasked + tl.maximum(m_edge - m_unmasked, 0) // BLOCK_M * BLOCK_M
    for hh in range(HEADS_PER_PROGRAM):
        h = h_first + hh
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        lse_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
        if CAUSAL:
            for m0 in range(m_lo, m_unmasked, BLOCK_M):
                col = _col_update(col, k, k_tail, q_base, stride_qm, stride_qd, lse_base, stride_lm, offs_n, m0,
                                  row_start, row_end, Sk, causal_offset, window, WINDOWED, D, qk_scale, True, USE_MAX,
                                  DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_D, BLOCK_D2, RAW_SOFTCAP)
        for m0 in range(m_unmasked, m_edge, BLOCK_M):
            col = _col_update(col, k, k_tail, q_base, stride_qm, stride_qd, lse_base, stride_lm, offs_n, m0,
                              row_start, row_end, Sk, causal_offset, window, WINDOWED, D, qk_scale, False, USE_MAX,
                              DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_D, BLOCK_D2, RAW_SOFTCAP)
        if WINDOWED:
            for m0 in range(tl.maximum(m_edge, m_unmasked), m_hi, BLOCK_M):
                col = _col_update(col, k, k_tail, q_base, stride_qm, stride_qd, lse_base, stride_lm, offs_n, m0,
                                  row_start, row_end, Sk, causal_offset, window, WINDOWED, D, qk_scale, True, USE_MAX,
                                  DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_D, BLOCK_D2, RAW_SOFTCAP)
    # Keys past Sk computed garbage from zero-filled K rows; the store mask drops them.
    tl.store(OUT + b.to(tl.int64) * stride_ob + chunk.to(tl.int64) * stride_oc + offs_n * stride_on, col * out_scale,
             mask=mask_n)


# float32 tiles (BLOCK_M, BLOCK_N, num_warps) by bytes per row. Its exact ("ieee") products run on
# the FMA pipes and spilled in the tiles tuned for 16-bit rows of the same width. H100, B=1 H=16
# S=8192 (results/fp32_cfg_v26_h100.txt, fp32_cfg2_v26_h100.txt, fp32_cfg3_v27_h100.txt): D=64 159
# -> 43 ms, D=72 53 -> 32, D=96 62 -> 36, D=128 427 -> 78, D=160 414 -> 96, D=192 822 -> 119.
# Widths not listed (D=256: 148 ms, the best of six tiles) take 64 x 64 with 8 warps.
_FLOAT32_TILES = {256: (64, 64, 8), 320: (64, 64, 4), 384: (64, 64, 4), 512: (32, 64, 8), 640: (32, 64, 8),
                  768: (32, 64, 8)}

# fp16/bf16 rows wider than 256 bytes (D > 128, portable kernels only): (pass-1 tiles, pass-2 tiles)
# as (BLOCK_M, BLOCK_N, num_warps), 2 stages, for rows split as 128 + a tail (D=129-192, 288 to 384
# bytes) and padded to 256 (D=193-256). H100, B=1 H=16 S=8192, each pass against the 64 x 64 tiles
# with 8 warps they had (results/tune_wide_v27_h100.txt, wide_after_v27_h100.txt): D=160 2.42 ->
# 0.86 and 2.01 -> 0.96 ms, D=192 2.47 -> 0.94 and 2.39 -> 1.00, D=256 1.96 -> 1.26 and 1.77 -> 1.41.
_SPLIT_WIDE_TILES = ((128, 64, 8), (64, 128, 8))
_PADDED_WIDE_TILES = ((128, 128, 8), (128, 128, 8))


@functools.lru_cache(maxsize=None)
def _block_sizes(head_dim: int, dtype: torch.dtype) -> dict:
    """Pass-2 tiles and launch settings, a pure function of D and dtype (reproducible across processes).

    Chosen from `python -m benchmarks.tune` on an H100 (benchmarks/NOTES.md).
    """
    block_d, block_d2 = head_dim_blocks(head_dim)
    if interpreting():
        # Small, unequal tiles on the CPU: small test shapes still cross block edges in both directions.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d, BLOCK_D2=block_d2, num_warps=4, num_stages=1)
    row_bytes = (block_d + block_d2) * (4 if dtype == torch.float32 else 2)
    if row_bytes <= 192:  # D <= 96 in fp16/bf16
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=block_d, BLOCK_D2=block_d2, num_warps=4, num_stages=3)
    if dtype == torch.float32:
        block_m, block_n, warps = _FLOAT32_TILES.get(row_bytes, (64, 64, 8))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_D2=block_d2, num_warps=warps, num_stages=2)
    if row_bytes <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=block_d, BLOCK_D2=block_d2, num_warps=4, num_stages=3)
    block_m, block_n, warps = (_SPLIT_WIDE_TILES if block_d2 else _PADDED_WIDE_TILES)[1]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_D2=block_d2, num_warps=warps, num_stages=2)


@functools.lru_cache(maxsize=1024)
def _row_block_sizes(head_dim: int, dtype: torch.dtype, n_rows: int, columns: bool) -> dict:
    """Row-stationary tiles (rows stay in registers, keys stream): pass 1, or pass 2 for few rows (columns).

    D in (96, 128] in fp16/bf16 tuned at causal Sq=128, Sk=262144 (benchmarks/results/tune_h100_v5_causal.csv).
    """
    cfg = _block_sizes(head_dim, dtype)
    if interpreting():
        return cfg
    row_bytes = (cfg["BLOCK_D"] + cfg["BLOCK_D2"]) * (4 if dtype == torch.float32 else 2)
    if row_bytes <= 192:
        cfg = dict(cfg, BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3)
    elif dtype == torch.float32:
        pass  # `_block_sizes`'s float32 tiles serve both passes
    elif row_bytes <= 256:
        if columns:
            cfg = dict(cfg, BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        elif n_rows <= 128:
            cfg = dict(cfg, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        else:
            cfg = dict(cfg, BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2)
    elif columns:
        cfg = dict(cfg, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    else:
        block_m, block_n, warps = (_SPLIT_WIDE_TILES if cfg["BLOCK_D2"] else _PADDED_WIDE_TILES)[0]
        cfg = dict(cfg, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2)
    return _fit_rows(cfg, n_rows, dtype)


def _fit_rows(cfg: dict, n_rows: int, dtype: torch.dtype) -> dict:
    """Row blocks no taller than the rows (16 at least, for the tensor cores): a window of 32 rows
    in 128-row blocks would exponentiate three rows of padding per row. The keys then come 128 at
    a time (fp16/bf16), each load feeding fewer rows. On the H100, H=32, Hk=8, Sq=32, D=128,
    causal, same key splits: GPU time 94 -> 71 us at Sk=16384, 234 -> 170 us at Sk=65536 (NOTES.md v20)."""
    block_m = max(16, utils.next_power_of_2(n_rows))
    if block_m >= cfg["BLOCK_M"]:
        return cfg
    block_n = cfg["BLOCK_N"] if dtype == torch.float32 else max(cfg["BLOCK_N"], 128)
    return dict(cfg, BLOCK_M=block_m, BLOCK_N=block_n)


# Few rows of grouped-query heads: a block may hold the rows of several query heads that share a key
# head, so each key block read from L2 feeds all of them (a 32-row window of 4 heads: one 128-row
# block instead of four 32-row blocks, each streaming the same keys). Blocks up to this many rows.
PACK_MAX_ROWS = 128


@functools.lru_cache(maxsize=1024)
def _pack_heads(cfg: tuple, n_rows: int, group: int, heads_per_chunk: int, max_rows: int, element_size: int) -> dict:
    """A row-stationary configuration (`_row_block_sizes`, as items) with PACK heads per block and
    PACK_ROWS = next_pow2(n_rows) rows of each (`_row_block_kernel`). PACK is the largest divisor of
    the group size and of ``heads_per_chunk`` (the heads whose column sums may be added together)
    whose rows fit ``max_rows``; PACK = 1 leaves the configuration as it was.

    Packed blocks of more than 64 rows over more than 192 bytes a row (D > 96 in fp16/bf16) stream
    64 keys at a time: on the H100, SnapKV windows (H=32, Hk=8, Sq=32, D=128) 109 vs 120 us of GPU
    time at Sk=65536, 32 vs 37 at 16384 (NOTES.md v21)."""
    cfg = dict(cfg)
    rows = utils.next_power_of_2(n_rows)
    pack = max((d for d in range(2, group + 1) if group % d == 0 and heads_per_chunk % d == 0 and d * rows <= max_rows),
               default=1)
    if pack == 1:
        return dict(cfg, PACK=1, PACK_ROWS=cfg["BLOCK_M"])
    block_m = max(16, utils.next_power_of_2(pack * rows))
    tall = block_m > 64 and (cfg["BLOCK_D"] + cfg["BLOCK_D2"]) * element_size > 192
    return dict(cfg, PACK=pack, PACK_ROWS=rows, BLOCK_M=block_m, BLOCK_N=64 if tall else cfg["BLOCK_N"])


def _packing(cfg: dict) -> tuple[int, int]:
    """(heads, rows of each) in a row block of a row-stationary configuration: (1, BLOCK_M) unless
    packed (`_pack_heads`)."""
    return cfg.get("PACK", 1), cfg.get("PACK_ROWS", cfg["BLOCK_M"])


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# A split costs a second launch (pass 2 then runs on its own, combining the partial LSEs: 45-70 us
# of host time on the lent machines), so only key ranges longer than this split: 4096 keys x
# 64-128 rows is ~10-15 us of GPU time per program.
MIN_KEYS_PER_SPLIT = 4096
# Once a range splits, a grid of at most half as many programs as SMs (a window of few rows: one
# row block per head) splits it down to this many keys per program, where the rule above would
# stop at MIN_KEYS_PER_SPLIT: such a grid leaves most of the GPU idle while each program runs its
# keys one tile after another. On the H100, H=32, Hk=8, Sq=32, D=128, causal: Sk=16384 52 vs 71 us
# of GPU time, Hk=4 Sk=8192 31 vs 72 (NOTES.md v20).
FEW_PROGRAMS_KEYS_PER_SPLIT = 512
# While a CUDA graph is being captured a split's second launch costs its replays no host time, only
# GPU time (the partial LSEs' combine), so such a grid splits ranges from this many keys on: a
# decoding step over a 4096-key window (H=32, Hk=8, D=128) replayed in 57 us unsplit, 18 us split
# (NOTES.md v30).
CAPTURED_MIN_KEYS_PER_SPLIT = 2 * FEW_PROGRAMS_KEYS_PER_SPLIT
# Splits make whole waves: a grid of 2.06 waves runs its last programs nearly alone, so it takes
# about three waves' time (causal Sq=128, Sk=262144, pass 2: 544 programs on 264 slots 0.918 ms,
# 512 programs 0.773 ms; benchmarks/NOTES.md v14). A grid is whole enough when its last wave is
# at least this full.
WAVE_FILL = 0.9


def _key_splits(n_keys: int, n_programs: int, block_n: int, device: torch.device, slots: int | None = None) -> int:
    """Keys per split for the row-stationary kernel over ``n_keys`` keys: long key ranges split among
    programs (flash-decoding) until the grid fills the GPU's ``slots`` (programs resident at once;
    default four per SM) in whole waves."""
    if device.type == "cpu":  # the interpreter: small enough that the CPU tests take the split path too
        n_splits = max(1, min(cdiv(16, n_programs), cdiv(n_keys, 2 * block_n)))
    else:
        slots = slots or 4 * _sm_count(device)
        n_splits = _whole_waves(n_programs, slots, cdiv(n_keys, _min_keys_per_split(n_keys, n_programs, device)))
    return cdiv(cdiv(n_keys, n_splits), block_n) * block_n


def _min_keys_per_split(k_len: int, n_programs: int, device: torch.device) -> int:
    """The fewest keys a split of the row-stationary kernel gets on a GPU (`_key_splits`)."""
    if n_programs <= _sm_count(device) // 2 and (
            k_len > MIN_KEYS_PER_SPLIT
            or (k_len > CAPTURED_MIN_KEYS_PER_SPLIT and torch.cuda.is_current_stream_capturing())):
        return FEW_PROGRAMS_KEYS_PER_SPLIT
    return MIN_KEYS_PER_SPLIT


def _whole_waves(n_programs: int, slots: int, max_splits: int) -> int:
    """The fewest splits (up to max_splits) whose grid of n_programs * splits fills its last wave of
    ``slots`` programs to WAVE_FILL, else the best-filled; none for grids of four waves or more."""
    if n_programs >= 4 * slots:
        return 1
    # Fewer splits than this fill less than WAVE_FILL of a single wave, the fewer the emptier.
    first = math.ceil(WAVE_FILL * slots / n_programs)
    if first >= max_splits:
        return max_splits
    best, best_fill = first, 0.0
    for splits in range(first, max_splits + 1):
        waves = n_programs * splits / slots
        fill = waves / math.ceil(waves)
        if fill >= WAVE_FILL:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
        if waves >= 8:
            break
    return best


def _int_class(value) -> int:
    """What Triton's specialization sees of an integer argument: 1, a multiple of 16, or neither.
    (Values past 32 bits, which Triton passes as 64-bit, are classed as 32-bit ones: the occupancy
    estimate then comes from a kernel that differs only in its address arithmetic.)"""
    return 1 if value == 1 else 16 if value % 16 == 0 else 17


_SLOTS: dict = {}  # by specialization: (device, dtypes, integer classes, constexprs) -> slots
_SLOTS_BY_CALL: dict = {}  # the same by the integers themselves: a cheaper key for repeated shapes


def _resident_slots(dtypes: tuple, ints: list, floats: list, meta: dict, device: torch.device) -> int:
    """Row-stationary programs that run at once on the GPU for a launch (Q's, K's and the key mask's
    dtypes; the integer and float arguments; the constexprs but SPLIT), from the registers and shared
    memory of its compiled kernel with SPLIT=True. Cached per specialization (the dtypes, each
    integer's class), not per shape: the split count, and with it the result's bits, is a function
    of the call alone, and a decoding loop whose key length grows each step compiles nothing new."""
    call_key = (device, *dtypes, *ints, *meta.values())
    slots = _SLOTS_BY_CALL.get(call_key)
    if slots is None:
        classes = tuple(map(_int_class, ints))
        cache_key = (device, *dtypes, classes, *meta.items())
        slots = _SLOTS.get(cache_key)
        if slots is None:
            kernel = _split_kernel(dtypes, classes, floats, meta)
            slots = _SLOTS[cache_key] = _sm_count(device) * _resident_programs(kernel, device)
        if len(_SLOTS_BY_CALL) > 4096:
            _SLOTS_BY_CALL.clear()
        _SLOTS_BY_CALL[call_key] = slots
    return slots


def _split_kernel(dtypes: tuple, classes: tuple, floats: list, meta: dict):
    """The row-stationary kernel compiled, not launched, with SPLIT=True for a specialization: Q's,
    K's and the key mask's dtypes, the integers' classes (`_int_class`), the constexprs but SPLIT."""
    return _row_block_kernel.warmup(*dtypes, torch.float32, torch.float32, torch.float32, *classes, *floats,
                                    SPLIT=True, grid=(1,), enable_fp_fusion=True, **meta)  # as utils.launch


def _resident_programs(kernel, device: torch.device) -> int:
    """Programs of a compiled kernel that one SM holds at once: the least of what its registers
    (allocated per warp in units of 256), shared memory (1 KiB reserved per program) and threads allow."""
    kernel._init_handles()  # loads the module, which sets n_regs
    props = torch.cuda.get_device_properties(device)
    warps = kernel.metadata.num_warps
    regs_per_warp = cdiv(max(kernel.n_regs, 1) * 32, 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or 228 * 1024
    by_smem = smem // (kernel.metadata.shared + 1024)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return max(1, min(by_regs, by_smem, by_threads))


def _qk_strides(query: torch.Tensor, key: torch.Tensor) -> tuple[tuple, int]:
    """Q's and K's strides for the kernels, and STRIDE_UNIT: the batch, head and row strides come in
    units of 16 bytes when they all are multiples of 16 bytes, else of one element.

    The kernels multiply them back by the compile-time unit, which tells Triton that every row
    starts 16-byte aligned, so loads vectorize and pipeline. Its own specialization marks only
    strides divisible by 16 elements: a contiguous D=72 tensor (row stride 72) got scalar loads
    and ran at 1.5x the time of D=80.
    """
    return _strides_in_units(query.stride(), key.stride(), query.element_size())


@functools.lru_cache(maxsize=256)  # a pure function of the layouts; small calls are host-bound
def _strides_in_units(q_strides: tuple, k_strides: tuple, element_size: int) -> tuple[tuple, int]:
    unit = 16 // element_size
    if any(s % unit for s in q_strides[:3] + k_strides[:3]):
        unit = 1
    q_units = tuple(s // unit for s in q_strides[:3]) + q_strides[3:]
    return q_units + tuple(s // unit for s in k_strides[:3]) + k_strides[3:], unit


def _launch_row_blocks(query, key, p: Problem, rows: range, cfg: dict, lse, out, key_keep=None, use_max=False,
                       out_scale=1.0, fused=False, scores=None):
    """Launch the row-stationary kernel over the rows (LSE mode when ``out`` is None, also storing
    the scaled scores into ``scores`` (B, H, rows, Sk) when given; both passes, no LSE in or out,
    when ``fused``)."""
    keep, *keep_strides = utils.key_keep_args(key_keep, key)  # K is a dummy pointer when unused
    grid, lse_shape, args, meta = _row_blocks_plan(
        p, rows, tuple(cfg.items()), query.stride(), key.stride(), key_keep is not None, tuple(keep_strides),
        None if fused or out is None else (lse.stride(), lse.shape[0]), None if out is None else out.stride(),
        None if scores is None else scores.stride(), query.dtype, key.dtype, keep.dtype, query.device, use_max,
        out_scale, fused)
    with _on_device(query):
        if fused:
            lse = out
        elif out is None:
            lse = utils.new_output(lse_shape, query.device)
        # LSE, OUT and SCORES are float32; unused ones alias the LSE
        utils.launch(_row_block_kernel, grid, query, key, keep, lse, lse if out is None else out,
                     lse if scores is None else scores, *args, **meta)
    return lse


@functools.lru_cache(maxsize=1024)  # small calls are host-bound, and callers repeat their shapes
def _row_blocks_plan(p: Problem, rows: range, cfg: tuple, q_strides: tuple, k_strides: tuple, has_key_mask: bool,
                     keep_strides: tuple, lse_layout, out_strides, scores_strides, q_dtype, k_dtype, keep_dtype,
                     device: torch.device, use_max: bool, out_scale: float, fused: bool) -> tuple:
    """(grid, shape of pass 1's LSE output, the arguments after the tensors, constexprs) of a
    `_launch_row_blocks` call, a pure function of its shapes, strides and flags. ``lse_layout``:
    (strides, size of dim 0) of a given LSE (pass 2), else None; a stride tuple or None for OUT and SCORES."""
    cfg = dict(cfg)
    pack, pack_rows = _packing(cfg)
    cfg.update(PACK=pack, PACK_ROWS=pack_rows)  # constexprs of the kernel
    packs = p.heads // pack  # blocks of heads: the heads themselves unless packed
    n_row_blocks = cdiv(len(rows), pack_rows)
    qk_strides, unit = _strides_in_units(q_strides, k_strides, q_dtype.itemsize)
    lse_parts = lse_layout is not None and len(lse_layout[0]) == 4  # pass 1's key-split partials (splits, B, H, rows)
    if fused:
        lse_strides = (0, 0, 0, 0, 0, 1)  # unused
    elif out_strides is None:  # of the (splits, B, H, rows) output allocated by the launcher
        lse_strides = (p.batch * p.heads * len(rows), p.heads * len(rows), len(rows), 1, 0, 1)
    elif lse_parts:
        strides, parts = lse_layout
        lse_strides = (0, *strides[1:], strides[0], parts)
    else:
        lse_strides = (0, *lse_layout[0], 0, 1)
    key_start = p.first_key(rows.start)  # keys before it: no row sees them (a sliding window)
    ints = [*qk_strides, *keep_strides, *lse_strides, *(out_strides or (0, 0, 0, 0)), *(scores_strides or (0, 0, 0))[:3],
            p.batch * packs, packs, p.group, p.causal_offset, p.window, p.k_len, rows.start, rows.stop, n_row_blocks,
            key_start]
    floats = [p.scale * LOG2E, out_scale]
    meta = dict(D=p.head_dim, COLUMNS=out_strides is not None, FUSED=fused, LSE_PARTS=lse_parts, USE_MAX=use_max,
                CAUSAL=p.causal, WINDOWED=p.window > 0, HAS_KEY_MASK=has_key_mask,
                STORE_SCORES=scores_strides is not None, STRIDE_UNIT=unit,
                RAW_SOFTCAP=p.raw_softcap, **_dot_flags(q_dtype), **cfg)
    n_keys = max(p.k_len - key_start, 1)
    if fused:  # each program needs all the keys of its rows
        keys_per_split = cdiv(n_keys, cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    else:
        slots = None
        if device.type == "cuda" and n_keys > MIN_KEYS_PER_SPLIT:  # a split is possible: fill whole waves
            slots = _resident_slots((q_dtype, k_dtype, keep_dtype), [*ints, cfg["BLOCK_N"]], floats, meta, device)
        keys_per_split = _key_splits(n_keys, p.batch * packs * n_row_blocks, cfg["BLOCK_N"], device, slots)
    n_splits = cdiv(n_keys, keys_per_split)
    lse_shape = None if fused or out_strides is not None else (n_splits, p.batch, p.heads, len(rows))
    grid = (n_splits * p.batch * packs * n_row_blocks,)
    return grid, lse_shape, (*ints, keys_per_split, *floats), dict(meta, SPLIT=n_splits > 1)


# Below this many scores per pass the Hopper kernels lose to their own launch cost: on the lent
# H100's host a launch with TMA descriptors took ~140 us of Python and driver work against ~60 us
# for the portable kernel, while the B=8, H=16, S=1024 pass (2**27 scores) runs ~60 us on the GPU.
FAST_PATH_MIN_SCORES = 2**29
# Both passes in one Hopper launch (hopper.fused_columns) pay that host cost once. On the H100 it
# saved GPU time from B=1 on at H=16, S=1024 (29 vs 32 us) and at B=8 (115 vs 135 us), but below
# 2**27 scores do_bench timed the host (B=4: 88-91 vs 74-75 us in v15; B=1 0.060 vs 0.042 ms in
# v16). With a head-dim tail (two descriptor arguments more) B=8 now wins too, since the register
# cap up to D=96: D=72 0.130 vs 0.157 ms, D=96 0.133 vs 0.167 (NOTES.md v16).
FUSED_FAST_PATH_MIN_SCORES = 2**27


def _fast_path(query, key, p: Problem, rows: range, key_keep=None, mode="lse"):
    """The Hopper kernels (`flash_colsum.hopper`) when they cover this call in ``mode`` ("lse": pass
    1, "columns": pass 2, "fused": both in one launch), else None.

    They take fp16/bf16 problems with D a multiple of 8 up to 256, Q and K with D contiguous and
    16-byte strides (contiguous, or transposed (B, S, H, D) views), on a CUDA capability 9.0 GPU,
    over all selected rows, with at least FAST_PATH_MIN_SCORES scores (FUSED_FAST_PATH_MIN_SCORES
    fused); causal ones with Sq <= Sk, not fused (`hopper.supports`). A key padding mask
    (``key_keep``) goes to pass 1 and the fused launch; pass 2 needs none (the caller zeroes its columns).
    FLASH_COLSUM_FAST_PATHS=0 turns them off (the portable kernels then run everywhere, as on the
    CPU interpreter).
    """
    min_scores = FUSED_FAST_PATH_MIN_SCORES if mode == "fused" else FAST_PATH_MIN_SCORES
    # The cheap tests first: small calls are host-bound, and each environment read costs ~3 us.
    if (p.batch * p.heads * len(rows) * p.k_len < min_scores or not query.is_cuda
            or rows != range(p.row_start, p.row_end) or interpreting()
            or os.environ.get("FLASH_COLSUM_FAST_PATHS", "1") == "0"):
        return None
    try:
        from . import hopper
    except (ImportError, AttributeError):  # a Triton without Gluon, or with another Gluon API
        return None
    return hopper if hopper.supports(query, key, p, mode) else None


# Calls up to this many scores per pass run both passes in one launch (FUSED): they are host-bound,
# and a launch costs more host time (~25-40 us on the lent machines' hosts) than the GPU time a
# row-stationary pass 2 can lose on them. Fused wins up to 2**28 scores at D=64 (S=4096: 0.245 vs
# 0.257 ms on an H100, results/fuse_ab_switch_v12_h100.csv) and 2**27 at D=128, loses at 2**29
# (results/fuse_ab_v11_h200.txt); D > 64 at 2**28 is unmeasured for it, so it keeps the lower limit.
# The Hopper fused kernel takes 2**28 at every D: at B=16, H=16, S=1024 it ran 259/262/288 us at
# D=72/96/128 against 320/334/397 for two portable passes (NOTES.md v15).
FUSED_MAX_SCORES = 2**27
FUSED_MAX_SCORES_D64 = 2**28


def _use_fused(p: Problem, n_programs: int, block_n: int, device: torch.device, hopper: bool = False) -> bool:
    """Fuse a small call unless pass 1 would split its keys: few programs over long keys need the
    split to fill the GPU (causal Sq=128, Sk=16384: 0.44 ms fused against 0.15 ms split)."""
    limit = FUSED_MAX_SCORES_D64 if p.head_dim <= 64 or hopper else FUSED_MAX_SCORES
    n_keys = max(p.k_len - p.first_key(p.row_start), 1)
    return p.batch * p.heads * p.n_rows * n_keys <= limit and _key_splits(n_keys, n_programs, block_n, device) >= n_keys


def fused_reduce(query, key, p: Problem, key_keep, heads_per_chunk: int, use_max: bool, divisor: float,
                 partials_ok: bool):
    """Both passes in one launch for small calls, or None where it does not apply.

    Each program keeps a block of selected rows, computes their LSE over all keys, then their column
    sums (maxima) divided by ``divisor``: partials (B, H, R, Sk) for R row blocks. Returns them as
    (B, H * R, Sk) when ``partials_ok`` (the caller reduces them together with the query heads, a
    reduction of the same kind; blocks may then hold several heads of a key head, `_fused_pack`, and
    the partials are (B, H // PACK * R, Sk)), else only when R = 1 and one head per chunk make them
    the (B, H, Sk) result. Padded keys' columns are not masked here. On an H100 the Hopper kernel
    (`hopper.fused_columns`) runs it where it applies. Short key ranges go to `one_pass_reduce`
    first, at any size.
    """
    one_pass = one_pass_reduce(query, key, p, key_keep, heads_per_chunk, use_max, divisor, partials_ok)
    if one_pass is not None:
        return one_pass
    cfg = _row_block_sizes(p.head_dim, query.dtype, p.n_rows, columns=True)
    fast = _fast_path(query, key, p, range(p.row_start, p.row_end), key_keep, "fused")
    n_row_blocks = cdiv(p.n_rows, fast.BLOCK_ROWS if fast else cfg["BLOCK_M"])
    if (not (partials_ok or (n_row_blocks == 1 and heads_per_chunk == 1))
            or not _use_fused(p, p.batch * p.heads * n_row_blocks, cfg["BLOCK_N"], query.device, fast is not None)):
        return None
    if fast:
        with _on_device(query):
            parts = fast.fused_columns(query, key, p, use_max, divisor, key_keep)
        return parts.view(p.batch, p.heads * n_row_blocks, p.k_len)
    if partials_ok:  # the caller adds (maxes) the heads of a key head together: they may share a block
        cfg = _fused_pack(cfg, p, query)
    pack, pack_rows = _packing(cfg)
    n_row_blocks = cdiv(p.n_rows, pack_rows)
    parts = utils.new_output((p.batch, p.heads // pack, n_row_blocks, p.k_len), query.device)
    # The kernel indexes OUT[row block, b, h, key]: a permuted view writes the planes head-major.
    _launch_row_blocks(query, key, p, range(p.row_start, p.row_end), cfg, None, parts.permute(2, 0, 1, 3),
                       key_keep, use_max, out_scale=1.0 / divisor, fused=True)
    return parts.view(p.batch, p.heads // pack * n_row_blocks, p.k_len)


@triton.jit
def _one_pass_kernel(
    Q, K, KEY_KEEP, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_keep_b, stride_keep_n, stride_op,
    H, GROUP, Sk, row_start, row_end, n_splits, causal_offset, window, qk_scale, out_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    USE_MAX: tl.constexpr, RAW_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Column sums (maxima) with one exponential per score, for key ranges of one tile (Sk <= BLOCK_K).

    Keys stationary: the program keeps all Sk keys of its key head, [BLOCK_K, D], and streams its
    query rows in groups of BLOCK_M. A group's scores [BLOCK_K, BLOCK_M] hold every key its rows
    see, so each row's max and sum are exact at once and col += sum over the rows of
    exp2(qk_scale * (s - max)) / sum: no LSE pass, no second exponential. Program pid =
    (b * H + h) * n_splits + split takes groups split, split + n_splits, ... of the selected rows
    and writes OUT plane pid: (B, H, n_splits, Sk) partial sums (maxima) times out_scale. Rows that
    see no key (causal Sq > Sk, a key mask) weigh 0.
    """
    pid = tl.program_id(0)
    split = pid % n_splits
    bh = pid // n_splits
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BLOCK_K)
    mask_n = offs_n < Sk
    k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    k = _load_tile(k_base, offs_n, stride_kn, mask_n, stride_kd, 0, BLOCK_D, 0, D)  # [BK, BD], read once
    seen_n = mask_n
    if HAS_KEY_MASK:
        keep = tl.load(KEY_KEEP + b.to(tl.int64) * stride_keep_b + offs_n * stride_keep_n, mask=mask_n, other=0)
        seen_n = seen_n & (keep != 0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    col = tl.zeros([BLOCK_K], tl.float32)  # weights are >= 0: 0 also starts a max
    for m0 in range(row_start + split * BLOCK_M, row_end, n_splits * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        q = _load_tile(q_base, offs_m, stride_qm, mask_m, stride_qd, 0, BLOCK_D, 0, D)  # [BM, BD]
        s = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT)  # [BK, BD] @ [BD, BM] -> [BK, BM]
        if RAW_SOFTCAP > 0:
            s = _soft_cap(s, RAW_SOFTCAP)  # before the masks: a capped -inf would be a finite -R
        seen = seen_n[:, None]
        if CAUSAL:
            seen = seen & _in_window(offs_m[None, :], offs_n[:, None], causal_offset, window, WINDOWED)
        s = tl.where(seen, s, float("-inf"))
        m = tl.max(s, axis=0) * qk_scale  # [BM]: each row's max over all its keys (qk_scale > 0)
        if CAUSAL or HAS_KEY_MASK:  # a row that sees no key: exp2(-inf - -inf) would be NaN
            m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s * qk_scale - m[None, :])
        l = tl.sum(p, axis=0)
        # l >= 1 for a row that sees a key (its max scores 1); one that sees none has p = 0 everywhere.
        w = tl.where(mask_m, 1.0 / tl.maximum(l, 1.0), 0.0)  # rows past the selection weigh 0
        if USE_MAX:
            col = tl.maximum(col, tl.max(p * w[None, :], axis=1))
        else:
            col += tl.sum(p * w[None, :], axis=1)
    tl.store(OUT + pid.to(tl.int64) * stride_op + offs_n, col * out_scale, mask=mask_n)


# Key ranges up to this long fit one tile of `_one_pass_kernel` (keys and a row group's scores on
# chip: 64 KiB of fp16 keys at D=64): 512 keys up to D=64, 256 up to D=128. On the H100, 512 keys
# at D=65-128 (padded to 128 columns) lost to the two passes: D=80 293 vs 244 us, D=128 S=257
# 206 vs 197 (B=64, H=16; results/one_pass_ab_v31_h100.txt).
ONE_PASS_MAX_KEYS = 512
ONE_PASS_MAX_KEYS_WIDE = 256
ONE_PASS_MAX_HEAD_DIM = 128
# On the GPU, calls from this many scores on take the one pass. Below it they are host-bound (and the
# tests' small shapes keep the two-pass kernels they were written for). On the H100, against the
# two passes (B, H=16, Sq = Sk = S, D=64, the flash_colsum statistic): S=197 B=64 60 vs 92 us,
# S=512 B=8 33 vs 39, B=256 721 vs 1004 (NOTES.md v31).
ONE_PASS_MIN_SCORES = 2**24


def _one_pass_fits(p: Problem) -> bool:
    """Whether the call's keys fit one tile of `_one_pass_kernel`."""
    max_keys = ONE_PASS_MAX_KEYS if p.head_dim <= 64 else ONE_PASS_MAX_KEYS_WIDE
    return p.k_len <= max_keys and p.head_dim <= ONE_PASS_MAX_HEAD_DIM


def _use_one_pass(p: Problem, query) -> bool:
    """Whether a call that fits the one pass should take it: 16-bit inputs on a GPU with
    ONE_PASS_MIN_SCORES scores or more (the tests force it elsewhere)."""
    return (query.is_cuda and query.dtype != torch.float32
            and p.batch * p.heads * p.n_rows * p.k_len >= ONE_PASS_MIN_SCORES)


def _one_pass_config(p: Problem, n_programs: int, device: torch.device) -> dict:
    """Rows per group and warps for `_one_pass_kernel`. On the H100 (results/onepass_short_v31_h100.txt,
    one_pass_ab_v31_h100.txt): up to 256 keys 64 rows with 4 warps (S=128 22 vs 25 us with 16 rows,
    D=128 S=197 81 vs 101; D=64 S=197 within 2%); 512 keys 32 rows with 4 warps where the grid fills
    the GPU, else 64 rows with 8 warps (B=64 S=512 182 vs 249 us; B=8 32 vs 38, B=4 22 vs 24)."""
    if device.type == "cpu":
        return dict(BLOCK_M=16, num_warps=4)
    if p.k_len <= 256:
        return dict(BLOCK_M=64, num_warps=4)
    if n_programs >= _sm_count(device):
        return dict(BLOCK_M=32, num_warps=4)
    return dict(BLOCK_M=64, num_warps=8)


def one_pass_reduce(query, key, p: Problem, key_keep, heads_per_chunk: int, use_max: bool, divisor: float,
                    partials_ok: bool):
    """Short key ranges (`_one_pass_fits`) where `_use_one_pass` wants them: (B, H // heads_per_chunk,
    Sk) column sums (maxima) of the selected rows over ``divisor``, one exponential per score
    (`_one_pass_kernel`); or, when ``partials_ok``, the (B, H * R, Sk) partials of R row splits for
    the caller to reduce with the heads. None elsewhere."""
    if not (_one_pass_fits(p) and _use_one_pass(p, query)):
        return None
    cfg = _one_pass_config(p, p.batch * p.heads, query.device)
    n_groups = cdiv(p.n_rows, cfg["BLOCK_M"])
    # Few heads split their rows over more programs (the partials are added after), up to a program per SM.
    slots = 4 if query.device.type == "cpu" else _sm_count(query.device)
    n_splits = max(1, min(n_groups, slots // (p.batch * p.heads)))
    parts = utils.new_output((p.batch, p.heads, n_splits, p.k_len), query.device)
    keep, stride_keep_b, stride_keep_n = utils.key_keep_args(key_keep, parts)
    with _on_device(query):
        utils.launch(
            _one_pass_kernel, (p.batch * p.heads * n_splits,),
            query, key, keep, parts, *query.stride(), *key.stride(), stride_keep_b, stride_keep_n, p.k_len,
            p.heads, p.group, p.k_len, p.row_start, p.row_end, n_splits, p.causal_offset, p.window,
            p.scale * LOG2E, 1.0 / divisor,
            D=p.head_dim, CAUSAL=p.causal, WINDOWED=p.window > 0, HAS_KEY_MASK=key_keep is not None,
            USE_MAX=use_max, RAW_SOFTCAP=p.raw_softcap, **_dot_flags(query.dtype),
            BLOCK_K=utils.next_power_of_2(max(p.k_len, 16)), BLOCK_D=utils.next_power_of_2(max(p.head_dim, 16)),
            **cfg,
        )
    if partials_ok:
        return parts.view(p.batch, p.heads * n_splits, p.k_len)
    parts = parts.view(p.batch, p.heads // heads_per_chunk, heads_per_chunk * n_splits, p.k_len)
    if parts.shape[2] == 1:
        return parts[:, :, 0]
    return parts.amax(dim=2) if use_max else parts.sum(dim=2)


# Packed fused blocks (both passes in one program) are at most this tall while the packed grid keeps
# one wave of a program per SM, and PACK_MAX_ROWS tall while it keeps two. On the H100, batched
# SnapKV windows (Hk=8, Sq=32, Sk=4096, D=128) took 72 us of GPU time at B=8 in 64-row blocks of two
# heads against 91 unpacked and 111 in 128-row blocks of four (64 programs); at B=32 (256 programs)
# 190 us in 128-row blocks against 210 in 64-row ones (NOTES.md v21).
FUSED_PACK_MAX_ROWS = 64


def _fused_pack(cfg: dict, p: Problem, query) -> dict:
    """`fused_reduce`'s configuration with the query heads of a key head packed (`_pack_heads`): as
    many heads a block as keep at least WAVE_FILL of a program per SM in blocks of up to
    FUSED_PACK_MAX_ROWS rows, or two such waves in blocks of up to PACK_MAX_ROWS. An unsplit launch
    of fewer programs than SMs runs each program's keys one tile after another on a partly idle GPU
    (B=4 of those windows: 65 us packed vs 63)."""
    if p.group == 1 or p.n_rows > FUSED_PACK_MAX_ROWS // 2:
        return cfg
    if not query.is_cuda:  # the interpreter: pack within its blocks
        return _pack_heads(tuple(cfg.items()), p.n_rows, p.group, p.group, cfg["BLOCK_M"], query.element_size())
    if query.dtype == torch.float32:  # as in `_row_blocks_for`
        return cfg
    rows = utils.next_power_of_2(p.n_rows)
    wave = WAVE_FILL * _sm_count(query.device)
    packs = [d for d in range(2, p.group + 1) if p.group % d == 0 and d * rows <= PACK_MAX_ROWS
             and p.batch * p.heads // d >= (wave if d * rows <= FUSED_PACK_MAX_ROWS else 2 * wave)]
    if not packs:
        return cfg
    return _pack_heads(tuple(cfg.items()), p.n_rows, p.group, p.group, max(packs) * rows, query.element_size())


@triton.jit
def _scores_reduce_kernel(
    SCORES, LSE, OUT,
    stride_sb, stride_sh, stride_sm, stride_lb, stride_lh, stride_lm, stride_lp, n_lse_parts, stride_ob, stride_oc,
    n_rows, heads_per_chunk, n_chunks, Sk, out_scale,
    USE_MAX: tl.constexpr, LSE_PARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT[b, c, key] = sum (max) over the rows of the chunk's heads of exp2(SCORES - lse2), times
    out_scale: the weights from pass 1's stored scores, no second pass over K. With LSE_PARTS, LSE
    holds pass 1's key-split partials, combined here (no torch kernels between the launches)."""
    pid = tl.program_id(0)
    n_key_blocks = tl.cdiv(Sk, BLOCK_N)
    key_block = pid % n_key_blocks
    bc = pid // n_key_blocks
    b = bc // n_chunks
    chunk = bc % n_chunks
    offs_n = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Sk
    col = tl.zeros([BLOCK_N], tl.float32)  # weights are >= 0: 0 also starts a max
    for hh in range(heads_per_chunk):
        h = chunk * heads_per_chunk + hh
        s_base = SCORES + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
        l_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
        for r0 in range(0, n_rows, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < n_rows
            # +inf LSE (dropped rows, rows that see no key) and -inf scores (masked keys) weigh 0.
            if LSE_PARTS:
                lse2 = _combined_lse2(l_base + offs_r * stride_lm, stride_lp, n_lse_parts, mask_r, BLOCK_R)
            else:
                lse2 = tl.load(l_base + offs_r * stride_lm, mask=mask_r, other=float("inf")) * _LOG2E
            s = tl.load(s_base + offs_r.to(tl.int64)[:, None] * stride_sm + offs_n[None, :],
                        mask=mask_r[:, None] & mask_n[None, :], other=float("-inf"))  # [BR, BN]
            p = tl.exp2(s - lse2[:, None])
            col = tl.maximum(col, tl.max(p, axis=0)) if USE_MAX else col + tl.sum(p, axis=0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + chunk.to(tl.int64) * stride_oc + offs_n, col * out_scale, mask=mask_n)


def _keeps_scores(p: Problem) -> bool:
    """Few rows over many keys: pass 1 stores their float32 scores, 8 bytes per row and key written
    and read back, which costs less than pass 2 reading each key's 2 * D bytes again (the passes
    are memory-bound there). Half of that break-even, for the launch and the extra kernel; and
    long enough key ranges that the saved traffic outweighs the host time of a call (on the H100:
    B=1 H=32 Sk=16384 lost, 0.23 vs 0.13 ms; from B * H * Sk = 2**22 on it won, NOTES.md v12)."""
    return p.n_rows * 8 <= p.head_dim and p.batch * p.heads * p.k_len >= SCORES_MIN_KEYS


SCORES_MIN_KEYS = 2**22  # keys summed over the batch and the query heads


def scores_reduce(query, key, p: Problem, key_keep, row_keep, heads_per_chunk: int, use_max: bool,
                  divisor: float):
    """Few selected rows (`_keeps_scores`), or None: pass 1 keeps the rows' scores (a (B, H, rows, Sk)
    float32 temporary, rows <= D / 8) and a light kernel turns them into the (B, H // heads_per_chunk,
    Sk) result, divided by ``divisor``. row_keep: optional (B, Sq) bool, False drops a row."""
    if not _keeps_scores(p):
        return None
    rows = range(p.row_start, p.row_end)
    scores = utils.new_output((p.batch, p.heads, p.n_rows, p.k_len), query.device)
    cfg = _row_blocks_for(p, query, p.n_rows, columns=False, heads_per_chunk=p.group)  # fitted to the rows
    rows_pow2 = utils.next_power_of_2(p.n_rows)
    lse = row_lse(query, key, p, key_keep, rows, config=cfg, combine=False, scores=scores)
    if row_keep is not None:
        lse = utils.drop_rows(_combine_lse(lse) if lse.dim() == 4 else lse, row_keep, p)
    lse_parts = lse.dim() == 4  # (splits, B, H, rows)
    n_chunks = p.heads // heads_per_chunk
    out = utils.new_output((p.batch, n_chunks, p.k_len), query.device)
    block_n = 32 if interpreting() else 256
    grid = (p.batch * n_chunks * cdiv(p.k_len, block_n),)
    with _on_device(query):
        utils.launch(
            _scores_reduce_kernel, grid,
            scores, lse, out, *scores.stride()[:3], *lse.stride()[-3:], lse.stride(0) if lse_parts else 0,
            lse.shape[0] if lse_parts else 1, *out.stride()[:2], p.n_rows, heads_per_chunk, n_chunks, p.k_len,
            1.0 / divisor, USE_MAX=use_max, LSE_PARTS=lse_parts, BLOCK_R=min(16, rows_pow2),
            BLOCK_N=block_n, num_warps=4,
        )
    return out


def _combine_lse(parts: torch.Tensor) -> torch.Tensor:
    """(splits, B, H, rows) partial LSEs -> (B, H, rows); +inf for rows that saw no key."""
    lse = torch.logsumexp(parts, dim=0)
    return lse.masked_fill_(torch.isneginf(lse), float("inf"))


def row_lse(query, key, p: Problem, key_keep=None, rows=None, config=None, combine=True, scores=None) -> torch.Tensor:
    """Pass 1: natural-log LSE, float32 (B, H, len(rows)), of rows (default: the selected ones).

    key_keep: optional (B, Sk) bool, False for padded keys. Rows that see no key get +inf.
    When few programs would cover the rows, the keys are split among several programs whose
    partial log-sum-exps are combined here (a (splits, B, H, rows) float32 temporary), or, with
    ``combine=False``, returned as they are for `col_reduce` to combine.
    scores: an optional (B, H, len(rows), Sk) float32 tensor (last dim contiguous) that receives
    scale * log2(e) * q.k, -inf where masked (the portable kernel only).
    """
    rows = rows or range(p.row_start, p.row_end)
    fast = None if config or scores is not None else _fast_path(query, key, p, rows, key_keep)
    # The fast path does not split keys: it needs a row block per SM at least.
    if fast and p.batch * p.heads * cdiv(len(rows), fast.BLOCK_ROWS) >= _sm_count(query.device):
        with _on_device(query):
            return fast.row_lse(query, key, p, key_keep)
    cfg = config or _row_blocks_for(p, query, len(rows), columns=False, heads_per_chunk=p.group)
    lse = _launch_row_blocks(query, key, p, rows, cfg, None, None, key_keep, scores=scores)
    if lse.shape[0] == 1:
        return lse[0]
    return _combine_lse(lse) if combine else lse


def _row_blocks_for(p: Problem, query, n_rows: int, columns: bool, heads_per_chunk: int) -> dict:
    """`_row_block_sizes` with the query heads of a key head packed into blocks where that pays
    (`_pack_heads`); ``heads_per_chunk``: the heads whose column sums may be added together."""
    cfg = _row_block_sizes(p.head_dim, query.dtype, n_rows, columns)
    if p.group == 1 or n_rows > PACK_MAX_ROWS // 2:
        return cfg
    if not query.is_cuda:  # the interpreter's blocks
        return _pack_heads(tuple(cfg.items()), n_rows, p.group, heads_per_chunk, cfg["BLOCK_M"], query.element_size())
    unpacked_programs = p.batch * p.heads * cdiv(n_rows, cfg["BLOCK_M"])
    if _min_keys_per_split(p.k_len, unpacked_programs, query.device) >= p.k_len:
        return cfg  # unsplit: a packed grid would walk the keys in fewer programs
    if query.dtype == torch.float32:  # its exact dot runs on the FMA units: 128 packed rows ran 6x slower
        return cfg
    row_bytes = (cfg["BLOCK_D"] + cfg["BLOCK_D2"]) * query.element_size()
    return _pack_heads(tuple(cfg.items()), n_rows, p.group, heads_per_chunk, PACK_MAX_ROWS if row_bytes <= 256 else 64,
                       query.element_size())


def _use_row_stationary(n_rows: int, block_m: int) -> bool:
    """Pass 2 row-stationary for up to four row blocks of selected rows (512 at the GPU tiles): few
    rows (decoding windows, CLS tokens, SnapKV's observation window) leave the key-centric kernel
    too little work per program. Measured faster on the H100 from 32 to 512 rows (v8 in NOTES.md);
    its partial sums cost one (B, H, Sk) float32 plane per row block."""
    return n_rows <= 4 * block_m


def col_reduce(query, key, lse, p: Problem, heads_per_chunk: int, use_max: bool, config=None,
               divisor: float = 1.0) -> torch.Tensor:
    """Pass 2: sum (or max) of the attention weights over the selected rows, float32, divided by
    ``divisor`` as the kernels store them (a mean's constant divisor: one torch kernel fewer).

    lse: (B, H, n_rows) for the selected rows, +inf drops a row; or (splits, B, H, n_rows) partials
    from `row_lse(combine=False)`. Returns (B, H // heads_per_chunk, Sk):
    entry [b, c, j] reduces key j's weights over the selected rows of query heads
    c * heads_per_chunk ... (c + 1) * heads_per_chunk - 1, which share one key head.
    Weights of padded keys are not masked here: the caller zeroes those columns.
    """
    n_chunks = p.heads // heads_per_chunk
    row_cfg = _row_block_sizes(p.head_dim, query.dtype, p.n_rows, columns=True)
    if _use_row_stationary(p.n_rows, row_cfg["BLOCK_M"]):
        # One partial per row block and query head (pack of heads), reduced here; the kernel
        # combines pass 1's LSE partials itself.
        row_cfg = config or _row_blocks_for(p, query, p.n_rows, columns=True, heads_per_chunk=heads_per_chunk)
        pack, pack_rows = _packing(row_cfg)
        n_row_blocks = cdiv(p.n_rows, pack_rows)
        parts = utils.new_output((n_row_blocks, p.batch, p.heads // pack, p.k_len), query.device)
        _launch_row_blocks(query, key, p, range(p.row_start, p.row_end), row_cfg, lse, parts, use_max=use_max,
                           out_scale=1.0 / divisor)
        if n_row_blocks == 1 and heads_per_chunk == pack:
            return parts[0]
        parts = parts.view(n_row_blocks, p.batch, n_chunks, heads_per_chunk // pack, p.k_len)
        return parts.amax(dim=(0, 3)) if use_max else parts.sum(dim=(0, 3))
    if lse.dim() == 4:
        lse = _combine_lse(lse)
    fast = None if config else _fast_path(query, key, p, range(p.row_start, p.row_end), mode="columns")
    if fast:
        with _on_device(query):
            return fast.col_reduce(query, key, lse, p, heads_per_chunk, use_max, divisor=divisor)
    out = utils.new_output((p.batch, n_chunks, p.k_len), query.device)
    cfg = config or _block_sizes(p.head_dim, query.dtype)
    n_key_blocks = cdiv(p.k_len, cfg["BLOCK_N"])
    qk_strides, unit = _qk_strides(query, key)
    grid = (p.batch * n_chunks * n_key_blocks,)
    with _on_device(query):
        utils.launch(
            _col_reduce_kernel, grid,
            query, key, lse, out,
            *qk_strides, *lse.stride(), *out.stride(),
            p.heads, p.group, heads_per_chunk, p.causal_offset, p.window, p.k_len, p.head_dim, p.row_start, p.row_end,
            n_key_blocks, p.scale * LOG2E, 1.0 / divisor,
            CAUSAL=p.causal, WINDOWED=p.window > 0, USE_MAX=use_max, STRIDE_UNIT=unit, RAW_SOFTCAP=p.raw_softcap,
            **_dot_flags(query.dtype),
            **cfg,
        )
    return out


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU, switching devices only when it is not the current one."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = dtype == torch.bfloat16 and interpreting()
    # float32 operands must not be rounded to tf32 (~3e-4 error); fp16/bf16 products are exact in fp32.
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return dict(DOT_PRECISION=precision, UPCAST_DOT=upcast)
