"""The data-pipeline benchmark times a warmed steady state of both back ends and writes its CSV and plot."""

from __future__ import annotations

import pytest

from tests.benchmarks import load


def test_benchmark_smoke(tmp_path):
    pytest.importorskip("PIL")
    mod = load("data_pipeline")
    import _common as C  # benchmarks/ is on sys.path once the script is loaded

    out = tmp_path / "results"
    argv = ["--images", "24", "--width", "80", "--height", "60", "--workers", "1", "--img-size", "32",
            "--batch-size", "4", "--warmup-batches", "2", "--data", str(tmp_path / "jpegs"), "--out", str(out)]
    assert mod.main(argv) == 0
    rows = C.read_rows(out / "data_pipeline_cpu.csv")
    from fastkd.data import dali_available

    backends = ("dali", "torch") if dali_available() else ("torch",)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["provider"], r["mode"]) for r in ok} == {(b, m) for b in backends for m in ("train", "val")}
    for r in ok:
        # 24 images = 6 batches of 4: 2 warm-up batches, the other 4 timed
        assert r["cfg"]["images"] == 16 and r["cfg"]["dataset_images"] == 24 and r["device"] == "cpu"
        assert r["cpu_model"] and r["torch"] and r["date"] and r["commit"] and r["load_avg_1m"] != ""
    by = {(r["provider"], r["mode"], r["metric"]): r for r in ok}
    for b, m, _ in by:
        t = by[(b, m, "batch_time")]
        assert int(t["reps"]) == 4 and 0 < float(t["p20"]) <= float(t["p50"]) <= float(t["p80"])
        # images/s is the timed images over the timed window, the sum of the 4 batch times (>= 2 x their median)
        window_ms, ips = float(by[(b, m, "timed_window")]["p50"]), float(by[(b, m, "images_per_s")]["p50"])
        assert abs(ips - 16e3 / window_ms) <= 1e-3 * ips and window_ms >= 2 * float(t["p50"]) * 0.999
        assert float(by[(b, m, "images_per_cpu_s")]["p50"]) > 0
    assert (out / "data_pipeline_cpu.png").stat().st_size > 10_000
    assert {r["status"] for r in rows} <= {"ok", "not_applicable"}


def test_too_few_batches_is_a_clear_error(tmp_path):
    pytest.importorskip("PIL")
    mod = load("data_pipeline")
    argv = ["--images", "8", "--width", "80", "--height", "60", "--workers", "1", "--img-size", "32",
            "--batch-size", "4", "--backends", "torch", "--modes", "val", "--data", str(tmp_path / "jpegs"),
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--images"):
        mod.main(argv)


def test_without_dali_torch_is_measured_and_dali_recorded(tmp_path, monkeypatch):
    """An install without DALI still benchmarks torchvision; DALI gets a not-applicable row with the reason."""
    pytest.importorskip("PIL")
    import fastkd.data

    monkeypatch.setattr(fastkd.data, "dali_available", lambda: False)
    mod = load("data_pipeline")
    import _common as C

    out = tmp_path / "out"
    argv = ["--images", "24", "--width", "80", "--height", "60", "--workers", "1", "--img-size", "32",
            "--batch-size", "4", "--warmup-batches", "2", "--modes", "val", "--data", str(tmp_path / "jpegs"),
            "--out", str(out)]
    assert mod.main(argv) == 0
    rows = C.read_rows(out / "data_pipeline_cpu.csv")
    (dali,) = [r for r in rows if r["provider"] == "dali"]
    assert dali["status"] == "not_applicable" and "DALI is not installed" in dali["note"]
    assert {r["metric"] for r in rows if r["provider"] == "torch" and r["status"] == "ok"} == {
        "batch_time", "timed_window", "images_per_s", "cpu_cores_used", "images_per_cpu_s"}
