"""benchmarks/head_importance.py runs end to end at a tiny size and writes its CSV."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "head_importance.py"


def test_benchmark_writes_csv(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_head_importance", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "hi.csv"
    argv = ["--device", "cpu", "--shapes", "2x2x40x16", "--ops", "entropy", "--reps", "1", "--out", str(out)]
    assert mod.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["provider"] for r in rows] == ["torch", "reference"]
    for r in rows:
        assert r["device"] and r["torch"] and r["date"] and r["N"] == "40"
        assert float(r["time_ms_p50"]) > 0 and float(r["max_rel_err_vs_reference"]) < 1e-5
    assert mod.main(argv + ["--providers", "torch"]) == 0  # appends
    assert len(list(csv.DictReader(out.open()))) == 3
