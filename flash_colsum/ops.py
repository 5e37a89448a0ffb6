"""Public API: `column_stats`, every column statistic of softmax attention, and `flash_colsum`, its
0.1.0-compatible shortcut (the mean weight each key receives). Both are differentiable in query
and key through the `flash_colsum::reduce_columns` operator's registered backward."""

from typing import Optional

import torch

from . import torch_backend
from .reference import naive_colsum
from .utils import (NoGradient, Problem, check_mask, check_tensor_arg, drop_rows, interpreting, make_problem,
                    problem_from_shapes, resolve_rows)

__all__ = ["column_stats", "flash_colsum", "naive_colsum"]

ROW_REDUCTIONS = ("sum", "mean", "max")
NORMALIZATIONS = ("rows", "visible")
HEAD_MODES = ("mean", "sum", "max", "none", "kv_mean", "kv_sum", "kv_max")


def _backend_module(p: Problem):
    if p.backend == "triton":
        from . import triton_backend  # imports Triton only when asked for

        return triton_backend
    return torch_backend


def _reduce_columns(query, key, p: Problem, lse, key_keep, row_keep, heads_per_chunk: int, use_max: bool, full_lse: bool,
                    divisor: float = 1.0, partials_ok: bool = False):
    """Reduce the weights over the selected rows (and chunks of heads) -> ((B, H // heads_per_chunk, Sk), lse),
    the reduction divided by ``divisor`` (a mean's constant: the kernels scale their stores).

    lse: a given (B, H, Sq) natural-log LSE, or None to compute it (pass 1); the returned lse is the
    computed one ((B, H, Sq) when full_lse, else (B, H, n_rows)), or None when it was given or not kept.
    partials_ok: the caller reduces every query head of a key head with the row reduction's kind, so
    the result may come as (B, H * R, Sk), R partials per head (the Triton back end's fused small calls).
    """
    backend = _backend_module(p)
    if lse is None and backend is torch_backend and not full_lse and torch_backend.fits_one_pass(p):
        return torch_backend.one_pass(query, key, p, key_keep, row_keep, heads_per_chunk, use_max, divisor)
    computed = None
    kernels_only = lse is None and backend is not torch_backend and not full_lse  # no LSE in or out
    if kernels_only:
        # Small calls in one launch; few rows over long keys from pass 1's stored scores.
        reduced = None
        if row_keep is None:
            reduced = backend.fused_reduce(query, key, p, key_keep, heads_per_chunk, use_max, divisor, partials_ok)
        if reduced is None:
            reduced = backend.scores_reduce(query, key, p, key_keep, row_keep, heads_per_chunk, use_max, divisor)
        if reduced is not None:
            return reduced, None
    if kernels_only and row_keep is None:
        # Pass 2 combines pass 1's key-split partials itself: no torch kernels in between.
        lse = backend.row_lse(query, key, p, key_keep, combine=False)
    elif lse is None:
        lse_rows = range(0, p.q_len) if full_lse else range(p.row_start, p.row_end)
        computed = lse = backend.row_lse(query, key, p, key_keep, lse_rows)
        lse = lse[:, :, p.row_start - lse_rows.start : p.row_end - lse_rows.start]
    else:
        # Rows that see no key may come as -inf from other kernels; ours use +inf: weight 0.
        lse = lse[:, :, p.row_start : p.row_end]
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    lse = drop_rows(lse, row_keep, p)
    return backend.col_reduce(query, key, lse, p, heads_per_chunk, use_max, divisor=divisor), computed


# The kernels as one PyTorch operator: opaque to torch.compile (no graph break; shapes from the
# fake implementation below) and safe inside CUDA graph capture (no host synchronization).
@torch.library.custom_op("flash_colsum::reduce_columns", mutates_args=())
def reduce_columns_op(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: Optional[torch.Tensor],
    key_keep: Optional[torch.Tensor],
    row_keep: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    row_start: int,
    row_end: int,
    heads_per_chunk: int,
    use_max: bool,
    full_lse: bool,
    backend: str,
    divisor: float,
    softcap: float,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H // heads_per_chunk, Sk) reduced weights and, with ``full_lse``, the computed (B, H, Sq)
    LSE (else an empty tensor: the kernels may not keep it)."""
    return _reduce_chunks(query, key, lse, key_keep, row_keep, scale, causal, row_start, row_end, heads_per_chunk, use_max,
                          full_lse, backend, divisor, softcap, window)


def _reduce_chunks(query, key, lse, key_keep, row_keep, scale, causal, row_start, row_end, heads_per_chunk, use_max,
                   full_lse, backend, divisor, softcap, window):
    """`reduce_columns_op`'s computation."""
    p = problem_from_shapes(query, key, scale, causal, row_start, row_end, backend, softcap, window)
    # A chunk of a whole key head's query heads may come as a fused launch's partials (one launch
    # for a small call, as in eager calls): (B, H * R / PACK, Sk), R row blocks a head, reduced here.
    out, computed = _reduce_columns(query, key, p, lse, key_keep, row_keep, heads_per_chunk, use_max, full_lse, divisor,
                                    partials_ok=heads_per_chunk == p.group)
    n_chunks = p.heads // heads_per_chunk
    if out.shape[1] != n_chunks:
        out = out.view(p.batch, n_chunks, -1, p.k_len)
        out = out.amax(dim=2) if use_max else out.sum(dim=2)
    return out, computed if full_lse else query.new_empty((0,), dtype=torch.float32)


@reduce_columns_op.register_fake
def _(query, key, lse, key_keep, row_keep, scale, causal, row_start, row_end, heads_per_chunk, use_max, full_lse, backend,
      divisor, softcap, window):
    b, h, sq = query.shape[:3]
    out = query.new_empty((b, h // heads_per_chunk, key.shape[2]), dtype=torch.float32)
    return out, query.new_empty((b, h, sq) if full_lse else (0,), dtype=torch.float32)


# Gradients: through the softmax to query and key, by two Triton kernels (backward.column_grads) or
# budget-sized PyTorch tiles (torch_backend.col_reduce_backward); an operator of its own, so that
# torch.compile traces it.
@torch.library.custom_op("flash_colsum::reduce_columns_backward", mutates_args=())
def reduce_columns_backward_op(
    grad: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    lse: Optional[torch.Tensor],
    key_keep: Optional[torch.Tensor],
    row_keep: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    row_start: int,
    row_end: int,
    heads_per_chunk: int,
    full_lse: bool,
    backend: str,
    divisor: float,
    softcap: float = 0.0,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) of `reduce_columns_op`'s sums for its gradients ``grad`` (B, H // heads_per_chunk, Sk)
    and, with ``full_lse``, ``grad_lse`` (B, H, Sq). A given ``lse`` is taken as the exact LSE of
    query and key: the gradient is the softmax statistic's, and ``lse`` itself gets none."""
    return _reduce_grads(grad, grad_lse, query, key, lse, key_keep, row_keep, scale, causal, row_start, row_end,
                         heads_per_chunk, full_lse, backend, divisor, softcap, window)


def _reduce_grads(grad, grad_lse, query, key, lse, key_keep, row_keep, scale, causal, row_start, row_end, heads_per_chunk,
                  full_lse, backend, divisor, softcap=0.0, window=0):
    """`reduce_columns_backward_op`'s computation."""
    p = problem_from_shapes(query, key, scale, causal, row_start, row_end, backend, softcap, window)
    rows = range(0, p.q_len) if full_lse else range(p.row_start, p.row_end)
    if lse is not None:  # else each back end's backward computes it
        lse = lse[:, :, rows.start : rows.stop]
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    # The divisor of a mean goes on the row weights: one multiply fewer per score, no copy of grad.
    if row_keep is None and len(rows) == p.n_rows:
        row_weight = torch.full((p.batch, len(rows)), 1.0 / divisor, device=query.device, dtype=torch.float32)
    else:
        row_weight = torch.zeros((p.batch, len(rows)), device=query.device, dtype=torch.float32)
        row_weight[:, p.row_start - rows.start : p.row_end - rows.start] = 1.0 / divisor
        if row_keep is not None:
            row_weight.mul_(row_keep[:, rows.start : rows.stop])
    col_grad = grad.float()  # (B, H // heads_per_chunk, Sk)
    lse_grad = grad_lse.float() if full_lse else None
    if p.backend == "triton":
        from . import backward

        grads_of = backward.column_grads
    else:
        grads_of = torch_backend.col_reduce_backward
    dq, dk = grads_of(query, key, lse, p, rows, key_keep, row_weight, col_grad, lse_grad)
    return dq.to(query.dtype), dk.to(key.dtype)


@reduce_columns_backward_op.register_fake
def _(grad, grad_lse, query, key, *args):
    return torch.empty_like(query), torch.empty_like(key)


def _save_for_backward(ctx, inputs, output):
    query, key, lse, key_keep, row_keep, *args = inputs
    ctx.save_for_backward(query, key, lse, key_keep, row_keep)
    ctx.args = args  # scale, causal, row_start, row_end, heads_per_chunk, use_max, full_lse, backend, divisor, softcap, window


def _backward(ctx, grad, grad_lse, grads_of=reduce_columns_backward_op):
    query, key, lse, key_keep, row_keep = ctx.saved_tensors
    scale, causal, row_start, row_end, heads_per_chunk, use_max, full_lse, backend, divisor, softcap, window = ctx.args
    if use_max:
        raise NotImplementedError("column_stats: reduce='max' has no gradient; reduce='sum' and 'mean' have one")
    dq, dk = grads_of(grad, grad_lse, query, key, lse, key_keep, row_keep, scale, causal, row_start, row_end,
                      heads_per_chunk, full_lse, backend, divisor, softcap, window)
    return dq, dk, *[None] * 14  # nothing for lse, the masks and the arguments


torch.library.register_autograd("flash_colsum::reduce_columns", _backward, setup_context=_save_for_backward)


class _EagerReduceColumns(torch.autograd.Function):
    """`reduce_columns_op` and its gradient for eager calls: the dispatcher's custom-op path costs
    ~0.3-0.5 ms of host time a call (a small call's forward took 0.50 ms instead of 0.05 on the H100).
    torch.compile traces the operators instead (`reduce_columns_op`, whose registered backward calls
    `reduce_columns_backward_op`)."""

    @staticmethod
    def forward(ctx, *inputs):
        _save_for_backward(ctx, inputs, None)
        return _reduce_chunks(*inputs)

    @staticmethod
    def backward(ctx, grad, grad_lse):
        with torch.no_grad():  # without the dispatcher here too; the torch tiles record nothing
            dq, dk, *nothing = _backward(ctx, grad, grad_lse, _reduce_grads)
        # First order only: under create_graph a second backward through dq, dk raises (a gradient
        # penalty would otherwise take them as constants), as the operator's backward does.
        if torch.is_grad_enabled():
            dq, dk = NoGradient.apply("column_stats gradients are first order: no second backward", (dq, dk),
                                      *[t for t in (grad, *ctx.saved_tensors[:2]) if t.requires_grad])
        return dq, dk, *nothing


def _visible_row_counts(p: Problem, row_keep, normalize: str, device):
    """Denominator of a row mean, broadcastable to (B, Sk): selected rows, or those that can see each key."""
    if row_keep is None and (normalize == "rows" or not p.causal):
        return p.n_rows  # a plain number: no extra kernels on the common path
    keep = torch.zeros((p.batch, p.q_len), dtype=torch.bool, device=device)
    keep[:, p.row_start : p.row_end] = True
    if row_keep is not None:
        keep &= row_keep
    if normalize == "rows" or not p.causal:
        return keep.sum(dim=1, keepdim=True).clamp_min_(1).float()
    # Causal: key j is seen by rows i >= j - (Sk - Sq) (and, in a sliding window, i < j - (Sk - Sq) +
    # window); count them with a suffix sum over rows.
    suffix = torch.zeros((p.batch, p.q_len + 1), device=device, dtype=torch.float32)
    suffix[:, :-1] = keep.flip(1).cumsum(1).flip(1)
    first_row = torch.arange(p.k_len, device=device) - p.causal_offset
    count = suffix[:, first_row.clamp(0, p.q_len)]
    if p.window:
        count = count - suffix[:, (first_row + p.window).clamp(0, p.q_len)]
    return count.clamp_min_(1)


def _validated_plan(query, key, scale, is_causal, reduce, normalize, heads, rows, backend, softcap=None,
                    window=None) -> tuple:
    """Check the arguments that every call has; (Problem with the selected rows, `head_plan`, result shape)."""
    p = make_problem(query, key, scale, is_causal, backend, softcap=softcap, window=window)
    if reduce not in ROW_REDUCTIONS:
        raise ValueError(f"reduce must be one of {ROW_REDUCTIONS}; got {reduce!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}")
    if normalize != "rows" and reduce != "mean":
        raise ValueError(f"normalize={normalize!r} applies to reduce='mean' only; got reduce={reduce!r}")
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}; got {heads!r}")
    p = p.with_rows(*resolve_rows(rows, p.q_len))
    out_shape = (p.batch, *_head_rows(heads, p.heads, p.kv_heads), p.k_len)
    return p, head_plan(heads, reduce, p.group), out_shape


# Validated plans by call signature. A small call spends more host time checking and planning than
# launching (on the lent H100's host ~77 us of host time for ~27 us of GPU work at B=1, S=1024), and
# callers repeat signatures: every layer of a model, every step of a loop. The key holds everything
# the checks read: shapes, dtypes and devices of both tensors, the arguments (with their types: 1 and
# True are equal keys in Python), and for CPU tensors whether the interpreter is on (the Triton
# back end's availability). Only arguments of plain types are keyed; others take the checks each time.
_PLANS: dict = {}
_PLANS_MAX = 1024
_PLAIN = frozenset((type(None), bool, int, float, str))


def _plan_key(query, key, scale, is_causal, reduce, normalize, heads, rows, backend, softcap=None, window=None):
    """A call's signature for `_PLANS`, or None where an argument is not of a plain type (or under
    torch.compile, which traces the checks)."""
    if (type(query) is not torch.Tensor or type(key) is not torch.Tensor or torch.compiler.is_compiling()
            or not {type(scale), type(is_causal), type(reduce), type(normalize), type(heads), type(backend),
                    type(softcap), type(window)} <= _PLAIN):
        return None
    if rows is not None:
        if type(rows) not in (slice, range) or not {type(rows.start), type(rows.stop), type(rows.step)} <= _PLAIN:
            return None
        rows = (type(rows), rows.start, rows.stop, rows.step)
    device = query.device
    return (query.shape, key.shape, query.dtype, key.dtype, device, key.device, device.type == "cuda" or interpreting(),
            type(scale), scale, type(is_causal), is_causal, reduce, normalize, heads, rows, backend, type(softcap), softcap,
            type(window), window)


def _call_plan(*args) -> tuple:
    """`_validated_plan(*args)`, memoized by `_plan_key(*args)` where there is one."""
    signature = _plan_key(*args)
    plan = None if signature is None else _PLANS.get(signature)
    if plan is None:
        plan = _validated_plan(*args)
        if signature is not None:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            _PLANS[signature] = plan
    return plan


def column_stats(
    query,
    key,
    *,
    scale=None,
    is_causal=False,
    reduce="mean",
    normalize="rows",
    heads="mean",
    rows=None,
    row_mask=None,
    query_padding_mask=None,
    key_padding_mask=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    lse=None,
    return_lse=False,
    accumulate_into=None,
    softcap=None,
    window=None,
    backend="auto",
):
    """Column statistics of softmax attention, without materializing the Sq x Sk matrix.

    With weights w[b, h, i, j] = softmax_j(scale * q[b, h, i] . k[b, h // G, j]) (G = H // Hk; masked
    keys excluded from the softmax), reduce w over the selected query rows i, then over heads h.

    Args:
        query: (B, H, Sq, D) float16/bfloat16/float32, any strides; or (total_q, H, D) packed
            sequences with ``cu_seqlens_q``.
        key: (B, Hk, Sk, D), H a multiple of Hk; or (total_k, Hk, D) with ``cu_seqlens_k``.
        scale: default 1 / sqrt(D).
        is_causal: bottom-right aligned: query i sees key j iff j <= i + (Sk - Sq).
        reduce: over rows: ``"sum"``, ``"mean"`` or ``"max"``.
        normalize: for ``reduce="mean"``: ``"rows"`` divides by the number of selected rows (0.1.0);
            ``"visible"`` by the number of selected rows that can see each key (H2O / kvpress's
            observed attention; differs only when causal).
        heads: ``"mean"``/``"sum"``/``"max"`` over all H heads -> (B, Sk); ``"none"`` -> (B, H, Sk);
            ``"kv_mean"``/``"kv_sum"``/``"kv_max"`` over each key head's group -> (B, Hk, Sk).
        rows: contiguous query rows to use, a ``slice`` or ``range`` in Python's convention
            (``slice(0, n)``: the first n, e.g. CLS tokens; ``slice(-n, None)``: the last n, SnapKV's
            observation window). Default: all rows.
        row_mask: (B, Sq) bool/int, True = use the row (e.g. SparseVLM's text raters). Not with ``rows``.
        query_padding_mask, key_padding_mask: (B, Sq) / (B, Sk) bool/int, transformers' convention
            (True/1 = real token). Padded rows contribute nothing and are not counted; padded keys
            are excluded from every softmax and get 0.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int cumulative lengths of packed sequences, as
            FlashAttention's varlen functions take them; sequence n is rows cu[n]:cu[n+1]. Results
            are packed too: (total_k,), (H, total_k) or (Hk, total_k). Eager only (reads lengths on host).
        lse: the per-row log-sum-exp the attention forward already computed (natural log, float32,
            (B, H, Sq') with Sq' >= Sq, extra columns ignored; (H, total_q) for packed input), computed
            with the same scale and masks. Skips the first pass. -inf rows are treated as empty rows.
        return_lse: also return the (B, H, Sq) float32 natural-log LSE (+inf for rows that see no key).
        accumulate_into: a float32 tensor of the result's shape and device; the result is added
            into it in place and it is returned (running statistics across decoding steps, H2O).
        softcap: logit soft-capping (Gemma 2's ``attn_logit_softcapping``): the scores become
            softcap * tanh(scale * q . k / softcap) before the masks and the softmax. A finite positive
            number, or None (off). Both back ends (the Hopper passes too, not its fused launch,
            windows only up to D=128), gradients included.
        window: a sliding window (Mistral, Gemma 2/3, gpt-oss): with ``is_causal``, query i sees only
            the ``window`` keys up to its diagonal, i + (Sk - Sq) - window < j <= i + (Sk - Sq), as
            transformers' sliding_window masks. A positive int, or None (off). Both back ends (the
            Hopper path up to D=192, D=128 with ``softcap``), gradients included; key blocks outside
            every window are skipped.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see `flash_colsum`).

    Returns:
        float32 statistics, shaped as ``heads`` says; with ``return_lse``, a tuple (stats, lse).
        A batch row with no selected row gives zeros. NaN/Inf inputs give NaN where they reach.

    Gradients: with ``reduce="sum"`` or ``"mean"`` the statistics (and a returned LSE) are
    differentiable in ``query`` and ``key`` (first order). The forward saves only its inputs; the
    backward recomputes the weights: two Triton kernels on the Triton back end (`flash_colsum.backward`),
    PyTorch tiles under `get_memory_budget()` on the torch one. A given ``lse`` is taken as the exact
    LSE of ``query`` and ``key`` and gets no gradient; ``reduce="max"`` raises NotImplementedError
    on backward. Gradients come in the inputs' dtype: a mean's are ~1/(H·Sq·Sk) per element, below
    fp16's smallest normal number at long sequences; scale the loss (as any fp16 training does) or
    use bf16.
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        return _column_stats_varlen(
            query, key, cu_seqlens_q, cu_seqlens_k, lse=lse, return_lse=return_lse, accumulate_into=accumulate_into,
            conflicts=dict(row_mask=row_mask, query_padding_mask=query_padding_mask, key_padding_mask=key_padding_mask),
            scale=scale, is_causal=is_causal, reduce=reduce, normalize=normalize, heads=heads, rows=rows, backend=backend,
            softcap=softcap, window=window,
        )
    if rows is not None and row_mask is not None:
        raise ValueError("give rows or row_mask, not both: they are two ways to select query rows")
    p, (head_op, kv, use_max, heads_per_chunk), out_shape = _call_plan(
        query, key, scale, is_causal, reduce, normalize, heads, rows, backend, softcap, window)
    b, sq, sk = p.batch, p.q_len, p.k_len
    row_keep = check_mask("row_mask", row_mask, (b, sq), query.device)
    pad_keep = check_mask("query_padding_mask", query_padding_mask, (b, sq), query.device)
    if pad_keep is not None:
        row_keep = pad_keep if row_keep is None else row_keep & pad_keep
    key_keep = check_mask("key_padding_mask", key_padding_mask, (b, sk), query.device)
    if lse is not None:
        check_tensor_arg("lse", lse, torch.float32, query.device)
        if lse.dim() != 3 or tuple(lse.shape[:2]) != (b, p.heads) or lse.shape[2] < sq:
            raise ValueError(f"lse must be (B, H, Sq) = ({b}, {p.heads}, {sq}) (extra trailing rows allowed); got {tuple(lse.shape)}")
    _check_accumulator(accumulate_into, out_shape, query.device)

    if b == 0 or sk == 0:
        stats = torch.zeros(out_shape, device=query.device, dtype=torch.float32)
        computed = torch.full((b, p.heads, sq), float("inf"), device=query.device) if return_lse else None
    else:
        full_lse = return_lse and lse is None
        count = _visible_row_counts(p, row_keep, normalize, query.device) if reduce == "mean" else 1
        divisor = _divisor(p, heads, head_op, kv, count)  # folded into the kernels' stores
        # The registered operator under torch.compile (opaque to the compiler), and its autograd
        # function wherever a gradient may be asked for (it saves only its inputs).
        compiling = torch.compiler.is_compiling()
        if compiling or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)):
            args = (query, key, lse, key_keep, row_keep, p.scale, p.causal, p.row_start, p.row_end, heads_per_chunk,
                    use_max, full_lse, p.backend, float(divisor), p.softcap, p.window)
            chunks, computed = reduce_columns_op(*args) if compiling else _EagerReduceColumns.apply(*args)
            if chunks.requires_grad:  # the outputs may be views, which autograd forbids changing in place
                chunks, computed = chunks.clone(), computed.clone()
        else:  # eager: the same code without the dispatcher's per-call overhead
            chunks, computed = _reduce_columns(query, key, p, lse, key_keep, row_keep, heads_per_chunk, use_max, full_lse,
                                               divisor, partials_ok=heads != "none" and (head_op == "max") == use_max)
        if key_keep is not None:
            chunks = chunks.masked_fill_(~key_keep[:, None, :], 0.0)
        stats = _reduce_heads(chunks, p, heads, head_op, kv, count, divided=True)
    if accumulate_into is not None:
        stats = accumulate_into.add_(stats)
    if return_lse:
        return stats, (lse[:, :, :sq] if lse is not None else computed)
    return stats


def head_plan(heads: str, reduce: str, group: int) -> tuple:
    """(head_op, per-KV-head?, row max?, query heads a kernel program reduces together).

    A program reduces a whole GQA group when the head reduction is of the row reduction's kind
    (sums with sums, maxima with maxima), else one head.
    """
    kv = heads.startswith("kv_")
    head_op = heads[3:] if kv else heads
    use_max = reduce == "max"
    same_kind = heads != "none" and (head_op == "max" if use_max else head_op in ("sum", "mean"))
    return head_op, kv, use_max, group if same_kind else 1


def divide_by_counts(stats: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A row mean: stats (B, [heads,] Sk) over per-key row counts (B, Sk), in place."""
    return stats.div_(count if stats.dim() == 2 else count[:, None, :])


def _head_rows(heads: str, n_heads: int, n_kv_heads: int) -> tuple:
    """The head axis a result keeps: () when heads are reduced away, (H,) or (Hk,) otherwise."""
    if heads == "none":
        return (n_heads,)
    return (n_kv_heads,) if heads.startswith("kv_") else ()


def _check_accumulator(buffer, shape: tuple, device) -> None:
    if buffer is None:
        return
    check_tensor_arg("accumulate_into", buffer, torch.float32, device)
    if tuple(buffer.shape) != shape:
        raise ValueError(f"accumulate_into must have the result's shape {shape}; got {tuple(buffer.shape)}")


def _divisor(p: Problem, heads: str, head_op: str, kv: bool, count=1) -> int:
    """The constant a result is divided by: a row mean's ``count`` when it is a number, times the
    head mean's head count. Sums and maxima commute with it, so the kernels can apply it."""
    divisor = count if isinstance(count, int) else 1
    if heads != "none" and head_op == "mean":
        divisor *= p.group if kv else p.heads
    return divisor


def _reduce_heads(chunks: torch.Tensor, p: Problem, heads: str, head_op: str, kv: bool, count=1,
                  divided: bool = False) -> torch.Tensor:
    """(B, C, Sk) per head chunk -> the requested head reduction, divided by a row mean's ``count``
    (a number, or (B, Sk)) and the head mean's head count; ``divided``: the kernels already divided
    by that constant (`_divisor`)."""
    if heads == "none":
        x = chunks
    else:
        x = chunks.view(p.batch, p.kv_heads, -1, p.k_len)
        per_result = x.shape[2] if kv else x.shape[1] * x.shape[2]  # chunks reduced into each result row
        if per_result == 1:  # nothing to reduce: no kernel
            x = x.view(p.batch, -1, p.k_len) if kv else x.view(p.batch, p.k_len)
        else:
            dims = (2,) if kv else (1, 2)
            x = x.amax(dim=dims) if head_op == "max" else x.sum(dim=dims)
    divisor = 1 if divided else _divisor(p, heads, head_op, kv, count)
    if divisor != 1:
        x = x.div_(divisor)
    return x if isinstance(count, int) else divide_by_counts(x, count)


def _column_stats_varlen(query, key, cu_seqlens_q, cu_seqlens_k, *, lse, return_lse, accumulate_into, conflicts, **kwargs):
    """Packed sequences: each one is a (1, H, len, D) strided view, so nothing is copied."""
    from .utils import check_varlen

    bounds_q, bounds_k = check_varlen(query, key, cu_seqlens_q, cu_seqlens_k, conflicts)
    total_k, heads, kv_heads = key.shape[0], query.shape[1], key.shape[1]
    if lse is not None:
        check_tensor_arg("lse", lse, torch.float32, query.device)
        if tuple(lse.shape) != (heads, query.shape[0]):
            raise ValueError(f"with cu_seqlens, lse must be (H, total_q) = ({heads}, {query.shape[0]}); got {tuple(lse.shape)}")
    out_shape = (*_head_rows(kwargs["heads"], heads, kv_heads), total_k)
    _check_accumulator(accumulate_into, out_shape, query.device)
    stats = torch.zeros(out_shape, device=query.device, dtype=torch.float32)
    lse_out = torch.full((heads, query.shape[0]), float("inf"), device=query.device) if return_lse else None
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if k1 == k0 or q1 == q0 or resolve_rows(kwargs["rows"], q1 - q0, allow_empty=True) is None:
            continue  # no keys, or no selected rows: this sequence's statistics stay 0
        q = query[q0:q1].transpose(0, 1).unsqueeze(0)  # (1, H, len_q, D) view
        k = key[k0:k1].transpose(0, 1).unsqueeze(0)
        seq_lse = None if lse is None else lse[:, q0:q1].unsqueeze(0)
        res = column_stats(q, k, lse=seq_lse, return_lse=return_lse, **kwargs)
        seq_stats, seq_lse = res if return_lse else (res, None)
        stats[..., k0:k1] = seq_stats[0]
        if return_lse:
            lse_out[:, q0:q1] = seq_lse[0]
    if accumulate_into is not None:
        stats = accumulate_into.add_(stats)
    if return_lse:
        return stats, (lse if lse is not None else lse_out)
    return stats


def flash_colsum(query, key, scale=None, is_causal=False, cls_len=None, *, backend="auto") -> torch.Tensor:
    """Mean attention weight each key receives, without materializing the attention matrix.

    For each batch row b and key j::

        out[b, j] = 1 / (H * R) * sum_h sum_{i in rows} softmax_j(scale * q[b, h, i] . k[b, h // G, j])

    where ``rows`` are all Sq query rows, or the first ``cls_len`` (clamped to Sq), R is their
    count and G = H // Hk is the GQA group size. The 0.1.0 API; `column_stats` does the rest.

    Args:
        query: (B, H, Sq, D), float16, bfloat16 or float32, any strides.
        key: (B, Hk, Sk, D), same dtype and device; H must be a multiple of Hk (MHA, GQA, MQA).
            Sq and Sk may differ. D may be anything from 1 to 256 on the Triton back end.
        scale: score scale, default 1 / sqrt(D); finite and positive.
        is_causal: bottom-right aligned causal mask, as FlashAttention: query i sees key j iff
            j <= i + (Sk - Sq). Masked weights count as 0 in the mean; a row that sees no key at
            all (possible when Sq > Sk) contributes 0 but still counts in R.
        cls_len: average only over the first ``cls_len`` query rows (e.g. CLS tokens).
        backend: ``"triton"`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
            ``"torch"`` (any device, tiled under `get_memory_budget()`), or
            ``"auto"`` (Triton for CUDA tensors when it is installed, torch otherwise).

    Returns:
        (B, Sk) float32. Without ``is_causal`` each row sums to 1 over keys. Empty when B or Sk is 0.
        NaN or Inf in a query row or key poisons (NaN) the weights of every row it touches; the
        call still returns.

    Deterministic: no atomics; identical inputs on the same device give bitwise identical results.
    Differentiable in query and key (see `column_stats`).
    Extra memory: O(B * H * (Sq + Sk)) float32, plus up to 8 MiB of partial sums when a small call
    (at most 2**27 scores, 2**28 at D <= 64) runs both passes in one launch, and (B, H, rows, Sk)
    float32 scores when at most D / 8 rows over long keys skip the second pass over K.
    """
    if cls_len is not None:
        from .utils import check_positive_int

        cls_len = check_positive_int("cls_len", cls_len)
    rows = None if cls_len is None else slice(0, cls_len)
    return column_stats(query, key, scale=scale, is_causal=is_causal, rows=rows, backend=backend)
