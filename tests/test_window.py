"""Sliding windows (Mistral, Gemma 2/3, gpt-oss): with is_causal, query i sees only the `window` keys
up to its diagonal. The torch back end, against the float64 reference."""

import pytest
import torch

from flash_colsum import column_stats
from flash_colsum.reference import reference_column_stats
from helpers import TOLERANCE, make_qk, rel_l2


@pytest.mark.parametrize("sq,sk", [(30, 30), (12, 40)])  # a prefill, and a chunk over a longer cache
def test_window_matches_reference(sq, sk):
    q, k = make_qk(2, 4, 2, sq, sk, 16)
    keep = torch.rand(2, sk) < 0.8
    rows = torch.rand(2, sq) < 0.7
    for window in (1, 5, 16):
        for kwargs in (dict(), dict(normalize="visible"), dict(reduce="max", heads="none"),
                       dict(key_padding_mask=keep, row_mask=rows, heads="kv_sum", reduce="sum"),
                       dict(rows=slice(-4, None), normalize="visible")):
            got = column_stats(q, k, is_causal=True, window=window, **kwargs)
            want = reference_column_stats(q, k, is_causal=True, window=window, **kwargs)
            assert rel_l2(got, want) <= TOLERANCE[torch.float32], (window, kwargs)
    # A window as long as the keys is plain causal attention; a short one is not (the test can fail).
    plain = column_stats(q, k, is_causal=True)
    assert rel_l2(column_stats(q, k, is_causal=True, window=sk), plain) <= 1e-6
    assert rel_l2(column_stats(q, k, is_causal=True, window=5), plain) > 1e-2


def test_window_gradients():
    """Sums and means keep their gradients (the torch back end's backward sees the window too):
    against autograd through the materialized float64 reference."""
    q, k = make_qk(1, 2, 1, 10, 14, 8)
    grad = torch.randn(1, 2, 14, dtype=torch.float64)
    found = []
    for fn, dtype in ((column_stats, torch.float32), (reference_column_stats, torch.float64)):
        qq, kk = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
        out = fn(qq, kk, is_causal=True, window=4, reduce="sum", heads="none")
        found.append(torch.autograd.grad((out * grad.to(dtype)).sum(), (qq, kk)))
    for got, want in zip(*found):
        assert rel_l2(got, want) <= 1e-5


def test_window_arguments():
    q, k = make_qk(1, 1, 1, 4, 4, 8)
    for bad, error, match in [(0, ValueError, "positive"), (2.0, TypeError, "positive int"), (True, TypeError, "int")]:
        with pytest.raises(error, match=match):
            column_stats(q, k, is_causal=True, window=bad)
    with pytest.raises(ValueError, match="needs is_causal=True"):
        column_stats(q, k, window=3)
    with pytest.raises(ValueError, match="torch back end only"):
        column_stats(q, k, is_causal=True, window=3, backend="triton")
