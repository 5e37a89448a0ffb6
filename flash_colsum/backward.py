"""Gradients of the column statistics through the softmax: two Triton kernels, never the Sq x Sk matrix.

The statistic over the rows i of ``rows``: out[b, h, j] = sum_i row_weight[b, i] * w[b, h, i, j],
with w = exp(s - lse) the softmax weights of the scores s = scale * q . k. For the gradient G of out
(per query head and key) and, optionally, the gradient gl of the returned natural-log LSE:

    dL/ds_ij = w_ij * (row_weight_i * G_j - c_i),   c_i = row_weight_i * D_i - gl_i,   D_i = sum_j w_ij G_j

which is FlashAttention's backward with a one-column value V = G and dO = row_weight (D_i is the
attention output of that V). Then dq_i = scale * sum_j dL/ds_ij k_j and dk_j = scale * sum_i dL/ds_ij q_i.

- `_rows_kernel` (row-stationary, one program per block of rows of one query head): a sweep over
  the keys for D_i, then a second one for dq; it stores c for the next kernel.
- `_keys_kernel` (key-stationary, one program per block of keys of one key head): sweeps the rows
  of every query head of the group for dk.
Each writes its block once: no atomics, bitwise reproducible. Scores as in the forward kernels
(fp16/bf16 products exact in float32). The two gradient products round dL/ds to the 16-bit input
dtype, first divided by a power of two above its bound so that fp16's range holds it (each row's own
in `_rows_kernel`, one per key block in `_keys_kernel`; exact, multiplied back on dq and dk), and take
float32 operands on tf32 where `GRAD_IN_INPUT_DTYPE` is off; float32 inputs take exact float32.
Offsets are 64-bit (a head's stride times the head index passes 2**31 in long sequences).
Masking convention as the forward: query i sees key j iff j <= i + Sk - Sq when causal (and, with a
sliding window, j > i + Sk - Sq - window); padded keys (key_keep 0) have weight 0; rows with
lse = +inf (no visible key) have weight 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import utils
from .triton_backend import _dot, _dot_flags, _in_window, _load_main, _load_tail, _on_device, _soft_cap
from .utils import LOG2E, Problem, cdiv


@triton.jit
def _row_offsets(head_offset, offs_row, stride_row, ROWS_OF_8: tl.constexpr):
    """Element offsets [ROWS] int64 of rows offs_row of a head. ROWS_OF_8 (the host checked the
    batch, head and row strides): multiples of 8, which Triton cannot see in a stride like 72 (it
    specializes integers divisible by 16 only), so the loads take 16 bytes, not 2, at a time (a hint
    on the scalar stride is lost; on the offsets it holds: sm_90 PTX, results/hint_ptx_v26.txt)."""
    rows = head_offset + offs_row.to(tl.int64) * stride_row
    if ROWS_OF_8:
        rows = tl.multiple_of(rows, 8)
    return rows


@triton.jit
def _key_tile(q, q_tail, K, k_head, stride_kn, stride_kd, keep_base, stride_keep_n, g_base, offs_m, n0, Sk, causal_offset,
              window, qk_scale, D: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
              HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
              UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
              ROWS_OF_8: tl.constexpr, RAW_SOFTCAP: tl.constexpr):
    """Keys n0 ... n0 + BLOCK_N against a block of rows (q, q_tail, offs_m): the keys [BN, BD] and
    their tail [BN, BD2] (streamed: unmasked; k itself when BLOCK_D2 is 0), the base-2 scores
    scale * log2(e) * q . k [BM, BN] (-inf where masked; soft-capped with RAW_SOFTCAP), the keys'
    G [BN], and the cap's slope [BM, BN] (1.0 without a cap)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_rows = _row_offsets(k_head, offs_n, stride_kn, ROWS_OF_8)
    k = _load_main(K, k_rows, 1, offs_n < Sk, stride_kd, D, BLOCK_D)
    s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT)  # [BM, BD] @ [BD, BN] -> [BM, BN]
    k_tail = k
    if BLOCK_D2 > 0:
        k_tail = _load_tail(K, k_rows, 1, offs_n < Sk, stride_kd, D, BLOCK_D, BLOCK_D2, False)
        s += _dot(q_tail, tl.trans(k_tail), DOT_PRECISION, UPCAST_DOT)  # [BM, BD2] @ [BD2, BN]
    slope = 1.0
    if RAW_SOFTCAP > 0:
        s, slope = _capped_and_slope(s, RAW_SOFTCAP)
    visible = offs_n[None, :] < Sk
    if CAUSAL:
        visible = visible & _in_window(offs_m[:, None], offs_n[None, :], causal_offset, window, WINDOWED)
    if HAS_KEY_MASK:
        keep = tl.load(keep_base + offs_n * stride_keep_n, mask=offs_n < Sk, other=0)
        visible = visible & (keep[None, :] != 0)
    g = tl.load(g_base + offs_n, mask=offs_n < Sk, other=0.0)
    return k, k_tail, tl.where(visible, s * qk_scale, float("-inf")), g, slope


@triton.jit
def _capped_and_slope(s, RAW_SOFTCAP: tl.constexpr):
    """Soft-capped raw products c = R tanh(s / R) and their slope dc/ds = 1 - (c / R)^2, which
    multiplies dL/dc on the way to q and k."""
    capped = _soft_cap(s, RAW_SOFTCAP)
    ratio = capped * (1.0 / RAW_SOFTCAP)
    return capped, 1.0 - ratio * ratio


@triton.jit
def _store_columns(row_ptrs, mask_row, values, D_START: tl.constexpr, D_HI_OR_LO: tl.constexpr, WIDTH: tl.constexpr):
    """Store values [ROWS, WIDTH] into columns D_START ... D_START + WIDTH - 1 of the rows row_ptrs
    [ROWS, 1]: the main block (D_START 0) below D_HI_OR_LO = D, a tail block at or past
    D_HI_OR_LO = BLOCK_D (the columns it shares with the main block are the main block's)."""
    offs_d = D_START + tl.arange(0, WIDTH)
    if D_START == 0:
        keep = offs_d[None, :] < D_HI_OR_LO
    else:
        keep = offs_d[None, :] >= D_HI_OR_LO
    tl.store(row_ptrs + offs_d[None, :], values, mask=mask_row[:, None] & keep)


@triton.jit
def _power_of_two_above(bound):
    """The power of two 2**(floor(log2(bound)) + 1) > bound, built from the exponent bits: exact,
    where exp2(ceil(log2(.))) goes through approximate MUFU ops. bound is clamped to 2**-100 first,
    so that dividing a row weight (<= 1) by it stays finite."""
    bits = tl.maximum(bound, 2.0**-100).to(tl.int32, bitcast=True)
    return ((bits & 0x7F800000) + 0x00800000).to(tl.float32, bitcast=True)


@triton.jit
def _grad_dot(ds, x, GRAD_16BIT: tl.constexpr, GRAD_PRECISION: tl.constexpr, DOT_PRECISION: tl.constexpr,
              UPCAST_DOT: tl.constexpr):
    """ds @ x, float32 accumulation. GRAD_16BIT: ds rounded to x's 16-bit dtype (the caller keeps
    |ds| <= 1 by dividing it by a power of two); else float32 operands with GRAD_PRECISION (tf32 or ieee)."""
    if GRAD_16BIT:
        out = _dot(ds.to(x.dtype), x, DOT_PRECISION, UPCAST_DOT)  # as the scores: 16-bit products exact in float32
    else:
        out = tl.dot(ds, x.to(tl.float32), input_precision=GRAD_PRECISION)
    return out


@triton.jit
def _rows_kernel(
    Q, K, LSE2, G, ROW_W, LSE_GRAD, KEEP, DQ, C, BOUND,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_keep_b, stride_keep_n, Sq,
    H, GROUP, G_HEADS, n_rows, row_start, Sk, causal_offset, window, qk_scale, scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_LSE_GRAD: tl.constexpr, COMPUTE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, GRAD_16BIT: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, ROWS_OF_8: tl.constexpr,
    RAW_SOFTCAP: tl.constexpr,
):
    """dq of one block of BLOCK_M selected rows of one query head, and those rows' c.

    LSE2, LSE_GRAD, C: (B, H, n_rows) float32 contiguous (base-2 LSE; natural-log LSE gradient).
    COMPUTE_LSE: the first sweep computes the LSE as a forward pass would (online maximum) and
    stores it in LSE2 for `_keys_kernel`, instead of loading it: no pass of its own.
    G: (B, H // G_HEADS, Sk) float32 contiguous, a row for G_HEADS consecutive query heads.
    ROW_W: (B, n_rows). DQ: (B, H, Sq, D) contiguous, in any float dtype (stored once, rounded).
    GRAD_16BIT: BOUND (B, H, cdiv(n_rows, BLOCK_M)) gets the block's bound on |dL/ds / scale|,
    max_i max_j w_ij (|row_w_i| max_j |G_j| + |c_i|) over its rows and swept keys, and each row's
    products divide dL/ds by a power of two above its own bound, multiplied back on dq. The largest
    weight counts: weights ~1/Sk (diffuse rows, long sequences) would otherwise leave dL/ds divided
    by the bound under fp16's smallest normal number.
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    bh = pid // n_blocks
    b = bh // H
    h = bh % H
    offs_r = (pid % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # within the selection
    mask_r = offs_r < n_rows
    offs_m = row_start + offs_r  # query rows
    q_rows = _row_offsets(b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, stride_qm, ROWS_OF_8)
    q = _load_main(Q, q_rows, 1, mask_r, stride_qd, D, BLOCK_D)  # [BM, BD]
    q_tail = q  # unused unless BLOCK_D2 > 0
    if BLOCK_D2 > 0:  # stationary: zero where it overlaps the main block
        q_tail = _load_tail(Q, q_rows, 1, mask_r, stride_qd, D, BLOCK_D, BLOCK_D2, True)  # [BM, BD2]
    k_head = b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    row = bh.to(tl.int64) * n_rows + offs_r
    row_w = tl.load(ROW_W + b.to(tl.int64) * n_rows + offs_r, mask=mask_r, other=0.0)
    g_base = G + (bh // G_HEADS).to(tl.int64) * Sk
    keep_base = KEEP + b.to(tl.int64) * stride_keep_b
    n_lo = 0
    n_hi = Sk
    if CAUSAL:  # the block's last row sees keys up to it + causal_offset
        n_hi = tl.minimum(Sk, tl.maximum(row_start + tl.minimum((pid % n_blocks + 1) * BLOCK_M, n_rows) + causal_offset, 0))
    if WINDOWED:  # ... and its first row none before its window
        n_lo = tl.minimum(tl.maximum(row_start + (pid % n_blocks) * BLOCK_M + causal_offset + 1 - window, 0), n_hi)

    if COMPUTE_LSE:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running maximum of the base-2 scores
        total = tl.zeros([BLOCK_M], tl.float32)  # sum_j exp2(t_ij - m_i)
    else:
        lse2 = tl.load(LSE2 + row, mask=mask_r, other=float("inf"))  # rows past the selection: weight 0
    dot = tl.zeros([BLOCK_M], tl.float32)  # D_i (times total when COMPUTE_LSE)
    g_max = 0.0  # max |G_j| over the swept keys
    w_max = tl.zeros([BLOCK_M], tl.float32)  # max_j w_ij (given LSE; else 1 / total)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        _, _, t, g, _ = _key_tile(q, q_tail, K, k_head, stride_kn, stride_kd, keep_base, stride_keep_n, g_base, offs_m,
                                  n0, Sk, causal_offset, window, qk_scale, D, CAUSAL, WINDOWED, HAS_KEY_MASK,
                                  DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_D, BLOCK_D2, ROWS_OF_8, RAW_SOFTCAP)
        if COMPUTE_LSE:
            m_new = tl.maximum(m, tl.max(t, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet: no -inf - -inf
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(t - m_safe[:, None])
            total = total * alpha + tl.sum(w, axis=1)
            dot = dot * alpha + tl.sum(w * g[None, :], axis=1)
            m = m_new
        else:
            w = tl.exp2(t - lse2[:, None])
            dot += tl.sum(w * g[None, :], axis=1)
            if GRAD_16BIT:
                w_max = tl.maximum(w_max, tl.max(w, axis=1))
        if GRAD_16BIT:
            g_max = tl.maximum(g_max, tl.max(tl.abs(g), axis=0))
    if COMPUTE_LSE:  # rows that see no key get +inf: weight 0, as the forward kernels' convention
        seen = (total > 0) & mask_r
        total = tl.where(seen, total, 1.0)  # no log2(0), no 0 / 0 in the lanes dropped below
        lse2 = tl.where(seen, m + tl.log2(total), float("inf"))
        dot = tl.where(seen, dot / total, 0.0)
        w_max = 1.0 / total  # the largest weight is exp2(m - lse2)
        tl.store(LSE2 + row, lse2, mask=mask_r)
    c = row_w * dot
    if HAS_LSE_GRAD:
        c -= tl.load(LSE_GRAD + row, mask=mask_r, other=0.0)
    tl.store(C + row, c, mask=mask_r)
    dq_scale = tl.zeros([BLOCK_M], tl.float32) + scale
    if GRAD_16BIT:  # |dL/ds / scale| <= max w (|row_w| max|G| + |c|): divided to <= 1, near it, for fp16's range
        bound = w_max * (tl.abs(row_w) * g_max + tl.abs(c))
        tl.store(BOUND + bh.to(tl.int64) * n_blocks + pid % n_blocks, tl.max(bound, axis=0))
        sigma = _power_of_two_above(bound)
        row_w = row_w / sigma  # exact: powers of two
        c = c / sigma
        dq_scale = dq_scale * sigma

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        dq_tail = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        k, k_tail, t, g, slope = _key_tile(q, q_tail, K, k_head, stride_kn, stride_kd, keep_base, stride_keep_n, g_base,
                                           offs_m, n0, Sk, causal_offset, window, qk_scale, D, CAUSAL, WINDOWED,
                                           HAS_KEY_MASK, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_D, BLOCK_D2, ROWS_OF_8,
                                           RAW_SOFTCAP)
        w = tl.exp2(t - lse2[:, None])
        ds = w * (row_w[:, None] * g[None, :] - c[:, None])  # dL/ds / scale
        if RAW_SOFTCAP > 0:  # through the cap (its slope <= 1: the 16-bit bound holds)
            ds = ds * slope
        dq += _grad_dot(ds, k, GRAD_16BIT, GRAD_PRECISION, DOT_PRECISION, UPCAST_DOT)  # [BM, BN] @ [BN, BD] -> [BM, BD]
        if BLOCK_D2 > 0:
            dq_tail += _grad_dot(ds, k_tail, GRAD_16BIT, GRAD_PRECISION, DOT_PRECISION, UPCAST_DOT)  # -> [BM, BD2]
    dq_rows = DQ + ((bh.to(tl.int64) * Sq + offs_m) * D)[:, None]
    _store_columns(dq_rows, mask_r, dq * dq_scale[:, None], 0, D, BLOCK_D)
    if BLOCK_D2 > 0:  # the columns past the main block only: the overlap is the main block's
        _store_columns(dq_rows, mask_r, dq_tail * dq_scale[:, None], D - BLOCK_D2, BLOCK_D, BLOCK_D2)


@triton.jit
def _keys_kernel(
    Q, K, LSE2, G, ROW_W, C, BOUND, KEEP, DK,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_keep_b, stride_keep_n,
    H, GROUP, G_HEADS, n_rows, row_start, Sk, causal_offset, window, qk_scale, scale, n_bounds,
    D: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, GRAD_16BIT: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, ROWS_OF_8: tl.constexpr,
    RAW_SOFTCAP: tl.constexpr,
):
    """dk of one block of BLOCK_N keys of one key head, over the selected rows of its GROUP query
    heads; C from `_rows_kernel`. DK: (B, Hk, Sk, D) contiguous, any float dtype. GRAD_16BIT: BOUND from
    `_rows_kernel` (n_bounds a head) bounds every |dL/ds / scale| of these heads; the products divide
    dL/ds by one power of two above the largest, multiplied back on dk."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(Sk, BLOCK_N)
    bhk = pid // n_blocks
    b = bhk // (H // GROUP)
    hk = bhk % (H // GROUP)
    n0 = (pid % n_blocks) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Sk
    k_rows = _row_offsets(b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh, offs_n, stride_kn, ROWS_OF_8)
    k = _load_main(K, k_rows, 1, mask_n, stride_kd, D, BLOCK_D)  # [BN, BD]
    k_tail = k  # unused unless BLOCK_D2 > 0
    if BLOCK_D2 > 0:  # stationary: zero where it overlaps the main block
        k_tail = _load_tail(K, k_rows, 1, mask_n, stride_kd, D, BLOCK_D, BLOCK_D2, True)  # [BN, BD2]
    visible_keys = mask_n
    if HAS_KEY_MASK:
        keep = tl.load(KEEP + b.to(tl.int64) * stride_keep_b + offs_n * stride_keep_n, mask=mask_n, other=0)
        visible_keys = visible_keys & (keep != 0)
    r_lo = 0
    r_hi = n_rows
    if CAUSAL:  # rows before n0 - causal_offset see none of these keys
        r_lo = tl.maximum(n0 - causal_offset - row_start, 0) // BLOCK_M * BLOCK_M
    if WINDOWED:  # ... nor rows past their window
        r_hi = tl.minimum(n_rows, tl.maximum(n0 + BLOCK_N - 1 - causal_offset + window - row_start, 0))
    dk_scale = scale
    if GRAD_16BIT:
        bound = 0.0
        for g_index in range(0, GROUP):
            bound_base = BOUND + (b * H + hk * GROUP + g_index).to(tl.int64) * n_bounds
            for i0 in range(0, n_bounds, BLOCK_M):
                offs_b = i0 + tl.arange(0, BLOCK_M)
                bound = tl.maximum(bound, tl.max(tl.load(bound_base + offs_b, mask=offs_b < n_bounds, other=0.0), axis=0))
        sigma = _power_of_two_above(bound)
        dk_scale = dk_scale * sigma
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        dk_tail = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    for g_index in range(0, GROUP):
        bh = b * H + hk * GROUP + g_index
        q_head = b.to(tl.int64) * stride_qb + (hk * GROUP + g_index).to(tl.int64) * stride_qh
        g = tl.load(G + (bh // G_HEADS).to(tl.int64) * Sk + offs_n, mask=mask_n, other=0.0)
        if GRAD_16BIT:
            g = g / sigma  # exact: a power of two
        for r0 in range(r_lo, r_hi, BLOCK_M):
            offs_r = r0 + tl.arange(0, BLOCK_M)
            mask_r = offs_r < n_rows
            offs_m = row_start + offs_r
            row = bh.to(tl.int64) * n_rows + offs_r
            q_rows = _row_offsets(q_head, offs_m, stride_qm, ROWS_OF_8)
            q = _load_main(Q, q_rows, 1, mask_r, stride_qd, D, BLOCK_D)
            lse2 = tl.load(LSE2 + row, mask=mask_r, other=float("inf"))
            row_w = tl.load(ROW_W + b.to(tl.int64) * n_rows + offs_r, mask=mask_r, other=0.0)
            c = tl.load(C + row, mask=mask_r, other=0.0)
            if GRAD_16BIT:
                c = c / sigma
            s = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT)  # [BN, BD] @ [BD, BM] -> [BN, BM]
            q_tail = q
            if BLOCK_D2 > 0:  # streamed: unmasked, as dk's tail needs every column
                q_tail = _load_tail(Q, q_rows, 1, mask_r, stride_qd, D, BLOCK_D, BLOCK_D2, False)
                s += _dot(k_tail, tl.trans(q_tail), DOT_PRECISION, UPCAST_DOT)  # [BN, BD2] @ [BD2, BM]
            if RAW_SOFTCAP > 0:
                s, slope = _capped_and_slope(s, RAW_SOFTCAP)
            w = tl.exp2(s * qk_scale - lse2[None, :])
            visible = visible_keys[:, None]
            if CAUSAL:
                visible = visible & _in_window(offs_m[None, :], offs_n[:, None], causal_offset, window, WINDOWED)
            w = tl.where(visible, w, 0.0)
            ds = w * (g[:, None] * row_w[None, :] - c[None, :])  # dL/ds / scale, [BN, BM]
            if RAW_SOFTCAP > 0:
                ds = ds * slope
            dk += _grad_dot(ds, q, GRAD_16BIT, GRAD_PRECISION, DOT_PRECISION, UPCAST_DOT)  # [BN, BM] @ [BM, BD] -> [BN, BD]
            if BLOCK_D2 > 0:
                dk_tail += _grad_dot(ds, q_tail, GRAD_16BIT, GRAD_PRECISION, DOT_PRECISION, UPCAST_DOT)  # -> [BN, BD2]
    dk_rows = DK + ((bhk.to(tl.int64) * Sk + offs_n) * D)[:, None]
    _store_columns(dk_rows, mask_n, dk * dk_scale, 0, D, BLOCK_D)
    if BLOCK_D2 > 0:
        _store_columns(dk_rows, mask_n, dk_tail * dk_scale, D - BLOCK_D2, BLOCK_D, BLOCK_D2)


# The gradient products on 16-bit operands (dL/ds rounded to the input dtype) instead of tf32 from
# float32 ones. On the H100 (NOTES.md v26, results/grad_v26_products_h100.txt) forward + backward
# took 12.1 instead of 17.5 ms at D=64 S=16384 and 9.8-10.1 instead of 21.3 ms at D=128 S=8192
# (fewer registers and spills: results/ptxas_bwd_v25.txt); the gradients' error against float64
# stays the rounding of the gradients themselves (results/grad_acc_v26_h100.txt). The tests run both.
GRAD_IN_INPUT_DTYPE = True


def _configs(block_d: int, block_d2: int = 0) -> tuple[dict, dict]:
    """Blocks and launch options of (`_rows_kernel`, `_keys_kernel`) for a head dim split into
    (block_d, block_d2) as `utils.head_dim_blocks` splits it, tuned on the H100 (fp16; S=16384 at
    D=64, S=8192 at D=128; NOTES.md v25 and v26). v25 (results/tune_bwd_v25_h100.txt) took forward +
    backward from 23.1 to 17.7 ms at D=64 and from 30.1 to 21.3 ms at D=128 against 64 x 64 blocks
    and 4 warps; v26 retuned the rows kernel once its first sweep computed the LSE
    (results/tune_rows_v26_h100.txt: D=128 9.77 -> 9.22 ms; D=64 kept, 11.29 ms) and then the keys
    kernel (results/tune_keys_v26_h100.txt: D=128 32-row blocks, 4 warps 9.11 -> 8.56 ms; D=64 kept,
    11.35 against 11.19-11.32 for the nearest others). Split head dims up to 160 take their main
    block's: at D=72/80/96 the D=64 configurations ran 19.7/12.9/3.75 ms against 23.5/13.7/3.80 with
    those of D=128 (results/ab_split2_v26_h100.txt). Wider rows (D=161-256) take 64 x 64 blocks with
    4 warps in both, forward + backward at S=4096 (v27): D=256 4.78 -> 2.29 ms against 32 x 32
    (results/bwd_wide_v27_h100.txt), D=192 2.27 -> 1.79 against D=128's (bwd_mid_v27_h100.txt;
    D=160 1.75 -> 1.71, kept)."""
    if block_d + block_d2 > 160:
        wide = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        return wide, wide
    if block_d <= 64:
        rows = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        keys = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)
    else:
        rows = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)
        keys = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
    return rows, keys


def column_grads(query, key, lse, p: Problem, rows: range, key_keep, row_weight, col_grad, lse_grad):
    """(dq, dk) in query's and key's dtypes, the gradient of the column statistic (module docstring),
    as `torch_backend.col_reduce_backward` takes its arguments: lse (B, H, len(rows)) natural log,
    +inf for rows that see no key, or None (`_rows_kernel` computes it); row_weight (B, len(rows));
    col_grad (B, H // n, Sk), a row for n consecutive query heads; lse_grad (B, H, len(rows)) or
    None; key_keep (B, Sk) bool or None."""
    n_rows = len(rows)
    # Each block of rows and of keys is written once, so the kernels round to the input dtype
    # themselves; rows outside ``rows`` get no gradient.
    dq = (torch.empty if n_rows == p.q_len else torch.zeros)(query.shape, device=query.device, dtype=query.dtype)
    dk = torch.empty(key.shape, device=key.device, dtype=key.dtype)
    if lse is None:
        lse2 = torch.empty((p.batch, p.heads, n_rows), device=query.device, dtype=torch.float32)
    else:
        lse2 = (lse.float() * LOG2E).contiguous()
    block_d, block_d2 = utils.head_dim_blocks(p.head_dim)  # 80 = 64 + 16, as the forward kernels
    rows_cfg, keys_cfg = _configs(block_d, block_d2)  # 72-96 run best as 64 (v26)
    col_grad = col_grad.float().contiguous()
    row_weight = row_weight.float().contiguous()
    lse_grad = None if lse_grad is None else lse_grad.float().contiguous()
    sixteen_bit = query.dtype != torch.float32 and GRAD_IN_INPUT_DTYPE
    c = torch.empty_like(lse2)
    n_bounds = cdiv(n_rows, rows_cfg["BLOCK_M"])
    bound = torch.empty((p.batch, p.heads, n_bounds), device=query.device, dtype=torch.float32) if sixteen_bit else c
    # Without a mask any pointer serves: the kernels never read it.
    keep, keep_strides = (key_keep.view(torch.uint8), key_keep.stride()) if key_keep is not None else (lse2, (0, 0))
    rows_of_8 = all(st % 8 == 0 for st in (*query.stride()[:3], *key.stride()[:3]))  # see _row_offsets
    meta = dict(D=p.head_dim, CAUSAL=p.causal, WINDOWED=p.window > 0, HAS_KEY_MASK=key_keep is not None,
                **_dot_flags(query.dtype),
                GRAD_16BIT=sixteen_bit, GRAD_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", BLOCK_D=block_d,
                BLOCK_D2=block_d2, ROWS_OF_8=rows_of_8, RAW_SOFTCAP=p.raw_softcap)
    strides = (*query.stride(), *key.stride(), *keep_strides)
    sizes = (p.heads, p.group, p.heads // col_grad.shape[1], n_rows, rows.start, p.k_len, p.causal_offset, p.window,
             p.scale * LOG2E, p.scale)
    with _on_device(query):
        utils.launch(_rows_kernel, (p.batch * p.heads * cdiv(n_rows, rows_cfg["BLOCK_M"]),), query, key, lse2, col_grad,
                     row_weight, lse_grad if lse_grad is not None else lse2, keep, dq, c, bound, *strides, p.q_len, *sizes,
                     HAS_LSE_GRAD=lse_grad is not None, COMPUTE_LSE=lse is None, **meta, **rows_cfg)
        utils.launch(_keys_kernel, (p.batch * p.kv_heads * cdiv(p.k_len, keys_cfg["BLOCK_N"]),), query, key, lse2,
                     col_grad, row_weight, c, bound, keep, dk, *strides, *sizes, n_bounds, **meta, **keys_cfg)
    return dq, dk
