"""Input makers and error measures shared by the tests."""

import torch

from flash_colsum.reference import naive_colsum

# Relative L2 error allowed against the float64 reference, by input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives NaN (which fails every <= check)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def make_qk(b, h, hk, sq, sk, d, dtype=torch.float32, device="cpu", seq_major=False):
    """Random query (B, H, Sq, D) and key (B, Hk, Sk, D).

    seq_major: build (B, S, H, D) tensors and view them as (B, H, S, D) with .transpose(1, 2),
    the layout most models produce, so the inputs are non-contiguous.
    """
    if seq_major:
        q = torch.randn(b, sq, h, d, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(b, sk, hk, d, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = torch.randn(b, h, sq, d, dtype=dtype, device=device)
        k = torch.randn(b, hk, sk, d, dtype=dtype, device=device)
    return q, k


def reference(q, k, **kwargs):
    """float64 ground truth on the same (possibly fp16/bf16) values."""
    return naive_colsum(q.cpu(), k.cpu(), dtype=torch.float64, **kwargs)


def record_row_block_launches(monkeypatch) -> list:
    """Record each launch of the Triton back end's row-stationary kernel as (its configuration,
    whether both passes are fused); the launches still run."""
    from flash_colsum import triton_backend as tb

    launches = []
    original = tb._launch_row_blocks

    def spy(query, key, p, rows, cfg, *args, **kwargs):
        launches.append((cfg, kwargs.get("fused", False)))
        return original(query, key, p, rows, cfg, *args, **kwargs)

    monkeypatch.setattr(tb, "_launch_row_blocks", spy)
    return launches
