"""Input makers and error measures shared by the tests."""

import math

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


def record_taken(monkeypatch, name: str) -> list:
    """Record, per call of the Triton back end's optional path ``name`` (a launcher that returns None
    where it does not apply: scores_reduce, one_pass_reduce), whether it ran; the calls still run."""
    from flash_colsum import triton_backend as tb

    taken = []
    original = getattr(tb, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(tb, name, spy)
    return taken


# Inputs whose scores leave pass 1's lazy max (hopper._lse_tile) behind: a tile must be redone with a
# new max, or the max so far lags far above a block's scores, or a row has seen no key yet.
LAZY_MAX_CASES = ["jump", "drop", "huge", "padded-first-keys", "causal-jump"]


def lazy_max_inputs(case, b, h, sq, sk, d, dtype, device):
    """(q, k, key_keep, causal) for one of LAZY_MAX_CASES. "jump": a few keys far into the sequence
    score ~110 (natural log) above the rest for the first rows, far past the lazy limit's ~64; "drop": the
    first keys do, so later blocks lag far below the max; "huge": scores with a standard deviation
    near 60, so the max keeps moving; "padded-first-keys": batch 0's first 60% of keys are dropped,
    so its rows see no key for several blocks, and batch 1's last ones; "causal-jump": "jump" under
    a causal mask."""
    q, k = make_qk(b, h, h, sq, sk, d, torch.float32, device)
    keep = None
    boost = (q[:, :, :4].mean(2, keepdim=True) * (110 * 4 * math.sqrt(d) / d)).expand(-1, -1, 3, -1)
    if case in ("jump", "causal-jump"):
        k[:, :, sk - sk // 3:sk - sk // 3 + 3] = boost
    elif case == "drop":
        k[:, :, :3] = boost
    elif case == "huge":
        q, k = q * 10, k * 6
    elif case == "padded-first-keys":
        keep = torch.ones(b, sk, dtype=torch.bool, device=device)
        keep[0, :sk * 6 // 10] = False
        keep[-1, sk - sk // 4:] = False
    return q.to(dtype), k.to(dtype), keep, case == "causal-jump"


def scores_reference(q, k, scale, rows=None, causal=False, key_keep=None, window=None, softcap=None):
    """scale * Q K^T in float64 on the CPU, (B, H, len(rows), Sk) for the selected rows (all by default),
    query head h against key head h // G, soft-capped (softcap * tanh(s / softcap)) if ``softcap``;
    -inf where the bottom-right causal mask hides key j from row i (j > i + Sk - Sq; with a sliding
    window also j <= i + Sk - Sq - window) or key_keep (B, Sk; False drops a key) drops it."""
    rows = range(q.shape[2]) if rows is None else rows
    k = k.cpu().double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale * torch.einsum("bhqd,bhkd->bhqk", q[:, :, rows].cpu().double(), k)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        keys, diagonal = torch.arange(k.shape[2])[None, :], torch.tensor(rows)[:, None] + k.shape[2] - q.shape[2]
        hidden = keys > diagonal
        if window:
            hidden |= keys <= diagonal - window
        s = s.masked_fill(hidden, float("-inf"))
    if key_keep is not None:
        s = s.masked_fill(~key_keep.cpu()[:, None, None, :], float("-inf"))
    return s


def lse_reference(q, k, scale, rows=None, causal=False, key_keep=None, window=None, softcap=None):
    """The natural-log LSE of `scores_reference`, float64 (B, H, len(rows))."""
    return torch.logsumexp(scores_reference(q, k, scale, rows, causal, key_keep, window, softcap), dim=-1)
