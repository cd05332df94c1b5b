"""``fastkd demo --quick`` and ``benchmarks/train_step.py --tiny`` run end to end on the CPU."""

from __future__ import annotations

import argparse

import pytest

from fastkd import demo
from tests.benchmarks import load


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
    return load("train_step")


def test_train_step_benchmark_tiny(tmp_path):
    bench = _bench()
    import _common as C  # benchmarks/ is on sys.path once the script is loaded

    variants = ["none", "hinton", "attndistill", "attn1", "attn1_eager", "attn12"]
    rc = bench.main(["--tiny", "--variants", *variants, "--data", "none", "--steps", "2", "--warmup", "1",
                     "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("train_step_*.csv")
    rows = C.read_rows(path)
    assert {r["provider"] for r in rows} == set(variants)
    by = {(r["provider"], r["metric"]): r for r in rows}
    for name in variants[:-1]:  # hinton and attndistill are registered methods: they must run
        step = by[(name, "step_time")]
        assert step["status"] == "ok" and int(step["reps"]) == 2, step
        assert 0 < float(step["p20"]) <= float(step["p50"]) <= float(step["p80"])
        # images/s is the batch over the median step time
        assert float(by[(name, "images_per_s")]["p50"]) == pytest.approx(4 / (float(step["p50"]) / 1e3), rel=1e-3)
        assert 0.0 <= float(by[(name, "data_wait_frac")]["p50"]) <= 1.0
        assert step["device"] and step["cpu_model"] and step["torch"] and step["date"] and step["commit"]
    assert by[("attn1_eager", "step_time")]["cfg"]["kernels"] == "eager-maps"  # the loss a user writes
    assert by[("attn1", "step_time")]["cfg"]["kernels"] == "default"
    assert by[("attn1", "step_time")]["cfg"]["layers"] == 1 and by[("attndistill", "step_time")]["cfg"]["layers"] == 0
    skipped = by[("attn12", "")]
    assert skipped["status"] == "skipped" and "blocks" in skipped["note"]  # the tiny student has 4 blocks
    assert path.with_suffix(".png").is_file()


def test_train_step_benchmark_with_loader(tmp_path):
    pytest.importorskip("PIL")
    bench = _bench()
    import _common as C

    rc = bench.main(["--tiny", "--variants", "none", "--data", "loader", "--steps", "2", "--warmup", "1",
                     "--out", str(tmp_path), "--workdir", str(tmp_path / "work"), "--no-plot"])
    assert rc == 0
    rows = {r["metric"]: r for r in C.read_rows(next(tmp_path.glob("train_step_*.csv")))}
    assert rows["step_time"]["status"] == "ok" and rows["step_time"]["cfg"]["data"] == "loader"
    assert 0.0 <= float(rows["data_wait_frac"]["p50"]) <= 1.0


def test_train_step_benchmark_recipes_reports_kd_overhead(tmp_path, capsys):
    """``--recipes``: each recipe beside its no-KD step (the same student, supervised, no teacher, one view), the
    KD overhead between the two medians, host syncs, and the closing summary the GPU suite prints."""
    bench = _bench()
    import _common as C

    recipes = ["hinton_tiny", "sdssl_tiny"]  # a teacher; two views and no teacher
    rc = bench.main(["--recipes", *recipes, "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    by = {(r["provider"], r["metric"]): r for r in C.read_rows(tmp_path / "train_step_recipes_cpu.csv")}
    summary = capsys.readouterr().out.split("step summary", 1)[1].splitlines()
    for recipe in recipes:
        kd, base = by[(recipe, "step_time")], by[(f"{recipe}:no_kd", "step_time")]
        assert kd["status"] == base["status"] == "ok"
        assert base["cfg"]["method"] == "supervised" and base["cfg"]["teacher"] == "none"
        assert kd["cfg"]["method"] == recipe[: -len("_tiny")]
        over = float(by[(recipe, "kd_overhead")]["p50"])
        assert over == pytest.approx(float(kd["p50"]) / float(base["p50"]) - 1, rel=1e-3, abs=1e-3)
        assert float(by[(recipe, "host_syncs")]["p50"]) == 0 == float(by[(f"{recipe}:no_kd", "host_syncs")]["p50"])
        assert f"{over:+.0%}" in next(line for line in summary if line.strip().startswith(f"{recipe} "))
