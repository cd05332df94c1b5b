"""Hostile and broken inputs (issue 14): each gives one clear line and exit code 2, never runs pickled code, and
resume stays exact or says why it cannot. CPU only, tiny models, the CLI in this process unless the case needs
a fresh one (a file-size limit, a stalled rank)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fastkd.cli import main
from fastkd.config import ConfigError
from fastkd.config import load_config
from fastkd.engine import checkpoint as ckpt
from tests.engine.conftest import write_quadrant_folder
from tests.engine.helpers import REPO
from tests.engine.helpers import env_for_subprocess
from tests.engine.helpers import run_cli
from tests.engine.helpers import run_cli_together

VIT = "{img_size: 16, patch_size: 8, embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0}"


def _args(tmp_path, data, name, *extra):
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        recipe.write_text("student: {name: vit_tiny_patch16_224, kwargs: " + VIT + "}\nmethod: {name: supervised}\n")
    return ["train", "--config", str(recipe), f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}",
            "run.device=cpu", "train.steps=2", "train.progress=false", "train.log_every=1", "train.eval=false",
            f"data.root={data}", "data.num_workers=0", "data.backend=torch", "data.img_size=16",
            "data.batch_size=8", *extra]


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    line = err.splitlines()[-1]
    assert line.startswith("fastkd ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in line, (needle, line)
    return line


class _Evil:
    """Unpickling it opens (creates) ``path`` for writing: what any code in a pickle could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# ---------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2


BAD = {
    "train.batch_size=0": (["train.batch_size=0"], "train.batch_size=0"),
    "negative batch": (["train.batch_size=-4"], "train.batch_size=-4"),
    "epochs=-3": (["train.epochs=-3", "train.steps=null"], "train.epochs=-3"),
    "missing root": (["data.root=/nonexistent/fastkd"], "/nonexistent/fastkd"),
    "empty root": (["data.root="], "DataConfig.root"),
    "num_classes": (["data.num_classes=2"], "DataConfig.num_classes=2"),
    "huge seed": (["run.seed=123456789012345678901234567890"], "run.seed="),
    "negative seed": (["run.seed=-1"], "run.seed=-1"),
    "timeout": (["distributed.timeout=0"], "distributed.timeout=0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_is_one_line(case, tmp_path, tiny_data, capsys):
    extra, needle = BAD[case]
    rc = main(_args(tmp_path, tiny_data, "r", *extra))
    _one_line_error(capsys, rc, needle)
    assert not (tmp_path / "runs" / "r" / "ckpt").exists()  # nothing trained, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, tiny_data, capsys):
    _one_line_error(capsys, main(_args(tmp_path, tiny_data, "r", "run.device=cuda")), "run.device=cuda")


def test_output_dir_under_a_file(tmp_path, tiny_data, capsys):
    (tmp_path / "afile").write_text("x")
    rc = main(_args(tmp_path, tiny_data, "r", f"run.output_dir={tmp_path / 'afile' / 'runs'}"))
    _one_line_error(capsys, rc, "run folder", "Not a directory")


@pytest.mark.parametrize("kind", ["binary", "deep", "laughs", "huge"])
def test_hostile_recipe_files(kind, tmp_path, capsys):
    f = tmp_path / "r.yaml"
    if kind == "binary":
        f.write_bytes(bytes(range(256)) * 8)
    elif kind == "deep":
        f.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "laughs":  # 9 levels of 9 aliases each: 9**9 = 387 million strings once expanded
        lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
        f.write_text("\n".join(lines) + "\n")
        assert f.stat().st_size <= 700
    else:
        f.write_text("a: [" + "1," * 600_000 + "1]\n")
    t0 = time.perf_counter()
    rc = main(["train", "--config", str(f), "--print-config"])
    needle = {"binary": "not a text file", "deep": "nested deeper", "laughs": "expands to more than",
              "huge": "characters"}[kind]
    _one_line_error(capsys, rc, f"--config {f}", needle)
    assert time.perf_counter() - t0 < 30  # refused before anything is expanded


def test_alias_bomb_in_an_override():
    bomb = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
           "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
    with pytest.raises(ConfigError, match="override method.params.x: expands to more than"):
        load_config(None, [f"method.params.x={bomb}"])
    # a normal alias still works
    cfg = load_config(None, ["method.params.x=[&a [1, 2], *a]"])
    assert cfg.method.params["x"] == [[1, 2], [1, 2]]


def test_debug_shows_traceback_and_bugs_keep_it(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("FASTKD_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.batch_size=0"):
        main(_args(tmp_path, tiny_data, "r", "train.batch_size=0"))
    monkeypatch.delenv("FASTKD_DEBUG")
    import fastkd.engine.commands as commands

    def bug(args):
        raise KeyError("a bug in fastkd")

    monkeypatch.setattr(commands, "_load", bug)
    with pytest.raises(KeyError):  # not an expected error: the traceback stays
        main(_args(tmp_path, tiny_data, "r"))


def test_real_entry_point_prints_one_line(tmp_path):
    r = run_cli(["train", "--config", "hinton_tiny", "train.epochs=-3", "train.steps=null"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "fastkd train: train.epochs=-3: expected an integer >= 1 (or set train.steps)"
    ], r.stderr


def _corrupt_copy(tmp_path, n_bad=1):
    data = write_quadrant_folder(tmp_path / "data")
    bad = sorted((data / "train" / "c1").glob("*.jpg"))[:n_bad]
    for f in bad:
        f.write_bytes(b"\xff\xd8 not really a jpeg")
    return data, bad


def test_corrupt_error_policy_and_totals(tmp_path, capsys):
    data, bad = _corrupt_copy(tmp_path, n_bad=2)
    rc = main(_args(tmp_path, data, "err", "data.corrupt=error"))
    _one_line_error(capsys, rc, "corrupt image", bad[0].name[:-4])
    # skip: the run goes on and the totals per split reach summary.json, metrics.jsonl and the summary table
    rc = main(_args(tmp_path, data, "skip", "data.corrupt=skip", "train.steps=4", "train.eval=true"))
    out = capsys.readouterr().out
    assert rc == 0
    run = tmp_path / "runs" / "skip"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["corrupt_train"] == 2 and summary["corrupt_val"] == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "corrupt"][-1] | {"time": 0} == \
        {"kind": "corrupt", "step": 4, "time": 0, "train": 2, "val": 0}
    assert "corrupt_train" in out


# The disk fills up while the step-4 checkpoint is written, in a real `python -m fastkd` process. ENOSPC: the file
# layer writes what fits (4 KiB of the temporary file), then every write fails with ENOSPC, as a full disk does.
# EFBIG: no Python in the way, the kernel refuses the writes beyond a file-size limit (RLIMIT_FSIZE, set as that file
# is opened, at half the size of the step-2 checkpoint).
_FULL_DISK = """
import builtins, errno, io, os, resource, runpy, signal, sys

how = sys.argv.pop(1)


class FullDisk(io.FileIO):
    room = 4096

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        self.room -= len(data)
        return super().write(data)


real_open = builtins.open


def open_(file, mode="r", *args, **kwargs):
    if ".step_00000004.pt.tmp" in str(file) and "w" in mode:
        if how == "ENOSPC":
            return FullDisk(file, "wb")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() rather than the signal
        limit = os.path.getsize(os.path.join(os.path.dirname(file), "step_00000002.pt")) // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return real_open(file, mode, *args, **kwargs)


builtins.open = open_
sys.argv[0] = "fastkd"
runpy.run_module("fastkd", run_name="__main__", alter_sys=True)
"""


FULL_DISK = ("ENOSPC", "EFBIG")


@pytest.fixture(scope="module")
def full_disk_runs(tmp_path_factory, tiny_data):
    """The run of each way the disk fills up, each in its own folder: independent processes (one thread each),
    started side by side. {how: (folder, completed process)}."""
    folders = {how: tmp_path_factory.mktemp(how) for how in FULL_DISK}
    runs = [[how, *_args(tmp, tiny_data, "r", "train.steps=4", "train.ckpt_every=2", "train.keep_ckpts=5")]
            for how, tmp in folders.items()]
    done = run_cli_together(*runs, cwd=REPO, timeout=240, launcher=[sys.executable, "-c", _FULL_DISK])
    return {how: (tmp, r) for (how, tmp), r in zip(folders.items(), done)}


@pytest.mark.parametrize("how", FULL_DISK)
def test_full_disk_keeps_the_last_good_checkpoint(how, full_disk_runs):
    """A full disk in the middle of a checkpoint: one line naming the last good checkpoint, exit code 2, that
    checkpoint loads, no partial file is left behind."""
    tmp_path, r = full_disk_runs[how]
    folder = tmp_path / "runs" / "r" / "ckpt"
    reason = {"ENOSPC": "No space left on device", "EFBIG": "File too large"}[how]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"fastkd train: could not write checkpoint {folder / 'step_00000004.pt'} ({reason}); nothing was replaced: "
        f"the last good checkpoint {folder / 'last.pt'} (= step_00000002.pt) is intact"
    ), r.stderr[-3000:]
    assert ckpt.load(folder / "last.pt")["step"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_00000002.pt"]  # no temporary file


@pytest.mark.parametrize("where", ["fsync", "close"])
def test_atomic_save_full_disk_late(where, tmp_path, monkeypatch):
    """Delayed allocation (ext4, NFS, ...) reports ENOSPC at fsync or close rather than at a write."""
    import errno

    first = ckpt.atomic_save({"step": 1}, ckpt.step_path(tmp_path, 1))
    os.link(first, ckpt.last_path(tmp_path))

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullAtClose(io.FileIO):
        def close(self):
            was_open = not self.closed
            super().close()
            if was_open:
                full()

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:  # the checkpoint writer's open(): a file whose close reports the full disk
        monkeypatch.setattr(ckpt, "open", lambda file, mode: FullAtClose(file, mode), raising=False)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.atomic_save({"step": 2}, ckpt.step_path(tmp_path, 2))
    assert "(No space left on device)" in str(info.value)
    assert f"last good checkpoint {ckpt.last_path(tmp_path)} (= step_00000001.pt) is intact" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.pt", "step_00000001.pt"]
    assert ckpt.load(ckpt.last_path(tmp_path)) == {"step": 1}


def test_atomic_save_keeps_the_traceback_of_a_bug(tmp_path):
    class Bug:
        def __reduce__(self):
            raise RuntimeError("a bug while pickling")

    with pytest.raises(RuntimeError, match="a bug while pickling"):
        ckpt.atomic_save({"x": Bug()}, ckpt.step_path(tmp_path, 1))
    assert not list((tmp_path / "ckpt").iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# run folder and resume


def test_fresh_run_in_a_used_folder_is_refused(tmp_path, tiny_data, capsys):
    assert main(_args(tmp_path, tiny_data, "r", "train.ckpt_every=1", "train.keep_ckpts=5")) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "runs" / "r" / "ckpt").iterdir())
    rc = main(_args(tmp_path, tiny_data, "r", "train.steps=1"))
    _one_line_error(capsys, rc, "--resume", "run.name", "run.overwrite=true")
    assert sorted(p.name for p in (tmp_path / "runs" / "r" / "ckpt").iterdir()) == before  # untouched
    # asked to overwrite: the old run's files are gone, nothing mixes
    assert main(_args(tmp_path, tiny_data, "r", "train.steps=1", "run.overwrite=true")) == 0
    names = sorted(p.name for p in (tmp_path / "runs" / "r" / "ckpt").iterdir())
    assert names == ["last.pt", "step_00000001.pt"]
    records = [json.loads(x) for x in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1]


def test_damaged_last_falls_back_and_leftovers_are_removed(tmp_path, tiny_data, capsys):
    assert main(_args(tmp_path, tiny_data, "full", "train.steps=4")) == 0
    assert main(_args(tmp_path, tiny_data, "r", "train.ckpt_every=1", "train.keep_ckpts=5", "train.steps=4")) == 0
    folder = tmp_path / "runs" / "r" / "ckpt"
    # last.pt is a hard link of step 4: damaging it in place damages both; step 3 is the newest good file
    with open(folder / "last.pt", "r+b") as f:
        f.truncate(200)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = folder / f".step_00000004.pt.tmp{dead.pid}"
    leftover.write_bytes(b"partial")
    capsys.readouterr()
    assert main(_args(tmp_path, tiny_data, "r", "train.steps=4", "--resume")) == 0
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "resumed from" in err and "step_00000003.pt" in err, err
    assert not leftover.exists()
    full = ckpt.load(tmp_path / "runs" / "full" / "ckpt" / "last.pt")
    resumed = ckpt.load(folder / "last.pt")
    assert resumed["step"] == 4
    for k, v in full["method"].items():  # step 4 was redone: the same weights as an uninterrupted run
        torch.testing.assert_close(resumed["method"][k], v, rtol=0, atol=0, msg=k)


def test_every_checkpoint_damaged_is_one_line(tmp_path, tiny_data, capsys):
    assert main(_args(tmp_path, tiny_data, "r")) == 0
    (tmp_path / "runs" / "r" / "ckpt" / "last.pt").write_bytes(b"garbage")
    capsys.readouterr()
    rc = main(_args(tmp_path, tiny_data, "r", "--resume"))
    _one_line_error(capsys, rc, "every checkpoint", "damaged")


def test_resume_from_another_configuration(tmp_path, capsys):
    """One run, resumed with each change in turn (a refused resume writes nothing, so the run serves every case)."""
    data = write_quadrant_folder(tmp_path / "data")
    assert main(_args(tmp_path, data, "r", "train.steps=1")) == 0
    teacher = ["teachers.0.name=vit_tiny_patch16_224", f"teachers.0.kwargs={VIT}"]
    for change, extra in (("data.seed=1", []), ("method.name=hinton", teacher), ("optim.lr=0.1", []),
                          ("fewer images", None)):  # fmt: skip
        if extra is None:
            for f in sorted((data / "train" / "c0").glob("*.jpg"))[:2]:
                f.unlink()
            extra, needle = [], "num_samples=32"
        else:
            extra, needle = [change, *extra], change.split("=")[0] + ":"
        capsys.readouterr()
        rc = main(_args(tmp_path, data, "r", "train.steps=2", "--resume", *extra))
        line = _one_line_error(capsys, rc, "run.resume=", needle)
        assert len(line) < 2000, change
        assert ckpt.load(ckpt.last_path(tmp_path / "runs" / "r"))["step"] == 1, change


# ---------------------------------------------------------------------------------------------------------------------
# security


def test_pickled_teacher_weights_need_trust_checkpoint(tmp_path, tiny_data, capsys):
    import argparse

    from tests.engine.helpers import tiny_vit

    weights = tmp_path / "teacher.pth"
    torch.save({"model": tiny_vit().state_dict(), "args": argparse.Namespace(lr=1)}, weights)
    teacher = ["method.name=hinton", "teachers.0.name=vit_tiny_patch16_224", f"teachers.0.kwargs={VIT}",
               f"teachers.0.weights={weights}"]
    rc = main(_args(tmp_path, tiny_data, "a", *teacher, "train.steps=1"))
    line = _one_line_error(capsys, rc, "--trust-checkpoint")
    assert "train" in line
    assert main(_args(tmp_path, tiny_data, "b", *teacher, "train.steps=1", "--trust-checkpoint")) == 0


def test_malicious_training_checkpoint_is_not_run(tmp_path, tiny_data, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"format": "fastkd-checkpoint/1", "x": _Evil(marker)}, bad)
    rc = main(_args(tmp_path, tiny_data, "r", "--resume", str(bad)))
    _one_line_error(capsys, rc, "weights_only")
    assert not marker.exists()
    with open(bad, "rb") as f:  # the file really is malicious
        torch.load(io.BytesIO(f.read()), weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory, tiny_data):
    """A one-process DeepSpeed (ZeRO-1) student stopped at step 2 of 4: its run folder, a pristine copy."""
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("ds")
    args = _args(tmp, tiny_data, "ds", "distributed.student=deepspeed", "distributed.zero_stage=1",
                 "train.ckpt_every=2", "train.keep_ckpts=5")
    r = run_cli(args, cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, args


def _ds_copy(deepspeed_run, tmp_path):
    import shutil

    src, args = deepspeed_run
    shutil.copytree(src / "runs", tmp_path / "runs")
    shutil.copy(src / "recipe.yaml", tmp_path / "recipe.yaml")
    args = [a.replace(str(src), str(tmp_path)) for a in args]
    return tmp_path / "runs" / "ds", [*args, "train.steps=4", "--resume"]


def test_malicious_deepspeed_file_is_refused(deepspeed_run, tmp_path):
    run, args = _ds_copy(deepspeed_run, tmp_path)
    marker = tmp_path / "pwned"
    states = run / "deepspeed" / "step_00000002" / "mp_rank_00_model_states.pt"
    legit = torch.load(states, weights_only=True)
    torch.save({**legit, "x": _Evil(marker)}, states)
    r = run_cli(args, cwd=REPO, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "--trust-checkpoint" in line and str(states) in line and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not marker.exists()
    # the file really runs code when trusted
    run_cli([*args, "--trust-checkpoint"], cwd=REPO, timeout=240)
    assert marker.exists()


def test_deepspeed_tag_is_confined_to_the_run_folder(deepspeed_run, tmp_path):
    """A tag that leaves the run folder, end to end; then every kind of bad tag at the check itself."""
    import shutil

    from fastkd.distributed import deepspeed as ds

    run, args = _ds_copy(deepspeed_run, tmp_path)
    last = ckpt.last_path(run)
    state = ckpt.load(last)
    outside = tmp_path / "elsewhere" / "step_00000002"
    outside.parent.mkdir()
    shutil.copytree(run / "deepspeed" / "step_00000002", outside)
    escape = "../../elsewhere/step_00000002"
    last.unlink()
    torch.save({**state, "deepspeed_tag": escape}, last)
    r = run_cli(args, cwd=REPO, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "deepspeed_tag=" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr, r.stderr
    for tag in (escape, "/etc", "latest", str(outside), "step_00000009", 2):  # the engine is never reached
        with pytest.raises(ckpt.CheckpointError, match="deepspeed_tag="):
            ds.load_student_checkpoint(None, run, tag)


def test_missing_deepspeed_names_the_extra(monkeypatch):
    from fastkd.distributed import deepspeed as ds

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ImportError, match=r"pip install 'fastkd\[deepspeed\]'"):
        ds._import()


# ---------------------------------------------------------------------------------------------------------------------
# distributed: a rank that stalls or never starts


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = env_for_subprocess()
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    return env


@pytest.mark.distributed
def test_stalled_rank_is_named_after_the_timeout(tmp_path, tiny_data):
    args = [sys.executable, "-m", "fastkd",
            *_args(tmp_path, tiny_data, "r", "train.steps=100000", "distributed.timeout=5", "data.batch_size=2")]
    port = _port()
    procs = [subprocess.Popen(args, cwd=REPO, env=_rank_env(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
        deadline = time.monotonic() + 200
        while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-3000:]
            time.sleep(0.5)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "distributed.timeout=5s" in line and "rank 1 did not answer" in line and "Traceback" not in err, err
    assert waited < 60  # the timeout, the grace for the other ranks, not PyTorch's 30 minutes


def test_rank_that_never_starts(tmp_path, tiny_data, capsys, monkeypatch):
    """Rank 0 of 2 alone gives up after distributed.timeout. In this process: the rendezvous is the only part that
    differs from a one-process run, and a fresh interpreter would spend ~10 s importing."""
    import torch.distributed as dist

    import fastkd.distributed

    monkeypatch.setattr(fastkd.distributed, "_timeout_s", fastkd.distributed._timeout_s)  # restored afterwards
    for key, value in _rank_env(0, 2, _port()).items():
        if key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    rc = main(_args(tmp_path, tiny_data, "r", "distributed.timeout=1"))
    _one_line_error(capsys, rc, "distributed.timeout=1s expired at start-up", "(1 of 2 joined)")
    assert time.monotonic() - t0 < 60 and not dist.is_initialized()


# ---------------------------------------------------------------------------------------------------------------------
# fastkd importance: every failure is one line


def test_importance_bad_weights_are_one_line(tmp_path, capsys):
    """(Bad images under each --corrupt policy: tests/models/test_importance_cli.py.)"""
    data = write_quadrant_folder(tmp_path / "data", n_train=8, n_val=0)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x00" * 64)
    rc = main(["importance", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--num-classes", "4",
               "--model-arg", "img_size=16", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=16",
               "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--model-arg", "mlp_ratio=2.0",
               "--data", str(data / "train"), "--workers", "0", "--batch-size", "4", "--no-plot", "--quiet",
               "--out", str(tmp_path / "out")])
    _one_line_error(capsys, rc, str(weights))
