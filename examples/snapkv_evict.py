"""SnapKV-style KV-cache eviction with flash-colsum, on the CPU.

    python examples/snapkv_evict.py

After prefill, the last W queries (the observation window) vote for the keys they attend to,
per KV head (GQA: mean over the group), the votes are smoothed by 1-D pooling, and each KV head
keeps its top tokens plus the window itself. We then compare the window's attention output on
the compressed cache with the full one.
"""

import torch

from flash_colsum import attention_with_lse, column_stats, pool_scores, select_topk

torch.manual_seed(0)
B, H, HK, S, D, WINDOW, BUDGET = 1, 8, 2, 2048, 64, 32, 256

# A prompt with a few "needle" keys that the window's queries look for.
q = torch.randn(B, H, S, D)
k = torch.randn(B, HK, S, D)
v = torch.randn(B, HK, S, D)
needles = torch.tensor([100, 700, 1500])
window_mean = q[:, :: H // HK, -WINDOW:].mean(2, keepdim=True)  # (B, HK, 1, D)
k[:, :, needles] = 24 * window_mean / window_mean.norm(dim=-1, keepdim=True)

# One fused forward gives the output and the LSE; the statistic reuses the LSE (no first pass).
out, lse = attention_with_lse(q, k, v, is_causal=True)
votes = column_stats(q, k, is_causal=True, rows=slice(-WINDOW, None), heads="kv_mean", lse=lse)  # (B, HK, S)
keep = select_topk(pool_scores(votes, kernel_size=7, pool="max"), BUDGET, keep_last=WINDOW)  # (B, HK, BUDGET)



def window_error(keep: torch.Tensor) -> float:
    """Relative error of the window's attention output when only ``keep`` (B, HK, n) stays cached."""
    index = keep[..., None].expand(-1, -1, -1, D)
    k_small, v_small = torch.gather(k, 2, index), torch.gather(v, 2, index)
    out_small, _ = attention_with_lse(q[:, :, -WINDOW:], k_small, v_small, is_causal=True)  # window stays last
    return ((out_small - out[:, :, -WINDOW:]).norm() / out[:, :, -WINDOW:].norm()).item()


recent = torch.arange(S - BUDGET, S).expand(B, HK, -1)  # baseline: keep the most recent tokens
found = all(bool((keep == n).any(-1).all()) for n in needles.tolist())
print(f"cache {S} -> {BUDGET} tokens per KV head; every needle kept: {found}")
print(f"window output relative error: SnapKV-style {window_error(keep):.3f}, most recent {window_error(recent):.3f}")
