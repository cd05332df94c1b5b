"""benchmarks/head_importance.py runs end to end at a tiny size and writes its CSV."""

from __future__ import annotations

from tests.benchmarks import load


def test_benchmark_writes_csv(tmp_path):
    mod = load("head_importance")
    import _common as C  # benchmarks/ is on sys.path once the script is loaded

    out = tmp_path / "hi.csv"
    argv = ["--device", "cpu", "--shapes", "2x2x40x16", "--ops", "entropy", "--reps", "2", "--out", str(out)]
    assert mod.main(argv + ["--providers", "triton", "torch", "reference"]) == 0
    rows = C.read_rows(out)
    (na,) = [r for r in rows if r["provider"] == "triton"]
    assert na["status"] == "not_applicable" and "CUDA" in na["note"]
    ok = [r for r in rows if r["provider"] != "triton"]
    assert {(r["provider"], r["metric"]) for r in ok} == {
        (p, m) for p in ("torch", "reference") for m in ("time", "peak_extra_memory", "max_rel_err_vs_fp64")
    }
    for r in ok:
        assert r["status"] == "ok" and r["op"] == "entropy" and r["cfg"]["N"] == 40
        assert r["device"] == "cpu" and r["cpu_model"] and r["torch"] and r["date"] and r["commit"]
        assert r["load_avg_1m"] != ""
        if r["metric"] == "time":
            assert int(r["reps"]) == 2 and 0 < float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        if r["metric"] == "max_rel_err_vs_fp64":  # fp32 streaming and fp32 materializing vs the fp64 oracle
            assert 0.0 < float(r["p50"]) < 64 * 2.0**-23  # > 0: the oracle is fp64, not the fp32 reference
    assert mod.main(argv + ["--providers", "torch"]) == 0  # appends
    assert len(C.read_rows(out)) == len(rows) + 3
