"""Interleaved timing: every method called once per iteration, back to back, on one clock.

    python -m benchmarks.interleave [--sweep NAME] [--iters 200] [--methods a,b,...] [--out DIR] [--wheels DIR]

benchmark_colsum times each method alone (do_bench, a few hundred ms each). On the power-capped H100
(NOTES.md v13) the clock drifts by a few percent between such runs, and a method that draws less
power runs at a higher clock alone than beside ours. Here each iteration calls every method once, in
an order that rotates from one iteration to the next, each call between two CUDA events, so all of
them see the same clock. Per method: the median ms, and the median of the per-call ratios to the
first method (flash_colsum) with their 10-90% range; a few hundred iterations pin that median to
~0.5% where the per-call ratios spread +-10%. The sweep answers "how fast is it for a user running
one kernel"; this one "which of two is faster", the question of every kernel A/B (NOTES.md v23).
A script, not a test: nothing asserts a time. On the CPU it times with perf_counter.

Sweeps are benchmark_colsum's; naive_colsum and chunked_naive are left out unless --methods names them.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.baselines import DEFAULT_WHEEL_DIR, load_baselines
from benchmarks.benchmark_colsum import METHODS, SWEEPS, Point, _baseline, error_note, make_inputs, methods_at, sweeps

DEFAULT_METHODS = ("flash_colsum", "flash_colsum_lse", "sdpa")  # and every baseline that loads


def ratio_summary(times: dict[str, list[float]]) -> list[dict]:
    """Rows of (method, calls, median_ms, ratio_median, ratio_p10, ratio_p90) from per-call times in
    ms, call i of every method taken in the same iteration; ratios are to the first method."""
    base = times[next(iter(times))]
    rows = []
    for name, ts in times.items():
        if len(ts) != len(base):
            raise ValueError(f"{name} has {len(ts)} calls, the first method {len(base)}")
        ratios = sorted(t / b for t, b in zip(ts, base))
        rows.append(dict(method=name, calls=len(ts), median_ms=statistics.median(ts),
                         ratio_median=statistics.median(ratios),
                         ratio_p10=ratios[len(ratios) // 10], ratio_p90=ratios[(9 * len(ratios)) // 10]))
    return rows


def interleaved_times(calls: dict[str, Callable], iters: int, device: str, warmup: int = 3) -> dict[str, list[float]]:
    """Per-call ms of each method over `iters` iterations; iteration i starts at method i mod n."""
    names = list(calls)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    for i in range(iters):
        order = names[i % len(names):] + names[:i % len(names)]
        if cuda:  # one event between consecutive calls: no gap, and no host wait inside the iteration
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(order) + 1)]
            events[0].record()
            for name, end in zip(order, events[1:]):
                calls[name]()
                end.record()
            torch.cuda.synchronize()
            for name, start, end in zip(order, events, events[1:]):
                times[name].append(start.elapsed_time(end))
        else:
            for name in order:
                t0 = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def measure(pt: Point, methods: dict, iters: int, device: str) -> list[dict]:
    """Rows for the methods that run at `pt` (flash_colsum first); the others get a row with a note."""
    q, k = make_inputs(pt, device)
    calls, skipped = {}, []
    for name in methods_at(pt, methods):
        try:
            fn = methods[name](q, k, pt)
            fn()
            calls[name] = fn
        except Exception as e:  # noqa: BLE001  (unsupported points of the baselines, OOM)
            skipped.append(dict(method=name, note=error_note(e)))
    rows = ratio_summary(interleaved_times(calls, iters, device)) if "flash_colsum" in calls else []
    return [dict(point=pt.label, note="", **r) for r in rows] + [
        dict(point=pt.label, calls=0, median_ms=None, ratio_median=None, ratio_p10=None, ratio_p90=None, **s) for s in skipped]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default="demo", choices=SWEEPS, help="benchmark_colsum's sweep of that name")
    parser.add_argument("--iters", type=int, default=200, help="iterations; each calls every method once")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: flash_colsum, flash_colsum_lse, sdpa and the baselines)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEEL_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters must be at least 1, got {args.iters}")

    available = dict(METHODS)
    if args.device == "cuda":
        available.update({name: _baseline(fn) for name, fn in load_baselines(args.wheels).items()})
    wanted = args.methods.split(",") if args.methods else [
        m for m in available if m in DEFAULT_METHODS or m not in METHODS]
    unknown = [m for m in wanted if m not in available]
    if unknown:
        parser.error(f"unknown or unavailable methods {unknown}; available: {sorted(available)}")
    methods = {"flash_colsum": available["flash_colsum"], **{m: available[m] for m in wanted}}

    rows = []
    for pt in sweeps(args.device)[args.sweep]:
        point_rows = measure(pt, methods, args.iters, args.device)
        print(f"{pt.label}, {args.iters} interleaved iterations")
        for r in point_rows:
            if r["median_ms"] is None:
                print(f"  {r['method']:24s} {r['note']}")
            else:
                print(f"  {r['method']:24s} {r['median_ms']:9.4f} ms   per-call ratio to flash_colsum: median "
                      f"{r['ratio_median']:.4f} (10-90%: {r['ratio_p10']:.4f}-{r['ratio_p90']:.4f})")
        rows += point_rows
    path = args.out / f"interleave_{args.sweep}_{args.device}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["point", "method", "calls", "median_ms", "ratio_median",
                                               "ratio_p10", "ratio_p90", "note"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
