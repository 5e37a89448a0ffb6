"""The readable reference: build the whole attention matrix, then average its columns.

Memory O(B * H * Sq * Sk): use it for checking and for small inputs only. Tests and benchmarks
call it with ``dtype=torch.float64`` as the ground truth.
"""

from __future__ import annotations

import torch

from .utils import SUPPORTED_DTYPES, make_problem


def attention_weights(query, key, scale=None, is_causal=False, *, dtype=torch.float64) -> torch.Tensor:
    """softmax(scale * Q K^T) as a (B, H, Sq, Sk) tensor of ``dtype``; fully masked rows are all 0."""
    p = make_problem(query, key, scale, is_causal, None, "torch", allowed_dtypes=SUPPORTED_DTYPES + (torch.float64,))
    k = key.to(dtype).repeat_interleave(p.group, dim=1)  # query head h reads key head h // G
    scores = p.scale * (query.to(dtype) @ k.transpose(-1, -2))  # [B, H, Sq, D] @ [B, H, D, Sk]
    if p.causal:
        i = torch.arange(p.q_len, device=query.device)[:, None]
        j = torch.arange(p.k_len, device=query.device)[None, :]
        scores = scores.masked_fill(j > i + p.causal_offset, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)  # a row with every key masked gives 0/0


def naive_colsum(query, key, scale=None, is_causal=False, cls_len=None, *, dtype=torch.float32) -> torch.Tensor:
    """Mean attention weight each key receives, (B, Sk), by materializing the attention matrix.

    Same semantics as `flash_colsum`: the mean over all H query heads and the selected query rows
    (all Sq rows, or the first ``cls_len``) of softmax(scale * q . k^T); masked weights count as 0.
    Computes and returns in ``dtype`` (float32 by default; float64 for a ground truth). Accepts
    float64 inputs as well.
    """
    p = make_problem(query, key, scale, is_causal, cls_len, "torch", allowed_dtypes=SUPPORTED_DTYPES + (torch.float64,))
    if p.batch == 0 or p.k_len == 0:
        return torch.zeros((p.batch, p.k_len), device=query.device, dtype=dtype)
    weights = attention_weights(query, key, p.scale, p.causal, dtype=dtype)[:, :, p.row_start : p.row_end]
    return weights.sum(dim=(1, 2)) / (p.heads * p.n_rows)
