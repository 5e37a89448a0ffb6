"""Sliding windows (Mistral, Gemma 2/3, gpt-oss): with is_causal, query i sees only the `window` keys
up to its diagonal. Every back end and Triton kernel path, against the float64 reference."""

import pytest
import torch

from flash_colsum import column_stats
from flash_colsum.reference import reference_column_stats
from helpers import TOLERANCE, lse_reference, make_qk, rel_l2
from conftest import TARGETS

CASES = (dict(), dict(normalize="visible"), dict(reduce="max", heads="none"),
         dict(key_padding_mask=True, row_mask=True, heads="kv_sum", reduce="sum"),
         dict(rows=slice(-4, None), normalize="visible"), dict(rows=slice(3, 50), return_lse=True))


def _check(q, k, window, backend, dtype=torch.float32, **kwargs):
    b, _, sq, _ = q.shape
    if kwargs.get("key_padding_mask") is True:  # fresh masks of the call's shapes
        kwargs.update(key_padding_mask=torch.rand(b, k.shape[2], device=q.device) < 0.8,
                      row_mask=torch.rand(b, sq, device=q.device) < 0.7)
    with_lse = kwargs.pop("return_lse", False)
    got = column_stats(q, k, is_causal=True, window=window, backend=backend, return_lse=with_lse, **kwargs)
    on_cpu = {name: v.cpu() if torch.is_tensor(v) else v for name, v in kwargs.items()}
    want = reference_column_stats(q.cpu(), k.cpu(), is_causal=True, window=window, **on_cpu)
    if with_lse:  # every row's LSE over its window only
        got, lse = got
        want_lse = lse_reference(q, k, q.shape[-1] ** -0.5, causal=True, window=window)
        assert rel_l2(lse.cpu(), want_lse[:, :, :lse.shape[2]]) <= TOLERANCE[dtype]
    assert rel_l2(got, want) <= TOLERANCE[dtype], (window, kwargs)
    return got


@pytest.mark.parametrize("sq,sk", [(30, 30), (12, 40), (70, 150)])  # a prefill, a chunk over a cache, several blocks
@pytest.mark.parametrize("backend,device", TARGETS)
def test_window_matches_reference(backend, device, sq, sk):
    q, k = make_qk(2, 4, 2, sq, sk, 16, device=device)
    for window in (1, 5, 16, 37):
        for kwargs in CASES:
            _check(q, k, window, backend, **dict(kwargs))
    # A window as long as the keys is plain causal attention; a short one is not (the test can fail).
    plain = column_stats(q, k, is_causal=True, backend=backend)
    assert rel_l2(column_stats(q, k, is_causal=True, window=sk, backend=backend), plain) <= 1e-6
    assert rel_l2(column_stats(q, k, is_causal=True, window=5, backend=backend), plain) > 1e-2


@pytest.mark.parametrize("backend,device", [t for t in TARGETS if t[0] == "triton"])
def test_window_on_every_triton_path(backend, device, monkeypatch):
    """Pass 1 with and without key splits, fused and not, the key-centric and the row-stationary pass
    2, and pass 1's stored scores for few rows: each skips the blocks outside the window and masks
    its edges (blocks of 16 to 64 rows and keys, windows shorter and longer than a block)."""
    import flash_colsum.triton_backend as tb

    q, k = make_qk(1, 4, 2, 150, 200, 32, device=device)
    for window in (3, 40, 130):
        _check(q, k, window, backend)  # fused where small enough
    monkeypatch.setattr(tb, "_use_fused", lambda *args: False)
    for window in (3, 40, 130):
        for rows in (None, slice(-20, None)):  # the key-centric pass 2, then the row-stationary one
            _check(q, k, window, backend, rows=rows)
    monkeypatch.setattr(tb, "_use_row_stationary", lambda *args: True)
    _check(q, k, 40, backend)
    monkeypatch.setattr(tb, "SCORES_MIN_KEYS", 0)
    taken = []
    original = tb.scores_reduce
    monkeypatch.setattr(tb, "scores_reduce", lambda *a, **kw: (lambda out: taken.append(out is not None) or out)(original(*a, **kw)))
    _check(q, k, 40, backend, rows=slice(100, 103))  # 3 rows * 8 <= D: scores stored once
    assert taken == [True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_window_gradients(backend, device, dtype):
    """Sums and means keep their gradients (both back ends' backward see the window): against
    autograd through the materialized float64 reference."""
    q, k = make_qk(1, 4, 2, 70, 150, 16, dtype=dtype, device=device)
    for window, kwargs in ((4, dict(reduce="sum", heads="none")), (37, dict(rows=slice(20, 60))),
                           (64, dict(normalize="visible", heads="kv_mean"))):
        out_shape = reference_column_stats(q.cpu(), k.cpu(), is_causal=True, window=window, **kwargs).shape
        grad = torch.randn(out_shape, dtype=torch.float64)
        found = []
        for fn, cast, extra in ((column_stats, dtype, dict(backend=backend)), (reference_column_stats, torch.float64, {})):
            qq, kk = [t.cpu().to(cast) if cast == torch.float64 else t for t in (q, k)]
            qq, kk = qq.detach().requires_grad_(), kk.detach().requires_grad_()
            out = fn(qq, kk, is_causal=True, window=window, **kwargs, **extra)
            # fp16 gradients of a mean are tiny (subnormal): scale the loss, as fp16 training does
            found.append(torch.autograd.grad((out * grad.to(out.device, out.dtype)).sum() * 1e4, (qq, kk)))
        for got, want in zip(*found):
            assert rel_l2(got.cpu(), want) <= (1e-5 if dtype == torch.float32 else 2e-3), (window, kwargs)


def test_window_arguments():
    q, k = make_qk(1, 1, 1, 4, 4, 8)
    for bad, error, match in [(0, ValueError, "positive"), (2.0, TypeError, "positive int"), (True, TypeError, "int")]:
        with pytest.raises(error, match=match):
            column_stats(q, k, is_causal=True, window=bad)
    with pytest.raises(ValueError, match="needs is_causal=True"):
        column_stats(q, k, window=3)
