"""Record token importance from any transformers model while it runs its fast attention.

    from flash_colsum.hf import ImportanceRecorder
    with ImportanceRecorder(model, attention_mask=batch["attention_mask"], heads="mean") as rec:
        model(**batch)
    rec.importance        # {layer index: (B, Sk) float32}

Inside the block the model's attention implementation is a registered wrapper: the output comes
from the wrapped implementation (``"sdpa"`` by default; never eager, never ``output_attentions``),
and `column_stats` records the statistic of each layer's queries and keys. No attention matrix is
built by the recorder. The statistics are recorded without gradients (they keep no layer's queries
and keys alive); call `column_stats` in the model's attention for differentiable ones. Needs
transformers >= 5 (its AttentionInterface).
"""

from __future__ import annotations

import torch

from .ops import column_stats

NAME = "colsum_recorder"  # no "flash" in it: transformers treats such names as FlashAttention kernels
_active: list["ImportanceRecorder"] = []  # innermost recorder last


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: the wrapped attention's output, plus a statistic for the recorder."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not _active:
        raise RuntimeError(f"attention implementation {NAME!r} used outside an ImportanceRecorder block")
    recorder = _active[-1]
    inner = ALL_ATTENTION_FUNCTIONS[recorder.inner]
    result = inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    recorder.record(module, query, key, scaling)
    return result


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _recording_attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the wrapped kernels take SDPA's mask


class ImportanceRecorder:
    """Context manager: run ``model`` with fast attention and record per-layer column statistics.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through the AttentionInterface.
        attention_mask: the (B, S) padding mask given to the model (1 = real token), or None. Keys
            and query rows are aligned to its end (the last Sk / Sq positions), as with a KV cache.
        inner: the attention implementation that computes the output (``"sdpa"``, ``"flash_attention_2"``...).
        **stats: `column_stats` arguments (``heads``, ``reduce``, ``normalize``, ``rows``, ``backend``...).

    ``importance`` maps each layer index to its statistic (shape as ``heads`` says); a new forward
    overwrites it. ``stacked()`` gives (layers, ...) in layer order.
    """

    def __init__(self, model, attention_mask=None, *, inner="sdpa", **stats):
        for bad in ("query_padding_mask", "key_padding_mask", "is_causal", "scale", "lse", "cu_seqlens_q", "cu_seqlens_k"):
            if bad in stats:
                raise ValueError(f"{bad} is set by the recorder from the model; do not pass it")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            raise ValueError(f"attention_mask must be a (B, S) tensor; got {getattr(attention_mask, 'shape', attention_mask)!r}")
        self.model, self.attention_mask, self.inner, self.stats = model, attention_mask, inner, stats
        self.importance: dict[int, torch.Tensor] = {}
        self._previous = None
        self._order: dict[int, int] = {}  # module id -> layer index, for modules without layer_idx

    def __enter__(self) -> "ImportanceRecorder":
        _register()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)
        _active.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _active.remove(self)
        self.model.set_attn_implementation(self._previous)
        return False

    def record(self, module, query: torch.Tensor, key: torch.Tensor, scaling) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = self._order.setdefault(id(module), len(self._order))
        q_len, k_len = query.shape[2], key.shape[2]
        masks = {}
        if self.attention_mask is not None:
            keep = self.attention_mask.to(device=query.device, dtype=torch.bool)
            masks = dict(key_padding_mask=keep[:, -k_len:], query_padding_mask=keep[:, -q_len:])
        causal = bool(getattr(module, "is_causal", False)) and q_len > 1
        with torch.no_grad():
            self.importance[layer] = column_stats(query, key, scale=scaling, is_causal=causal, **masks, **self.stats)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.importance[i] for i in sorted(self.importance)])
