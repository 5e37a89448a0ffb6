"""Summarize where a kernel's warps wait, from Nsight Compute's per-instruction source page.

    ncu --clock-control none -k regex:stream --launch-skip 2 --launch-count 1 \
        --section SourceCounters -o rep python3 SCRIPT        # on the GPU machine
    ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python -m benchmarks.ncu_stalls sass.csv

Prints the warp-stall samples by reason, the executed instructions by opcode with each opcode's
main stalls, the hottest instructions, and the straight-line runs of instructions that execute the
same number of times (a kernel's loops show up as such runs): their opcodes and stalls. Used in
NOTES.md v27 on the Hopper kernels.
"""

import argparse
import collections
import csv


def _opcode(source: str) -> str:
    words = source.split()
    if not words:
        return "?"
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]  # skip a predicate
    return op.split(".")[0]


def summarize(path: str, hottest: int = 20, min_run: int = 20) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next(r for r in rows if "Source" in r and "# Samples" in r)
    col = {name: i for i, name in enumerate(header)}
    data = [r for r in rows[rows.index(header) + 1:] if len(r) == len(header)]
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def count(r, name):
        return int(r[col[name]] or 0)

    samples = sum(count(r, "# Samples") for r in data)
    by_reason, executed = collections.Counter(), collections.Counter()
    stalls_of = collections.defaultdict(collections.Counter)
    for r in data:
        op = _opcode(r[col["Source"]])
        executed[op] += count(r, "Instructions Executed")
        for s in reasons:
            by_reason[s] += count(r, s)
            stalls_of[op][s[6:]] += count(r, s)
    lines = [f"{samples} stall samples"]
    lines += [f"  {s[6:]:20s} {v:8d} {100 * v / max(samples, 1):5.1f}%" for s, v in by_reason.most_common() if v]
    total = sum(executed.values())
    lines.append(f"\n{total} warp instructions executed, by opcode")
    for op, v in executed.most_common(20):
        top = ", ".join(f"{k}={n}" for k, n in stalls_of[op].most_common(3) if n)
        lines.append(f"  {op:10s} {v:11d} {100 * v / max(total, 1):5.1f}%  {top}")
    lines.append("\nhottest instructions")
    for r in sorted(data, key=lambda r: -count(r, "# Samples"))[:hottest]:
        top = sorted(((count(r, s), s[6:]) for s in reasons), reverse=True)[:2]
        lines.append(f"  {count(r, '# Samples'):6d}  {r[col['Source']].strip()[:60]:60s} {top}")
    lines.append(f"\nruns of >= {min_run} instructions executed equally often (loops and peeled tiles)")
    runs = []
    for index, r in enumerate(data):
        n = count(r, "Instructions Executed")
        if runs and runs[-1][0] == n:
            runs[-1][2].append(r)
        else:
            runs.append((n, index, [r]))
    for n, index, run in runs:
        if len(run) < min_run or n == 0:
            continue
        ops = collections.Counter(_opcode(r[col["Source"]]) for r in run)
        waits = collections.Counter({s[6:]: sum(count(r, s) for r in run) for s in reasons})
        lines.append(f"  from #{index}: {len(run)} instructions x {n}, {sum(count(r, '# Samples') for r in run)} samples")
        lines.append("    " + ", ".join(f"{op} {k}" for op, k in ops.most_common(8)))
        lines.append("    " + ", ".join(f"{s} {k}" for s, k in waits.most_common(5) if k))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    args = parser.parse_args()
    print(summarize(args.csv))


if __name__ == "__main__":
    main()
