"""Gradients of the column statistics through the softmax, against float64 autograd through the
materializing reference."""

import pytest
import torch

import flash_colsum
from flash_colsum import column_stats, flash_colsum as colsum
from flash_colsum.ops import reduce_columns_backward_op, reduce_columns_op
from flash_colsum.reference import reference_column_stats
from helpers import make_qk, rel_l2
from conftest import TARGETS

# fp16/bf16 gradients are rounded to the input dtype (2**-11 / 2**-8 relative per element).
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(params=[False, True], ids=["tf32-products", "16bit-products"])
def grad_products(request, monkeypatch):
    """The Triton backward's gradient products both ways (`backward.GRAD_IN_INPUT_DTYPE`)."""
    from flash_colsum import backward

    monkeypatch.setattr(backward, "GRAD_IN_INPUT_DTYPE", request.param)
    return request.param


def grads(fn, q, k, out_weights=None):
    """(result, dq, dk, upstream weights) of sum(fn(q, k) * weights) for random upstream weights."""
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    out = fn(q, k)
    if out_weights is None:
        out_weights = torch.randn(out.shape, dtype=torch.float64)
    (out * out_weights.to(out.device, out.dtype)).sum().backward()
    return out, q.grad, k.grad, out_weights


def check_against_reference(q, k, backend, tol=None, **kwargs):
    out, dq, dk, weights = grads(lambda q, k: column_stats(q, k, backend=backend, **kwargs), q, k)
    cpu_kwargs = {name: value.cpu() if torch.is_tensor(value) else value for name, value in kwargs.items()}
    ref, ref_dq, ref_dk, _ = grads(lambda q, k: reference_column_stats(q, k, **cpu_kwargs), q.cpu().double(),
                                   k.cpu().double(), weights)
    tol = tol or GRAD_TOLERANCE[q.dtype]
    assert dq.dtype == q.dtype and dk.dtype == k.dtype
    assert rel_l2(out, ref) <= max(tol, 1e-4)
    assert rel_l2(dq, ref_dq) <= tol and rel_l2(dk, ref_dk) <= tol


CASES = [
    dict(),
    dict(is_causal=True, heads="kv_sum", reduce="sum"),
    dict(is_causal=True, rows=slice(-5, None), heads="kv_mean", normalize="visible"),
    dict(rows=slice(2, 9), heads="none"),
    dict(heads="max"),  # the head max is outside the operator: torch differentiates it
    dict(row_mask="random", key_padding_mask="random", heads="sum"),
]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_float64(backend, device, case, dtype, grad_products):
    if grad_products and (backend == "torch" or dtype == torch.float32):
        pytest.skip("the switch applies to the Triton back end's 16-bit inputs only")
    q, k = make_qk(2, 4, 2, 19, 37, 24, dtype, device)
    kwargs = dict(CASES[case])
    if kwargs.get("row_mask") == "random":
        kwargs["row_mask"] = torch.rand(2, 19, device=device) < 0.7
        kwargs["key_padding_mask"] = torch.rand(2, 37, device=device) < 0.8
    check_against_reference(q, k, backend, **kwargs)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("sq,sk", [(150, 140), (90, 40)])  # several blocks of rows and keys; rows that see no key
def test_gradients_over_many_blocks(backend, device, sq, sk, grad_products):
    q, k = make_qk(2, 4, 2, sq, sk, 40, torch.bfloat16, device, seq_major=True)  # (B, S, H, D) memory
    keep = torch.rand(2, sk, device=device) < 0.9
    check_against_reference(q, k, backend, is_causal=True, rows=slice(5, None), key_padding_mask=keep, heads="kv_sum",
                            reduce="sum")


@pytest.mark.parametrize("backend,device", TARGETS)
# Every block configuration of the Triton kernels, split head dims (72 = 64 + 16, 96 = 64 + 32,
# 192 = 128 + 64) and rows that are not 16-byte aligned (D=36).
@pytest.mark.parametrize("d", [36, 72, 96, 128, 192, 256])
def test_gradients_at_head_dims(backend, device, d, grad_products):
    q, k = make_qk(1, 4, 4, 70, 150, d, torch.float16, device)
    check_against_reference(q, k, backend, is_causal=True, heads="none")


@pytest.mark.parametrize("backend,device", TARGETS)
def test_gradients_over_several_key_tiles(backend, device):
    """A budget that splits the keys: D_i then comes from a first sweep over the key tiles."""
    q, k = make_qk(1, 32, 8, 6, 3000, 16, torch.float32, device)
    old = flash_colsum.get_memory_budget()
    flash_colsum.set_memory_budget(2**20)  # 2048 scores of 32 heads per tile: two key tiles
    try:
        check_against_reference(q, k, backend, is_causal=True, heads="kv_mean")
    finally:
        flash_colsum.set_memory_budget(old)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_large_upstream_gradients(backend, device, grad_products):
    """dL/ds past fp16's range while dq and dk stay inside it: one row splits its weight evenly
    between two keys whose upstream gradients are +-2e5, so dL/ds = +-1e5 (fp16 tops out at 65504)
    and dq, dk ~ 1e4. 16-bit products must rescale dL/ds first."""
    q = torch.rand(1, 1, 1, 16, dtype=torch.float64) - 0.5
    k0 = torch.randn(16, dtype=torch.float64)
    across = torch.randn(16, dtype=torch.float64)
    across -= (across @ q[0, 0, 0]) / (q[0, 0, 0] @ q[0, 0, 0]) * q[0, 0, 0]  # q . (k1 - k0) = 0: equal scores
    k = torch.stack([k0, k0 + 0.1 * across])[None, None]
    q, k = q.to(device, torch.float16), k.to(device, torch.float16)
    weights = torch.tensor([[2e5, -2e5]], dtype=torch.float64)
    fn = lambda q, k, **kw: column_stats(q, k, reduce="sum", heads="sum", **kw)  # noqa: E731
    _, dq, dk, _ = grads(lambda q, k: fn(q, k, backend=backend), q, k, weights)
    _, ref_dq, ref_dk, _ = grads(lambda q, k: reference_column_stats(q, k, reduce="sum", heads="sum"), q.cpu().double(),
                                 k.cpu().double(), weights)
    assert ref_dq.abs().max() < 6e4 and ref_dk.abs().max() < 6e4  # the gradients themselves fit fp16
    # dq cancels: +-1e5 * (k0, k1) with k1 - k0 small, so the 2**-11 rounding of each dL/ds (16-bit
    # or tf32 products alike) shows ~10x larger relative to dq than to its terms. Overflow gives inf.
    assert rel_l2(dq, ref_dq) <= 2e-2 and rel_l2(dk, ref_dk) <= 1e-3


@pytest.mark.parametrize("backend,device", TARGETS)
def test_tiny_upstream_gradients(backend, device, grad_products):
    """dL/ds below fp16's subnormal spacing (6e-8) while dk, a sum over 4096 rows, is a normal fp16
    number: two equal keys take half of every row's weight, upstream gradients +-4e-7 give dL/ds =
    +-2e-7 and dk ~ 1e-4. 16-bit products must scale dL/ds up first (~10% off otherwise)."""
    q = torch.rand(1, 1, 4096, 16, device=device).to(torch.float16)  # positive: the rows' terms add up
    k = torch.randn(1, 1, 1, 16, device=device).to(torch.float16).expand(1, 1, 2, 16).contiguous()
    weights = torch.tensor([[4e-7, -4e-7]], dtype=torch.float64)
    fn = lambda q, k, **kw: column_stats(q, k, reduce="sum", heads="sum", **kw)  # noqa: E731
    _, _, dk, _ = grads(lambda q, k: fn(q, k, backend=backend), q, k, weights)
    _, _, ref_dk, _ = grads(lambda q, k: reference_column_stats(q, k, reduce="sum", heads="sum"), q.cpu().double(),
                            k.cpu().double(), weights)
    assert ref_dk.abs().min() > 6.2e-5  # normal fp16 numbers
    assert rel_l2(dk, ref_dk) <= 1e-3


@pytest.mark.parametrize("backend,device", TARGETS)
def test_diffuse_weights_over_many_keys(backend, device, grad_products):
    """Weights ~1/Sk over 16384 keys: dL/ds is ~5e-6 of the bound |row_w| max|G| + |c|, under fp16's
    smallest normal number once divided by it. The 16-bit products must scale by the row's largest
    weight too (a loss-scaled fp16 backward: upstream gradients ~2**12, dq and dk normal numbers).
    Rounding dq to fp16 alone costs 2e-4, dL/ds's rounding ~2e-4 more; without the largest weight
    in the bound dq was 6.8e-4 off. (tf32 products: ~5e-4 on the H100, exact float32 here.)"""
    q, k = make_qk(1, 1, 1, 24, 16384, 16, torch.float16, device)
    weights = torch.randn(1, 16384, dtype=torch.float64) * 2**12
    fn = lambda q, k, **kw: column_stats(q, k, reduce="sum", heads="sum", **kw)  # noqa: E731
    _, dq, dk, _ = grads(lambda q, k: fn(q, k, backend=backend), q, k, weights)
    _, ref_dq, ref_dk, _ = grads(lambda q, k: reference_column_stats(q, k, reduce="sum", heads="sum"), q.cpu().double(),
                                 k.cpu().double(), weights)
    assert ref_dq.abs().max() > 6.2e-5 and ref_dk.abs().max() > 6.2e-5
    tol = 4e-4 if grad_products or backend == "torch" else 1e-3
    assert rel_l2(dq, ref_dq) <= tol and rel_l2(dk, ref_dk) <= tol


@pytest.mark.parametrize("backend,device", TARGETS)
def test_total_weight_has_no_gradient(backend, device):
    """Each row's weights sum to 1, so the sum of every key's column sum is constant: its gradient is
    0, which holds only if the c_i term cancels the G_j term exactly."""
    q, k = make_qk(2, 4, 2, 21, 33, 16, torch.float32, device)
    _, dq, dk, _ = grads(lambda q, k: column_stats(q, k, reduce="sum", heads="sum", backend=backend), q, k,
                         torch.ones(2, 33, dtype=torch.float64))
    _, ref_dq, ref_dk, _ = grads(lambda q, k: column_stats(q, k, reduce="sum", heads="sum", backend=backend), q, k)
    assert dq.norm() <= 1e-5 * ref_dq.norm() and dk.norm() <= 1e-5 * ref_dk.norm()


@pytest.mark.parametrize("backend,device", TARGETS)
def test_gradient_of_the_returned_lse(backend, device):
    q, k = make_qk(2, 4, 2, 11, 23, 16, torch.float32, device)
    stats_w, lse_w = torch.randn(2, 23), torch.randn(2, 4, 11)

    def ours(q, k):
        stats, lse = column_stats(q, k, is_causal=True, rows=slice(3, 8), return_lse=True, backend=backend)
        return (stats * stats_w.to(device)).sum() + (lse * lse_w.to(device)).sum()

    def reference(q, k):
        stats = reference_column_stats(q, k, is_causal=True, rows=slice(3, 8))
        s = 0.25 * q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)
        s = s.masked_fill(torch.ones(11, 23, dtype=torch.bool).triu(23 - 11 + 1), float("-inf"))
        return (stats * stats_w.double()).sum() + (torch.logsumexp(s, dim=-1) * lse_w.double()).sum()

    _, dq, dk, _ = grads(ours, q, k, torch.tensor(1.0))
    _, ref_dq, ref_dk, _ = grads(reference, q.cpu().double(), k.cpu().double(), torch.tensor(1.0))
    assert rel_l2(dq, ref_dq) <= 1e-5 and rel_l2(dk, ref_dk) <= 1e-5


@pytest.mark.parametrize("backend,device", TARGETS)
def test_given_lse_is_taken_as_exact(backend, device):
    """With a forward's LSE, the gradient is still the softmax statistic's; the LSE gets none."""
    q, k = make_qk(2, 4, 4, 13, 21, 16, torch.float32, device)
    _, lse = column_stats(q, k, return_lse=True, backend=backend)
    lse.requires_grad_()
    with_lse = grads(lambda q, k: column_stats(q, k, lse=lse, backend=backend), q, k)
    without = grads(lambda q, k: column_stats(q, k, backend=backend), q, k, with_lse[3])
    assert rel_l2(with_lse[1], without[1]) <= 1e-6 and rel_l2(with_lse[2], without[2]) <= 1e-6
    assert lse.grad is None


@pytest.mark.parametrize("backend,device", TARGETS)
def test_packed_sequences_and_accumulation(backend, device):
    q, k = make_qk(1, 4, 2, 17, 17, 16, torch.float32, device)
    cu = torch.tensor([0, 7, 17], device=device)
    running = torch.rand(1, 2, 17, device=device)

    def ours(q, k):
        packed_q, packed_k = q[0].transpose(0, 1), k[0].transpose(0, 1)  # (total, H, D)
        out = column_stats(packed_q, packed_k, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True, heads="kv_sum",
                           backend=backend)
        return column_stats(q, k, accumulate_into=running.clone(), heads="kv_mean", backend=backend) + out

    def reference(q, k):
        parts = [reference_column_stats(q[:, :, a:b], k[:, :, a:b], is_causal=True, heads="kv_sum")[0]
                 for a, b in ((0, 7), (7, 17))]
        return running.double().cpu() + reference_column_stats(q, k, heads="kv_mean") + torch.cat(parts, dim=-1)

    out, dq, dk, weights = grads(ours, q, k)
    ref, ref_dq, ref_dk, _ = grads(reference, q.cpu().double(), k.cpu().double(), weights)
    assert rel_l2(out, ref) <= 1e-5 and rel_l2(dq, ref_dq) <= 1e-5 and rel_l2(dk, ref_dk) <= 1e-5


@pytest.mark.parametrize("backend,device", TARGETS)
def test_row_max_has_no_gradient(backend, device):
    q, k = make_qk(1, 2, 2, 8, 8, 16, torch.float32, device)
    q.requires_grad_()
    out = column_stats(q, k, reduce="max", backend=backend)  # the forward still works
    torch.testing.assert_close(out.detach().cpu(), reference_column_stats(q.detach(), k, reduce="max").float().cpu())
    with pytest.raises(NotImplementedError, match="reduce='max' has no gradient"):
        out.sum().backward()


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("compiled_op", [False, True], ids=["eager", "operator"])
def test_second_order_raises(backend, device, compiled_op):
    """Gradients are first order: differentiating dq again (a gradient penalty) must raise, not
    treat dq as a constant (the Triton kernels record no graph) or fail inside the torch tiles."""
    q, k = make_qk(1, 2, 2, 8, 12, 16, torch.float32, device)
    q.requires_grad_(), k.requires_grad_()
    if compiled_op:  # the path torch.compile traces: the registered operator and its backward
        out, _ = reduce_columns_op(q, k, None, None, None, 0.25, False, 0, 8, 1, False, False, backend, 16.0, 0.0, 0)
    else:
        out = column_stats(q, k, backend=backend)
    (dq,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), q, create_graph=True)
    with pytest.raises((NotImplementedError, RuntimeError), match="first order|no autograd formula"):
        torch.autograd.grad(dq.pow(2).sum(), k)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_forward_saves_only_its_inputs(backend, device):
    """The torch back end used to record every score tile for autograd (O(Sq * Sk) memory)."""
    q, k = make_qk(1, 8, 8, 256, 256, 16, torch.float32, device)
    q.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = colsum(q, k, backend=backend)
    assert out.requires_grad and sum(saved) <= q.numel() + k.numel() + 64
    with torch.no_grad():
        assert colsum(q, k, backend=backend).grad_fn is None


@pytest.mark.parametrize("backend,device", TARGETS)
def test_compiled_backward(backend, device):
    torch._dynamo.reset()
    q, k = make_qk(2, 4, 2, 12, 20, 16, torch.float32, device)
    fn = lambda q, k: column_stats(q, k, is_causal=True, heads="kv_mean", backend=backend)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, dq, dk, weights = grads(compiled, q, k)
    ref, ref_dq, ref_dk, _ = grads(fn, q, k, weights)
    for got, want in ((out, ref), (dq, ref_dq), (dk, ref_dk)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_opcheck_with_gradients(backend, device):
    q, k = make_qk(2, 4, 2, 10, 18, 16, torch.float32, device)
    q.requires_grad_()
    k.requires_grad_()
    args = (q, k, None, None, None, 0.25, True, 2, 10, 2, False, True, backend, 8.0, 0.0, 0)
    torch.library.opcheck(reduce_columns_op, args, test_utils=("test_schema", "test_autograd_registration"))
    grad, grad_lse = torch.randn(2, 2, 18, device=device), torch.randn(2, 4, 10, device=device)
    torch.library.opcheck(reduce_columns_backward_op, (grad, grad_lse, q.detach(), k.detach(), *args[2:10], True, backend, 8.0),
                          test_utils=("test_schema", "test_faketensor"))
