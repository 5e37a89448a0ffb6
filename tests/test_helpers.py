"""attention_with_lse, pool_scores, select_topk."""

import pytest
import torch
import torch.nn.functional as F

from flash_colsum import attention_with_lse, column_stats, pool_scores, select_topk
from helpers import make_qk, rel_l2
from conftest import TARGETS


@pytest.mark.parametrize("sq,sk,causal", [(16, 16, True), (6, 30, True), (12, 20, False)])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_attention_with_lse(backend, device, sq, sk, causal):
    q, k = make_qk(2, 4, 2, sq, sk, 32, torch.float32, device)
    v = torch.randn(2, 2, sk, 32, device=device)
    out, lse = attention_with_lse(q, k, v, is_causal=causal)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q.double() @ kk.double().transpose(-1, -2)) / 32**0.5
    if causal:
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1), float("-inf"))
    assert lse.shape == (2, 4, sq) and lse.dtype == torch.float32
    assert rel_l2(lse, torch.logsumexp(scores, -1)) <= 1e-6
    assert rel_l2(out, torch.softmax(scores, -1) @ vv.double()) <= 1e-5
    # One forward serves both: the statistic from its LSE equals the computed one.
    torch.testing.assert_close(
        column_stats(q, k, is_causal=causal, lse=lse, backend=backend),
        column_stats(q, k, is_causal=causal, backend=backend), rtol=1e-5, atol=1e-7,
    )


def test_pool_scores():
    x = torch.rand(2, 3, 17)
    assert torch.allclose(pool_scores(x, 5, "max"), F.max_pool1d(x, 5, 1, 2))
    avg = pool_scores(x, 3)
    assert torch.allclose(avg[..., 1:-1], (x[..., :-2] + x[..., 1:-1] + x[..., 2:]) / 3)
    assert torch.allclose(avg[..., 0], (x[..., 0] + x[..., 1]) / 2)
    with pytest.raises(ValueError, match="odd"):
        pool_scores(x, 4)
    with pytest.raises(ValueError, match="pool must be"):
        pool_scores(x, 3, "sum")


def test_select_topk():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.05, 0.3, 0.7, 0.0]])
    assert select_topk(scores, 3).tolist() == [[1, 3, 6]]
    assert select_topk(scores, 4, keep_first=1, keep_last=1).tolist() == [[0, 1, 3, 7]]
    per_head = torch.rand(2, 4, 50)
    idx = select_topk(per_head, 10, keep_last=3)
    assert idx.shape == (2, 4, 10) and (idx[..., -3:] == torch.tensor([47, 48, 49])).all()
    with pytest.raises(ValueError, match="keep_first \\+ keep_last <= k <= Sk"):
        select_topk(scores, 9)
