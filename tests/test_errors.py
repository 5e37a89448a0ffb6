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
        (dict(scale=0.0), ValueError, "scale must be finite and positive; got 0.0"),
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
