"""flash_colsum against the float64 reference, on every back end this machine can run."""

import math
import os

import pytest
import torch

from flash_colsum import flash_colsum, get_memory_budget, naive_colsum, set_memory_budget
from helpers import (LAZY_MAX_CASES, TOLERANCE, lazy_max_inputs, lse_reference, make_qk, record_row_block_launches,
                     reference, rel_l2)
from conftest import TARGETS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, Hk, Sq, Sk, D, causal, cls_len, seq_major): block-size tails in every dimension.
CASES = [
    pytest.param(2, 4, 4, 40, 70, 64, False, None, False, id="batched-mha"),
    pytest.param(2, 4, 2, 40, 70, 64, True, None, False, id="gqa-causal-sq<sk"),
    pytest.param(1, 6, 1, 33, 33, 72, True, None, False, id="mqa-causal-sq=sk-d72"),
    pytest.param(2, 2, 1, 70, 40, 80, True, None, False, id="causal-sq>sk-d80"),
    pytest.param(3, 2, 2, 45, 50, 16, False, 3, False, id="cls-d16"),
    pytest.param(2, 4, 2, 20, 90, 128, True, 5, True, id="causal-cls-seqmajor-d128"),
    pytest.param(1, 2, 2, 17, 65, 96, False, None, True, id="seqmajor-d96"),
    pytest.param(1, 2, 1, 5, 37, 112, True, 100, False, id="cls-clamped-d112"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("b,h,hk,sq,sk,d,causal,cls_len,seq_major", CASES)
@pytest.mark.parametrize("backend,device", TARGETS)
def test_matches_reference(backend, device, b, h, hk, sq, sk, d, causal, cls_len, seq_major, dtype):
    q, k = make_qk(b, h, hk, sq, sk, d, dtype, device, seq_major)
    out = flash_colsum(q, k, is_causal=causal, cls_len=cls_len, backend=backend)
    assert out.shape == (b, sk) and out.dtype == torch.float32 and out.device == q.device
    err = rel_l2(out, reference(q, k, is_causal=causal, cls_len=cls_len))
    assert err <= TOLERANCE[dtype], f"relative L2 error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("b,h,hk,sq,sk,d,causal,cls_len,seq_major", CASES)
def test_pass2_layouts_match_reference(pass2_layout, b, h, hk, sq, sk, d, causal, cls_len, seq_major, dtype):
    """Both Triton pass-2 kernels (key-centric, row-stationary) on every case, whatever the row count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = make_qk(b, h, hk, sq, sk, d, dtype, device, seq_major)
    out = flash_colsum(q, k, is_causal=causal, cls_len=cls_len, backend="triton")
    err = rel_l2(out, reference(q, k, is_causal=causal, cls_len=cls_len))
    assert err <= TOLERANCE[dtype], f"{pass2_layout}: relative L2 error {err:.3e}"


@pytest.mark.parametrize("d", [1, 3, 16, 40, 64, 72, 80, 88, 128, 256])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_any_head_dim(backend, device, d):
    q, k = make_qk(1, 2, 1, 19, 41, d, torch.float16, device)
    scale = 0.5 / math.sqrt(d)
    out = flash_colsum(q, k, scale=scale, backend=backend)
    assert rel_l2(out, reference(q, k, scale=scale)) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("backend,device", TARGETS)
def test_rows_sum_to_one(backend, device):
    q, k = make_qk(3, 4, 2, 30, 50, 32, torch.float32, device)
    out = flash_colsum(q, k, backend=backend)
    torch.testing.assert_close(out.sum(dim=1).cpu(), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_causal_sums_count_only_rows_that_see_keys(backend, device):
    # Sq > Sk: the first Sq - Sk rows see no key; they add 0 but still count in the mean.
    sq, sk = 48, 20
    q, k = make_qk(2, 2, 2, sq, sk, 32, torch.float32, device)
    out = flash_colsum(q, k, is_causal=True, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(dim=1).cpu(), torch.full((2,), sk / sq), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_deterministic(backend, device):
    q, k = make_qk(2, 4, 2, 37, 77, 64, torch.float16, device)
    first = flash_colsum(q, k, is_causal=True, backend=backend)
    second = flash_colsum(q, k, is_causal=True, backend=backend)
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_matches_naive_colsum_float32(backend, device):
    q, k = make_qk(2, 2, 2, 24, 24, 32, torch.float16, device)
    torch.testing.assert_close(flash_colsum(q, k, backend=backend), naive_colsum(q, k), atol=1e-6, rtol=1e-4)


def test_seed_api_examples():
    """The 0.1.0 README's calls still work (on the CPU they take the torch back end)."""
    q = torch.randn(2, 4, 64, 16)
    assert flash_colsum(q, q.clone()).shape == (2, 64)
    assert flash_colsum(q, q.clone(), cls_len=1).shape == (2, 64)
    q, k = torch.randn(1, 4, 8, 32), torch.randn(1, 4, 96, 32)
    assert flash_colsum(q, k, is_causal=True).shape == (1, 96)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 2, 0, 8)], ids=["B=0", "Sk=0"])
def test_empty_result(backend, device, shape):
    b, hk, sk, d = shape
    q = torch.randn(b, 2, 7, d, device=device)
    k = torch.randn(b, hk, sk, d, device=device)
    out = flash_colsum(q, k, backend=backend)
    assert out.shape == (b, sk) and out.dtype == torch.float32


@pytest.mark.parametrize("backend,device", TARGETS)
def test_non_finite_inputs_return(backend, device):
    q, k = make_qk(1, 2, 2, 20, 40, 16, torch.float32, device)
    q[0, 0, 3, 0] = float("nan")
    k[0, 1, 5, 0] = float("inf")
    out = flash_colsum(q, k, backend=backend)
    assert out.shape == (1, 40) and torch.isnan(out).any()


def test_torch_backend_two_pass_under_small_budget():
    """A budget too small for a full row of scores forces the key-blocked two-pass path."""
    q, k = make_qk(2, 4, 2, 300, 1500, 16, torch.float32)
    old = get_memory_budget()
    try:
        set_memory_budget(2**20)
        for causal in (False, True):
            out = flash_colsum(q, k, is_causal=causal, backend="torch")
            assert rel_l2(out, reference(q, k, is_causal=causal)) <= TOLERANCE[torch.float32]
    finally:
        set_memory_budget(old)


@pytest.mark.parametrize("bad", [0, 2**20 - 1, 1.5e9, True, "1GB"])
def test_memory_budget_validation(bad):
    with pytest.raises(ValueError, match="budget"):
        set_memory_budget(bad)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_long_keys_few_rows(backend, device, causal, pass2_layout):
    """Few query rows over many keys: the Triton LSE pass splits the keys (flash-decoding style),
    and with causal masking some splits see none of a row's keys. On a GPU only key ranges past
    MIN_KEYS_PER_SPLIT (4096) split: Sk=9000 takes three splits there."""
    for sq, sk in ((8, 300), (200, 300), (3, 2000), (3, 9000)):
        q, k = make_qk(1, 1, 1, sq, sk, 32, torch.float32, device)
        out = flash_colsum(q, k, is_causal=causal, backend=backend)
        assert rel_l2(out, reference(q, k, is_causal=causal)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("n_programs,slots,max_splits,splits", [
    (64, 396, 64, 6),    # causal Sq=128 Sk=262144 D=128 pass 1 on an H100: 384 of 396 slots, not 576 (1.45 waves)
    (32, 264, 64, 8),    # its pass 2: 256 of 264, not 544 (2.06 waves)
    (128, 264, 16, 2),   # causal Sq=512 Sk=65536: 256, not 640
    (16, 396, 16, 16),   # too few keys to fill the GPU: the most splits allowed
    (64, 396, 4, 4),
    (300, 264, 64, 4),   # over a wave: 1200 programs fill 4.5 waves' worth better than 300 do 2
    (2000, 264, 64, 1),  # four waves or more: no split
    (10, 264, 1, 1),     # one split allowed
])
def test_key_splits_fill_whole_waves(n_programs, slots, max_splits, splits):
    from flash_colsum.triton_backend import WAVE_FILL, _whole_waves

    assert _whole_waves(n_programs, slots, max_splits) == splits
    waves = n_programs * splits / slots
    assert splits == max_splits or n_programs >= 4 * slots or waves / math.ceil(waves) >= WAVE_FILL


def test_row_blocks_fitted_to_few_rows():
    """A window of few rows gets row blocks no taller than itself (16 at least), and 128-key tiles in
    fp16/bf16; rows that fill a block keep the tuned tiles."""
    pytest.importorskip("triton")
    from flash_colsum.triton_backend import _fit_rows

    cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, BLOCK_D2=0, num_warps=4, num_stages=3)
    assert _fit_rows(cfg, 32, torch.float16) == dict(cfg, BLOCK_M=32, BLOCK_N=128)
    assert _fit_rows(cfg, 1, torch.bfloat16) == dict(cfg, BLOCK_M=16, BLOCK_N=128)
    assert _fit_rows(cfg, 33, torch.float32) == dict(cfg, BLOCK_M=64)  # fp32 keeps its key tiles
    for n_rows in (100, 128, 4096):  # a block of 128 rows either way
        assert _fit_rows(cfg, n_rows, torch.float16) is cfg


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_tiles_for_every_head_dim(dtype, monkeypatch):
    """The GPU tile choices (`_block_sizes`, `_row_block_sizes`) are pure functions of the head dim
    and dtype: every D from 1 to 256 gets one, with its head-dim split, for both passes and any row
    count (the interpreter takes small tiles instead, so CI would not otherwise reach them)."""
    pytest.importorskip("triton")
    from flash_colsum import triton_backend as tb
    from flash_colsum.utils import head_dim_blocks

    monkeypatch.setattr(tb, "interpreting", lambda: False)
    caches = (tb._block_sizes, tb._row_block_sizes)  # GPU tiles must not stay cached for the interpreter's tests
    for cached in caches:
        cached.cache_clear()
    try:
        for d in range(1, 257):
            block_d, block_d2 = head_dim_blocks(d)
            cfg = tb._block_sizes(d, dtype)
            assert (cfg["BLOCK_D"], cfg["BLOCK_D2"]) == (block_d, block_d2), d
            for n_rows, columns in ((32, False), (100, True), (4096, False), (4096, True)):
                rows = tb._row_block_sizes(d, dtype, n_rows, columns)
                assert rows["BLOCK_M"] >= 16 and rows["BLOCK_N"] >= 16 and rows["num_warps"] in (4, 8), (d, n_rows)
    finally:
        for cached in caches:
            cached.cache_clear()


def test_heads_packed_by_key_head():
    """A block holds the rows of PACK query heads of one key head: the largest divisor of the group
    size (and of the heads a column sum may mix) whose rows, a power of two each, fit the block."""
    pytest.importorskip("triton")
    from flash_colsum.triton_backend import _pack_heads

    cfg = tuple(dict(BLOCK_M=32, BLOCK_N=128, BLOCK_D=128, BLOCK_D2=0, num_warps=4, num_stages=3).items())
    packed = lambda n_rows, group, heads_per_chunk, max_rows=128: {  # noqa: E731
        k: v for k, v in _pack_heads(cfg, n_rows, group, heads_per_chunk, max_rows, 2).items()
        if k in ("PACK", "PACK_ROWS", "BLOCK_M")}
    assert packed(32, 4, 4) == dict(PACK=4, PACK_ROWS=32, BLOCK_M=128)  # SnapKV on Llama: one block per key head
    assert packed(32, 4, 32) == dict(PACK=4, PACK_ROWS=32, BLOCK_M=128)
    assert packed(32, 8, 8) == dict(PACK=4, PACK_ROWS=32, BLOCK_M=128)
    assert packed(20, 4, 4) == dict(PACK=4, PACK_ROWS=32, BLOCK_M=128)
    assert packed(64, 4, 4) == dict(PACK=2, PACK_ROWS=64, BLOCK_M=128)
    assert packed(16, 7, 7) == dict(PACK=7, PACK_ROWS=16, BLOCK_M=128)  # 112 rows, 16 of padding
    assert packed(32, 7, 7) == dict(PACK=1, PACK_ROWS=32, BLOCK_M=32)  # 224 rows: no divisor of 7 fits
    assert packed(1, 4, 4) == dict(PACK=4, PACK_ROWS=1, BLOCK_M=16)
    assert packed(32, 4, 1) == dict(PACK=1, PACK_ROWS=32, BLOCK_M=32)  # per-head columns: no mixing
    assert packed(32, 6, 2) == dict(PACK=2, PACK_ROWS=32, BLOCK_M=64)
    assert packed(32, 4, 4, max_rows=64) == dict(PACK=2, PACK_ROWS=32, BLOCK_M=64)
    assert packed(32, 4, 4, max_rows=16) == dict(PACK=1, PACK_ROWS=32, BLOCK_M=32)  # taller than a block
    # 64-key blocks for tall packed blocks of wide rows only (D=128 here: 256 bytes a row in fp16)
    assert _pack_heads(cfg, 32, 4, 4, 128, 2)["BLOCK_N"] == 64
    assert _pack_heads(cfg, 16, 4, 4, 128, 2)["BLOCK_N"] == 128  # 64 rows
    assert _pack_heads(cfg, 32, 4, 1, 128, 2)["BLOCK_N"] == 128  # not packed
    assert _pack_heads(cfg, 32, 4, 4, 128, 1)["BLOCK_N"] == 128  # 128 bytes a row


@pytest.mark.parametrize("h,hk,sq,sk,causal,seq_major", [(8, 2, 4, 150, True, False), (12, 4, 3, 97, False, False),
                                                         (8, 1, 2, 70, True, True)])
def test_gqa_windows_packed(h, hk, sq, sk, causal, seq_major, monkeypatch):
    """Few rows of grouped-query heads run packed, several heads per row block (and per column sum
    where the heads are summed anyway), against float64: per head, per key head, mean over heads,
    row maxima, a row slice, key padding, the returned LSE, and (B, S, H, D) strided inputs."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter's small blocks; on a GPU test_few_rows_over_many_heads covers packing")
    from flash_colsum import column_stats
    from flash_colsum.reference import reference_column_stats

    launches = record_row_block_launches(monkeypatch)
    q, k = make_qk(1, h, hk, sq, sk, 24, torch.float16, seq_major=seq_major)
    keep = torch.ones(1, sk, dtype=torch.bool)
    keep[0, :11] = False
    group = h // hk
    for kwargs, pass2_packed in ((dict(heads="kv_sum"), True), (dict(heads="none"), False),
                                 (dict(heads="mean", rows=slice(1, None)), True), (dict(heads="kv_max", reduce="max"), True),
                                 (dict(heads="kv_mean", key_padding_mask=keep), True)):
        launches.clear()
        out = column_stats(q, k, is_causal=causal, backend="triton", **kwargs)
        assert rel_l2(out, reference_column_stats(q, k, is_causal=causal, **kwargs)) <= TOLERANCE[torch.float16], kwargs
        packs = [cfg.get("PACK", 1) for cfg, _ in launches]
        assert len(packs) == 2 and packs[0] > 1 and group % packs[0] == 0, (kwargs, packs)  # split: two launches
        assert (packs[1] > 1) == pass2_packed, (kwargs, packs)
    launches.clear()
    out, lse = column_stats(q, k, is_causal=causal, heads="kv_sum", return_lse=True, backend="triton")
    assert launches and all(cfg.get("PACK", 1) > 1 for cfg, _ in launches), launches
    assert rel_l2(out, reference_column_stats(q, k, is_causal=causal, heads="kv_sum")) <= TOLERANCE[torch.float16]
    scores = q.double() @ k.double().repeat_interleave(group, dim=1).transpose(-1, -2) / 24**0.5
    if causal:
        scores.masked_fill_(torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1), float("-inf"))
    assert rel_l2(lse, scores.logsumexp(-1)) <= 1e-6


@pytest.mark.parametrize("h,hk,sq,causal", [(8, 2, 4, True), (12, 4, 3, False)])
def test_gqa_fused_windows_packed(h, hk, sq, causal, monkeypatch):
    """Batched few-row windows run both passes in one launch; where the result adds (or maxes) the
    heads of a key head with the rows' own reduction, that launch packs them into blocks too."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter's small blocks; on a GPU test_batched_windows_pack_heads covers it")
    from flash_colsum import column_stats
    from flash_colsum.reference import reference_column_stats

    launches = record_row_block_launches(monkeypatch)
    q, k = make_qk(4, h, hk, sq, 40, 24, torch.float16)
    for kwargs, packed in ((dict(heads="kv_mean"), True), (dict(heads="sum", reduce="sum"), True),
                           (dict(heads="kv_max", reduce="max"), True), (dict(heads="kv_sum", reduce="max"), False),
                           (dict(heads="none"), False)):
        launches.clear()
        out = column_stats(q, k, is_causal=causal, backend="triton", **kwargs)
        assert rel_l2(out, reference_column_stats(q, k, is_causal=causal, **kwargs)) <= TOLERANCE[torch.float16], kwargs
        assert len(launches) == 1 and launches[0][1], (kwargs, launches)  # one fused launch
        assert (launches[0][0].get("PACK", 1) == h // hk) == packed, (kwargs, launches)


def test_few_programs_split_shorter_key_ranges(monkeypatch):
    """Key ranges past MIN_KEYS_PER_SPLIT split; a grid of at most half as many programs as SMs
    (SnapKV's window: one row block per head) then splits them down to 512 keys per program where
    a fuller grid stops at 4096. Shorter ranges stay in one launch (a split's second launch costs
    more host time than it saves there)."""
    pytest.importorskip("triton")
    import dataclasses

    import flash_colsum.triton_backend as tb
    from flash_colsum.utils import Problem

    monkeypatch.setattr(tb, "_sm_count", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gpu = torch.device("cuda")  # a device object only: nothing runs; 528 default slots
    window = Problem(batch=1, heads=32, kv_heads=8, q_len=32, k_len=16384, head_dim=128, scale=128**-0.5,
                     causal=True, row_start=0, row_end=32, backend="triton")
    assert tb._key_splits(window.k_len, 64, 128, gpu) == 2048  # 8 splits: 512 of 528 slots
    assert tb._key_splits(window.k_len, 32, 128, gpu) == 1152  # 15 splits: 480 of 528 slots
    assert tb._key_splits(window.k_len, 66, 128, gpu) == 2048  # half the SMs
    assert tb._key_splits(window.k_len, 67, 128, gpu) == 4096  # at most one split per 4096 keys
    assert not tb._use_fused(window, 32, 128, gpu)
    short = dataclasses.replace(window, k_len=4096)
    assert tb._key_splits(short.k_len, 32, 128, gpu) == 4096 and tb._use_fused(short, 32, 128, gpu)
    long = dataclasses.replace(window, k_len=65536)
    assert tb._key_splits(long.k_len, 32, 128, gpu) == 4480  # 15 splits
    assert tb._key_splits(long.k_len, 200, 128, gpu) == 13184  # 5 splits (two waves, 95% full), >= 4096 keys each


def test_captured_graphs_split_shorter_key_ranges(monkeypatch):
    """While a CUDA graph is captured, a grid of few programs splits key ranges of 1025-4096 keys
    too (its replays pay no host time for the second launch); wider grids and shorter ranges keep
    one launch, and outside a capture nothing changes."""
    pytest.importorskip("triton")
    import dataclasses

    import flash_colsum.triton_backend as tb
    from flash_colsum.utils import Problem

    monkeypatch.setattr(tb, "_sm_count", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gpu = torch.device("cuda")  # a device object only: nothing runs
    decode = Problem(batch=1, heads=32, kv_heads=8, q_len=4096, k_len=4096, head_dim=128, scale=128**-0.5,
                     causal=True, row_start=4095, row_end=4096, backend="triton")
    assert tb._key_splits(4096, 32, 128, gpu) == 4096 and tb._use_fused(decode, 32, 128, gpu)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tb._key_splits(4096, 32, 128, gpu) == 512  # 8 splits: the most at 512 keys each
    assert not tb._use_fused(decode, 32, 128, gpu)
    assert tb._key_splits(2048, 66, 128, gpu) == 512
    assert tb._key_splits(4096, 67, 128, gpu) == 4096  # more programs than half the SMs
    assert tb._key_splits(1024, 32, 128, gpu) == 1024  # too short to split
    short = dataclasses.replace(decode, q_len=1024, k_len=1024, row_start=1023, row_end=1024)
    assert tb._use_fused(short, 32, 128, gpu)


def test_integer_classes():
    """Integers map to what Triton specializes them on (1, multiples of 16, others): the cache of
    resident programs is keyed by these, not by shapes."""
    from flash_colsum.triton_backend import _int_class

    assert [_int_class(v) for v in (1, 0, 32, 33, 4096 + 8, 2**31 + 16)] == [1, 16, 16, 17, 17, 16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the driver's occupancy calculator)")
def test_resident_programs_match_the_driver():
    """The splits' slots count programs per SM as the CUDA driver's occupancy calculator does."""
    import ctypes

    from flash_colsum import triton_backend as tb
    from flash_colsum.utils import make_problem

    libcuda = ctypes.CDLL("libcuda.so.1")
    for d, sq in ((128, 128), (128, 512), (64, 128)):
        q, k = make_qk(1, 4, 4, sq, 2 * tb.MIN_KEYS_PER_SPLIT + 1000, d, torch.float16, "cuda")
        tb._SLOTS.clear()
        tb._SLOTS_BY_CALL.clear()
        lse = tb.row_lse(q, k, make_problem(q, k, None, True, "triton"), combine=False)
        assert torch.isfinite(lse).any()
        assert tb._SLOTS
        for cache_key in tb._SLOTS:  # (device, Q/K/mask dtypes, integer classes, *constexpr items)
            kernel = tb._split_kernel(cache_key[1:4], cache_key[4], [1.0, 1.0], dict(cache_key[5:]))
            kernel._init_handles()
            blocks = ctypes.c_int()
            err = libcuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(blocks), ctypes.c_void_p(kernel.function), kernel.metadata.num_warps * 32,
                ctypes.c_size_t(kernel.metadata.shared))
            assert err == 0
            assert tb._resident_programs(kernel, q.device) == blocks.value, (d, sq, kernel.n_regs, kernel.metadata.shared)


@pytest.mark.parametrize("row_width", [72, 73, 76], ids=["aligned", "odd", "8-byte"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_strides_in_16_byte_units(dtype, row_width):
    """D=72 rows inside wider rows: 16-byte multiples travel in 16-byte units, other strides as they are."""
    from flash_colsum.triton_backend import _qk_strides

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(2, 3, 40, row_width, dtype=dtype, device=device)[..., :72]
    k = torch.randn(2, 3, 50, row_width, dtype=dtype, device=device)[..., :72]
    strides, unit = _qk_strides(q, k)
    aligned = row_width * q.element_size() % 16 == 0
    assert unit == (16 // q.element_size() if aligned else 1)
    assert [s * unit for s in strides[:3]] == list(q.stride()[:3]) and strides[3] == 1
    out = flash_colsum(q, k, is_causal=True, backend="triton")
    assert rel_l2(out, reference(q, k, is_causal=True)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("case", LAZY_MAX_CASES)
@pytest.mark.parametrize("d", [32, 72])
def test_row_lse_on_far_apart_scores(case, d):
    """The portable pass 1, the reference of the Hopper one and its lazy max (tests/test_hopper.py), on
    scores that jump far above the max so far, lag far below it, keep moving, or stay unseen for whole
    key blocks: the LSE against float64."""
    from flash_colsum import triton_backend as tb
    from flash_colsum.utils import make_problem

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, keep, causal = lazy_max_inputs(case, 2, 2, 24, 300, d, torch.float32, device)
    p = make_problem(q, k, None, causal, "triton")
    lse = tb.row_lse(q, k, p, key_keep=keep)
    ref = lse_reference(q, k, p.scale, causal=causal, key_keep=keep)
    assert torch.isfinite(lse).all()
    assert rel_l2(lse, ref) <= 1e-6
