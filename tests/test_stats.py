"""column_stats: every statistic, row selection, mask and packed layout against the float64 reference."""

import pytest
import torch

from flash_colsum import column_stats
from flash_colsum.reference import reference_column_stats
from helpers import TOLERANCE, make_qk, record_taken, rel_l2
from conftest import TARGETS

HEADS = ["mean", "sum", "max", "none", "kv_mean", "kv_sum", "kv_max"]


def check(q, k, backend, dtype=torch.float32, **kwargs):
    out = column_stats(q, k, backend=backend, **kwargs)
    ref = reference_column_stats(q.cpu(), k.cpu(), **{n: (v.cpu() if torch.is_tensor(v) else v) for n, v in kwargs.items()})
    assert out.shape == ref.shape and out.dtype == torch.float32
    if ref.norm() == 0:  # e.g. causal Sq > Sk with only rows that see no key selected
        assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
        return out
    err = rel_l2(out, ref)
    assert err <= TOLERANCE[dtype], f"relative L2 error {err:.3e}"
    return out


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_reductions(backend, device, reduce, heads, pass2_layout):
    q, k = make_qk(2, 4, 2, 24, 40, 32, torch.float16, device)
    check(q, k, backend, torch.float16, is_causal=True, reduce=reduce, heads=heads)


@pytest.mark.parametrize("rows", [slice(-5, None), slice(0, 3), range(4, 17), None], ids=["last5", "first3", "range4-17", "all"])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_visible_normalization(backend, device, rows):
    # Sq < Sk and Sq > Sk: rows that see each key differ from the selected rows.
    for sq, sk in ((20, 45), (30, 18)):
        q, k = make_qk(2, 4, 1, sq, sk, 16, torch.float32, device)
        check(q, k, backend, is_causal=True, normalize="visible", rows=rows, heads="kv_mean")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_row_mask_and_padding(backend, device, causal):
    b, sq, sk = 3, 26, 26
    q, k = make_qk(b, 4, 2, sq, sk, 24, torch.float32, device, seq_major=True)
    lengths = torch.tensor([26, 17, 9])
    key_pad = (torch.arange(sk)[None] < lengths[:, None]).to(device)  # right padding
    query_pad = key_pad.to(torch.int64)  # transformers passes 0/1 integers
    row_mask = (torch.rand(b, sq) < 0.4).to(device)
    check(q, k, backend, is_causal=causal, key_padding_mask=key_pad, query_padding_mask=query_pad)
    check(q, k, backend, is_causal=causal, key_padding_mask=key_pad, row_mask=row_mask, reduce="max", heads="none")
    out = check(q, k, backend, is_causal=causal, key_padding_mask=key_pad, rows=slice(-6, None), normalize="visible")
    assert (out[key_pad == 0] == 0).all()


@pytest.mark.parametrize("backend,device", TARGETS)
def test_left_padding_all_masked_rows(backend, device):
    """Left padding: padded query rows see only padded keys; they must add nothing (not NaN)."""
    q, k = make_qk(2, 2, 2, 12, 12, 16, torch.float32, device)
    keep = torch.ones(2, 12, dtype=torch.bool, device=device)
    keep[1, :5] = False
    out = check(q, k, backend, is_causal=True, key_padding_mask=keep, query_padding_mask=keep)
    torch.testing.assert_close(out.sum(dim=1).cpu(), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_varlen(backend, device, causal):
    lens_q, lens_k = [7, 1, 19, 0, 12], [9, 5, 19, 4, 40]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), 4, 32, device=device)
    k = torch.randn(sum(lens_k), 2, 32, device=device)
    for kwargs in (dict(), dict(heads="kv_sum", rows=slice(-3, None)), dict(heads="none", reduce="max")):
        check(q, k, backend, is_causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kwargs)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_lse_reuse(backend, device):
    q, k = make_qk(2, 4, 2, 30, 50, 32, torch.float16, device)
    kwargs = dict(is_causal=True, rows=slice(-8, None), heads="kv_mean", normalize="visible")
    stats, lse = column_stats(q, k, return_lse=True, backend=backend, **kwargs)
    assert lse.shape == (2, 4, 30) and lse.dtype == torch.float32
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 32**0.5
    hidden = torch.ones(30, 50, dtype=torch.bool, device=device).triu(50 - 30 + 1)
    ref_lse = torch.logsumexp(scores.masked_fill(hidden, float("-inf")), dim=-1)
    assert rel_l2(lse, ref_lse) <= 1e-6
    reused = column_stats(q, k, lse=lse, backend=backend, **kwargs)
    torch.testing.assert_close(reused, stats, rtol=1e-6, atol=1e-7)
    # An LSE with padding columns beyond Sq (as SDPA's memory-efficient kernel returns) is accepted.
    padded = torch.cat([lse, torch.full_like(lse[..., :2], float("nan"))], dim=-1)
    torch.testing.assert_close(column_stats(q, k, lse=padded, backend=backend, **kwargs), stats, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_lse_reuse_varlen(backend, device):
    cu = torch.tensor([0, 10, 31], dtype=torch.int32, device=device)
    q, k = torch.randn(31, 2, 16, device=device), torch.randn(31, 1, 16, device=device)
    stats, lse = column_stats(q, k, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True, return_lse=True, backend=backend)
    assert lse.shape == (2, 31)
    again = column_stats(q, k, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True, lse=lse, backend=backend)
    torch.testing.assert_close(again, stats, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_accumulate_across_steps(backend, device):
    """H2O: running sums of attention received, one decoding step at a time."""
    k = torch.randn(1, 2, 20, 16, device=device)
    total = torch.zeros(1, 2, 20, device=device)
    steps = [torch.randn(1, 4, 1, 16, device=device) for _ in range(3)]
    for q in steps:
        out = column_stats(q, k, heads="kv_sum", reduce="sum", accumulate_into=total, backend=backend)
        assert out is total
    expected = sum(reference_column_stats(q.cpu(), k.cpu(), heads="kv_sum", reduce="sum") for q in steps)
    assert rel_l2(total, expected) <= 1e-5


@pytest.mark.parametrize("heads,reduce,one_launch", [
    ("mean", "mean", True), ("kv_sum", "sum", True), ("max", "max", True),  # partials join the head reduction
    ("none", "mean", False), ("kv_max", "mean", False),  # several row blocks per head: two passes
])
@pytest.mark.parametrize("backend,device", [t for t in TARGETS if t[0] == "triton"])
def test_small_calls_fuse_both_passes(backend, device, heads, reduce, one_launch, monkeypatch):
    """A small call runs both passes in one launch where its result layout allows."""
    import flash_colsum.triton_backend as tb

    launches = []
    launch = tb._launch_row_blocks
    monkeypatch.setattr(tb, "_launch_row_blocks", lambda *a, **kw: launches.append(kw.get("fused")) or launch(*a, **kw))
    q, k = make_qk(2, 4, 2, 300, 70, 32, torch.float16, device)  # 300 rows: several row blocks on any device
    check(q, k, backend, torch.float16, is_causal=True, heads=heads, reduce=reduce, key_padding_mask=torch.rand(2, 70, device=device) < 0.9)
    assert (launches == [True]) == one_launch, launches


@pytest.mark.parametrize("d,sq,hopper,fused", [(64, 4096, False, True), (64, 8192, False, False), (128, 2048, False, True),
                                            (128, 4096, False, False), (128, 4096, True, True), (72, 8192, True, False)])
def test_fused_size_limit_depends_on_head_dim(d, sq, hopper, fused):
    """One launch up to 2**28 scores at D <= 64 and 2**27 above, 2**28 at every D on the Hopper
    kernel (measured limits, NOTES v11/v12/v15)."""
    pytest.importorskip("triton")
    import flash_colsum.triton_backend as tb
    from flash_colsum.utils import Problem

    p = Problem(batch=1, heads=16, kv_heads=16, q_len=sq, k_len=sq, head_dim=d, scale=d**-0.5, causal=False,
                row_start=0, row_end=sq, backend="triton")
    # A device with many SMs' worth of programs: pass 1 would not split the keys.
    assert tb._use_fused(p, 10**6, 128, torch.device("cpu"), hopper) == fused


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,device", [t for t in TARGETS if t[0] == "triton"])
def test_few_rows_from_stored_scores(backend, device, causal, monkeypatch):
    """Few rows over long keys: pass 1 stores the scores and the weights come from them (no second
    pass over K), with key splits, key padding, row masks, GQA head reductions and row windows."""
    import flash_colsum.triton_backend as tb

    monkeypatch.setattr(tb, "SCORES_MIN_KEYS", 0)  # the shapes here are small,
    monkeypatch.setattr(tb, "_use_fused", lambda *args: False)  # so a GPU would fuse them
    taken = record_taken(monkeypatch, "scores_reduce")
    b, sk = 2, 300  # several key splits under the interpreter
    q, k = make_qk(b, 4, 2, 5, sk, 64, torch.float16, device, seq_major=True)  # 5 rows * 8 <= D
    key_pad = (torch.arange(sk)[None] < torch.tensor([300, 171])[:, None]).to(device)
    row_mask = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]], device=device)
    for kwargs in (dict(), dict(key_padding_mask=key_pad, reduce="max", heads="none"),
                   dict(row_mask=row_mask, heads="kv_sum", reduce="sum"), dict(rows=slice(-2, None), heads="kv_max"),
                   dict(key_padding_mask=key_pad, row_mask=row_mask, normalize="visible")):
        taken.clear()
        check(q, k, backend, torch.float16, is_causal=causal, **kwargs)
        assert taken == [True], kwargs
    # Past the break-even (8 bytes per row and key against 2 * D per key) both passes run as before.
    from flash_colsum.utils import Problem

    nine_rows = Problem(batch=1, heads=4, kv_heads=2, q_len=9, k_len=sk, head_dim=64, scale=0.125, causal=False,
                        row_start=0, row_end=9, backend="triton")
    assert tb._keeps_scores(nine_rows.with_rows(0, 8)) and not tb._keeps_scores(nine_rows)
