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


def _tile_sizes(p: Problem, n_rows: int) -> tuple[int, int, int]:
    """(batch rows, query rows, keys) per tile so that B_tile * H * rows * keys scores fit the budget."""
    scores = max(1, _memory_budget // (_BYTES_PER_SCORE * p.heads))  # batch * rows * keys per tile
    block_n = min(p.k_len, scores)
    block_m = max(1, min(n_rows, scores // block_n))
    block_b = max(1, min(p.batch, scores // (block_n * block_m))) if block_m == n_rows else 1
    return block_b, block_m, block_n


def fits_one_pass(p: Problem) -> bool:
    """Does a tile hold all Sk keys, so scores can serve the LSE and the weights at once?"""
    return _tile_sizes(p, p.n_rows)[2] == p.k_len


def _tiles(p: Problem, rows: range):
    """Yield (batch slice, row range, key ranges) covering the problem in budget-sized tiles."""
    block_b, block_m, block_n = _tile_sizes(p, len(rows))
    key_blocks = [range(n0, min(n0 + block_n, p.k_len)) for n0 in range(0, p.k_len, block_n)]
    for b0 in range(0, p.batch, block_b):
        for m0 in range(rows.start, rows.stop, block_m):
            yield slice(b0, b0 + block_b), range(m0, min(m0 + block_m, rows.stop)), key_blocks


def _scores(query, key, p: Problem, batch: slice, rows: range, keys: range, key_keep=None) -> torch.Tensor:
    """Scaled float32 scores of a tile, (b, Hk, G * M, N); causally hidden (and padded) keys are -inf.

    The G query heads of a key head are stacked along the row axis, so one batched matmul serves
    GQA without copying K per query head. key_keep: (B, Sk) bool or None (no padding mask applied).
    """
    q = query[batch, :, rows.start : rows.stop].float()
    k = key[batch, :, keys.start : keys.stop].float()
    b, hk, g, m = q.shape[0], p.kv_heads, p.group, len(rows)
    q = q.reshape(b, hk, g * m, p.head_dim)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(p.scale)  # [b, Hk, G*M, D] @ [b, Hk, D, N]
    hidden = None
    if p.causal:
        i = torch.arange(rows.start, rows.stop, device=q.device)
        j = torch.arange(keys.start, keys.stop, device=q.device)
        hidden = (j[None, :] > i[:, None] + p.causal_offset)[None, None, None]  # [1, 1, 1, M, N]
    if key_keep is not None:
        padded = ~key_keep[batch, keys.start : keys.stop][:, None, None, None, :]  # [b, 1, 1, 1, N]
        hidden = padded if hidden is None else hidden | padded
    if hidden is not None:
        s = s.view(b, hk, g, m, -1).masked_fill(hidden, float("-inf")).view(b, hk, g * m, -1)
    return s


def _lse_of(s: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of a score tile; rows with no visible key get +inf, so their weights are 0."""
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return lse.masked_fill_(torch.isneginf(lse), float("inf"))


def _rows_to_heads(x: torch.Tensor, p: Problem, m: int) -> torch.Tensor:
    """(b, Hk, G * M, ...) with group heads stacked along rows -> (b, H, M, ...)."""
    return x.reshape(x.shape[0], p.heads, m, *x.shape[3:])


def _reduce_tile(w: torch.Tensor, p: Problem, m: int, heads_per_chunk: int, use_max: bool) -> torch.Tensor:
    """Weights (b, Hk, G * M, N) -> (b, H // heads_per_chunk, N), reduced over rows and chunk heads."""
    w = w.reshape(w.shape[0], p.heads // heads_per_chunk, heads_per_chunk * m, w.shape[-1])
    return w.amax(dim=2) if use_max else w.sum(dim=2)


def _accumulate(out: torch.Tensor, part: torch.Tensor, use_max: bool) -> None:
    torch.maximum(out, part, out=out) if use_max else out.add_(part)


def row_lse(query, key, p: Problem, key_keep=None, rows=None) -> torch.Tensor:
    """Natural-log LSE, float32 (B, H, len(rows)), of rows (default: the selected ones); +inf if no key is visible."""
    rows = rows or range(p.row_start, p.row_end)
    lse = torch.empty((p.batch, p.heads, len(rows)), device=query.device, dtype=torch.float32)
    for batch, tile_rows, key_blocks in _tiles(p, rows):
        acc = None
        for keys in key_blocks:  # online log-sum-exp over key blocks
            part = torch.logsumexp(_scores(query, key, p, batch, tile_rows, keys, key_keep), dim=-1)
            acc = part if acc is None else torch.logaddexp(acc, part)
        acc.masked_fill_(torch.isneginf(acc), float("inf"))
        lse[batch, :, tile_rows.start - rows.start : tile_rows.stop - rows.start] = _rows_to_heads(acc, p, len(tile_rows))
    return lse


def col_reduce(query, key, lse, p: Problem, heads_per_chunk: int, use_max: bool, divisor: float = 1.0) -> torch.Tensor:
    """Sum (or max) of exp(s - lse) over the selected rows, (B, H // heads_per_chunk, Sk) float32,
    divided by ``divisor``.

    lse: (B, H, n_rows) for the selected rows; +inf drops a row. Padded keys are not masked here.
    """
    rows = range(p.row_start, p.row_end)
    out = torch.zeros((p.batch, p.heads // heads_per_chunk, p.k_len), device=query.device, dtype=torch.float32)
    for batch, tile_rows, key_blocks in _tiles(p, rows):
        tile_lse = lse[batch, :, tile_rows.start - rows.start : tile_rows.stop - rows.start]
        tile_lse = tile_lse.reshape(tile_lse.shape[0], p.kv_heads, -1, 1)  # (b, Hk, G*M, 1), as the scores
        for keys in key_blocks:
            s = _scores(query, key, p, batch, tile_rows, keys)
            part = _reduce_tile(s.sub_(tile_lse).exp_(), p, len(tile_rows), heads_per_chunk, use_max)
            _accumulate(out[batch, :, keys.start : keys.stop], part, use_max)
    return out if divisor == 1 else out.div_(divisor)


def one_pass(query, key, p: Problem, key_keep, row_keep, heads_per_chunk: int, use_max: bool, divisor: float = 1.0):
    """Both passes from one score tile, when all Sk keys fit a tile (see `fits_one_pass`).

    Returns (reduced (B, H // heads_per_chunk, Sk) over divisor, lse (B, H, n_rows)) like `row_lse` + `col_reduce`.
    row_keep: (B, Sq) bool or None; rows it drops contribute nothing.
    """
    rows = range(p.row_start, p.row_end)
    out = torch.zeros((p.batch, p.heads // heads_per_chunk, p.k_len), device=query.device, dtype=torch.float32)
    lse = torch.empty((p.batch, p.heads, p.n_rows), device=query.device, dtype=torch.float32)
    for batch, tile_rows, (keys,) in _tiles(p, rows):
        m = len(tile_rows)
        s = _scores(query, key, p, batch, tile_rows, keys, key_keep)
        tile_lse = _lse_of(s)
        lse[batch, :, tile_rows.start - rows.start : tile_rows.stop - rows.start] = _rows_to_heads(tile_lse, p, m)[..., 0]
        if row_keep is not None:
            dropped = ~row_keep[batch, tile_rows.start : tile_rows.stop]  # (b, M)
            tile_lse = tile_lse.view(-1, p.kv_heads, p.group, m, 1).masked_fill(dropped[:, None, None, :, None], float("inf"))
            tile_lse = tile_lse.view(-1, p.kv_heads, p.group * m, 1)
        part = _reduce_tile(s.sub_(tile_lse).exp_(), p, m, heads_per_chunk, use_max)
        _accumulate(out[batch], part, use_max)
    return (out if divisor == 1 else out.div_(divisor)), lse
