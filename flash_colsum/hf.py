"""Record token importance from any transformers model while it runs its fast attention.

    from flash_colsum.hf import ImportanceRecorder
    with ImportanceRecorder(model, attention_mask=batch["attention_mask"], heads="mean") as rec:
        model(**batch)
    rec.importance        # {layer index: (B, Sk) float32}

Inside the block the model's attention implementation is a registered wrapper: the output comes
from the wrapped implementation (``"sdpa"`` by default, the model's eager one only if asked; never
``output_attentions``),
and `column_stats` records the statistic of each layer's queries and keys. No attention matrix is
built by the recorder. The statistics are recorded without gradients (they keep no layer's queries
and keys alive); call `column_stats` in the model's attention for differentiable ones. Needs
transformers >= 5 (its AttentionInterface).

Attention sinks (gpt-oss's ``s_aux``) are folded into each row's log-sum-exp; logit soft-capping
(Gemma 2's ``softcap``) and causal sliding windows (Mistral, Gemma 2/3, gpt-oss) pass to
`column_stats`. Layers whose softmax it cannot
reproduce raise NotImplementedError rather than record another statistic: bidirectional sliding
windows, attention chunks shorter than the keys (Llama 4), and other masks (a causal suffix after
PaliGemma's bidirectional prefix, Gemma 3's image tokens, packed sequences). ``unsupported="skip"``
leaves such layers out instead; or call `column_stats` on rows and keys whose softmax it matches.
"""

from __future__ import annotations

import inspect
import sys
import weakref

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
    if recorder.inner == "eager":  # transformers calls a model's own eager function directly, unregistered
        inner = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if inner is None:
            raise ValueError(f"inner='eager': {type(module).__module__} has no eager_attention_forward")
    else:
        inner = ALL_ATTENTION_FUNCTIONS[recorder.inner]
    result = inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    recorder.record(module, query, key, scaling, kwargs, attention_mask)
    return result


# Rows of the model's mask pattern checked at a time (`ImportanceRecorder._note_mask`): bounds the
# check's memory to B * 1024 * Sk bytes where the wrapped kernel (FlashAttention) builds no mask.
_MASK_ROWS = 1024


def _recording_mask(*args, **kwargs):
    """AttentionMaskInterface entry: the wrapped implementation's own mask, in its own format (eager's
    additive floats, SDPA's booleans, FlashAttention's padding...), after the recorder notes whether
    the model's pattern is one `column_stats` computes."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    inner = _active[-1].inner if _active else "sdpa"
    mask = ALL_MASK_ATTENTION_FUNCTIONS[inner if inner in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"](*args, **kwargs)
    if _active:
        arguments = inspect.signature(sdpa_mask).bind(*args, **kwargs).arguments  # every mask function's parameters
        _active[-1]._note_mask(mask, **{name: value for name, value in arguments.items() if name != "kwargs"})
    return mask


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _recording_attention)
    if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(NAME) is not _recording_mask:
        AttentionMaskInterface.register(NAME, _recording_mask)


class ImportanceRecorder:
    """Context manager: run ``model`` with fast attention and record per-layer column statistics.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through the AttentionInterface.
        attention_mask: the (B, S) padding mask given to the model (1 = real token), or None. Keys
            and query rows are aligned to its end (the last Sk / Sq positions), as with a KV cache.
        inner: the attention implementation that computes the output (``"sdpa"``, ``"flash_attention_2"``,
            ``"eager"``: the model's own, e.g. for gpt-oss's sinks, which SDPA ignores...).
        unsupported: ``"raise"`` (NotImplementedError) at a layer whose softmax `column_stats` cannot
            reproduce (above), or ``"skip"``: leave it out of ``importance`` and say why in ``skipped``
            (Llama 4's chunked layers, say, while its full-attention layers record).
        **stats: `column_stats` arguments (``heads``, ``reduce``, ``normalize``, ``rows``, ``backend``...).

    ``importance`` maps each layer index to its statistic (shape as ``heads`` says); a new forward
    overwrites it. Attention modules without a ``layer_idx`` (a VLM's vision tower) are keyed by their
    name in the model instead, so that they do not overwrite the language model's layers.
    ``stacked()`` gives (layers, ...) of the indexed layers in order (of all, in model order, for a
    model without indices).
    """

    def __init__(self, model, attention_mask=None, *, inner="sdpa", unsupported="raise", **stats):
        if unsupported not in ("raise", "skip"):
            raise ValueError(f"unsupported must be 'raise' or 'skip'; got {unsupported!r}")
        for bad in ("query_padding_mask", "key_padding_mask", "is_causal", "scale", "lse", "cu_seqlens_q", "cu_seqlens_k",
                    "softcap", "window"):
            if bad in stats:
                raise ValueError(f"{bad} is set by the recorder from the model; do not pass it")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            raise ValueError(f"attention_mask must be a (B, S) tensor; got {getattr(attention_mask, 'shape', attention_mask)!r}")
        self.model, self.attention_mask, self.inner, self.stats = model, attention_mask, inner, stats
        self.unsupported = unsupported
        self.skipped: dict[int | str, str] = {}  # with unsupported="skip": layer -> why it was not recorded
        self.importance: dict[int | str, torch.Tensor] = {}
        self._mask_kinds: dict = {}  # id(mask) -> (weakref to it, "causal" | "full" | "other"): `_note_mask`
        self._untracked_other = False  # an "other" pattern whose mask object cannot be followed to its layers
        self._previous = None
        self._names: dict[int, str] = {}  # module id -> its name in the model, for modules without layer_idx

    def __enter__(self) -> "ImportanceRecorder":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _register()
        if self.inner != "eager" and self.inner not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"inner must be 'eager' or a registered attention implementation "
                             f"({', '.join(ALL_ATTENTION_FUNCTIONS.valid_keys())}); got {self.inner!r}")
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)
        self._mask_kinds.clear()
        self._untracked_other = False
        _active.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _active.remove(self)
        self.model.set_attn_implementation(self._previous)
        return False

    def _note_mask(self, mask, *, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   use_vmap=False, device="cpu", **_) -> None:
        """Note the pattern of a mask the model built, padding aside: "causal", "full" (bidirectional:
        PaliGemma's prefix), ("window", w) (causal within a sliding window of w keys) or "other"
        (bidirectional image tokens among causal text, attention chunks, packed sequences). Plain
        causal and bidirectional functions cost nothing; composite ones are evaluated _MASK_ROWS rows
        at a time. The layers that get this mask look its pattern up (`record`)."""
        from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

        if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
            kind = "causal" if mask_function is causal_mask_function else "full"
        elif mask_function is None:
            return
        else:
            keys = kv_offset + torch.arange(kv_length, device=device)

            def chunks():  # (absolute rows, (B, n, Sk) bool: which keys each row sees)
                for q0 in range(0, q_length, _MASK_ROWS):
                    n = min(_MASK_ROWS, q_length - q0)
                    yield q_offset + q0 + torch.arange(n, device=device), sdpa_mask(
                        batch_size=batch_size, q_length=n, kv_length=kv_length, q_offset=q_offset + q0,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=None,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap,
                        device=device)[:, 0]

            causal = full = True
            for rows, seen in chunks():
                causal = causal and bool((seen == (keys[None, :] <= rows[:, None])).all())
                full = full and bool(seen.all())
                if not (causal or full):
                    break
            kind = "causal" if causal else "full" if full else "other"
            # A sliding window? Its width from the first key seen by the last row of the chunk that left
            # the causal pattern (in a window that row hides keys), then checked on every chunk.
            if kind == "other":
                last_seen = seen[0, -1].nonzero()
                width = int(rows[-1] - keys[last_seen[0, 0]] + 1) if len(last_seen) else 0
                if width > 0 and all(bool((seen == ((keys[None, :] <= rows[:, None])
                                                     & (keys[None, :] > rows[:, None] - width))).all())
                                     for rows, seen in chunks()):
                    kind = ("window", width)
        try:
            ref = weakref.ref(mask)
        except TypeError:  # None (FlashAttention without padding) or a type without weak references
            self._untracked_other |= kind == "other"  # then every layer of the block refuses
            return
        self._mask_kinds = {key: value for key, value in self._mask_kinds.items() if value[0]() is not None}
        self._mask_kinds[id(mask)] = (ref, kind)

    def _mask_kind(self, mask):
        """The noted pattern of the mask a layer got, or None (no mask, or one built outside the block)."""
        ref, kind = self._mask_kinds.get(id(mask), (None, None))
        if mask is not None and ref is not None and ref() is mask:
            return kind
        return "other" if self._untracked_other else None

    def record(self, module, query: torch.Tensor, key: torch.Tensor, scaling, options: dict | None = None,
               mask=None) -> None:
        """Record the statistic of one attention call; ``options``: the keywords the model passed to
        its attention function (sliding_window, softcap, s_aux / sinks...); ``mask``: the mask it got."""
        options = options or {}
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            if not self._names:
                self._names = {id(m): name for name, m in self.model.named_modules()}
            layer = self._names.get(id(module)) or f"{type(module).__name__}@{id(module):x}"
        q_len, k_len = query.shape[2], key.shape[2]
        kind = self._mask_kind(mask)
        causal = options.get("is_causal")  # as transformers' SDPA integration reads it
        causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
        window = options.get("sliding_window")
        if isinstance(kind, tuple):  # a sliding window in the mask the model built
            kind, window = "causal", kind[1]
        if kind is not None:  # the mask the model built says which (PaliGemma's prefix is bidirectional)
            causal = kind == "causal"
        unlike = None
        if window is not None and k_len > window:  # one at least as long as the keys hides none of them
            if causal:  # a decoding step (one row) too: it sees the window's last keys
                window = int(window)
            else:
                unlike = f"a bidirectional sliding window of {window} keys over {k_len}"
        else:
            window = None
            causal = causal and q_len > 1  # one row sees every key either way
        if unlike is None and kind == "other":
            unlike = ("an attention mask other than causal (within a sliding window) or bidirectional, with "
                      "padding (prefix-LM or bidirectional image tokens, attention chunks, packed sequences)")
        if unlike is not None:
            if self.unsupported == "skip":
                self.importance.pop(layer, None)  # an earlier forward's statistic would be stale
                self.skipped[layer] = unlike
                return
            raise NotImplementedError(
                f"ImportanceRecorder: layer {layer} uses {unlike}, which flash_colsum does not compute; "
                "its statistic would not be the model's attention (unsupported='skip' records the other layers)")
        self.skipped.pop(layer, None)
        masks = {}
        if self.attention_mask is not None:
            keep = self.attention_mask.to(device=query.device, dtype=torch.bool)
            masks = dict(key_padding_mask=keep[:, -k_len:], query_padding_mask=keep[:, -q_len:])
        common = dict(scale=scaling, is_causal=causal, softcap=options.get("softcap"), window=window, **masks)
        sinks = options.get("s_aux", options.get("sinks"))
        with torch.no_grad():
            if sinks is not None:
                # Attention sinks (gpt-oss): one more logit per head in every row's softmax denominator,
                # none in the numerators, so the weights are exp(s - lse') with lse' = logaddexp(lse, sink).
                _, lse = column_stats(query, key, **common, heads="none", reduce="sum", return_lse=True,
                                      backend=self.stats.get("backend", "auto"))
                sink = sinks.detach().to(device=lse.device, dtype=torch.float32).reshape(1, -1, 1)
                common["lse"] = torch.logaddexp(lse, sink)
            self.importance[layer] = column_stats(query, key, **common, **self.stats)

    def stacked(self) -> torch.Tensor:
        indexed = sorted(key for key in self.importance if isinstance(key, int))
        if not indexed:  # named modules only: in model order (named_modules lists them so)
            order = {name: i for i, name in enumerate(self._names.values())}
            indexed = sorted(self.importance, key=lambda name: order.get(name, len(order)))
        return torch.stack([self.importance[key] for key in indexed])
