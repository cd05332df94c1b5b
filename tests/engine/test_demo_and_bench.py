"""``fastkd demo --quick`` and ``benchmarks/train_step.py --tiny`` run end to end on the CPU."""

from __future__ import annotations

import argparse
import csv
import importlib.util

import pytest

from fastkd import demo
from tests.engine.helpers import REPO


def test_demo_quick(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    assert demo.run_demo(args) == 0
    text = (tmp_path / "summary.md").read_text()
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "run " not in line]
    assert len(rows) == 3  # teacher, student without KD, student with KD
    assert "no distillation" in rows[1] and "distillation" in rows[2]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        top1, img_s, secs = float(cells[3]), float(cells[4]), float(cells[5])
        assert 0.0 <= top1 <= 100.0 and img_s > 0 and secs > 0
    assert (tmp_path / "teacher.pth").is_file()


def _bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_tiny(tmp_path):
    bench = _bench()
    rc = bench.main(["--tiny", "--variants", "none", "hinton", "attn1", "attn1_eager", "attn12", "--data", "none",
                     "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("train_step_*.csv")
    rows = list(csv.DictReader(open(path)))
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"none", "hinton", "attn1", "attn1_eager", "attn12"}
    for name in ("none", "attn1", "attn1_eager"):
        assert by[name]["status"] == "ok", by[name]
        assert float(by[name]["img_per_s"]) > 0 and float(by[name]["step_ms"]) > 0
        assert by[name]["device"] and by[name]["torch"] and by[name]["date"] and by[name]["commit"]
    assert by["attn1_eager"]["kernels"] == "reference" and by["attn1"]["kernels"] == "default"
    assert by["attn12"]["status"] == "skipped" and "blocks" in by["attn12"]["note"]  # tiny student has 4 blocks
    assert by["hinton"]["status"] in ("ok", "skipped")
    assert path.with_suffix(".png").is_file()


def test_train_step_benchmark_with_loader(tmp_path):
    pytest.importorskip("PIL")
    bench = _bench()
    rc = bench.main(["--tiny", "--variants", "none", "--data", "loader", "--steps", "2", "--warmup", "1",
                     "--out", str(tmp_path), "--workdir", str(tmp_path / "work"), "--no-plot"])
    assert rc == 0
    (row,) = list(csv.DictReader(open(next(tmp_path.glob("train_step_*.csv")))))
    assert row["status"] == "ok" and row["data"] == "loader" and 0.0 <= float(row["data_wait_frac"]) <= 1.0
