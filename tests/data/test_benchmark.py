"""The data-pipeline benchmark runs end to end at a toy size and writes its CSV and plot."""

from __future__ import annotations

import csv
import importlib.util
import os

from tests.data.conftest import needs_dali

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data_pipeline.py")


@needs_dali  # it compares DALI with torchvision
def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("data_pipeline", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "results"
    argv = [
        "--images",
        "12",
        "--width",
        "80",
        "--height",
        "60",
        "--workers",
        "1",
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--data",
        str(tmp_path / "jpegs"),
        "--out",
        str(out),
    ]
    assert mod.main(argv) == 0
    rows = list(csv.DictReader(open(out / "data_pipeline_cpu.csv")))
    assert {(r["backend"], r["mode"]) for r in rows} == {
        ("dali", "train"),
        ("dali", "val"),
        ("torch", "train"),
        ("torch", "val"),
    }
    assert all(int(r["images"]) == 12 and float(r["images_per_s"]) > 0 and r["device"] == "cpu" for r in rows)
    assert rows[0]["dali"] and rows[0]["torch"] and rows[0]["date"]
    assert (out / "data_pipeline_cpu.png").stat().st_size > 10_000
