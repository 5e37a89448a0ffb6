"""A/B timings of the Triton back end's switches, in one process (same GPU, same run).

    python -m benchmarks.ab [--out DIR] [--switch row_stat] [--rounds 2]

For each point, times `flash_colsum` and each pass (medians of `triton.testing.do_bench`); where
a point names a switch, with it on and off, checking that both give the same result. Each round
runs the states in the other order (on, off, ... then ..., off, on): whatever runs second in a
round (a warmer clock, a quieter host) is not always the same state.
  row_stat:  pass 2 as the library chooses ("on"), key-centric ("off") and row-stationary ("forced").
  fast:      the Hopper Gluon kernels where they apply ("on") or the portable kernels only ("off").
  fused:     small calls in one launch as the library chooses ("on"), never ("off") or wherever the
             result layout allows ("forced").
  scores:    few rows from pass 1's stored scores as the library chooses ("on") or never ("off").
  waves:     key splits that fill whole waves of resident programs ("on") or v13's rule, cdiv(4 * SMs,
             programs) splits ("off"; NOTES.md v14).
  fused_fast: small calls in one Hopper launch (hopper.fused_columns) as the library chooses ("on"),
             never (the portable fused kernel, "off") or at any size ("forced").
  one_pass:  short key ranges in one pass, one exponential per score, as the library chooses ("on"),
             never ("off") or wherever they fit, small calls too ("forced"; NOTES.md v31).
"""

import argparse
import contextlib
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks.benchmark_colsum import write_csv
from flash_colsum import flash_colsum
from flash_colsum import triton_backend as tb
from flash_colsum.utils import cdiv, make_problem

POINTS = [  # (B, H, Sq, Sk, D, causal, switch)
    (1, 16, 16384, 16384, 64, False, "fast"),
    (1, 16, 65536, 65536, 64, False, "fast"),
    (1, 16, 16384, 16384, 72, False, "fast"),
    (1, 16, 16384, 16384, 80, False, "fast"),
    (1, 16, 16384, 16384, 96, False, "fast"),
    (1, 16, 16384, 16384, 128, False, "fast"),
    (8, 16, 1024, 1024, 64, False, "fast"),
    (64, 16, 1024, 1024, 64, False, "fast"),
    (1, 16, 16384, 16384, 64, True, "fast"),  # causal prefill
    (1, 16, 16384, 16384, 128, True, "fast"),
    (1, 32, 8192, 8192, 128, True, "fast"),
    (1, 16, 16384, 16384, 72, True, "fast"),
    (1, 16, 4096, 16384, 64, True, "fast"),  # a causal chunk over a longer cache
    (1, 16, 32768, 32768, 64, True, "fast"),
    (1, 32, 128, 65536, 128, True, "row_stat"),
    (1, 32, 128, 262144, 128, True, "row_stat"),
    (1, 32, 512, 65536, 128, True, "row_stat"),
    (1, 32, 32, 262144, 128, False, "row_stat"),
    (1, 32, 256, 65536, 128, True, "row_stat"),
    (4, 32, 64, 32768, 128, False, "row_stat"),
    (1, 16, 128, 65536, 64, False, "row_stat"),
    (1, 16, 1024, 1024, 64, False, "fused"),
    (8, 16, 1024, 1024, 64, False, "fused"),
    (1, 16, 2048, 2048, 64, False, "fused"),
    (1, 16, 4096, 4096, 64, False, "fused"),
    (1, 32, 2048, 2048, 128, False, "fused"),
    (4, 32, 1024, 1024, 128, True, "fused"),
    (1, 32, 1, 262144, 128, True, "scores"),
    (1, 32, 8, 262144, 128, True, "scores"),
    (1, 32, 16, 262144, 128, False, "scores"),
    (1, 32, 1, 16384, 128, True, "scores"),
    (8, 32, 1, 32768, 128, True, "scores"),
    (1, 16, 4, 262144, 64, False, "scores"),
    (1, 32, 128, 262144, 128, True, "waves"),
    (1, 32, 512, 65536, 128, True, "waves"),
    (1, 32, 256, 65536, 128, True, "waves"),
    (1, 32, 32, 262144, 128, False, "waves"),
    (1, 16, 128, 65536, 64, False, "waves"),
    (1, 16, 1024, 1024, 64, False, "fused_fast"),
    (2, 16, 1024, 1024, 64, False, "fused_fast"),
    (4, 16, 1024, 1024, 64, False, "fused_fast"),
    (8, 16, 1024, 1024, 64, False, "fused_fast"),
    (16, 16, 1024, 1024, 64, False, "fused_fast"),
    (1, 16, 2048, 2048, 64, False, "fused_fast"),
    (1, 16, 4096, 4096, 64, False, "fused_fast"),
    (8, 16, 1024, 1024, 72, False, "fused_fast"),
    (8, 16, 1024, 1024, 96, False, "fused_fast"),
    (8, 16, 1024, 1024, 128, False, "fused_fast"),
    (1, 32, 2048, 2048, 128, False, "fused_fast"),
    (64, 16, 197, 197, 64, False, "one_pass"),
    (8, 16, 257, 257, 64, False, "one_pass"),
    (8, 16, 512, 512, 64, False, "one_pass"),
    (256, 16, 512, 512, 64, False, "one_pass"),
    (64, 16, 256, 256, 128, False, "one_pass"),
    (8, 16, 512, 512, 64, True, "one_pass"),
]


def _v13_key_splits(n_keys, n_programs, block_n, device, slots=None):
    """v13's rule: cdiv(4 * SMs, programs) splits, at most one per MIN_KEYS_PER_SPLIT keys."""
    n_splits = max(1, min(cdiv(4 * tb._sm_count(device), n_programs), cdiv(n_keys, tb.MIN_KEYS_PER_SPLIT)))
    return cdiv(cdiv(n_keys, n_splits), block_n) * block_n


# Each state other than "on" swaps one decision of the back end for a fixed answer.
STATES = {"row_stat": ("on", "off", "forced"), "fast": ("on", "off"), "fused": ("on", "off", "forced"),
          "scores": ("on", "off"), "waves": ("on", "off"), "fused_fast": ("on", "off", "forced"),
          "one_pass": ("on", "off", "forced")}
REPLACEMENTS = {
    ("row_stat", "off"): ("_use_row_stationary", lambda n_rows, block_m: False),
    ("row_stat", "forced"): ("_use_row_stationary", lambda n_rows, block_m: True),
    ("fast", "off"): ("_fast_path", lambda *args, **kwargs: None),
    ("fused", "off"): ("_use_fused", lambda *args: False),
    ("fused", "forced"): ("_use_fused", lambda *args: True),
    ("scores", "off"): ("_keeps_scores", lambda p: False),
    ("waves", "off"): ("_key_splits", _v13_key_splits),
    ("fused_fast", "off"): ("FUSED_FAST_PATH_MIN_SCORES", 2**62),
    ("fused_fast", "forced"): ("FUSED_FAST_PATH_MIN_SCORES", 0),
    ("one_pass", "off"): ("_use_one_pass", lambda p, query: False),
    ("one_pass", "forced"): ("_use_one_pass", lambda p, query: True),
}


@contextlib.contextmanager
def switched(switch: str, state: str):
    if (switch, state) not in REPLACEMENTS:
        yield
        return
    name, replacement = REPLACEMENTS[switch, state]
    saved = getattr(tb, name)
    setattr(tb, name, replacement)
    tb._row_blocks_plan.cache_clear()  # launch plans memoize what the switches change
    try:
        yield
    finally:
        setattr(tb, name, saved)
        tb._row_blocks_plan.cache_clear()


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--switch", default=None, help="only the points with this switch")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per point, the states' order alternating")
    args = parser.parse_args()
    rows = []
    for b, h, sq, sk, d, causal, switch in POINTS:
        if args.switch and switch != args.switch:
            continue
        q = torch.randn(b, h, sq, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, h, sk, d, device="cuda", dtype=torch.float16)
        p = make_problem(q, k, None, causal, "triton")
        result, first = {}, len(rows)
        states = STATES[switch] if switch else ("on",)
        for round_ in range(args.rounds):
            for state in states if round_ % 2 == 0 else states[::-1]:
                with switched(switch, state):
                    result[state] = flash_colsum(q, k, is_causal=causal)
                    lse = tb.row_lse(q, k, p)
                    rows.append(dict(
                        point=f"B={b} H={h} Sq={sq} Sk={sk} D={d}{' causal' if causal else ''}", switch=switch,
                        state=state, round=round_,
                        total_ms=bench(lambda: flash_colsum(q, k, is_causal=causal)),
                        pass1_ms=bench(lambda: tb.row_lse(q, k, p)),
                        pass2_ms=bench(lambda: tb.col_reduce(q, k, lse, p, 1, False)),
                    ))
        diff = max(((out - result["on"]).norm() / result["on"].norm()).item() for out in result.values())
        for r in rows[first:]:
            r["rel_diff"] = diff
        for r in rows[first:]:
            print(f"{r['point']:<42} {switch or '':>8} {r['state']:>6} (round {r['round']}): total {r['total_ms']:.3f} ms  "
                  f"pass 1 {r['pass1_ms']:.3f}  pass 2 {r['pass2_ms']:.3f}  (largest difference between states {diff:.1e})", flush=True)
        del q, k, lse
    write_csv(rows, args.out / "ab.csv")


if __name__ == "__main__":
    main()
