"""Benchmark driver: flash_colsum against naive_colsum, latency and peak extra memory.

    python -m benchmarks.benchmark_colsum --sweep {demo,noncausal_batched,noncausal,causal,all} [--out DIR]

Times are medians (CUDA events through triton.testing.do_bench on a GPU, perf_counter on the CPU).
Peak extra memory is what a call allocates beyond its inputs: torch.cuda.max_memory_allocated on
a GPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on the CPU.
This is a script, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import gc
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flash_colsum import flash_colsum, naive_colsum


@dataclass(frozen=True)
class Point:
    b: int
    h: int
    sq: int
    sk: int
    d: int
    causal: bool = False
    hk: int | None = None  # None: as many key heads as query heads
    dtype: str = "float16"

    @property
    def label(self) -> str:
        gqa = f" Hk={self.hk}" if self.hk else ""
        mode = "causal" if self.causal else "full"
        return f"B={self.b} H={self.h}{gqa} Sq={self.sq} Sk={self.sk} D={self.d} {mode} {self.dtype}"

    def naive_bytes(self) -> int:
        """Memory naive_colsum needs: float32 scores and weights, B*H*Sq*Sk each."""
        return 2 * 4 * self.b * self.h * self.sq * self.sk


def sweeps(device: str) -> dict[str, list[Point]]:
    gpu = device == "cuda"
    demo = (
        [Point(8, 16, 1024, 1024, 64), Point(1, 16, 4096, 4096, 64), Point(1, 16, 16384, 16384, 64),
         Point(1, 32, 128, 65536, 128, causal=True), Point(1, 16, 16384, 16384, 72)]
        if gpu else
        [Point(4, 8, 256, 256, 64), Point(1, 8, 1024, 1024, 64), Point(1, 8, 2048, 2048, 64),
         Point(1, 8, 2048, 2048, 80), Point(1, 16, 128, 8192, 128, causal=True)]
    )
    return {
        "demo": demo,
        "noncausal_batched": [Point(b, 16, 1024, 1024, 64) for b in (1, 8, 64, 256, 1024)],
        "noncausal": [Point(1, 16, s, s, 64) for s in (2048, 4096, 16384, 65536, 262144)],
        "causal": [Point(1, 32, 128, sk, 128, causal=True) for sk in (16384, 65536, 262144)],
    }


def make_inputs(pt: Point, device: str):
    dtype = getattr(torch, pt.dtype)
    q = torch.randn(pt.b, pt.h, pt.sq, pt.d, device=device, dtype=dtype)
    k = torch.randn(pt.b, pt.hk or pt.h, pt.sk, pt.d, device=device, dtype=dtype)
    return q, k


METHODS = {
    "flash_colsum": lambda q, k, pt: flash_colsum(q, k, is_causal=pt.causal),
    "naive_colsum": lambda q, k, pt: naive_colsum(q, k, is_causal=pt.causal),
}


def _vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_extra_bytes(fn, device: str) -> int:
    """Bytes a call allocates at its peak beyond what was live before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _vm_kib("VmRSS")
    fn()
    return max(0, _vm_kib("VmHWM") - before) * 1024


def median_ms(fn, device: str, budget_s: float = 1.0) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(pt: Point, methods: dict, device: str, mem_limit: int) -> list[dict]:
    rows = []
    q, k = make_inputs(pt, device)
    for name, method in methods.items():
        row = dict(asdict(pt), method=name, device=device, ms=None, peak_extra_mib=None, note="")
        if name == "naive_colsum" and pt.naive_bytes() > mem_limit:
            row["note"] = f"skipped: needs ~{pt.naive_bytes() / 2**30:.1f} GiB"
            rows.append(row)
            continue
        fn = lambda: method(q, k, pt)  # noqa: E731
        try:
            row["peak_extra_mib"] = peak_extra_bytes(fn, device) / 2**20
            row["ms"] = median_ms(fn, device)
        except torch.OutOfMemoryError:
            row["note"] = "OOM"
        rows.append(row)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], title: str) -> None:
    header = ["shape", "method", "ms", "peak extra MiB", "note"]
    body = [
        [Point(**{f: r[f] for f in Point.__dataclass_fields__}).label, r["method"],
         f"{r['ms']:.3f}" if r["ms"] is not None else "-",
         f"{r['peak_extra_mib']:.1f}" if r["peak_extra_mib"] is not None else "-", r["note"]]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in ("shape", "method", "note") else "right")
        for line in body:
            table.add_row(*line)
        Console(width=160).print(table)
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        print(title)
        for line in [header, *body]:
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default="demo", choices=["demo", "noncausal_batched", "noncausal", "causal", "all"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the CSV")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--naive-limit-gib", type=float, default=None,
                        help="skip naive_colsum above this many GiB (default: 8 on the CPU, the GPU's memory)")
    args = parser.parse_args(argv)

    table = sweeps(args.device)
    names = ["noncausal_batched", "noncausal", "causal"] if args.sweep == "all" else [args.sweep]
    if args.naive_limit_gib is not None:
        mem_limit = int(args.naive_limit_gib * 2**30)
    elif args.device == "cuda":
        mem_limit = torch.cuda.get_device_properties(0).total_memory
    else:
        mem_limit = 8 * 2**30
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    all_rows = []
    for name in names:
        rows = [r for pt in table[name] for r in measure(pt, METHODS, args.device, mem_limit)]
        print_table(rows, f"{name} on {device_name} (torch {torch.__version__})")
        write_csv(rows, args.out / f"{name}_{args.device}.csv")
        all_rows += rows
    return all_rows


if __name__ == "__main__":
    main()
