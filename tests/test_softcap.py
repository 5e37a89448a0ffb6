"""Logit soft-capping (Gemma 2): scores softcap * tanh(scale * q . k / softcap) before the softmax,
on every back end and kernel path, against the float64 reference."""

import pytest
import torch
import triton
import triton.language as tl

from flash_colsum import column_stats
from flash_colsum.reference import attention_weights, reference_column_stats
from flash_colsum.triton_backend import _soft_cap
from helpers import TOLERANCE, lse_reference, make_qk, rel_l2
from conftest import TARGETS

CAP = 2.0  # small against the scores below (std ~3): tanh saturates, so capping changes the result


def _qk(b, h, hk, sq, sk, d, dtype, device):
    q, k = make_qk(b, h, hk, sq, sk, d, dtype, device)
    return q * 3, k  # scores of std ~3 at scale 1/sqrt(D)


def _check(q, k, backend, dtype, **kwargs):
    got = column_stats(q, k, softcap=CAP, backend=backend, **kwargs)
    on_cpu = {name: v.cpu() if torch.is_tensor(v) else v for name, v in kwargs.items()}  # the reference's masks
    want = reference_column_stats(q.cpu(), k.cpu(), softcap=CAP, **on_cpu)
    assert rel_l2(got, want) <= TOLERANCE[dtype], kwargs
    # The cap matters at these scores: without it the statistic is another one (a test that can fail).
    assert rel_l2(reference_column_stats(q.cpu(), k.cpu(), **on_cpu), want) > 100 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_softcap_matches_reference(backend, device, dtype):
    """Both passes, fused small calls, causal masks, GQA, key padding, rows and every reduction."""
    q, k = _qk(2, 4, 2, 40, 72, 40, dtype, device)  # D = 32 + 8: a head-dim tail block
    keep = torch.rand(2, 72, device=device) < 0.8
    for kwargs in (dict(), dict(is_causal=True), dict(reduce="max", heads="none"),
                   dict(key_padding_mask=keep, heads="kv_sum", reduce="sum"), dict(rows=slice(-7, None))):
        _check(q, k, backend, dtype, **kwargs)


@pytest.mark.parametrize("backend,device", [t for t in TARGETS if t[0] == "triton"])
def test_softcap_on_every_triton_path(backend, device, monkeypatch):
    """Pass 1 then the key-centric pass 2 (not fused; more rows than the interpreter's row-stationary
    pass 2 takes, 4 blocks of 16), and pass 1's stored scores for few rows."""
    import flash_colsum.triton_backend as tb

    q, k = _qk(1, 2, 1, 80, 150, 32, torch.float32, device)
    monkeypatch.setattr(tb, "_use_fused", lambda *args: False)
    _check(q, k, backend, torch.float32, is_causal=True)
    monkeypatch.setattr(tb, "SCORES_MIN_KEYS", 0)
    taken = []
    original = tb.scores_reduce
    monkeypatch.setattr(tb, "scores_reduce", lambda *a, **kw: (lambda out: taken.append(out is not None) or out)(original(*a, **kw)))
    _check(q, k, backend, torch.float32, rows=slice(0, 3))  # 3 rows * 8 <= D: scores stored once
    assert taken == [True]


@pytest.mark.parametrize("backend,device", TARGETS)
def test_softcap_lse(backend, device):
    """The returned LSE is the capped scores' one, and given back it reproduces the statistic."""
    q, k = _qk(1, 2, 2, 20, 30, 16, torch.float32, device)
    stats, lse = column_stats(q, k, softcap=CAP, return_lse=True, heads="none", backend=backend)
    scores = CAP * torch.tanh(q.double().cpu() @ k.double().cpu().transpose(-1, -2) / 4 / CAP)
    assert rel_l2(lse, torch.logsumexp(scores, dim=-1)) <= 1e-6
    again = column_stats(q, k, softcap=CAP, lse=lse, heads="none", backend=backend)
    assert rel_l2(again, stats) <= 1e-6
    w = attention_weights(q.cpu(), k.cpu(), softcap=CAP)
    assert rel_l2(stats, w.mean(dim=2)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_softcap_gradients(backend, device, dtype):
    """Gradients through the cap (its slope 1 - tanh^2 on dL/ds), of the statistic and of a returned
    LSE, against autograd through the float64 reference; with a causal sliding window as Gemma 2's
    local layers, a row range and grouped-query heads. Without the slope they differ (can fail)."""
    q, k = _qk(1, 4, 2, 70, 150, 16, dtype, device)
    for kwargs in (dict(is_causal=True, window=37, heads="kv_mean"), dict(rows=slice(20, 60), is_causal=True),
                   dict(reduce="sum", heads="none")):
        out_shape = reference_column_stats(q.cpu(), k.cpu(), softcap=CAP, **kwargs).shape
        grad = torch.randn(out_shape, dtype=torch.float64)
        grad_lse = torch.randn(1, 4, 70, dtype=torch.float64)
        found = []
        for double in (False, True):
            qq, kk = (q.cpu().double(), k.cpu().double()) if double else (q, k)
            qq, kk = qq.detach().requires_grad_(), kk.detach().requires_grad_()
            if double:
                out = reference_column_stats(qq, kk, softcap=CAP, **kwargs)
                lse = lse_reference(qq, kk, qq.shape[-1] ** -0.5, causal=kwargs.get("is_causal", False),
                                    window=kwargs.get("window"), softcap=CAP)
            else:
                out, lse = column_stats(qq, kk, softcap=CAP, backend=backend, return_lse=True, **kwargs)
            # fp16 gradients of a mean are tiny (subnormal): scale the loss, as fp16 training does
            loss = (out * grad.to(out.device, out.dtype)).sum() * 1e4 + (lse * grad_lse.to(lse.device, lse.dtype)).sum()
            found.append(torch.autograd.grad(loss, (qq, kk)))
        for got, want in zip(*found):
            assert rel_l2(got.cpu(), want) <= (1e-5 if dtype == torch.float32 else 2e-3), kwargs
    # The cap matters for the gradient too: the uncapped one is another (a test that can fail).
    qq = q.cpu().double().requires_grad_()
    capped = torch.autograd.grad((reference_column_stats(qq, k.cpu().double(), softcap=CAP, **kwargs) * grad).sum(), qq)[0]
    plain = torch.autograd.grad((reference_column_stats(qq, k.cpu().double(), **kwargs) * grad).sum(), qq)[0]
    assert rel_l2(plain, capped) > 0.1


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                       (float("nan"), ValueError), ("50", TypeError), (True, TypeError)])
def test_bad_softcap(bad, error):
    q, k = make_qk(1, 1, 1, 4, 4, 8)
    with pytest.raises(error, match="softcap"):
        column_stats(q, k, softcap=bad, backend="torch")


def test_hopper_path_takes_softcap(monkeypatch):
    """Checked on the CPU with the capability faked: both Gluon passes cap the scores too (their GPU
    test: test_hopper.py::test_soft_capped_scores_on_both_passes); capped small calls fuse on the
    portable kernel, and capped windows above D=128 stay there."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from flash_colsum import hopper
    from flash_colsum.utils import make_problem

    monkeypatch.setattr(hopper, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    q, k = make_qk(1, 2, 2, 256, 256, 64, torch.float16)
    capped = make_problem(q, k, None, False, "torch", softcap=50.0)
    assert hopper.supports(q, k, capped, "lse") and hopper.supports(q, k, capped, "columns")
    assert not hopper.supports(q, k, capped, "fused")
    q, k = make_qk(1, 2, 2, 256, 256, 192, torch.float16)
    assert hopper.supports(q, k, make_problem(q, k, None, True, "torch", window=64))
    assert not hopper.supports(q, k, make_problem(q, k, None, True, "torch", window=64, softcap=50.0))


@triton.jit
def _cap_kernel(s_ptr, out_ptr, n, R: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _soft_cap(tl.load(s_ptr + offs, mask=offs < n), R), mask=offs < n)


@pytest.mark.parametrize("device", [t[1] for t in TARGETS if t[0] == "triton"])
def test_soft_cap_numerics(device):
    """The kernels' R tanh(s / R) (an exp2 and a Newton reciprocal) against float64 tanh, elementwise:
    within float32 rounding of R over small, saturating, infinite and NaN scores."""
    R = 7.0
    s = torch.cat([torch.randn(3000) * R * 3, torch.randn(1000) * 1e-3, torch.linspace(-40 * R, 40 * R, 4001),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3e38, -3e38])])
    out = torch.full_like(s, float("nan"), device=device)
    _cap_kernel[(triton.cdiv(s.numel(), 1024),)](s.to(device), out, s.numel(), R, BLOCK=1024)
    want = R * torch.tanh(s.double() / R)
    finite = ~s.isnan()
    assert out.cpu()[~finite].isnan().all()
    assert (out.cpu()[finite].double() - want[finite]).abs().max() <= 4e-7 * R
