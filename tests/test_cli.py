"""The console entry point: ``fastkd info`` and ``fastkd bench kernels``.

One test runs the real entry point (``python -m fastkd``) in a fresh process; the others are about the output
and call :func:`fastkd.cli.main` in this process (a fresh interpreter spends seconds importing torch)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from fastkd.cli import main


def fastkd(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastkd", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def info_json(capsys) -> dict:
    capsys.readouterr()
    assert main(["info", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_reports_versions_devices_and_kernels(capsys):
    out = fastkd("info")  # the real entry point, in a fresh process
    assert out.returncode == 0, out.stderr
    for word in ("fastkd", "torch", "triton", "timm", "DALI", "DeepSpeed", "xformers", "devices", "attention_kl"):
        assert word in out.stdout, f"{word!r} missing from fastkd info:\n{out.stdout}"
    as_json = info_json(capsys)
    assert as_json["kernels"]["cpu"]["attention_kl"] == "torch"
    assert as_json["versions"]["fastkd"]


def test_info_honours_forced_kernels(monkeypatch, capsys):
    monkeypatch.setenv("FASTKD_KERNELS", "reference")
    as_json = info_json(capsys)
    assert as_json["kernels"]["cpu"]["attention_kl"] == "reference"


def test_bench_kernels_writes_csv(tmp_path):
    out_csv = tmp_path / "ak.csv"
    rc = main(["bench", "kernels", "--shapes", "1,2,17,16", "--providers", "fastkd,eager", "--dtypes", "fp32",
               "--rep-ms", "5", "--no-plot", "--out", str(out_csv)])
    assert rc == 0
    rows = [r for r in csv.DictReader(open(out_csv)) if r["metric"] == "time"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("fastkd", "eager") for m in ("forward", "backward", "full")
    }
    for r in rows:
        assert float(r["p50"]) > 0 and r["device"].startswith("cpu") and r["torch"] and r["commit"]
        flops = json.loads(r["config"])["model_flops"]
        assert flops == {"forward": 4, "backward": 8, "full": 12}[r["mode"]] * 2 * 17 * 17 * 16


def test_every_command_follows_the_convention():
    from fastkd.cli import COMMANDS
    from fastkd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS) == {"train", "eval", "importance", "bench", "info", "demo", "data",
                                                  "teacher-cache"}


def test_a_command_whose_module_fails_to_import_is_an_error(monkeypatch):
    import pytest

    from fastkd import cli

    monkeypatch.setitem(cli.COMMANDS, "broken", ("fastkd_no_such_module.commands", "never shown"))
    with pytest.raises(ImportError, match="fastkd broken: its module fastkd_no_such_module.commands"):
        cli.build_parser()
    with pytest.raises(ImportError):
        cli.main(["info"])
    monkeypatch.setitem(cli.COMMANDS, "broken", ("fastkd.engine.commands", "defines no run_broken"))
    with pytest.raises(AttributeError, match="defines no add_broken_arguments"):
        cli.build_parser()
