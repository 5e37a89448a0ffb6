"""The readable reference: build the whole attention matrix, then reduce its columns.

Memory O(B * H * Sq * Sk): use it for checking and for small inputs only. Tests and benchmarks
call it with ``dtype=torch.float64`` as the ground truth.
"""

from __future__ import annotations

import torch

from .utils import SUPPORTED_DTYPES, check_positive_int, make_problem, resolve_rows

_DTYPES = SUPPORTED_DTYPES + (torch.float64,)


def attention_weights(query, key, scale=None, is_causal=False, key_padding_mask=None, *, softcap=None, window=None,
                      dtype=torch.float64):
    """softmax(scale * Q K^T) as a (B, H, Sq, Sk) tensor of ``dtype``; with ``softcap``, of
    softcap * tanh(scale * Q K^T / softcap).

    Causal is bottom-right aligned, and with a sliding ``window`` query i sees only the keys j with
    i + Sk - Sq - window < j <= i + Sk - Sq; padded keys (mask False/0) get weight 0; a row with every
    key masked is all 0.
    """
    p = make_problem(query, key, scale, is_causal, "torch", allowed_dtypes=_DTYPES, softcap=softcap, window=window)
    k = key.to(dtype).repeat_interleave(p.group, dim=1)  # query head h reads key head h // G
    scores = p.scale * (query.to(dtype) @ k.transpose(-1, -2))  # [B, H, Sq, D] @ [B, H, D, Sk]
    if p.softcap:
        scores = p.softcap * torch.tanh(scores / p.softcap)
    hidden = torch.zeros((p.q_len, p.k_len), dtype=torch.bool, device=query.device)
    if p.causal:
        i = torch.arange(p.q_len, device=query.device)[:, None]
        j = torch.arange(p.k_len, device=query.device)[None, :]
        hidden = j > i + p.causal_offset
        if p.window:
            hidden = hidden | (j <= i + p.causal_offset - p.window)
    hidden = hidden[None, None]
    if key_padding_mask is not None:
        hidden = hidden | (key_padding_mask == 0)[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    return torch.nan_to_num(weights, nan=0.0)  # a row with every key masked gives 0/0


def reference_column_stats(
    query, key, *, scale=None, is_causal=False, reduce="mean", normalize="rows", heads="mean", rows=None,
    row_mask=None, query_padding_mask=None, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
    softcap=None, window=None, dtype=torch.float64,
):
    """`column_stats` by materializing the weights; same arguments (no lse, accumulation or backend)."""
    if cu_seqlens_q is not None:  # one sequence at a time, results packed along keys
        kwargs = dict(scale=scale, is_causal=is_causal, reduce=reduce, normalize=normalize, heads=heads, rows=rows,
                      softcap=softcap, window=window, dtype=dtype)
        heads_kept = {"none": query.shape[1]}.get(heads, key.shape[1] if heads.startswith("kv_") else None)
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = []
        for q0, q1, k0, k1 in zip(bq, bq[1:], bk, bk[1:]):
            if q1 > q0 and resolve_rows(rows, q1 - q0, allow_empty=True) is not None:
                q, k = query[q0:q1].transpose(0, 1)[None], key[k0:k1].transpose(0, 1)[None]
                pieces.append(reference_column_stats(q, k, **kwargs)[0])
            else:  # no selected row: zeros
                pieces.append(torch.zeros((k1 - k0,) if heads_kept is None else (heads_kept, k1 - k0), dtype=dtype))
        return torch.cat(pieces, dim=-1)
    b, h, sq, _ = query.shape
    hk, sk = key.shape[1], key.shape[2]
    w = attention_weights(query, key, scale, is_causal, key_padding_mask, softcap=softcap, window=window,
                          dtype=dtype)  # (B, H, Sq, Sk)
    start, stop = resolve_rows(rows, sq)
    keep = torch.zeros((b, sq), dtype=torch.bool)
    keep[:, start:stop] = True
    for mask in (row_mask, query_padding_mask):
        if mask is not None:
            keep &= (mask != 0).cpu()
    keep = keep.to(w.device)
    w = w * keep[:, None, :, None]
    if reduce == "max":
        per_head = w.amax(dim=2)
    else:
        per_head = w.sum(dim=2)
        if reduce == "mean":
            if normalize == "visible":
                i = torch.arange(sq, device=w.device)[:, None]
                j = torch.arange(sk, device=w.device)[None, :]
                sees = (j <= i + (sk - sq)) if is_causal else torch.ones((sq, sk), dtype=torch.bool, device=w.device)
                if window:
                    sees = sees & (j > i + (sk - sq) - window)
                count = (keep[:, :, None] & sees[None]).sum(dim=1)  # (B, Sk)
            else:
                count = keep.sum(dim=1, keepdim=True).expand(b, sk)
            per_head = per_head / count.clamp_min(1)[:, None, :]
    if heads == "none":
        return per_head
    if heads.startswith("kv_"):
        grouped, op = per_head.view(b, hk, h // hk, sk), heads[3:]
        return {"mean": grouped.mean(2), "sum": grouped.sum(2), "max": grouped.amax(2)}[op]
    return {"mean": per_head.mean(1), "sum": per_head.sum(1), "max": per_head.amax(1)}[heads]


def naive_colsum(query, key, scale=None, is_causal=False, cls_len=None, *, dtype=torch.float32) -> torch.Tensor:
    """Mean attention weight each key receives, (B, Sk), by materializing the attention matrix.

    Same semantics as `flash_colsum`: the mean over all H query heads and the selected query rows
    (all Sq rows, or the first ``cls_len``) of softmax(scale * q . k^T); masked weights count as 0.
    Computes and returns in ``dtype`` (float32 by default; float64 for a ground truth). Accepts
    float64 inputs as well.
    """
    p = make_problem(query, key, scale, is_causal, "torch", allowed_dtypes=_DTYPES)
    row_end = p.q_len if cls_len is None else min(check_positive_int("cls_len", cls_len), p.q_len)
    if p.batch == 0 or p.k_len == 0:
        return torch.zeros((p.batch, p.k_len), device=query.device, dtype=dtype)
    weights = attention_weights(query, key, p.scale, p.causal, dtype=dtype)[:, :, :row_end]
    return weights.sum(dim=(1, 2)) / (p.heads * row_end)
