"""Train through token importance: the attention each token receives is differentiable.

A query projection learns, by gradient descent on `column_stats`'s output alone, to make every
query of a sequence attend to a few marked tokens (in a real model: the tokens a pruner should
keep). No attention matrix is built, in the forward or the backward.

    python examples/learn_importance.py [--steps 60] [--device cpu|cuda]
"""

import argparse

import torch

from flash_colsum import column_stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, heads, length, dim, n_marked = 4, 2, 128, 32, 4

    # Token features; the marked tokens carry a shared direction the queries can learn to look for.
    x = torch.randn(batch, length, dim, device=args.device)
    marked = torch.zeros(batch, length, dtype=torch.bool, device=args.device)
    marked[torch.arange(batch)[:, None], torch.randint(0, length, (batch, n_marked))] = True
    x = x + 2.0 * marked[..., None] * torch.randn(dim, device=args.device)
    to_query = torch.nn.Linear(dim, heads * dim).to(args.device)
    to_key = torch.nn.Linear(dim, heads * dim).to(args.device).requires_grad_(False)
    optimizer = torch.optim.Adam(to_query.parameters(), lr=3e-2)

    def attention_on_marked():
        q = to_query(x).view(batch, length, heads, dim).transpose(1, 2)  # (B, H, S, D), no copy
        k = to_key(x).view(batch, length, heads, dim).transpose(1, 2)
        importance = column_stats(q, k)  # (B, S): mean weight each token receives; rows sum to 1
        return (importance * marked).sum(dim=1)  # (B,): share of all attention on the marked tokens

    with torch.no_grad():
        before = attention_on_marked().mean().item()
    for _ in range(args.steps):
        loss = -attention_on_marked().log().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = attention_on_marked().mean().item()
    print(f"attention on the {n_marked} marked of {length} tokens: {before:.3f} -> {after:.3f}")
    print(f"learned to attend to them: {after > 10 * before}")


if __name__ == "__main__":
    main()
