"""benchmarks/_common.py: the timing helper, the memory method, the CSV schema and the dirty-tree rule."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import torch

from tests.benchmarks import load


@pytest.fixture()
def C():
    return load("_common")


def test_time_fn_keeps_setup_out_of_the_window(C):
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1
        time.sleep(0.03)

    def fn():
        calls["fn"] += 1
        time.sleep(0.002)

    t = C.time_fn(fn, torch.device("cpu"), setup=setup, warmup=2, reps=5)
    assert t.reps == 5 and calls == {"setup": 7, "fn": 7}
    assert 2.0 <= t.p20 <= t.p50 <= t.p80 < 25.0  # 30 ms of setup would show in every sample
    assert t.total_ms >= 5 * 2.0


def test_peak_memory_sees_a_temporary_buffer(C):
    with C.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(96 * 2**20 // 4)  # 96 MiB, written: resident
        del x
    assert 90.0 <= mem.extra_mib <= 200.0


def test_rows_have_the_one_schema(C, tmp_path):
    env = C.stamp(torch.device("cpu"), ("torch",))
    t = C.Timing(2.0, 1.0, 3.0, 7, 14.0)
    rows = [C.row(env, benchmark="b", op="o", provider="p", config={"N": 3}, metric="time", unit="ms", value=t),
            C.row(env, benchmark="b", op="o", provider="q", config={"N": 3}, status="not_applicable", note="why")]
    assert env["cpu_model"] and env["commit"] and env["date"] and '"torch"' in env["versions"]
    path = C.write_rows(tmp_path / "r.csv", rows)
    C.write_rows(path, rows[:1], append=True)
    back = C.read_rows(path)
    assert [r["provider"] for r in back] == ["p", "q", "p"] and list(back[0])[: len(C.FIELDS)] == C.FIELDS
    assert back[0]["cfg"] == {"N": 3} and (back[0]["p50"], back[0]["reps"]) == ("2.0", "7")
    assert back[1]["status"] == "not_applicable" and back[1]["p50"] == "" and back[1]["load_avg_1m"] != ""
    with pytest.raises(ValueError, match="unknown columns"):
        C.row(env, benchmark="b", op="o", provider="p", config={}, speed=1)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="another header"):
        C.write_rows(other, rows, append=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dirty_tree_is_stamped_and_refused(C, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", "code.py")
    git("commit", "-qm", "one")
    monkeypatch.setattr(C, "ROOT", repo)
    monkeypatch.setattr(C, "RESULTS", repo / "benchmarks" / "results")
    target = repo / "benchmarks" / "results" / "x.csv"
    assert not C.tree_dirty() and not C.git_commit().endswith("-dirty")
    target.write_text("written by an earlier benchmark of the same run\n")  # results do not make the tree dirty
    assert not C.tree_dirty()
    C.check_output(target, force=False)
    (repo / "code.py").write_text("x = 2\n")
    assert C.tree_dirty() and C.git_commit().endswith("-dirty")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        C.check_output(target, force=False)
    C.check_output(target, force=True)  # forced: allowed, and the rows say -dirty
    C.check_output(tmp_path / "elsewhere.csv", force=False)  # outside benchmarks/results: allowed
    (repo / "code.py").write_text("x = 1\n")
    (repo / "new.py").write_text("")  # an untracked source file changes what runs too
    assert C.tree_dirty()
