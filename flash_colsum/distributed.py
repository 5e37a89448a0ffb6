"""Context-parallel column statistics over torch.distributed.

Each rank of a process group holds one contiguous shard of the sequence, in rank order: queries
(B, H, Sq_r, D) and keys (B, Hk, Sk_r, D), the layout of ring attention and of PyTorch's context
parallelism. `context_parallel_column_stats` returns the statistics of the *whole* sequence
(global rows, global causal mask, bottom-right aligned) for this rank's key shard, or for all keys.

Two strategies, built on torch.distributed collectives only (NCCL on GPUs, gloo on the CPU):

* ``"heads"`` (DeepSpeed-Ulysses): an all-to-all turns sequence shards into head shards, each rank
  runs the single-device kernels on the full sequence for H / W query heads (and Hk / W key heads),
  and the per-head results are combined with one all-reduce (or all-gather). Needs H and Hk
  divisible by the world size W.
* ``"ring"``: K shards circulate to build each local row's log-sum-exp (pass 1), then Q shards
  travel with their LSE so that each rank accumulates the column statistics of its own keys
  (pass 2). The next shard's send/receive overlaps the current shard's kernels. Works for any H.

Bytes sent per rank (b = bytes per element, S = total length, W ranks, balanced shards):
  heads: (W-1)/W of the local Q and K shards, B*(H+Hk)*S/W*D*b, plus the result's all-reduce of
         B*Sk*4 bytes ((B, H or Hk, Sk) all-gather for per-head results);
  ring:  (W-1) K shards in pass 1, B*Hk*S/W*D*b each, and (W-1) Q shards with their float32 LSE in
         pass 2, B*H*S/W*(D*b + 4) each.
With a causal mask, contiguous shards leave rank 0 with the least work; a load-balanced ("zigzag")
layout gives each rank chunks i and 2W-1-i of 2W chunks. The bytes above are the same for it,
since every shard still visits every rank; only the kernels' work per step evens out.
See docs/context_parallel.md for the scaling model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from . import ops
from .ops import HEAD_MODES, NORMALIZATIONS, ROW_REDUCTIONS, head_plan
from .utils import NoGradient, make_problem, resolve_rows

STRATEGIES = ("auto", "heads", "ring")


def context_parallel_column_stats(
    query,
    key,
    *,
    group=None,
    strategy="auto",
    gather_result=False,
    scale=None,
    is_causal=False,
    reduce="mean",
    normalize="rows",
    heads="mean",
    rows=None,
    softcap=None,
    window=None,
    backend="auto",
):
    """`column_stats` of the full, sharded sequence; see the module docstring.

    Args:
        query, key: this rank's shards, (B, H, Sq_r, D) and (B, Hk, Sk_r, D); shard lengths may differ
            between ranks, every other dimension, the dtype and all arguments must match.
        group: the process group (default: the world).
        strategy: ``"heads"``, ``"ring"`` or ``"auto"`` (heads when H and Hk divide by the world size).
        gather_result: return the statistics of all Sk keys instead of this rank's Sk_r.
        scale, is_causal, reduce, normalize, heads, rows, softcap, window, backend: as in
            `column_stats`, over the global sequence (``rows`` selects global query rows; causal,
            and a sliding window, are bottom-right aligned on the global lengths).

    Every rank raises the same ValueError when any rank's input is bad, so no rank is left waiting.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel_column_stats needs an initialized torch.distributed process group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world < 2:
        raise ValueError(f"the process group has {world} rank; use column_stats on one device")
    stats = dict(scale=scale, is_causal=is_causal, reduce=reduce, normalize=normalize, heads=heads, rows=rows,
                 softcap=softcap, window=window, backend=backend)
    shards = _agree(query, key, group, world, dict(stats, strategy=strategy, gather_result=gather_result))
    q_lens, k_lens = [s[0] for s in shards], [s[1] for s in shards]
    with torch.no_grad():  # the collectives carry no gradient: record nothing
        out = _sharded_stats(query, key, group, world, rank, q_lens, k_lens, strategy, gather_result, stats)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        (out,) = NoGradient.apply("context_parallel_column_stats has no gradient; column_stats on one device has one",
                                  (out,), query, key)
    return out


def _sharded_stats(query, key, group, world, rank, q_lens, k_lens, strategy, gather_result, stats: dict) -> torch.Tensor:
    b, h, _, _ = query.shape
    hk = key.shape[1]
    if strategy == "auto":
        strategy = "heads" if h % world == 0 and hk % world == 0 else "ring"
    if strategy == "heads":
        full = _head_parallel(query, key, group, world, q_lens, k_lens, stats)
        if gather_result:
            return full
        k0 = sum(k_lens[:rank])
        return full[..., k0 : k0 + k_lens[rank]].contiguous()
    local = _ring(query, key, group, world, rank, q_lens, k_lens, stats)
    return _all_gather_keys(local, group, k_lens) if gather_result else local


def _agree(query, key, group, world: int, args: dict) -> list[tuple[int, int]]:
    """Validate locally, then compare every rank's shapes and arguments; all ranks raise alike."""
    error = None
    try:
        choices = dict(reduce=ROW_REDUCTIONS, normalize=NORMALIZATIONS, heads=HEAD_MODES, strategy=STRATEGIES)
        for name, allowed in choices.items():
            if args[name] not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {args[name]!r}")
        make_problem(query, key, args["scale"], args["is_causal"], args["backend"], softcap=args["softcap"],
                     window=args["window"])
        meta = dict(
            fixed=(query.shape[0], query.shape[1], key.shape[1], query.shape[3], str(query.dtype), query.device.type),
            args=repr(sorted(args.items())), lens=(query.shape[2], key.shape[2]),
        )
    except (TypeError, ValueError) as exc:
        error, meta = f"{type(exc).__name__}: {exc}", None
    everyone = [None] * world
    dist.all_gather_object(everyone, (error, meta), group=group)
    errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e is not None]
    if errors:
        raise ValueError("bad input on some ranks; " + "; ".join(errors))
    for field, what in (("fixed", "shapes (B, H, Hk, D), dtype and device type"), ("args", "arguments")):
        values = [m[field] for _, m in everyone]
        if any(v != values[0] for v in values):
            detail = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"ranks disagree on {what}: {detail}")
    if args["strategy"] == "heads":
        h, hk = everyone[0][1]["fixed"][1:3]
        if h % world or hk % world:
            raise ValueError(f"strategy='heads' needs H={h} and Hk={hk} divisible by the world size {world}; use 'ring'")
    return [m["lens"] for _, m in everyone]


def _head_parallel(query, key, group, world, q_lens, k_lens, stats: dict) -> torch.Tensor:
    """All-to-all from sequence shards to head shards, local kernels, one collective for the result."""
    q = _seq_to_heads(query, group, world, q_lens)  # (B, H / W, Sq, D)
    k = _seq_to_heads(key, group, world, k_lens)  # (B, Hk / W, Sk, D)
    heads = stats["heads"]
    local_heads = {"mean": "sum"}.get(heads, heads)  # a mean over all heads divides after the sum
    out = ops.column_stats(q, k, **{**stats, "heads": local_heads})
    if heads in ("mean", "sum", "max"):
        dist.all_reduce(out, op=dist.ReduceOp.MAX if heads == "max" else dist.ReduceOp.SUM, group=group)
        return out.div_(query.shape[1]) if heads == "mean" else out
    parts = [torch.empty_like(out) for _ in range(world)]  # per-head results: gather the head shards
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _seq_to_heads(x: torch.Tensor, group, world: int, lens: list[int]) -> torch.Tensor:
    """(B, heads, S_r, D) sequence shard -> (B, heads / W, S, D) head shard, by one all-to-all."""
    b, n_heads, n_local, d = x.shape
    per_rank, longest = n_heads // world, max(lens)
    # Every message padded to the longest shard: gloo's all-to-all wants equal sizes.
    x = torch.nn.functional.pad(x, (0, 0, 0, longest - n_local))
    send = [x[:, r * per_rank : (r + 1) * per_rank].contiguous() for r in range(world)]
    recv = [x.new_empty((b, per_rank, longest, d)) for _ in lens]
    _all_to_all(recv, send, group, world)
    return torch.cat([part[:, :, :n] for part, n in zip(recv, lens)], dim=2)


def _all_to_all(recv: list, send: list, group, world: int) -> None:
    """dist.all_to_all, or the same exchange as point-to-point messages on gloo, whose all-to-all
    is missing from some PyTorch releases (2.11 among them)."""
    if dist.get_backend(group) != "gloo":
        dist.all_to_all(recv, send, group=group)
        return
    rank = dist.get_rank(group)
    recv[rank].copy_(send[rank])
    p2p = [dist.P2POp(dist.isend, send[r], _peer(group, r), group) for r in range(world) if r != rank]
    p2p += [dist.P2POp(dist.irecv, recv[r], _peer(group, r), group) for r in range(world) if r != rank]
    for request in dist.batch_isend_irecv(p2p):
        request.wait()


def _ring(query, key, group, world, rank, q_lens, k_lens, stats: dict) -> torch.Tensor:
    """Ring strategy: the statistics of this rank's keys over every rank's selected query rows."""
    sq, sk = sum(q_lens), sum(k_lens)
    q_starts = [sum(q_lens[:r]) for r in range(world)]
    k_starts = [sum(k_lens[:r]) for r in range(world)]
    row_start, row_end = resolve_rows(stats["rows"], sq)
    offset = sk - sq  # global bottom-right alignment: row i sees keys j <= i + offset
    base = make_problem(query, key, stats["scale"], stats["is_causal"], stats["backend"], softcap=stats["softcap"],
                        window=stats["window"])
    backend = ops._backend_module(base)
    heads = stats["heads"]
    head_op, kv, use_max, per_program = head_plan(heads, stats["reduce"], base.group)

    def local_problem(q_rank: int, k_rank: int):
        """The (q shard, k shard) block as a single-device problem, or None if it has no work."""
        rows = (max(row_start - q_starts[q_rank], 0), min(row_end - q_starts[q_rank], q_lens[q_rank]))
        if rows[0] >= rows[1] or k_lens[k_rank] == 0:
            return None
        local_offset = q_starts[q_rank] + offset - k_starts[k_rank]
        if base.causal and rows[1] - 1 + local_offset < 0:
            return None  # every selected row lies before the first key of the shard
        if base.window and rows[0] + local_offset - base.window + 1 >= k_lens[k_rank]:
            return None  # every selected row's window starts past the shard's last key
        return dataclasses.replace(
            base, q_len=q_lens[q_rank], k_len=k_lens[k_rank], row_start=rows[0], row_end=rows[1],
            causal_offset=local_offset,
        )

    # Pass 1: this rank's rows against every K shard; K travels around the ring.
    rows = range(max(row_start - q_starts[rank], 0), max(min(row_end - q_starts[rank], q_lens[rank]), 0))
    lse = query.new_full((base.batch, base.heads, len(rows)), float("-inf"), dtype=torch.float32)
    for k_rank, (k_shard,) in _circulate([key.contiguous()], group, world, rank, k_lens):
        p = local_problem(rank, k_rank)
        if p is not None:
            part = backend.row_lse(query, k_shard, p, None, range(p.row_start, p.row_end))
            lse = torch.logaddexp(lse, part.masked_fill(torch.isposinf(part), float("-inf")))
    # All local rows' LSE, +inf outside the selection and for rows that see no key anywhere.
    full_lse = query.new_full((base.batch, base.heads, q_lens[rank]), float("inf"), dtype=torch.float32)
    full_lse[:, :, rows.start : rows.stop] = lse.masked_fill_(torch.isneginf(lse), float("inf"))

    # Pass 2: every rank's rows (with their LSE) against this rank's keys; Q and LSE travel.
    out = None
    for q_rank, (q_shard, q_lse) in _circulate([query.contiguous(), full_lse], group, world, rank, q_lens):
        p = local_problem(q_rank, rank)
        if p is None:
            continue
        part = backend.col_reduce(q_shard, key, q_lse[:, :, p.row_start : p.row_end], p, per_program, use_max)
        out = part if out is None else (torch.maximum(out, part) if use_max else out.add_(part))
    if out is None:
        out = key.new_zeros((base.batch, base.heads // per_program, key.shape[2]), dtype=torch.float32)

    count = 1
    if stats["reduce"] == "mean":
        glob = dataclasses.replace(base, q_len=sq, k_len=sk, row_start=row_start, row_end=row_end, causal_offset=offset)
        count = ops._visible_row_counts(glob, None, stats["normalize"], query.device)
        if not isinstance(count, int):
            count = count[:, k_starts[rank] : k_starts[rank] + k_lens[rank]]  # this rank's keys
    return ops._reduce_heads(out, dataclasses.replace(base, k_len=key.shape[2]), heads, head_op, kv, count)


def _peer(group, group_rank: int) -> int:
    """The global rank that point-to-point operations address."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _circulate(tensors: list, group, world: int, rank: int, lens: list[int]):
    """Yield (owner rank, tensors) for every rank's shard, ours first, moving one step along the ring
    per yield. Each tensor holds the sequence on dim 2 (shard lengths may differ: ``lens``). The
    next shard's send/receive is posted before the caller works on the current one, so they overlap."""
    current, owner = tensors, rank
    for step in range(world):
        pending, incoming = [], []
        if step < world - 1:
            source = (owner - 1) % world
            for t in current:
                shape = list(t.shape)
                shape[2] = lens[source]
                incoming.append(t.new_empty(shape))
            p2p = [dist.P2POp(dist.isend, t, _peer(group, (rank + 1) % world), group) for t in current]
            p2p += [dist.P2POp(dist.irecv, t, _peer(group, (rank - 1) % world), group) for t in incoming]
            pending = dist.batch_isend_irecv(p2p)
        yield owner, current
        for request in pending:
            request.wait()
        if incoming:
            current, owner = incoming, source


def _all_gather_keys(local: torch.Tensor, group, lens: list[int]) -> torch.Tensor:
    """Concatenate every rank's key-shard result along the last axis (shards may differ in length)."""
    longest = max(lens)
    padded = torch.nn.functional.pad(local, (0, longest - local.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in lens]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[..., :n] for part, n in zip(parts, lens)], dim=-1)
