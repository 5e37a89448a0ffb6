"""Pure-PyTorch back end: the same statistic on any device, in tiles that fit a memory budget.

For each batch row and each block of query rows it computes float32 scores against a block of
keys. When a block of rows fits the budget against *all* keys (the common case), scores are
computed once: softmax and column sums come from the same tile. Otherwise it runs two passes
like the Triton kernels: an online log-sum-exp over key blocks, then the weights exp(s - lse)
block by block. Temporary memory stays under `get_memory_budget()` bytes (default 256 MiB),
apart from the O(B * H * (Sq + Sk)) float32 results and row statistics.
"""

from __future__ import annotations

import torch

from .utils import Problem

_BYTES_PER_SCORE = 12  # float32 score + float32 weight + bool mask/temporaries, per tile element
_memory_budget = 256 * 2**20


def get_memory_budget() -> int:
    """Bytes of temporary memory the torch back end may use per tile."""
    return _memory_budget


def set_memory_budget(nbytes: int) -> None:
    """Set the torch back end's temporary-memory budget in bytes (at least 1 MiB)."""
    global _memory_budget
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 2**20:
        raise ValueError(f"memory budget must be an int of at least 1 MiB (1048576 bytes); got {nbytes!r}")
    _memory_budget = nbytes


def _tile_sizes(p: Problem) -> tuple[int, int, int]:
    """(batch rows, query rows, keys) per tile so that B_tile * H * rows * keys scores fit the budget."""
    scores = max(1, _memory_budget // (_BYTES_PER_SCORE * p.heads))  # batch * rows * keys per tile
    block_n = min(p.k_len, scores)
    block_m = max(1, min(p.n_rows, scores // block_n))
    block_b = max(1, min(p.batch, scores // (block_n * block_m))) if block_m == p.n_rows else 1
    return block_b, block_m, block_n


def _scores(q: torch.Tensor, k: torch.Tensor, p: Problem, rows: range, keys: range) -> torch.Tensor:
    """Scaled float32 scores, (b, Hk, G * M, N); masked entries are -inf.

    q: (b, H, M, D) rows of the tile, k: (b, Hk, N, D). The G query heads of a key head are stacked
    along the row axis, so one batched matmul serves GQA without copying K per query head.
    """
    b, hk, g, m = q.shape[0], p.kv_heads, p.group, len(rows)
    q = q.float().reshape(b, hk, g * m, p.head_dim)
    s = torch.matmul(q, k.float().transpose(-1, -2)).mul_(p.scale)  # [b, Hk, G*M, D] @ [b, Hk, D, N]
    if p.causal:
        i = torch.arange(rows.start, rows.stop, device=q.device)
        j = torch.arange(keys.start, keys.stop, device=q.device)
        hidden = j[None, :] > i[:, None] + p.causal_offset  # [M, N]
        s = s.view(b, hk, g, m, -1).masked_fill(hidden, float("-inf")).view(b, hk, g * m, -1)
    return s


def _finite_or_inf(lse: torch.Tensor) -> torch.Tensor:
    """Rows with no visible key have lse = -inf; make it +inf so their weights are 0, not NaN."""
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def colsum_torch(query: torch.Tensor, key: torch.Tensor, p: Problem) -> torch.Tensor:
    """Per-key-head column sums (B, Hk, Sk), float32, over the selected rows of each group's heads."""
    out = torch.zeros((p.batch, p.kv_heads, p.k_len), device=query.device, dtype=torch.float32)
    if p.k_len == 0:
        return out
    block_b, block_m, block_n = _tile_sizes(p)
    key_blocks = [range(n0, min(n0 + block_n, p.k_len)) for n0 in range(0, p.k_len, block_n)]
    for b0 in range(0, p.batch, block_b):
        batch = slice(b0, b0 + block_b)
        for m0 in range(p.row_start, p.row_end, block_m):
            rows = range(m0, min(m0 + block_m, p.row_end))
            q = query[batch, :, rows.start : rows.stop]
            if len(key_blocks) == 1:  # one pass: the scores serve both the LSE and the weights
                s = _scores(q, key[batch], p, rows, key_blocks[0])
                lse = _finite_or_inf(torch.logsumexp(s, dim=-1, keepdim=True))
                out[batch] += torch.exp(s.sub_(lse)).sum(dim=2)
                continue
            lse = torch.full((*q.shape[:1], p.kv_heads, p.group * len(rows), 1), float("-inf"), device=q.device)
            for keys in key_blocks:  # pass 1: online log-sum-exp over key blocks
                s = _scores(q, key[batch, :, keys.start : keys.stop], p, rows, keys)
                lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1, keepdim=True))
            lse = _finite_or_inf(lse)
            for keys in key_blocks:  # pass 2: weights and their column sums
                s = _scores(q, key[batch, :, keys.start : keys.stop], p, rows, keys)
                out[batch, :, keys.start : keys.stop] += torch.exp(s.sub_(lse)).sum(dim=2)
    return out
