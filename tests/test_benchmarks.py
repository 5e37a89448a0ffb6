"""The benchmark driver: its floor formula always; a whole demo run when FLASH_COLSUM_RUN_BENCH=1."""

import csv
import os
import sys

import pytest
import torch

from benchmarks.baselines import ALIASES, DEFAULT_WHEEL_DIR, load_baselines
from benchmarks.benchmark_colsum import Point, chunked_naive, main
from benchmarks.ceilings import floor_ms, model_ms, visible_fraction
from flash_colsum import naive_colsum


def test_visible_fraction():
    assert visible_fraction(2, 3, causal=True) == 5 / 6  # row 0 sees keys 0-1, row 1 keys 0-2
    assert visible_fraction(3, 2, causal=True) == 3 / 6  # Sq > Sk: row 0 sees nothing
    assert visible_fraction(4, 4, causal=True) == 10 / 16
    assert visible_fraction(3, 5, causal=False) == 1.0


def test_floor_is_the_slowest_of_exp_matmul_and_memory():
    pt = Point(b=2, h=4, sq=8, sk=16, d=32, hk=2)  # float16
    scores = 2 * 4 * 8 * 16
    qk_bytes = 2 * 2 * 32 * (4 * 8 + 2 * 16)
    exp_bound = dict(exp2_per_s=1.0, matmul_flops=1e30, copy_bytes_per_s=1e30)
    assert floor_ms(pt, exp_bound) == pytest.approx(2 * scores * 1e3)
    assert floor_ms(pt, exp_bound, lse_given=True) == pytest.approx(scores * 1e3)
    matmul_bound = dict(exp2_per_s=1e30, matmul_flops=1.0, copy_bytes_per_s=1e30)
    assert floor_ms(pt, matmul_bound) == pytest.approx(2 * 2 * scores * 32 * 1e3)
    copy_bound = dict(exp2_per_s=1e30, matmul_flops=1e30, copy_bytes_per_s=1.0)
    assert floor_ms(pt, copy_bound) == pytest.approx(2 * qk_bytes * 1e3)
    causal = Point(b=1, h=1, sq=2, sk=3, d=8, causal=True)
    assert floor_ms(causal, exp_bound) == pytest.approx(2 * 5 * 1e3)


def test_model_adds_exp_and_matmul_time_or_takes_memory_time():
    pt = Point(b=2, h=4, sq=8, sk=16, d=72, hk=2)  # the matmul computes K = 64 + 16 = 80
    scores = 2 * 4 * 8 * 16
    exp_rate = dict(exp2_per_s=1.0, matmul_flops=1e30, copy_bytes_per_s=1e30)
    per_score = 1 + 2 * 80 / 256  # one exp2, then 2K FLOP at 256 FLOP per exp2-time
    assert model_ms(pt, exp_rate) == pytest.approx(2 * scores * per_score * 1e3)
    assert model_ms(pt, exp_rate, lse_given=True) == pytest.approx(scores * per_score * 1e3)
    assert model_ms(pt, exp_rate) > floor_ms(pt, exp_rate)  # the floor overlaps what the model adds
    qk_bytes = 2 * 2 * 72 * (4 * 8 + 2 * 16)
    memory_bound = dict(exp2_per_s=1e30, matmul_flops=1e30, copy_bytes_per_s=1.0)
    assert model_ms(pt, memory_bound) == pytest.approx(2 * qk_bytes * 1e3)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_naive_matches_naive(causal):
    q = torch.randn(2, 4, 7, 16)
    k = torch.randn(2, 2, 5, 16)  # GQA, and Sq > Sk: causal rows that see no key
    want = naive_colsum(q, k, is_causal=causal, dtype=torch.float64).float()
    got = chunked_naive(q, k, causal, budget_bytes=4 * 2 * 4 * 5 * 3)  # 3 rows per chunk
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not list(DEFAULT_WHEEL_DIR.glob("*.whl")), reason="no baseline wheels in .whl/")
def test_baselines_import_under_their_aliases():
    baselines = load_baselines(DEFAULT_WHEEL_DIR)
    assert set(baselines) == {"flash_colsum_0.1.0", "flash_colreduce_0.2.2"}
    for alias in ALIASES.values():
        assert alias in sys.modules
    assert hasattr(sys.modules["flash_colsum_v010"], "flash_colsum")
    assert sys.modules["flash_colsum"].__file__ != sys.modules["flash_colsum_v010"].__file__


@pytest.mark.skipif(os.environ.get("FLASH_COLSUM_RUN_BENCH") != "1", reason="set FLASH_COLSUM_RUN_BENCH=1")
def test_demo_run(tmp_path):
    rows = main(["--sweep", "demo", "--out", str(tmp_path)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in (f"demo_{device}.csv", f"bench_demo_{device}.csv", f"bench_demo_{device}.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / f"bench_demo_{device}.csv").open() as f:
        flash = [r for r in csv.DictReader(f) if r["method"] == "flash_colsum"]
    assert flash and all(float(r["ms"]) > 0 for r in flash)
    assert len(rows) >= 2 * len(flash)


def test_power_sample_parsing():
    """benchmarks.power reads nvidia-smi's clock, power and throttle-reason bits."""
    from benchmarks.power import parse_sample

    assert parse_sample("1815 MHz, 705.14 W, 0x0000000000000004") == (1815.0, 705.14, ["sw_power_cap"])
    assert parse_sample("1980 MHz, 579.0 W, 0x0000000000000000") == (1980.0, 579.0, [])
    assert parse_sample(" 1560 MHz , 701 W , 0x0000000000000024") == (1560.0, 701.0, ["sw_power_cap", "sw_thermal"])


def test_interleaved_ratios_pair_calls_of_one_iteration():
    from benchmarks.interleave import ratio_summary

    # b is 2x a call by call, although its median alone (4.0) is not 2x a's (3.0).
    rows = ratio_summary({"a": [1.0, 3.0, 5.0, 2.0, 4.0], "b": [2.0, 6.0, 10.0, 4.0, 8.0]})
    assert [r["method"] for r in rows] == ["a", "b"]
    assert rows[0]["ratio_median"] == rows[0]["ratio_p10"] == rows[0]["ratio_p90"] == 1.0
    assert rows[1]["median_ms"] == 6.0 and rows[1]["ratio_median"] == 2.0 and rows[1]["calls"] == 5
    mixed = ratio_summary({"a": [1.0, 1.0, 1.0], "b": [3.0, 1.0, 2.0]})[1]
    assert (mixed["ratio_p10"], mixed["ratio_median"], mixed["ratio_p90"]) == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="b has 2 calls"):
        ratio_summary({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0]})


def test_interleaved_calls_rotate_their_order():
    from benchmarks.interleave import interleaved_times

    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in "abc"}
    times = interleaved_times(calls, iters=4, device="cpu", warmup=1)
    assert log[:3] == ["a", "b", "c"]  # the warm-up
    assert log[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(ts) for name, ts in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_interleave_cli_on_the_cpu(tmp_path):
    from benchmarks.interleave import main as interleave

    rows = interleave(["--sweep", "noncausal_batched", "--device", "cpu", "--iters", "2", "--out", str(tmp_path)])
    with (tmp_path / "interleave_noncausal_batched_cpu.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) == 6  # three points, flash_colsum and sdpa at each
    assert all(float(r["median_ms"]) > 0 for r in written)
    assert {float(r["ratio_median"]) for r in written if r["method"] == "flash_colsum"} == {1.0}
    with pytest.raises(SystemExit):
        interleave(["--device", "cpu", "--methods", "flash_colsum,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        interleave(["--device", "cpu", "--iters", "0", "--out", str(tmp_path)])


def test_ncu_stalls_summary(tmp_path):
    """benchmarks.ncu_stalls reads ncu's per-instruction CSV: totals by stall reason and opcode
    (predicates skipped), and runs of instructions executed equally often."""
    from benchmarks.ncu_stalls import summarize

    header = ["Address", "Source", "# Samples", "Instructions Executed", "stall_mio", "stall_wait", "stall_wait (Not Issued)"]
    body = [["0x0", "  MUFU.EX2 R1, R2", "5", "7", "4", "1", "1"],
            ["0x10", "  @!P0 FADD R3, R1, R3", "3", "7", "0", "3", "3"],
            ["0x20", "  EXIT", "0", "1", "0", "0", "0"]]
    path = tmp_path / "sass.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["Kernel Name", "k"], header, *body])
    text = summarize(str(path), min_run=2)
    assert text.startswith("8 stall samples")
    assert "mio                         4  50.0%" in text and "wait                        4  50.0%" in text
    assert "MUFU" in text and "FADD" in text and "@!P0" not in text.split("hottest")[0]
    assert "2 instructions x 7, 8 samples" in text
