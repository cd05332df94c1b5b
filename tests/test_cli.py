"""The console entry point: ``fastkd info`` and ``fastkd bench kernels`` on a fresh process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys


def fastkd(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastkd", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_info_reports_versions_devices_and_kernels():
    out = fastkd("info")
    assert out.returncode == 0, out.stderr
    for word in ("fastkd", "torch", "triton", "timm", "DALI", "DeepSpeed", "xformers", "devices", "attention_kl"):
        assert word in out.stdout, f"{word!r} missing from fastkd info:\n{out.stdout}"
    as_json = json.loads(fastkd("info", "--json").stdout)
    assert as_json["kernels"]["cpu"]["attention_kl"] == "torch"
    assert as_json["versions"]["fastkd"]


def test_info_honours_forced_kernels(monkeypatch):
    import os

    env = {**os.environ, "FASTKD_KERNELS": "reference"}
    as_json = json.loads(fastkd("info", "--json", env=env).stdout)
    assert as_json["kernels"]["cpu"]["attention_kl"] == "reference"


def test_bench_kernels_writes_csv(tmp_path):
    out_csv = tmp_path / "ak.csv"
    out = fastkd("bench", "kernels", "--shapes", "1,2,17,16", "--providers", "fastkd,eager", "--dtypes", "fp32",
                 "--rep-ms", "5", "--no-plot", "--out", str(out_csv))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [r for r in csv.DictReader(open(out_csv)) if r["metric"] == "time"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("fastkd", "eager") for m in ("forward", "backward", "full")
    }
    for r in rows:
        assert float(r["p50"]) > 0 and r["device"].startswith("cpu") and r["torch"] and r["commit"]
        flops = json.loads(r["config"])["model_flops"]
        assert flops == {"forward": 4, "backward": 8, "full": 12}[r["mode"]] * 2 * 17 * 17 * 16
