"""Public API: `flash_colsum`, the mean attention weight each key receives."""

from __future__ import annotations

import torch

from .reference import naive_colsum
from .torch_backend import colsum_torch
from .utils import Problem, make_problem

__all__ = ["flash_colsum", "naive_colsum"]


def _kv_head_sums(query: torch.Tensor, key: torch.Tensor, p: Problem) -> torch.Tensor:
    """(B, Hk, Sk) float32 sums of the weights over the selected rows of each key head's query heads."""
    if p.backend == "triton":
        from .triton_backend import colsum_triton  # imports Triton only when asked for

        return colsum_triton(query, key, p)
    return colsum_torch(query, key, p)


def flash_colsum(query, key, scale=None, is_causal=False, cls_len=None, *, backend="auto") -> torch.Tensor:
    """Mean attention weight each key receives, without materializing the attention matrix.

    For each batch row b and key j::

        out[b, j] = 1 / (H * R) * sum_h sum_{i in rows} softmax_j(scale * q[b, h, i] . k[b, h // G, j])

    where ``rows`` are all Sq query rows, or the first ``cls_len`` (clamped to Sq), R is their
    count and G = H // Hk is the GQA group size.

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
            ``"torch"`` (any device, tiled under `torch_backend.get_memory_budget()`), or
            ``"auto"`` (Triton for CUDA tensors when it is installed, torch otherwise).

    Returns:
        (B, Sk) float32. Without ``is_causal`` each row sums to 1 over keys. Empty when B or Sk is 0.
        NaN or Inf in a query row or key poisons (NaN) the weights of every row it touches; the
        call still returns.

    Deterministic: no atomics; identical inputs on the same device give bitwise identical results.
    Extra memory: O(B * H * (Sq + Sk)) float32.
    """
    p = make_problem(query, key, scale, is_causal, cls_len, backend)
    if p.batch == 0 or p.k_len == 0:
        return torch.zeros((p.batch, p.k_len), device=query.device, dtype=torch.float32)
    sums = _kv_head_sums(query, key, p)
    return sums.sum(dim=1).div_(p.heads * p.n_rows)
