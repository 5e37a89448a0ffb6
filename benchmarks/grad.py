"""The gradient's price: flash_colsum's forward alone, forward + backward, and the same statistic
through a materialized softmax (eager PyTorch autograd), with each one's peak extra GPU memory.

    python -m benchmarks.grad [--s 1024 4096 16384] [--d 64] [--h 16] [--dtype float16] [--products]

--products also times the Triton backward with its gradient products on 16-bit operands
(`backward.GRAD_IN_INPUT_DTYPE` flipped), beside the default, in the same process.

The Triton back end's backward is two kernels (flash_colsum/backward.py); the torch back end's
recomputes the weights in PyTorch tiles under the memory budget. Medians of triton.testing.do_bench.
"""

import argparse

import torch
import triton

from flash_colsum import backward as triton_backward
from flash_colsum import flash_colsum


def materialized(q, k):
    """flash_colsum's mean through eager autograd: the (B, H, Sq, Sk) weights exist, with their gradient."""
    weights = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return weights.mean(dim=(1, 2))


def measure(fn, q, k, backward: bool, grad_mode: bool = True):
    """(median ms, peak extra MiB) of fn(q, k), with a backward from random upstream weights if asked
    (else in grad mode if ``grad_mode``: the forward that records for autograd)."""
    upstream = torch.randn(q.shape[0], k.shape[2], device=q.device)

    def call():
        if not backward:
            with torch.set_grad_enabled(grad_mode):
                return fn(q, k)
        return torch.autograd.grad((fn(q, k) * upstream).sum(), (q, k))

    try:
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(call, warmup=25, rep=200), peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--h", type=int, default=16)
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--products", action="store_true", help="also time the other GRAD_IN_INPUT_DTYPE")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"B={args.b} H={args.h} D={args.d} {args.dtype}")
    print("S | forward ms (no grad / grad mode) | forward+backward ms (Triton / torch back end) | "
          "materialized fwd+bwd ms | peak MiB fwd / fwd+bwd / materialized")
    for s in args.s:
        q = torch.randn(args.b, args.h, s, args.d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(args.b, args.h, s, args.d, device="cuda", dtype=dtype, requires_grad=True)
        fwd, fwd_mib = measure(flash_colsum, q, k, backward=False, grad_mode=False)
        fwd_grad, _ = measure(flash_colsum, q, k, backward=False)
        both, both_mib = measure(flash_colsum, q, k, backward=True)
        if args.products:
            default = triton_backward.GRAD_IN_INPUT_DTYPE
            triton_backward.GRAD_IN_INPUT_DTYPE = not default
            other, _ = measure(flash_colsum, q, k, backward=True)
            triton_backward.GRAD_IN_INPUT_DTYPE = default
            again, _ = measure(flash_colsum, q, k, backward=True)  # the default once more: drift shows
            print(f"{s} | forward+backward ms, GRAD_IN_INPUT_DTYPE={default}: {both:.3f} then {again:.3f}; "
                  f"={not default}: {other:.3f}")
        torch_both, _ = measure(lambda q, k: flash_colsum(q, k, backend="torch"), q, k, backward=True)
        naive, naive_mib = measure(materialized, q, k, backward=True)
        fmt = lambda x, f: "OOM" if x is None else f.format(x)  # noqa: E731
        print(f"{s} | {fmt(fwd, '{:.3f}')} / {fmt(fwd_grad, '{:.3f}')} | {fmt(both, '{:.3f}')} / {fmt(torch_both, '{:.3f}')} | {fmt(naive, '{:.3f}')} | "
              f"{fmt(fwd_mib, '{:.0f}')} / {fmt(both_mib, '{:.0f}')} / {fmt(naive_mib, '{:.0f}')}")


if __name__ == "__main__":
    main()
