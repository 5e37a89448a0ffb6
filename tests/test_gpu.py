"""Checks that need a CUDA GPU: 64-bit indexing on huge tensors, devices."""

import pytest
import torch

from flash_colsum import flash_colsum
from helpers import TOLERANCE, record_row_block_launches, reference, rel_l2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_offsets_past_int32():
    """Key elements beyond 2**31: batch 1 of K starts at offset 2**31 + 2**20 elements (4 GiB fp16)."""
    sk, d = 2**23 + 2**12, 128
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GiB of GPU memory")
    k = torch.randn(2, 1, sk, d, device="cuda", dtype=torch.float16)
    assert k.numel() > 2**31
    q = torch.randn(2, 2, 16, d, device="cuda", dtype=torch.float16)
    for causal in (False, True):
        fast = flash_colsum(q, k, is_causal=causal, backend="triton")
        slow = flash_colsum(q, k, is_causal=causal, backend="torch")
        assert rel_l2(fast, slow) <= 1e-4
        assert rel_l2(fast[1], slow[1]) <= 1e-4  # the batch row that lives past 2**31


@cuda
def test_auto_picks_triton_on_cuda():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    auto = flash_colsum(q, q)
    assert torch.equal(auto, flash_colsum(q, q, backend="triton"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("b,s,d,causal", [(1, 1024, 64, False), (8, 1024, 64, False), (1, 16384, 64, False),
                                          (1, 4096, 128, True)])
def test_tensors_on_a_device_that_is_not_the_current_one(b, s, d, causal):
    """Inputs on cuda:1 while cuda:0 is current: every launch (portable, fused, Hopper passes on an
    H100) runs on the inputs' device and gives the bits it gives with cuda:1 current."""
    q = torch.randn(b, 16, s, d, device="cuda:1", dtype=torch.float16)
    k = torch.randn(b, 16, s, d, device="cuda:1", dtype=torch.float16)
    with torch.cuda.device(0):
        away = flash_colsum(q, k, is_causal=causal, backend="triton")
        torch.cuda.synchronize(1)
    with torch.cuda.device(1):
        home = flash_colsum(q, k, is_causal=causal, backend="triton")
    assert away.device == q.device and torch.equal(away, home)


@cuda
@pytest.mark.parametrize("b,sq,sk,d,dtype", [(8, 32, 4096, 128, torch.float16), (16, 16, 2048, 128, torch.bfloat16),
                                             (16, 32, 2048, 64, torch.float16), (4, 32, 4096, 128, torch.float16),
                                             (8, 64, 2048, 128, torch.float16), (32, 32, 2048, 128, torch.float16)])
@pytest.mark.parametrize("causal", [False, True])
def test_batched_windows_pack_heads(b, sq, sk, d, dtype, causal, monkeypatch):
    """Batched few-row windows (H=32, Hk=8) in one fused launch pack the heads of a key head into
    blocks of up to 64 rows while the grid keeps ~a program per SM, 128 while it keeps two (B=4 does
    not pack, nor do 64-row windows below two waves); against float64 for sums, means and maxima,
    with left key padding."""
    from flash_colsum import column_stats
    from flash_colsum import triton_backend as tb
    from flash_colsum.reference import reference_column_stats
    from flash_colsum.utils import next_power_of_2

    q = torch.randn(b, 32, sq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, 8, sk, d, device="cuda", dtype=dtype)
    keep = torch.ones(b, sk, dtype=torch.bool, device="cuda")
    keep[1, :333] = False
    rows = next_power_of_2(sq)
    wave = tb.WAVE_FILL * tb._sm_count(q.device)
    packs = [p for p in (2, 4) if p * rows <= 128 and b * 32 // p >= (wave if p * rows <= 64 else 2 * wave)]
    expected = max(packs, default=1)
    launches = record_row_block_launches(monkeypatch)
    for kwargs in (dict(heads="kv_mean"), dict(heads="mean", key_padding_mask=keep), dict(heads="kv_max", reduce="max")):
        launches.clear()
        out = column_stats(q, k, is_causal=causal, backend="triton", **kwargs)
        ref = reference_column_stats(q.cpu(), k.cpu(), is_causal=causal,
                                     **{n: v.cpu() if torch.is_tensor(v) else v for n, v in kwargs.items()})
        assert rel_l2(out, ref) <= 1e-5, kwargs
        assert [(cfg.get("PACK", 1), fused) for cfg, fused in launches] == [(expected, True)], (kwargs, launches)


@cuda
@pytest.mark.parametrize("sq,sk,d,dtype", [(32, 8192, 128, torch.float16), (16, 4100, 128, torch.bfloat16),
                                           (48, 16384, 80, torch.float16), (32, 4096, 64, torch.float16),
                                           (32, 8192, 96, torch.bfloat16), (64, 2048, 128, torch.float16),
                                           (32, 8192, 64, torch.float32), (32, 8192, 256, torch.float16)])
@pytest.mark.parametrize("causal", [False, True])
def test_few_rows_over_many_heads(sq, sk, d, dtype, causal, monkeypatch):
    """SnapKV-like windows (H=32, Hk=8, few rows): row blocks fitted to the rows; past 4096 keys,
    keys split among programs down to 512 per split (two launches) and the query heads of a key
    head packed into blocks (NOTES.md v21), else one fused launch of one row block per head (v20).
    Against float64 for per-head, per-key-head and mean results, column maxima and left key
    padding; and the expected path is the one taken."""
    from flash_colsum import column_stats
    from flash_colsum.reference import reference_column_stats
    from flash_colsum.utils import next_power_of_2

    q = torch.randn(2, 32, sq, d, device="cuda", dtype=dtype)
    k = torch.randn(2, 8, sk, d, device="cuda", dtype=dtype)
    keep = torch.ones(2, sk, dtype=torch.bool, device="cuda")
    keep[1, :333] = False
    launches = record_row_block_launches(monkeypatch)
    for kwargs in (dict(heads="kv_sum"), dict(heads="none"), dict(heads="mean", reduce="max"),
                   dict(heads="kv_mean", key_padding_mask=keep), dict(heads="kv_sum", rows=slice(sq // 3, None))):
        launches.clear()
        out = column_stats(q, k, is_causal=causal, backend="triton", **kwargs)
        ref = reference_column_stats(q.cpu(), k.cpu(), is_causal=causal,
                                     **{n: v.cpu() if torch.is_tensor(v) else v for n, v in kwargs.items()})
        assert rel_l2(out, ref) <= 1e-5, kwargs
        assert len(launches) == (2 if sk > 4096 else 1), kwargs
        # Split windows pack the 4 query heads of a key head into blocks of up to 128 rows (pass 2
        # too, unless per-head columns or row maxima under a head mean keep heads apart).
        rows = next_power_of_2(len(range(sq)[kwargs.get("rows", slice(None))]))
        max_rows = 128 if d * q.element_size() <= 256 else 64
        packs = sk > 4096 and dtype != torch.float32  # fp32's FMA dot ran 6x slower packed (NOTES.md v21)
        assert launches[0][0].get("PACK", 1) == (min(4, max_rows // rows) if packs else 1), kwargs
        assert all(cfg["BLOCK_M"] == max(16, cfg.get("PACK", 1) * rows) for cfg, _ in launches), kwargs


@cuda
@pytest.mark.parametrize("d,dtype", [(d, torch.float32) for d in (64, 72, 96, 128, 160, 192, 256)]
                         + [(d, torch.float16) for d in (136, 160, 192, 256)])
def test_tiles_per_row_width(monkeypatch, d, dtype):
    """Tiles by bytes per row: float32's (triton_backend._FLOAT32_TILES) at every width the table
    names, and fp16 rows wider than 256 bytes (_WIDE_TILES). Against float64 in one fused launch
    (small) and in two passes (2**27 scores or more), causal or not, at lengths ending inside a tile.
    The portable kernels' tiles: the Hopper ones (test_hopper) would take the larger fp16 calls."""
    monkeypatch.setenv("FLASH_COLSUM_FAST_PATHS", "0")
    for h, s in ((4, 700), (16, 2900)):
        q = torch.randn(1, h, s, d, device="cuda", dtype=dtype)
        k = torch.randn(1, h // 2, s + 37, d, device="cuda", dtype=dtype)
        for causal in (False, True):
            out = flash_colsum(q, k, is_causal=causal, backend="triton")
            assert rel_l2(out, reference(q, k, is_causal=causal)) <= TOLERANCE[dtype], (h, s, causal)
