"""Benchmark driver: flash_colsum against naive, chunked, SDPA and the published packages.

    python -m benchmarks.benchmark_colsum --sweep {demo,noncausal_batched,noncausal,causal,variants,window,all}
        [--out DIR] [--wheels DIR] [--device cuda|cpu] [--naive-limit-gib N]

"all" runs every sweep but demo, which only samples the others. On the CPU every sweep has small
shapes and flash_colsum runs its torch back end; the PyPI baselines (benchmarks/baselines.py) and
the ceilings need CUDA. Times are medians (CUDA events through triton.testing.do_bench on a GPU,
perf_counter on the CPU). Peak extra memory is what a call allocates beyond its inputs:
torch.cuda.max_memory_allocated on a GPU, the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) on the CPU. A GPU run starts by measuring the matmul, copy and exp2
ceilings; flash_colsum rows get the floor they imply (benchmarks/ceilings.py) and pct_of_floor, and
the H100's serial model (exponentials and matmuls one after the other) and pct_of_model.
flash_speedup is a row's time over flash_colsum's at the same point (> 1: flash_colsum is faster).

Output under --out: bench_{sweep}_{device}.csv (every row, with a `sweep` column) and
bench_{sweep}_{device}.png (latency and memory per sweep), plus {sweep}_{device}.csv when a single
sweep is asked for. This is a script, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import gc
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.baselines import DEFAULT_WHEEL_DIR, load_baselines
from benchmarks.ceilings import floor_ms, measure_ceilings, model_ms
from flash_colsum import column_stats, flash_colsum, naive_colsum

SWEEPS = ["demo", "noncausal_batched", "noncausal", "causal", "variants", "window", "short"]
LSE_ROW_MIN_SCORES = 2**26  # non-causal points from this Sq*Sk on also time the LSE-given path


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
    lse: bool = False  # also time flash_colsum given the LSE (automatic for large non-causal points)

    @property
    def label(self) -> str:
        gqa = f" Hk={self.hk}" if self.hk else ""
        mode = "causal" if self.causal else "full"
        return f"B={self.b} H={self.h}{gqa} Sq={self.sq} Sk={self.sk} D={self.d} {mode} {self.dtype}"

    @property
    def times_lse(self) -> bool:
        return self.lse or (not self.causal and self.sq * self.sk >= LSE_ROW_MIN_SCORES)

    def naive_bytes(self) -> int:
        """Memory naive_colsum needs: float32 scores and weights, B*H*Sq*Sk each."""
        return 2 * 4 * self.b * self.h * self.sq * self.sk


def sweeps(device: str) -> dict[str, list[Point]]:
    if device == "cuda":
        return {
            "demo": [Point(8, 16, 1024, 1024, 64), Point(1, 16, 4096, 4096, 64), Point(1, 16, 16384, 16384, 64),
                     Point(1, 32, 128, 65536, 128, causal=True), Point(1, 16, 16384, 16384, 72)],
            "noncausal_batched": [Point(b, 16, 1024, 1024, 64) for b in (1, 8, 64, 256, 1024)],
            "noncausal": [Point(1, 16, s, s, 64) for s in (2048, 4096, 16384, 65536, 262144)],
            "causal": [Point(1, 32, 128, sk, 128, causal=True) for sk in (16384, 65536, 262144)]
            + [Point(1, 32, 512, 65536, 128, causal=True)],
            "variants": [Point(1, 16, 16384, 16384, d) for d in (72, 80, 96, 128)]
            + [Point(1, 16, 16384, 16384, 64, dtype="bfloat16"), Point(1, 32, 16384, 16384, 128, hk=8),
               Point(1, 32, 128, 65536, 128, causal=True, lse=True),
               Point(1, 16, 16384, 16384, 64, causal=True), Point(1, 32, 8192, 8192, 128, causal=True)],  # prefills
            # SnapKV's observation window: the last 32 queries of a prompt score the KV cache (GQA)
            "window": [Point(1, 32, 32, sk, 128, causal=True, hk=8) for sk in (4096, 16384, 65536)]
            + [Point(1, 32, 64, 2048, 128, hk=8)],  # text queries over image tokens
            # Vision encoders and BERT-size batches: ViT-B/16 (197 tokens, 12 heads), CLIP ViT-L/14 (257
            # and 577 at 336 px), 512 tokens; up to 512 keys at D=64 they take the one pass.
            "short": [Point(64, 16, 197, 197, 64), Point(256, 12, 197, 197, 64), Point(64, 16, 257, 257, 64),
                      Point(8, 16, 512, 512, 64), Point(256, 16, 512, 512, 64), Point(64, 16, 577, 577, 64)],
        }
    # CPU: the same kinds of points, small enough that --sweep all takes well under two minutes.
    return {
        "demo": [Point(4, 8, 256, 256, 64), Point(1, 8, 1024, 1024, 64), Point(1, 8, 2048, 2048, 64),
                 Point(1, 8, 2048, 2048, 80), Point(1, 16, 128, 8192, 128, causal=True)],
        "noncausal_batched": [Point(b, 8, 256, 256, 64) for b in (1, 4, 16)],
        "noncausal": [Point(1, 8, s, s, 64) for s in (256, 512, 1024)],
        "causal": [Point(1, 8, 64, sk, 128, causal=True) for sk in (1024, 4096)]
        + [Point(1, 8, 256, 4096, 128, causal=True)],
        "variants": [Point(1, 8, 512, 512, d) for d in (72, 80, 96, 128)]
        + [Point(1, 8, 512, 512, 64, dtype="bfloat16"), Point(1, 8, 512, 512, 128, hk=2),
           Point(1, 8, 512, 512, 64, lse=True), Point(1, 8, 64, 4096, 128, causal=True, lse=True),
           Point(1, 8, 1024, 1024, 64, causal=True)],
        "window": [Point(1, 8, 16, sk, 128, causal=True, hk=2) for sk in (1024, 4096)],
        "short": [Point(16, 12, 197, 197, 64), Point(4, 16, 512, 512, 64)],
    }


def make_inputs(pt: Point, device: str):
    dtype = getattr(torch, pt.dtype)
    q = torch.randn(pt.b, pt.h, pt.sq, pt.d, device=device, dtype=dtype)
    k = torch.randn(pt.b, pt.hk or pt.h, pt.sk, pt.d, device=device, dtype=dtype)
    return q, k


def chunked_naive(q, k, causal: bool, budget_bytes: int = 2**28):
    """Mean weight per key from float32 softmax rows materialized a chunk of query rows at a time.

    What one writes without a fused kernel when the whole matrix does not fit: scores in the input
    dtype (tensor cores), softmax and column sums in float32, about `budget_bytes` of float32
    weights per chunk. GQA groups are folded into the rows, so K is never repeated.
    """
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    group = h // hk
    grouped = q.reshape(b, hk, group, sq, d)
    rows = max(1, budget_bytes // (4 * b * h * sk))
    out = torch.zeros(b, sk, device=q.device, dtype=torch.float32)
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        scores = grouped[:, :, :, r0:r1].reshape(b, hk, group * (r1 - r0), d) @ k.transpose(-1, -2)
        scores = scores.float().mul_(d**-0.5).view(b, hk, group, r1 - r0, sk)
        if causal:  # bottom-right: row i sees key j iff j <= i + Sk - Sq
            i = torch.arange(r0, r1, device=q.device)[:, None]
            scores.masked_fill_(torch.arange(sk, device=q.device) > i + (sk - sq), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if causal:
            weights.nan_to_num_(0.0)  # rows that see no key (Sq > Sk) add nothing
        out += weights.sum(dim=(1, 2, 3))
    return out.div_(h * sq)


def _flash_with_lse(q, k, pt: Point):
    """flash_colsum's statistic from a precomputed LSE, as when the attention forward returned it."""
    _, lse = column_stats(q, k, is_causal=pt.causal, return_lse=True)  # outside the timed call
    return partial(column_stats, q, k, lse=lse, is_causal=pt.causal)


def _sdpa(q, k, pt: Point):
    """The attention forward itself (v = k), what a fused attention costs at this shape."""
    if pt.causal and pt.sq != pt.sk:
        raise NotImplementedError("SDPA's is_causal is top-left aligned; ours is bottom-right")
    return partial(F.scaled_dot_product_attention, q, k, k, is_causal=pt.causal, enable_gqa=pt.hk is not None)


def _baseline(fn):
    """A baselines.load_baselines callable (q, k, causal) as a method setup."""
    return lambda q, k, pt: partial(fn, q, k, pt.causal)


# name -> setup(q, k, pt) returning the call to time; setup runs once, outside the timed region.
METHODS = {
    "flash_colsum": lambda q, k, pt: partial(flash_colsum, q, k, is_causal=pt.causal),
    "flash_colsum_lse": _flash_with_lse,
    "naive_colsum": lambda q, k, pt: partial(naive_colsum, q, k, is_causal=pt.causal),
    "chunked_naive": lambda q, k, pt: partial(chunked_naive, q, k, pt.causal),
    "sdpa": _sdpa,
}
FLASH_METHODS = ("flash_colsum", "flash_colsum_lse")


def methods_at(pt: Point, methods: dict) -> list[str]:
    return [m for m in methods if m != "flash_colsum_lse" or pt.times_lse]


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


def median_ms(fn, device: str, budget_s: float = 0.3) -> float:
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


def error_note(e: Exception) -> str:
    """A failed method's note: the exception's type and the first line of its message."""
    first_line = str(e).strip().split("\n")[0]
    return f"{type(e).__name__}: {first_line}"[:100] if first_line else type(e).__name__


def measure(pt: Point, methods: dict, device: str, mem_limit: int, ceilings=None, tick=print) -> list[dict]:
    """One row per method at `pt`; a method that fails gets its exception type in `note`, not a crash."""
    rows = []
    q, k = make_inputs(pt, device)
    for name in methods_at(pt, methods):
        tick(f"{pt.label} {name}")
        row = dict(asdict(pt), method=name, device=device, ms=None, peak_extra_mib=None,
                   floor_ms=None, pct_of_floor=None, model_ms=None, pct_of_model=None, flash_speedup=None, note="")
        rows.append(row)
        if name == "naive_colsum" and pt.naive_bytes() > mem_limit:
            row["note"] = f"skipped: needs ~{pt.naive_bytes() / 2**30:.1f} GiB"
            continue
        try:
            fn = methods[name](q, k, pt)
            row["peak_extra_mib"] = peak_extra_bytes(fn, device) / 2**20
            row["ms"] = median_ms(fn, device)
        except torch.OutOfMemoryError:
            row["note"] = "OOM"
        except Exception as e:  # noqa: BLE001  (unsupported points of the baselines)
            row["note"] = error_note(e)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    flash = next(r["ms"] for r in rows if r["method"] == "flash_colsum")
    for row in rows:
        if row["ms"] is None:
            continue
        if ceilings and row["method"] in FLASH_METHODS:
            lse_given = row["method"] == "flash_colsum_lse"
            row["floor_ms"] = floor_ms(pt, ceilings, lse_given=lse_given)
            row["pct_of_floor"] = 100 * row["floor_ms"] / row["ms"]
            row["model_ms"] = model_ms(pt, ceilings, lse_given=lse_given)
            row["pct_of_model"] = 100 * row["model_ms"] / row["ms"]
        if flash is not None and row["method"] != "flash_colsum":
            row["flash_speedup"] = row["ms"] / flash
    return rows


def point_of(row: dict) -> Point:
    return Point(**{f.name: row[f.name] for f in fields(Point)})


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], title: str) -> None:
    header = ["shape", "method", "ms", "peak extra MiB", "floor ms", "% of floor", "% of model", "flash speedup", "note"]
    body = [
        [point_of(r).label, r["method"], _fmt(r["ms"], ".3f"), _fmt(r["peak_extra_mib"], ".1f"),
         _fmt(r["floor_ms"], ".3f"), _fmt(r["pct_of_floor"], ".0f"), _fmt(r.get("pct_of_model"), ".0f"),
         "-" if r["flash_speedup"] is None else f"{r['flash_speedup']:.2f}x", r["note"]]
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
        Console(width=200).print(table)
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


@contextmanager
def progress(total: int, title: str):
    """Yields tick(text), called before each measurement: a rich progress bar, or numbered lines."""
    try:
        from rich.progress import Progress
    except ImportError:
        count = iter(range(1, total + 1))
        yield lambda text: print(f"{title} [{next(count)}/{total}] {text}", flush=True)
        return
    # No refresh thread: it takes the GIL while host-bound calls are timed (small points read up to
    # 3x slower under it, NOTES.md v8/v11); the bar redraws at each tick instead.
    with Progress(auto_refresh=False) as bar:
        task = bar.add_task(title, total=total)
        done = iter(range(total))
        yield lambda text: bar.update(task, completed=next(done), description=f"{title}: {text}", refresh=True)
        bar.update(task, completed=total, description=title)


def _tick_label(pt: Point, varying: list[str]) -> str:
    """The fields that change across a sweep, short: 'Sq=4096 Sk=4096', 'D=80 bfloat16'."""
    names = dict(b="B", h="H", hk="Hk", sq="Sq", sk="Sk", d="D")
    parts = []
    for f in varying:
        value = getattr(pt, f)
        if f in names and value is not None:
            parts.append(f"{names[f]}={value}")
        elif f in ("causal", "lse") and value:
            parts.append(f)
        elif f == "dtype":
            parts.append(value)
    return " ".join(parts)


def plot(rows_by_sweep: dict[str, list[dict]], path: Path, title: str) -> None:
    """One PNG: a row per sweep, latency and peak memory per point (log y), a line per method.

    A method without a number at a point (OOM, skipped, unsupported) breaks its line there and gets
    an 'x' at the top edge.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = list(dict.fromkeys(r["method"] for rows in rows_by_sweep.values() for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(rows_by_sweep), 2, figsize=(13, 1 + 4.2 * len(rows_by_sweep)), squeeze=False)
    for (sweep, rows), (ax_ms, ax_mem) in zip(rows_by_sweep.items(), axes):
        points = list(dict.fromkeys(point_of(r) for r in rows))
        varying = [f.name for f in fields(Point) if len({getattr(p, f.name) for p in points}) > 1]
        x_of = {p: i for i, p in enumerate(points)}
        panels = ((ax_ms, "ms", "latency (ms)"), (ax_mem, "peak_extra_mib", "peak extra memory (MiB)"))
        for ax, key, ylabel in panels:
            for m in methods:
                mine = [r for r in rows if r["method"] == m]
                xs = [x_of[point_of(r)] for r in mine]
                ys = [r[key] if r[key] is not None and r[key] > 0 else float("nan") for r in mine]  # NaN: a gap
                ax.plot(xs, ys, "o-", color=colors[m])
                missing = [x for x, r in zip(xs, mine) if r["ms"] is None]
                if missing:  # y in axes coordinates: the top edge, whatever the data range
                    ax.scatter(missing, [0.97] * len(missing), marker="x", color=colors[m],
                               transform=ax.get_xaxis_transform(), clip_on=False)
            ax.set_yscale("log")
            ax.set_xticks(range(len(points)), [_tick_label(p, varying) for p in points],
                          rotation=20, ha="right", fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{sweep}: {ylabel}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    inch = 1 / fig.get_figheight()  # in figure coordinates: title, then legend, then the axes
    fig.suptitle(f"{title}   (x at the top: OOM, skipped or unsupported)", fontsize=10, y=1 - 0.1 * inch, va="top")
    fig.legend(handles=[Line2D([], [], color=colors[m], marker="o", label=m) for m in methods],
               loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 * inch), ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 1.0 * inch))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default="demo", choices=[*SWEEPS, "all"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the CSVs and the plot")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEEL_DIR,
                        help="folder with the flash-colsum 0.1.0 and flash-colreduce 0.2.2 wheels (CUDA only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--naive-limit-gib", type=float, default=None,
                        help="skip naive_colsum above this many GiB (default: 8 on the CPU, the GPU's memory)")
    args = parser.parse_args(argv)

    table = sweeps(args.device)
    names = SWEEPS[1:] if args.sweep == "all" else [args.sweep]
    cuda = args.device == "cuda"
    if args.naive_limit_gib is not None:
        mem_limit = int(args.naive_limit_gib * 2**30)
    elif cuda:
        mem_limit = torch.cuda.get_device_properties(0).total_memory
    else:
        mem_limit = 8 * 2**30
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    title = f"{device_name}, torch {torch.__version__}"
    methods = dict(METHODS)
    ceilings = None
    if cuda:
        methods.update({name: _baseline(fn) for name, fn in load_baselines(args.wheels).items()})
        ceilings = measure_ceilings(args.device)
        print(f"ceilings: fp16 matmul {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s, "
              f"copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
              f"exp2 {ceilings['exp2_per_s'] / 1e12:.2f} T/s")
    else:
        print("PyPI baselines and ceilings left out: they need CUDA")

    by_sweep = {}
    for name in names:
        total = sum(len(methods_at(pt, methods)) for pt in table[name])
        with progress(total, name) as tick:
            rows = [r for pt in table[name] for r in measure(pt, methods, args.device, mem_limit, ceilings, tick)]
        by_sweep[name] = [dict(sweep=name, **r) for r in rows]
        print_table(rows, f"{name} on {title}")
        if len(names) == 1:
            write_csv(rows, args.out / f"{name}_{args.device}.csv")
    all_rows = [r for rows in by_sweep.values() for r in rows]
    write_csv(all_rows, args.out / f"bench_{args.sweep}_{args.device}.csv")
    plot(by_sweep, args.out / f"bench_{args.sweep}_{args.device}.png", title)
    print(f"wrote {args.out}/bench_{args.sweep}_{args.device}.csv and .png")
    return all_rows


if __name__ == "__main__":
    main()
