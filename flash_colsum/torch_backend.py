"""Pure-PyTorch back end: the same statistic on any device, in tiles that fit a memory budget.

For each batch row and each block of query rows it computes float32 scores against a block of
keys. When a block of rows fits the budget against *all* keys (the common case), scores are
computed once: softmax and column sums come from the same tile. Otherwise it runs two passes
like the Triton kernels: an online log-sum-exp over key blocks, then the weights exp(s - lse)
block by block. Temporary memory stays under `get_memory_budget()` bytes (default 256 MiB),
apart from the O(B * H * (Sq + Sk)) float32 results and row statistics.
"""

from __future__ import annotations

import math

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


def _tile_sizes(p: Problem, n_rows: int, bytes_per_score: int = _BYTES_PER_SCORE, square: bool = False) -> tuple[int, int, int]:
    """(batch rows, query rows, keys) per tile so that B_tile * H * rows * keys scores fit the budget.
    All keys in a tile where they fit (one sweep over them), or with ``square``, as many rows as keys."""
    scores = max(1, _memory_budget // (bytes_per_score * p.heads))  # batch * rows * keys per tile
    block_n = min(p.k_len, math.isqrt(scores) if square else scores)
    block_m = max(1, min(n_rows, scores // block_n))
    block_b = max(1, min(p.batch, scores // (block_n * block_m))) if block_m == n_rows else 1
    return block_b, block_m, block_n


def fits_one_pass(p: Problem) -> bool:
    """Does a tile hold all Sk keys, so scores can serve the LSE and the weights at once?"""
    return _tile_sizes(p, p.n_rows)[2] == p.k_len


def _tiles(p: Problem, rows: range, bytes_per_score: int = _BYTES_PER_SCORE, square: bool = False):
    """Yield (batch slice, row range, key ranges) covering the problem in budget-sized tiles."""
    block_b, block_m, block_n = _tile_sizes(p, len(rows), bytes_per_score, square)
    key_blocks = [range(n0, min(n0 + block_n, p.k_len)) for n0 in range(0, p.k_len, block_n)]
    for b0 in range(0, p.batch, block_b):
        for m0 in range(rows.start, rows.stop, block_m):
            yield slice(b0, b0 + block_b), range(m0, min(m0 + block_m, rows.stop)), key_blocks


def _scores(query, key, p: Problem, batch: slice, rows: range, keys: range, key_keep=None) -> torch.Tensor:
    """Scaled (and soft-capped) float32 scores of a tile, (b, Hk, G * M, N); causally hidden (and
    padded, and outside a sliding window) keys are -inf.

    The G query heads of a key head are stacked along the row axis, so one batched matmul serves
    GQA without copying K per query head. key_keep: (B, Sk) bool or None (no padding mask applied).
    """
    q = query[batch, :, rows.start : rows.stop].float()
    k = key[batch, :, keys.start : keys.stop].float()
    b, hk, g, m = q.shape[0], p.kv_heads, p.group, len(rows)
    q = q.reshape(b, hk, g * m, p.head_dim)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(p.scale)  # [b, Hk, G*M, D] @ [b, Hk, D, N]
    if p.softcap:
        s = s.div_(p.softcap).tanh_().mul_(p.softcap)
    hidden = None
    if p.causal:
        i = torch.arange(rows.start, rows.stop, device=q.device)
        j = torch.arange(keys.start, keys.stop, device=q.device)
        hidden = j[None, :] > i[:, None] + p.causal_offset
        if p.window:  # a sliding window: the `window` keys up to the diagonal
            hidden |= j[None, :] <= i[:, None] + p.causal_offset - p.window
        hidden = hidden[None, None, None]  # [1, 1, 1, M, N]
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


_BACKWARD_BYTES_PER_SCORE = 16  # float32 scores/weights + their gradient + mask temporaries


def col_reduce_backward(query, key, lse, p: Problem, rows: range, key_keep, row_weight, col_grad, lse_grad):
    """Gradients (dq, dk), float32 like query and key, of the column statistic through the softmax.

    The statistic over ``rows``: out[b, h, j] = sum_i row_weight[b, i] * w[b, h, i, j], with
    w = exp(s - lse) the softmax weights of scores s = scale * q . k (causally hidden and padded
    keys: -inf, weight 0; soft-capped, s = softcap * tanh(scale * q . k / softcap), whose slope
    1 - (s / softcap)^2 multiplies dL/ds). lse: (B, H, len(rows)) natural-log LSE of those rows (+inf: a row that
    sees no key), or None (computed here by `row_lse`). row_weight: (B, len(rows)) float32. col_grad: (B, H // n, Sk) float32, the gradient
    of out, a row for n consecutive query heads; lse_grad: (B, H, len(rows)) float32 or None, the
    gradient of lse itself. Through the softmax, dL/ds_ij = w_ij * (row_weight_i * G_j - c_i) with
    G = col_grad, c_i = row_weight_i * D_i - lse_grad_i and D_i = sum_j w_ij G_j (FlashAttention's
    backward with a one-column V = G).
    Tiles stay within the memory budget; a tile that holds only some of the keys takes D_i in a
    first sweep over them.
    """
    if lse is None:
        lse = row_lse(query, key, p, key_keep, rows)
    query, key = query.float(), key.float()  # once, not per tile (an O(B * H * S * D) copy)
    dq = torch.zeros(query.shape, device=query.device, dtype=torch.float32)
    dk = torch.zeros(key.shape, device=key.device, dtype=torch.float32)
    hk, g = p.kv_heads, p.group
    # Square tiles: the two matmuls into dq and dk ([M, N] @ [N, D], [N, M] @ [M, D]) then have many
    # rows each; with all keys in a tile, dq's had 64 on the H100 (S=16384, H=16) and ran 2.5x slower.
    for batch, tile_rows, key_blocks in _tiles(p, rows, _BACKWARD_BYTES_PER_SCORE, square=True):
        b, m = len(range(p.batch)[batch]), len(tile_rows)
        r = slice(tile_rows.start - rows.start, tile_rows.stop - rows.start)
        tile_lse = lse[batch, :, r].reshape(b, hk, g, m, 1)
        weight = row_weight[batch, r].reshape(b, 1, 1, m, 1)
        grads = col_grad[batch].repeat_interleave(p.heads // col_grad.shape[1], dim=1).reshape(b, hk, g, 1, p.k_len)

        def weights(keys):
            """(b, Hk, G, M, N) softmax weights of the tile's rows against ``keys``, and with a soft cap
            the slope of the capped scores in the uncapped ones, 1 - (s / softcap)^2 (else None)."""
            s = _scores(query, key, p, batch, tile_rows, keys, key_keep).view(b, hk, g, m, -1)
            # Hidden scores are -inf: the clamp gives them slope 0 (their weight is 0), not -inf.
            slope = s.div(p.softcap).square_().neg_().add_(1.0).clamp_(min=0.0) if p.softcap else None
            return s.sub_(tile_lse).exp_(), slope

        first = weights(key_blocks[0]) if len(key_blocks) == 1 else None
        dot = 0.0  # D_i: [.., M, N] @ [.., N, 1] -> [.., M, 1]
        for keys in key_blocks:
            w, _ = first if first is not None else weights(keys)
            dot = dot + torch.matmul(w, grads[..., keys.start : keys.stop].transpose(-1, -2))
        c = dot.mul_(weight)
        if lse_grad is not None:
            c.sub_(lse_grad[batch, :, r].reshape(b, hk, g, m, 1))
        q = query[batch, :, tile_rows.start : tile_rows.stop].reshape(b, hk, g * m, p.head_dim)
        for keys in key_blocks:
            w, slope = first if first is not None else weights(keys)
            ds = (grads[..., keys.start : keys.stop] * weight).sub_(c).mul_(w)  # / scale
            if slope is not None:  # through the cap: d(capped)/d(uncapped)
                ds.mul_(slope)
            ds = ds.view(b, hk, g * m, -1)
            # The scale of ds = scale * dL/ds' (s' = q . k) goes on the small results.
            dq[batch, :, tile_rows.start : tile_rows.stop] += torch.matmul(ds, key[batch, :, keys.start : keys.stop]).view(
                b, p.heads, m, p.head_dim).mul_(p.scale)
            dk[batch, :, keys.start : keys.stop] += torch.matmul(ds.transpose(-1, -2), q).mul_(p.scale)  # [.., N, G*M] @ [.., G*M, D]
    return dq, dk
