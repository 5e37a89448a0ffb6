"""Every bad input gets a clear TypeError/ValueError naming the argument."""

import pytest
import torch

from flash_colsum import flash_colsum, naive_colsum


def qk(q_shape=(2, 4, 8, 16), k_shape=(2, 2, 10, 16), dtype=torch.float16):
    return torch.randn(q_shape).to(dtype), torch.randn(k_shape).to(dtype)


@pytest.mark.parametrize("fn", [flash_colsum, naive_colsum])
@pytest.mark.parametrize(
    "q_shape,k_shape,match",
    [
        ((4, 8, 16), (2, 2, 10, 16), r"query must be 4-D .*\(4, 8, 16\)"),
        ((2, 4, 8, 16), (2, 10, 16), r"key must be 4-D .*\(2, 10, 16\)"),
        ((2, 4, 8, 16), (3, 2, 10, 16), r"batch sizes differ.*\(2, 4, 8, 16\).*\(3, 2, 10, 16\)"),
        ((2, 4, 8, 16), (2, 2, 10, 32), r"head dims differ.*D=16.*D=32"),
        ((2, 4, 8, 16), (2, 3, 10, 16), r"H=4 must be a multiple of key heads Hk=3"),
        ((2, 4, 0, 16), (2, 2, 10, 16), r"query has no rows"),
        ((2, 4, 8, 0), (2, 2, 10, 0), r"head dim must be at least 1"),
        ((2, 0, 8, 16), (2, 0, 10, 16), r"head counts must be positive"),
    ],
)
def test_bad_shapes(fn, q_shape, k_shape, match):
    q, k = qk(q_shape, k_shape)
    with pytest.raises(ValueError, match=match):
        fn(q, k)


def test_bad_types_and_dtypes():
    q, k = qk()
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        flash_colsum([1.0], k)
    with pytest.raises(TypeError, match="query and key must share a dtype"):
        flash_colsum(q, k.float())
    with pytest.raises(TypeError, match="query must have dtype"):
        flash_colsum(q.to(torch.int32), k.to(torch.int32))
    with pytest.raises(TypeError, match="query must have dtype"):
        flash_colsum(q.double(), k.double())  # float64 only in the reference
    assert naive_colsum(q.double(), k.double()).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(cls_len=0), ValueError, "cls_len must be a positive int; got 0"),
        (dict(cls_len=-2), ValueError, "cls_len"),
        (dict(cls_len=1.0), TypeError, "cls_len must be a positive int or None; got float"),
        (dict(cls_len=True), TypeError, "cls_len"),
        (dict(scale=0.0), ValueError, r"scale must be finite and positive \(or None\); got 0.0"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(scale="0.1"), TypeError, "scale must be a real number"),
        (dict(is_causal=1), TypeError, "is_causal must be a bool"),
        (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'torch'\); got 'cuda'"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q, k = qk()
    with pytest.raises(exc, match=match):
        flash_colsum(q, k, **kwargs)


def test_devices_differ():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    q, k = qk()
    with pytest.raises(ValueError, match="one device"):
        flash_colsum(q.cuda(), k)


def test_triton_refused_where_it_cannot_run(monkeypatch):
    q, k = qk()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: tensors are on cpu"):
        flash_colsum(q, k, backend="triton")


def test_triton_head_dim_limit():
    q, k = qk((1, 1, 4, 257), (1, 1, 4, 257))
    if torch.cuda.is_available():  # otherwise the CPU interpreter runs Triton (conftest)
        q, k = q.cuda(), k.cuda()
    with pytest.raises(ValueError, match="head dims up to 256; got D=257"):
        flash_colsum(q, k, backend="triton")
    assert flash_colsum(q, k, backend="torch").shape == (1, 4)


# column_stats: every new argument is validated.
def _stats_call(**kwargs):
    from flash_colsum import column_stats

    q, k = qk()
    return column_stats(q, k, **kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(reduce="median"), ValueError, r"reduce must be one of \('sum', 'mean', 'max'\); got 'median'"),
        (dict(normalize="keys"), ValueError, "normalize must be one of"),
        (dict(normalize="visible", reduce="max"), ValueError, "applies to reduce='mean' only"),
        (dict(heads="min"), ValueError, "heads must be one of"),
        (dict(rows=slice(0, 2), row_mask=torch.ones(2, 8, dtype=torch.bool)), ValueError, "rows or row_mask, not both"),
        (dict(rows=[0, 1]), TypeError, "rows must be a slice, a range or None; got list"),
        (dict(rows=slice(0, 8, 2)), ValueError, r"contiguous \(step 1\)"),
        (dict(rows=slice(5, 5)), ValueError, "selects no query row of Sq=8"),
        (dict(rows=slice(0.5, 3)), TypeError, "int bounds"),
        (dict(row_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, r"row_mask must have shape \(2, 8\); got \(2, 9\)"),
        (dict(key_padding_mask=torch.ones(2, 8, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(2, 10\); got \(2, 8\)"),
        (dict(query_padding_mask=torch.ones(2, 8)), TypeError, "query_padding_mask must be bool or integer"),
        (dict(key_padding_mask=[[1] * 10] * 2), TypeError, "key_padding_mask must be a torch.Tensor"),
        (dict(lse=torch.zeros(2, 4, 7)), ValueError, r"lse must be \(B, H, Sq\) = \(2, 4, 8\)"),
        (dict(lse=torch.zeros(2, 4, 8, dtype=torch.float16)), TypeError, "lse must be torch.float32"),
        (dict(accumulate_into=torch.zeros(2, 8)), ValueError, r"accumulate_into must have the result's shape \(2, 10\)"),
        (dict(accumulate_into=torch.zeros(2, 10, dtype=torch.float64)), TypeError, "accumulate_into must be torch.float32"),
        (dict(heads="none", accumulate_into=torch.zeros(2, 10)), ValueError, r"shape \(2, 4, 10\)"),
    ],
)
def test_bad_stats_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _stats_call(**kwargs)


def _packed(lens_q=(3, 5), lens_k=(4, 6)):
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return torch.randn(sum(lens_q), 2, 8), torch.randn(sum(lens_k), 1, 8), cu(lens_q), cu(lens_k)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: {**a, "cu_seqlens_k": None}, ValueError, "give both cu_seqlens_q and cu_seqlens_k"),
        (lambda a: {**a, "cu_seqlens_q": torch.tensor([0, 5, 3, 8], dtype=torch.int32), "cu_seqlens_k": torch.tensor([0, 4, 6, 10], dtype=torch.int32)}, ValueError, "cu_seqlens_q must be non-decreasing"),
        (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 4, 9], dtype=torch.int32)}, ValueError, "cu_seqlens_k must end at the packed length 10; got 9"),
        (lambda a: {**a, "cu_seqlens_q": torch.tensor([1, 3, 8], dtype=torch.int32)}, ValueError, "must start at 0"),
        (lambda a: {**a, "cu_seqlens_q": torch.tensor([0.0, 3, 8])}, TypeError, "cu_seqlens_q must be a 1-D int32/int64 tensor"),
        (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 10], dtype=torch.int32)}, ValueError, "as many sequences; got 2 and 1"),
        (lambda a: {**a, "key_padding_mask": torch.ones(2, 6, dtype=torch.bool)}, ValueError, "key_padding_mask does not apply to packed"),
        (lambda a: {**a, "query": a["query"][None]}, ValueError, r"query must be 3-D \(total, heads, D\)"),
        (lambda a: {**a, "lse": torch.zeros(2, 7)}, ValueError, r"lse must be \(H, total_q\) = \(2, 8\)"),
    ],
)
def test_bad_varlen(change, exc, match):
    from flash_colsum import column_stats

    q, k, cu_q, cu_k = _packed()
    args = change(dict(query=q, key=k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k))
    with pytest.raises(exc, match=match):
        column_stats(**args)
