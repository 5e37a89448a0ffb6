"""Test set-up: where to run each back end, and NaN-poisoned kernel outputs.

Without a GPU the Triton kernels run under Triton's CPU interpreter; TRITON_INTERPRET must be set
before Triton is first imported, hence here, at collection time.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flash_colsum.utils as fc_utils  # noqa: E402  (after the interpreter switch)

# (backend, device) pairs the suite checks on this machine.
TARGETS = [("torch", "cpu"), ("triton", "cpu")]
if HAS_CUDA:
    TARGETS = [("torch", "cpu"), ("torch", "cuda"), ("triton", "cuda")]


def pytest_report_header(config):
    return f"flash-colsum targets: {TARGETS}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer a kernel should fully write starts as NaN, so an unwritten element shows."""

    def poisoned(shape, device):
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)

    monkeypatch.setattr(fc_utils, "new_output", poisoned)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different, reproducible seed for every test: a CRC of its id (Python's str hash changes from
    process to process unless PYTHONHASHSEED is set)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["key_centric", "row_stationary", "fused", "scores", "one_pass"])
def pass2_layout(request, monkeypatch):
    """Force the Triton pass 2 onto one kernel: key-centric, row-stationary for any row count,
    fused with pass 1 in one launch wherever its result layout allows (any size), the weights
    from pass 1's stored scores (any row count), or one pass for key ranges that fit its tile
    (any size; longer ones take the two passes)."""
    import flash_colsum.triton_backend as tb

    monkeypatch.setattr(tb, "_use_one_pass", lambda p, query: request.param == "one_pass")
    monkeypatch.setattr(tb, "_use_row_stationary", lambda n_rows, block_m: request.param == "row_stationary")
    monkeypatch.setattr(tb, "_use_fused", lambda *args: request.param == "fused")
    monkeypatch.setattr(tb, "_keeps_scores", lambda p: request.param == "scores")
    return request.param
