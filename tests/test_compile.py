"""The operator registration: opcheck, torch.compile(fullgraph=True), CUDA graphs."""

import pytest
import torch

from flash_colsum import column_stats, flash_colsum
from flash_colsum.ops import reduce_columns_op
from flash_colsum.reference import reference_column_stats
from helpers import TOLERANCE, make_qk, record_row_block_launches, rel_l2
from conftest import TARGETS, HAS_CUDA


@pytest.mark.parametrize("backend,device", TARGETS)
def test_opcheck(backend, device):
    q, k = make_qk(2, 4, 2, 20, 36, 16, torch.float32, device)
    keep = torch.rand(2, 36, device=device) < 0.8
    rows = torch.rand(2, 20, device=device) < 0.7
    cases = [
        (q, k, None, None, None, 0.25, True, 0, 20, 2, False, False, backend, 1.0, 0.0, 0),
        (q, k, None, keep, rows, 0.25, False, 3, 17, 1, True, True, backend, 3.0, 0.0, 0),
        (q, k, torch.randn(2, 4, 20, device=device), None, None, 0.25, True, 5, 20, 2, False, False, backend, 60.0, 0.0, 0),
        (q, k, None, keep, None, 0.25, False, 0, 20, 1, False, True, backend, 1.0, 2.5, 0),  # soft-capped scores
    ]
    if backend == "torch":  # a sliding window: the torch back end's
        cases.append((q, k, None, keep, None, 0.25, True, 0, 20, 2, False, True, backend, 1.0, 0.0, 7))
    for args in cases:
        torch.library.opcheck(reduce_columns_op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend,device", TARGETS)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    q, k = make_qk(2, 4, 2, 24, 40, 32, torch.float16, device)
    keep = torch.ones(2, 40, dtype=torch.bool, device=device)
    keep[1, 30:] = False

    def stats(q, k, keep):
        a = column_stats(q, k, is_causal=True, key_padding_mask=keep, heads="kv_mean", rows=slice(-8, None), backend=backend)
        return a, flash_colsum(q, k, backend=backend)

    compiled = torch.compile(stats, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    for got, want in zip(compiled(q, k, keep), stats(q, k, keep)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_capture():
    q, k = make_qk(2, 4, 2, 64, 256, 64, torch.float16, "cuda")
    run = lambda: column_stats(q, k, is_causal=True, heads="none", reduce="max")  # noqa: E731
    expected = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, run(), rtol=0, atol=0)
    assert not torch.equal(captured, expected)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_captured_decoding_step_splits(monkeypatch):
    """A decoding step over 3000 keys runs in one launch eagerly but splits its keys inside a CUDA
    graph (kernels first compiled during the capture); the replay matches float64."""
    q, k = make_qk(1, 8, 2, 3000, 3000, 128, torch.float16, "cuda")
    run = lambda: column_stats(q, k, is_causal=True, rows=slice(-1, None), window=2900)  # noqa: E731
    launches = record_row_block_launches(monkeypatch)
    run()
    assert [fused for _, fused in launches] == [True]
    launches.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    assert [fused for _, fused in launches] == [False, False]  # pass 1 split, then pass 2
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    want = reference_column_stats(q.cpu(), k.cpu(), is_causal=True, rows=slice(-1, None), window=2900)
    assert rel_l2(captured.cpu(), want) <= TOLERANCE[torch.float16]
