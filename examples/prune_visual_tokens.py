"""Visual-token pruning (FastV / SparseVILA style): keep the image tokens that receive the most attention.

    python examples/prune_visual_tokens.py

A stand-in for one layer of a vision-language model: 576 image tokens followed by 40 text tokens,
random projections of random hidden states. Two common scores, neither builds the attention matrix:
  * CLS-row attention in the vision tower (rows=slice(0, 1));
  * text-row attention in the language model (row_mask selects the text rows, SparseVLM's raters).
"""

import torch

from flash_colsum import column_stats, select_topk

torch.manual_seed(0)
B, H, D, N_IMG, N_TXT, KEEP = 2, 16, 64, 576, 40, 144
hidden = torch.randn(B, N_IMG + N_TXT, H * D)
w_q, w_k = torch.randn(H * D, H * D) / (H * D) ** 0.5, torch.randn(H * D, H * D) / (H * D) ** 0.5
q = (hidden @ w_q).view(B, -1, H, D).transpose(1, 2)  # (B, H, S, D), a strided view
k = (hidden @ w_k).view(B, -1, H, D).transpose(1, 2)

# Vision tower: how much the CLS token (row 0 here) attends to each token.
cls_scores = column_stats(q, k, rows=slice(0, 1))[:, :N_IMG]  # (B, N_IMG)

# Language model: how much the text tokens attend to each image token (causal decoder).
text_rows = torch.zeros(B, N_IMG + N_TXT, dtype=torch.bool)
text_rows[:, N_IMG:] = True
text_scores = column_stats(q, k, is_causal=True, row_mask=text_rows)[:, :N_IMG]

for name, scores in (("CLS attention", cls_scores), ("text attention", text_scores)):
    keep = select_topk(scores, KEEP)  # (B, KEEP) ascending image-token indices
    pruned = torch.gather(hidden[:, :N_IMG], 1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
    share = torch.gather(scores, 1, keep).sum(1) / scores.sum(1)
    print(f"{name:>15}: kept {KEEP}/{N_IMG} image tokens -> {tuple(pruned.shape)}, "
          f"holding {100 * share.mean():.1f}% of the image tokens' attention")
