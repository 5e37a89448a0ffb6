"""Checks that need a CUDA GPU: 64-bit indexing on huge tensors, devices."""

import pytest
import torch

from flash_colsum import flash_colsum
from helpers import rel_l2

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
