"""Memoized plans: a repeated call signature skips the checks and the launch arithmetic, and nothing
that changes an answer or an error hides behind a memo."""

import pytest
import torch

from flash_colsum import column_stats, ops
from flash_colsum import utils as fc_utils
from flash_colsum.reference import reference_column_stats
from helpers import TOLERANCE, make_qk, rel_l2
from conftest import HAS_CUDA, TARGETS


@pytest.fixture
def validations(monkeypatch):
    """Counts the calls that ran the full checks (`ops._validated_plan`), with an empty memo."""
    calls = []
    original = ops._validated_plan
    monkeypatch.setattr(ops, "_PLANS", {})
    monkeypatch.setattr(ops, "_validated_plan", lambda *args: calls.append(args) or original(*args))
    return calls


def test_a_repeated_signature_is_checked_once(validations):
    q, k = make_qk(2, 4, 2, 12, 20, 16)
    first = column_stats(q, k, backend="torch")
    again = column_stats(*make_qk(2, 4, 2, 12, 20, 16), backend="torch")  # other values, same signature
    assert len(validations) == 1
    assert not torch.equal(first, again)


# Each differs from the base call in one keyed argument; 1 and 1.0 are equal in Python, as are
# slice(0, 3) and range(0, 3)'s bounds, but they are different arguments.
VARIANTS = [
    dict(scale=0.5), dict(scale=1), dict(scale=1.0), dict(is_causal=True), dict(reduce="max"), dict(heads="none"),
    dict(normalize="visible"), dict(rows=slice(0, 3)), dict(rows=range(0, 3)), dict(rows=slice(0, 4)),
    dict(rows=slice(-3, None)),
]


def test_every_keyed_argument_splits_the_memo(validations):
    q, k = make_qk(2, 4, 2, 12, 20, 16)
    column_stats(q, k, backend="torch")
    for n, kwargs in enumerate(VARIANTS, start=2):
        out = column_stats(q, k, backend="torch", **kwargs)
        assert len(validations) == n, kwargs
        ref = reference_column_stats(q, k, **kwargs)
        assert rel_l2(out, ref) <= TOLERANCE[torch.float32], kwargs
    for shape in ((2, 4, 2, 12, 21, 16), (2, 4, 4, 12, 20, 16), (2, 4, 2, 13, 20, 16), (3, 4, 2, 12, 20, 16)):
        column_stats(*make_qk(*shape), backend="torch")
    column_stats(q.half(), k.half(), backend="torch")  # another dtype
    assert len(validations) == len(VARIANTS) + 1 + 4 + 1


@pytest.mark.parametrize("kwargs, exc", [
    (dict(reduce="median"), ValueError), (dict(rows=slice(5, 5)), ValueError), (dict(scale=-1.0), ValueError),
    (dict(rows=slice(0, 2.5)), TypeError), (dict(rows=3), TypeError), (dict(is_causal=1), TypeError),
])
def test_errors_raise_on_every_call(validations, kwargs, exc):
    q, k = make_qk(2, 4, 2, 12, 20, 16)
    for _ in range(3):
        with pytest.raises(exc):
            column_stats(q, k, backend="torch", **kwargs)
    assert ops._PLANS == {}


def test_argument_types_outside_the_memo_still_work(validations):
    """A numpy-like scale (or any non-plain argument) takes the checks every time and is right."""
    q, k = make_qk(2, 4, 2, 12, 20, 16)
    scale = torch.tensor(0.3).item()  # a float: memoized
    column_stats(q, k, backend="torch", scale=scale)
    column_stats(q, k, backend="torch", scale=scale)
    assert len(validations) == 1

    class Half(float):
        pass

    for _ in range(2):
        out = column_stats(q, k, backend="torch", scale=Half(0.5))
    assert len(validations) == 3
    assert rel_l2(out, reference_column_stats(q, k, scale=0.5)) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(HAS_CUDA, reason="the Triton back end on CPU tensors needs the interpreter")
def test_interpreter_switched_off_after_a_memoized_call(validations, monkeypatch):
    q, k = make_qk(1, 2, 2, 8, 8, 16)
    column_stats(q, k, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="cannot run here"):
        column_stats(q, k, backend="triton")


@pytest.mark.parametrize("backend,device", TARGETS)
def test_layouts_of_one_shape_alternate(backend, device, pass2_layout):
    """The launch plans are keyed by strides: contiguous and (B, S, H, D) views of one shape, in
    turn, each against float64."""
    for _ in range(2):
        for seq_major in (False, True):
            q, k = make_qk(2, 4, 2, 20, 36, 24, torch.float16, device, seq_major=seq_major)
            out = column_stats(q, k, backend=backend, heads="kv_sum")
            ref = reference_column_stats(q.cpu(), k.cpu(), heads="kv_sum")
            assert rel_l2(out, ref) <= TOLERANCE[torch.float16], (seq_major, pass2_layout)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_broadcast_key_padding_mask(backend, device, pass2_layout):
    """A (B, Sk) mask expanded from one row has batch stride 0: still a mask, still per key."""
    q, k = make_qk(3, 4, 2, 18, 30, 16, torch.float32, device)
    keep = (torch.rand(1, 30) < 0.7).to(device)
    keep[0, 0] = True
    mask = keep.expand(3, 30)
    assert mask.stride(0) == 0
    out = column_stats(q, k, backend=backend, key_padding_mask=mask, heads="none", reduce="max")
    ref = reference_column_stats(q.cpu(), k.cpu(), key_padding_mask=mask.cpu(), heads="none", reduce="max")
    assert rel_l2(out, ref) <= TOLERANCE[torch.float32]
    assert (out[mask[:, None, :].expand_as(out) == 0] == 0).all()
    # Strides (0, 0): a mask that drops every key is still a mask (no row sees a key: LSE +inf, zeros).
    none = torch.tensor(False, device=device).expand(3, 30)
    out, lse = column_stats(q, k, backend=backend, key_padding_mask=none, heads="none", return_lse=True)
    assert torch.equal(out.cpu(), torch.zeros(3, 4, 30))
    assert torch.equal(lse.cpu(), torch.full((3, 4, 18), float("inf")))
