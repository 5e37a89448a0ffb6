"""Helpers that turn importance scores into a choice of tokens: pooling and top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_scores(scores: torch.Tensor, kernel_size: int = 5, pool: str = "avg") -> torch.Tensor:
    """Smooth scores along the last (key) axis, as SnapKV does before choosing tokens.

    scores: (..., Sk) float. A window of ``kernel_size`` (odd) centred on each key, stride 1, the
    same length out; ``pool`` is ``"avg"`` (edges average over the keys that exist) or ``"max"``.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int; got {kernel_size!r}")
    if pool not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max'; got {pool!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1 or not scores.dtype.is_floating_point:
        raise TypeError("scores must be a floating tensor (..., Sk)")
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pad = kernel_size // 2
    if pool == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return pooled.reshape(scores.shape)


def select_topk(scores: torch.Tensor, k: int, *, keep_first: int = 0, keep_last: int = 0) -> torch.Tensor:
    """Indices of the tokens to keep, sorted ascending, along the last axis: (..., k).

    The ``keep_first`` first and ``keep_last`` last tokens (sink tokens, SnapKV's observation
    window) are always kept and count towards ``k``; the rest are the highest scores. Works on
    any leading shape, so (B, Sk), per head (B, H, Sk) or per KV head (B, Hk, Sk) scores select
    per row. Use ``torch.gather`` (or index_select) with the result to compact a KV cache.
    """
    n = scores.shape[-1]
    for name, v in (("k", k), ("keep_first", keep_first), ("keep_last", keep_last)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int; got {v!r}")
    if k > n or keep_first + keep_last > k:
        raise ValueError(f"need keep_first + keep_last <= k <= Sk; got keep_first={keep_first}, keep_last={keep_last}, k={k}, Sk={n}")
    forced = torch.zeros(n, dtype=torch.bool, device=scores.device)
    forced[:keep_first] = True
    forced[n - keep_last :] = True
    ranked = scores.masked_fill(forced, float("inf"))  # forced tokens win every comparison
    return ranked.topk(k, dim=-1).indices.sort(dim=-1).values
