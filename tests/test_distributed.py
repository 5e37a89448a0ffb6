"""Context parallelism: gloo process groups of 2 and 4 ranks on the CPU, spawned by the tests, and
NCCL groups of one rank per GPU where a machine has two or more."""

import functools
import os
import socket
import traceback
import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flash_colsum.utils as fc_utils
from flash_colsum import column_stats
from flash_colsum.distributed import context_parallel_column_stats

TIMEOUT_S = 240
# The ranks hold CPU tensors (gloo): Triton runs them only under the interpreter (CPU machines).
BACKENDS = ("torch", "triton") if os.environ.get("TRITON_INTERPRET") == "1" else ("torch",)
N_GPUS = torch.cuda.device_count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(total: int, world: int, rank: int) -> slice:
    """Contiguous shards whose lengths differ by at most one."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _check_cases(rank, world, device="cpu", dtypes=(torch.float32,), backends=BACKENDS, tolerance=1e-6):
    """Every strategy on this rank's shards against the single-device result on the whole sequence."""
    cases = []
    for h, hk in ((2 * world, world), (6, 3)):
        for causal in (False, True):
            for kwargs in (
                dict(),
                dict(heads="kv_max", reduce="max"),
                dict(heads="none", reduce="sum", rows=slice(-5, None)),
                dict(heads="kv_mean", normalize="visible", rows=slice(2, 17)),
                dict(softcap=1.5),  # Gemma 2's capped logits; with a sliding window (causal only) below
                *([dict(window=5), dict(window=3, softcap=2.0, heads="kv_mean", normalize="visible")] if causal else []),
            ):
                cases += [(h, hk, causal, kwargs, dtype) for dtype in dtypes]
    for h, hk, causal, kwargs, dtype in cases:
        torch.manual_seed(zlib.crc32(repr((h, hk, causal, kwargs)).encode()))  # the same on every rank
        sq, sk = 4 * world + 5, 4 * world + 8  # Sq != Sk: the global causal offset matters
        q = torch.randn(2, h, sq, 16).to(device, dtype)
        k = torch.randn(2, hk, sk, 16).to(device, dtype)
        qs, ks = _shard(sq, world, rank), _shard(sk, world, rank)
        strategies = ["ring", "auto"] + (["heads"] if h % world == 0 and hk % world == 0 else [])
        for backend in backends if not kwargs or device != "cpu" else ("torch",):  # interpreter time
            expected = column_stats(q, k, is_causal=causal, backend=backend, **kwargs)
            for strategy in strategies:
                got = context_parallel_column_stats(
                    q[:, :, qs], k[:, :, ks], strategy=strategy, is_causal=causal, backend=backend, **kwargs
                )
                want = expected[..., ks]
                err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
                assert got.shape == want.shape, (strategy, got.shape, want.shape)
                assert err <= tolerance, f"{strategy} {backend} {dtype} H={h} Hk={hk} causal={causal} {kwargs}: {err:.2e}"
        full = context_parallel_column_stats(q[:, :, qs], k[:, :, ks], is_causal=causal, gather_result=True, **kwargs)
        assert ((full - expected).norm() / expected.norm()).item() <= tolerance


def _check_errors(rank, world):
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16)
    bad_d = torch.randn(1, 4, 5, 8) if rank == world - 1 else q
    bad_k = torch.randn(1, 4, 5, 8) if rank == world - 1 else k
    with pytest.raises(ValueError, match=r"ranks disagree on shapes"):
        context_parallel_column_stats(bad_d, bad_k)
    bad_args = dict(is_causal=rank == 0)
    with pytest.raises(ValueError, match=r"ranks disagree on arguments"):
        context_parallel_column_stats(q, k, **bad_args)
    bad_rank_input = q[:, :3] if rank == 1 else q  # H=3 with Hk=4 on one rank only
    with pytest.raises(ValueError, match=r"rank 1: ValueError: query heads H=3 must be a multiple"):
        context_parallel_column_stats(bad_rank_input, k)
    with pytest.raises(ValueError, match=r"strategy='heads' needs H=6 and Hk=3 divisible"):
        context_parallel_column_stats(torch.randn(1, 6, 5, 16), torch.randn(1, 3, 5, 16), strategy="heads")
    with pytest.raises(ValueError, match="reduce must be one of"):
        context_parallel_column_stats(q, k, reduce="median")
    # No gradient through the collectives: a backward raises instead of silently leaving q and k out.
    out = context_parallel_column_stats(q.requires_grad_(), k)
    assert out.requires_grad
    with pytest.raises(NotImplementedError, match="context_parallel_column_stats has no gradient"):
        out.sum().backward()


def _poisoned(shape, device):
    return torch.full(shape, float("nan"), device=device, dtype=torch.float32)


def _worker(rank, world, port, check, env, backend):
    os.environ.update(env)
    fc_utils.new_output = _poisoned  # conftest's NaN poisoning does not reach spawned ranks
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        check(rank, world)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _spawn(world, check, backend="gloo"):
    env = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    if backend == "nccl":  # NVLink multicast must stay off on the lent machines
        env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    args = (world, _free_port(), check, env, backend)
    context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = TIMEOUT_S
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            pytest.fail(f"context-parallel ranks did not finish within {TIMEOUT_S} s (hang)")


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world):
    _spawn(world, _check_cases)


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_raises_on_every_rank(world):
    _spawn(world, _check_errors)


@pytest.mark.skipif(N_GPUS < 2, reason="needs two or more GPUs")
@pytest.mark.parametrize("world", sorted({2, N_GPUS}))
def test_nccl_matches_single_gpu(world):
    """One rank per GPU over NCCL, Triton and torch back ends, fp16 and bf16: within 1e-5 of one GPU."""
    check = functools.partial(
        _check_cases, device="cuda", dtypes=(torch.float16, torch.bfloat16), backends=("triton", "torch"), tolerance=1e-5
    )
    _spawn(world, check, backend="nccl")


def _check_single_rank(rank, world):
    with pytest.raises(ValueError, match="the process group has 1 rank"):
        context_parallel_column_stats(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_group_of_one():
    _spawn(1, _check_single_rank)


def test_needs_process_group():
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        context_parallel_column_stats(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
