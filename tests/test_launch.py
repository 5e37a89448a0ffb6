"""utils.launch: repeated calls reuse the compiled kernel, and only calls that specialize alike do."""

import pytest
import torch

from flash_colsum import column_stats, utils
from helpers import make_qk


class FakeCompiled:
    packed_metadata = b""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("compiled", grid, args))


class FakeKernel:
    """Records how it is launched; like a JITFunction, returns its compiled kernel (or None, as the
    interpreter does, when ``interpreted``)."""
    arg_names = ["x", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self, interpreted=False):
        self.log, self.interpreted = [], interpreted

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return None if self.interpreted else FakeCompiled(self.log)
        return run


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(utils, "_COMPILED", {})


def paths(kernel):
    return [entry[0] for entry in kernel.log]


def test_repeated_call_takes_the_compiled_kernel_with_every_parameter_in_order():
    kernel, x = FakeKernel(), torch.zeros(64, dtype=torch.float16)
    utils.launch(kernel, (4,), x, 128, 0.5, BLOCK=32, FLAG=True, num_warps=4)
    utils.launch(kernel, (4,), x, 128, 0.5, BLOCK=32, FLAG=True, num_warps=4)
    assert paths(kernel) == ["jit", "compiled"]
    # FFMA contraction is asked for explicitly (Triton 3.10 turns its default off).
    assert kernel.log[0][3] == dict(enable_fp_fusion=True, BLOCK=32, FLAG=True, num_warps=4)
    # Constexprs follow the arguments in signature order; launch options are baked in; grid padded to 3-D.
    assert kernel.log[1] == ("compiled", (4, 1, 1), (x, 128, 0.5, 32, True))
    # Another tensor with the same dtype and alignment specializes alike, whatever its address.
    utils.launch(kernel, (8, 2), torch.ones(64, dtype=torch.float16), 128, 0.5, BLOCK=32, FLAG=True, num_warps=4)
    assert kernel.log[2][:2] == ("compiled", (8, 2, 1))


@pytest.mark.parametrize("change", ["int", "dtype", "alignment", "constexpr", "option"])
def test_a_call_that_may_specialize_otherwise_takes_the_jit_path(change):
    kernel, x = FakeKernel(), torch.zeros(64, dtype=torch.float16)
    args, meta = [x, 128, 0.5], dict(BLOCK=32, FLAG=True, num_warps=4)
    utils.launch(kernel, (4,), *args, **meta)
    if change == "int":
        args[1] = 129  # no longer a multiple of 16
    elif change == "dtype":
        args[0] = x.to(torch.bfloat16)
    elif change == "alignment":
        args[0] = x[1:]  # 2 bytes past a 16-byte boundary
    elif change == "constexpr":
        meta["FLAG"] = False
    else:
        meta["num_warps"] = 8
    utils.launch(kernel, (4,), *args, **meta)
    assert paths(kernel) == ["jit", "jit"]


def test_no_cache_without_a_compiled_kernel_or_with_a_defaulted_constexpr():
    interpreted, x = FakeKernel(interpreted=True), torch.zeros(8)
    for _ in range(2):
        utils.launch(interpreted, (1,), x, 16, 1.0, BLOCK=16, FLAG=False)
    defaulted = FakeKernel()  # FLAG left to its default: the compiled launcher would miss it
    for _ in range(2):
        utils.launch(defaulted, (1,), x, 16, 1.0, BLOCK=16)
    assert paths(interpreted) == paths(defaulted) == ["jit", "jit"] and utils._COMPILED == {}


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(utils, "_COMPILED_MAX", 3)
    kernel, x = FakeKernel(), torch.zeros(8)
    for n in range(5):
        utils.launch(kernel, (1,), x, n, 1.0, BLOCK=16, FLAG=False)
    assert len(utils._COMPILED) <= 3


def test_arguments_with_one_key_specialize_alike():
    """Whenever two arguments get the same key, Triton's own specialization of them (type, and
    divisibility by 16 or value 1) is the same: a coarser key would launch a kernel compiled for
    other arguments (a key of plain values alone fails here: 0 == False). Integers at the
    boundaries, bools and floats equal to them, tensors of several dtypes at every byte offset."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this Triton specializes arguments otherwise")
    from triton.backends.compiler import BaseBackend

    base = torch.zeros(64, dtype=torch.float16)
    values = [0, 1, 2, 15, 16, 17, 32, 2**31 - 1, 2**31, 2**32 + 16, True, False, 1.0, 16.0, 0.5, None,
              *[base[i:] for i in range(9)], *[base.view(torch.uint8)[i:] for i in range(17)], base.float(), base.bool()]
    key = lambda a: a if type(a) is int else utils._arg_key(a)  # as launch builds it
    spec = lambda a: libtriton.native_specialize_impl(BaseBackend, a, False, True, True)
    for a in values:
        for b in values:
            if key(a) == key(b):
                assert spec(a) == spec(b), (a, b)


class CountingCache(dict):
    hits = 0

    def get(self, key, default=None):
        entry = super().get(key, default)
        self.hits += entry is not None
        return entry


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
@pytest.mark.parametrize("b,h,sq,sk,d,causal,rows", [
    (1, 4, 200, 300, 64, False, None),           # both passes in one launch
    (2, 16, 1024, 1024, 64, False, None),         # two passes
    (1, 32, 4, 131072, 64, True, slice(-4, None)),  # stored scores, key splits
    (1, 16, 4096, 4096, 72, True, None),          # causal passes (Hopper on an H100)
    (8, 16, 1024, 1024, 64, False, None),         # both passes in one launch (Hopper on an H100)
])
def test_cached_launches_match_the_jit_ones(monkeypatch, b, h, sq, sk, d, causal, rows):
    cache = CountingCache()
    monkeypatch.setattr(utils, "_COMPILED", cache)
    q, k = make_qk(b, h, h, sq, sk, d, torch.float16, "cuda")
    first = column_stats(q, k, is_causal=causal, rows=rows)  # the JIT path, storing compiled kernels
    assert cache and cache.hits == 0
    again = column_stats(q, k, is_causal=causal, rows=rows)
    assert cache.hits >= 1 and torch.equal(first, again)
