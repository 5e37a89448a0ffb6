"""What limits a pass on the GPU at hand: its time, and the SM clock, board power and throttle
reasons nvidia-smi reports while it runs in a loop. On the H100 the large passes run at the 700 W
cap, the clock falling from 1980 MHz to ~1.85 GHz at D=64 and ~1.6 GHz at D=128 (NOTES.md v13):
a pass then costs energy per score, and moving work between pipes does not make it faster. Small
calls stay under it (the one-launch S=4096 call at 1980 MHz and ~570 W, NOTES.md v24).

    python -m benchmarks.power [--b 1] [--s 16384] [--d 64] [--seconds 2]

Runs flash_colsum's two passes as the library picks them (Hopper fast path where it applies), the
whole call (a small one runs both passes in one launch) and SDPA's forward at the same shape
(H=16, fp16, non-causal).
"""

import argparse
import statistics
import subprocess
import time

import torch

# nvidia-smi's clocks_event_reasons bits (NVML's clocksEventReasons)
REASONS = {0x1: "idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
           0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
           0x100: "display_clocks"}
QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"


def parse_sample(line: str) -> tuple[float, float, list[str]]:
    """One nvidia-smi CSV line ("1815 MHz, 705.14 W, 0x0000000000000004") -> (MHz, W, reasons)."""
    clock, power, mask = (field.strip() for field in line.split(","))
    bits = int(mask, 16)
    return float(clock.split()[0]), float(power.split()[0]), [name for bit, name in REASONS.items() if bits & bit]


def sample_while(fn, seconds: float) -> dict:
    """Run fn in a loop for `seconds` while nvidia-smi samples every 100 ms; medians of the middle half."""
    fn()
    torch.cuda.synchronize()
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    start = time.time()
    while time.time() - start < seconds:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    smi.terminate()
    lines = [line for line in smi.communicate()[0].splitlines() if line.strip()]
    samples = [parse_sample(line) for line in lines[len(lines) // 4: 3 * len(lines) // 4 + 1]]
    if not samples:
        return dict(mhz=None, watts=None, reasons=[])
    reasons = sorted({r for _, _, rs in samples for r in rs})
    return dict(mhz=statistics.median(s[0] for s in samples), watts=statistics.median(s[1] for s in samples),
                reasons=reasons)


def main():
    from triton.testing import do_bench

    from flash_colsum import flash_colsum
    from flash_colsum import triton_backend as tb
    from flash_colsum.utils import make_problem

    parser = argparse.ArgumentParser()
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--s", type=int, default=16384)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    q = torch.randn(args.b, 16, args.s, args.d, device="cuda", dtype=torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    p = make_problem(q, k, None, False, "triton")
    lse = tb.row_lse(q, k, p)
    calls = {
        "pass 1": lambda: tb.row_lse(q, k, p),
        "pass 2": lambda: tb.col_reduce(q, k, lse, p, 1, False),
        "whole call": lambda: flash_colsum(q, k),
        "sdpa forward": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    print(f"{torch.cuda.get_device_name()}, B={args.b} H=16 S={args.s} D={args.d} fp16")
    for name, fn in calls.items():
        ms = do_bench(fn, return_mode="median")
        state = sample_while(fn, args.seconds)
        print(f"{name:13s} {ms:8.3f} ms   SM {state['mhz']} MHz   {state['watts']} W   "
              f"throttle: {', '.join(state['reasons']) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
