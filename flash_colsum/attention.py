"""One fused attention forward that also returns the per-row log-sum-exp, so `column_stats`
can skip its first pass (``column_stats(q, k, lse=lse)``)."""

from __future__ import annotations

import torch

from .utils import make_problem


def attention_with_lse(query, key, value, *, scale=None, is_causal=False):
    """PyTorch's fused attention forward, returning (output, lse).

    Args:
        query: (B, H, Sq, D); key, value: (B, Hk, Sk, D) and (B, Hk, Sk, Dv), H a multiple of Hk.
        is_causal: bottom-right aligned (query i sees key j iff j <= i + Sk - Sq), as `column_stats`.

    Returns:
        output (B, H, Sq, Dv) in the input dtype, and lse (B, H, Sq) float32, natural log, the value
        `column_stats` takes as ``lse``.

    On CUDA this runs the memory-efficient kernel (``aten::_efficient_attention_forward``, its
    bottom-right causal mode); on the CPU the fused CPU flash kernel, which for a causal Sq != Sk
    needs an explicit (Sq, Sk) float mask. GQA key/value heads are repeated for these kernels
    (a copy of K and V). Both are private PyTorch operators, checked by the test suite.
    """
    p = make_problem(query, key, scale, is_causal, "torch")
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be (B, Hk, Sk, Dv) matching key {tuple(key.shape)}; got {tuple(getattr(value, 'shape', ()))}")
    if value.dtype != query.dtype or value.device != query.device:
        raise TypeError(f"value must match query's dtype and device; got {value.dtype} on {value.device}")
    if p.group > 1:
        key, value = key.repeat_interleave(p.group, dim=1), value.repeat_interleave(p.group, dim=1)
    if query.is_cuda:
        mask_type = 2 if p.causal else 0  # 2: causal from the bottom right
        out, lse = torch.ops.aten._efficient_attention_forward(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),  # (B, S, H, D) layout
            None, None, None, None, None, 0.0, mask_type, True, scale=p.scale,
        )[:2]
        return out.transpose(1, 2), lse[:, :, : p.q_len].float()  # the kernel pads lse's rows
    bias = None
    if p.causal and p.q_len != p.k_len:
        i = torch.arange(p.q_len, device=query.device)[:, None]
        j = torch.arange(p.k_len, device=query.device)[None, :]
        bias = torch.zeros((p.q_len, p.k_len), dtype=query.dtype, device=query.device)
        bias.masked_fill_(j > i + p.causal_offset, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, p.causal and bias is None, attn_mask=bias, scale=p.scale
    )
    return out, lse.float()
