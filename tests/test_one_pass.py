"""The one-pass kernel for short key ranges (triton_backend._one_pass_kernel): keys stationary, one
exponential per score. By itself it takes only large 16-bit calls on a GPU; here it is forced on
wherever it fits and checked against the float64 reference on every option it serves."""

import pytest
import torch

from flash_colsum import column_stats
from flash_colsum import triton_backend as tb
from flash_colsum.reference import reference_column_stats
from conftest import HAS_CUDA
from helpers import TOLERANCE, make_qk, record_taken, rel_l2

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def one_pass_runs(monkeypatch) -> list:
    """Force the one pass wherever it fits; per call of it, whether it ran (`record_taken`)."""
    monkeypatch.setattr(tb, "_use_one_pass", lambda p, query: True)
    return record_taken(monkeypatch, "one_pass_reduce")


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "window": dict(is_causal=True, window=7),
    "key_mask": dict(key_padding_mask=True),
    "softcap": dict(softcap=3.0),
    "last_rows_kv_sum": dict(rows=slice(-5, None), heads="kv_sum", reduce="sum"),
    "max_per_head": dict(reduce="max", heads="none"),
    "causal_kv_max": dict(is_causal=True, reduce="max", heads="kv_max"),
    "visible": dict(is_causal=True, normalize="visible", heads="sum"),
}


def _check(q, k, dtype, **kwargs):
    if kwargs.get("key_padding_mask") is True:  # right padding, one batch row nearly all padding
        lengths = torch.tensor([k.shape[2], 3])[: q.shape[0]]
        kwargs["key_padding_mask"] = (torch.arange(k.shape[2])[None] < lengths[:, None]).to(q.device)
    got = column_stats(q, k, backend="triton", **kwargs)
    on_cpu = {name: v.cpu() if torch.is_tensor(v) else v for name, v in kwargs.items()}
    want = reference_column_stats(q.cpu(), k.cpu(), **on_cpu)
    assert rel_l2(got, want) <= TOLERANCE[dtype], kwargs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sq,sk", [(37, 50), (70, 16), (9, 64)])  # causal Sq > Sk: rows that see no key
def test_one_pass_matches_reference(one_pass_runs, case, sq, sk):
    q, k = make_qk(2, 4, 2, sq, sk, 24, torch.float16, DEVICE)
    _check(q, k, torch.float16, **CASES[case])
    assert one_pass_runs and all(one_pass_runs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [16, 40, 64, 80, 128])
def test_one_pass_head_dims_and_dtypes(one_pass_runs, d, dtype):
    q, k = make_qk(2, 2, 1, 20, 33, d, dtype, DEVICE, seq_major=True)
    _check(q, k, dtype, is_causal=True)
    assert all(one_pass_runs)


@pytest.mark.parametrize("heads", ["mean", "none", "kv_mean", "max"])
def test_one_pass_row_splits(one_pass_runs, monkeypatch, heads):
    """Few heads split their rows over several programs (partials added after): with and without
    the caller reducing them together with the heads (MHA "mean" chunks differ from key heads)."""
    monkeypatch.setattr(tb, "_sm_count", lambda device: 16)  # a GPU's split rule on a small grid
    q, k = make_qk(1, 2, 2, 150, 40, 32, torch.float16, DEVICE)
    _check(q, k, torch.float16, heads=heads, reduce="max" if heads == "max" else "mean")
    assert all(one_pass_runs)


@pytest.mark.parametrize("d,sk", [(16, tb.ONE_PASS_MAX_KEYS + 1), (80, tb.ONE_PASS_MAX_KEYS_WIDE + 1),
                                  (130, 20)])
def test_longer_keys_take_two_passes(one_pass_runs, d, sk):
    """Past its key limit (lower above D=64) or head-dim limit a call declines the one pass,
    whatever the policy says."""
    q, k = make_qk(1, 1, 1, 8, sk, d, torch.float16, DEVICE)
    _check(q, k, torch.float16)
    assert one_pass_runs == [False]


def test_one_pass_policy_on_cpu():
    """Without forcing, CPU tensors (the interpreter) keep the two-pass kernels."""
    q, k = make_qk(1, 1, 1, 4, 8, 16, torch.float16, "cpu")
    p = tb.Problem(1, 1, 1, 4, 8, 16, 0.25, False, 0, 4, "triton")
    assert not tb._use_one_pass(p, q)


@pytest.mark.skipif(not HAS_CUDA, reason="the GPU policy")
def test_large_gpu_calls_take_one_pass(monkeypatch):
    """A batched call past ONE_PASS_MIN_SCORES takes the one pass by itself and matches the two
    passes (forced) to float32 rounding."""
    runs = record_taken(monkeypatch, "one_pass_reduce")
    q, k = make_qk(16, 16, 16, 257, 257, 64, torch.float16, "cuda")
    got = column_stats(q, k, heads="none")
    assert runs == [True]
    monkeypatch.setattr(tb, "_use_one_pass", lambda p, query: False)
    want = column_stats(q, k, heads="none")
    assert runs == [True, False] and rel_l2(got, want) <= 1e-5
