"""Trainer on CPU with in-memory data and tiny ViTs: resume exactness, non-finite loss, checkpoints, logging."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from fastkd.config import load_config
from fastkd.engine import checkpoint as ckpt
from fastkd.engine.evaluate import evaluate_topk
from fastkd.engine.trainer import NonFiniteLossError
from fastkd.engine.trainer import Trainer
from fastkd.methods import build
from fastkd.models import Teacher
from tests.engine.helpers import MemoryLoader
from tests.engine.helpers import tiny_vit
from tests.utils import assert_close_rel
from tests.utils import tol


def _cfg(tmp_path, name, *extra):
    return load_config(None, [
        f"run.output_dir={tmp_path}", f"run.name={name}", "run.device=cpu",
        "train.epochs=2", "train.accum_steps=2", "train.clip_grad=1.0", "train.ema=true", "train.ema_decay=0.9",
        "train.log_every=1", "train.progress=false", "train.drop_path=0.1",
        "optim.lr=3e-3", "schedule.warmup_steps=2", "schedule.min_lr=1e-4", "method.name=hinton", *extra,
    ])


def _trainer(cfg, seed=0):
    torch.manual_seed(0)  # the teacher is fixed (in real runs it comes from a weights file)
    teacher = Teacher(tiny_vit(), input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225))
    torch.manual_seed(seed)  # the student's initial weights are overwritten when resuming
    student = tiny_vit(drop_path_rate=0.1)
    method = build("hinton", student=student, teachers=[teacher], temperature=2.0)
    return Trainer(cfg, method=method, train_loader=MemoryLoader(n=40, batch_size=4),
                   val_loader=MemoryLoader(n=16, batch_size=8, shuffle=False), console=False)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted reference run both resume tests compare with (the same configuration in each): trained once.
    """
    full = _trainer(_cfg(tmp_path_factory.mktemp("full"), "full"))
    full.train()
    return full


def test_stop_and_resume_is_exact(tmp_path, full_run):
    # 40 samples / 4 per batch = 10 micro-batches = 5 steps per epoch; 2 epochs = 10 steps
    full = full_run
    assert full.step == 10 and full.epoch == 2
    ref = _params(full)
    ref_ema = {k: v.clone() for k, v in full.method.ema.module.state_dict().items()}

    # interrupted mid-epoch (step 3 of epoch 0), then resumed in a fresh trainer built from a different seed
    part = _trainer(_cfg(tmp_path, "split"))
    part.train(stop_at=3)
    assert ckpt.latest(tmp_path / "split").name == "last.pt"
    resumed = _trainer(_cfg(tmp_path, "split", "run.resume=auto"), seed=123)
    assert resumed.step == 3 and resumed.step_in_epoch == 3
    resumed.train()
    got = _params(resumed)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    for k, v in resumed.method.ema.module.state_dict().items():
        torch.testing.assert_close(v, ref_ema[k], rtol=0, atol=0, msg=f"ema {k}")
    assert resumed.lr() == full.lr()


def test_resume_at_epoch_boundary_is_exact(tmp_path, full_run):
    full = full_run
    part = _trainer(_cfg(tmp_path, "split"))
    part.train(stop_at=5)  # exactly the end of epoch 0
    resumed = _trainer(_cfg(tmp_path, "split", f"run.resume={tmp_path / 'split' / 'ckpt' / 'last.pt'}"), seed=7)
    assert resumed.step == 5 and resumed.step_in_epoch == 5  # the epoch's end (eval, rollover) is still to come
    resumed.train()
    for k, v in _params(full).items():
        torch.testing.assert_close(_params(resumed)[k], v, rtol=0, atol=0, msg=k)


def test_checkpoint_contents_and_logs(tmp_path):
    tr = _trainer(_cfg(tmp_path, "r", "train.ckpt_every=2", "train.keep_ckpts=1"))
    summary = tr.train()
    run = tmp_path / "r"
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    for key in ("method", "optimizer", "scheduler", "ema", "loader", "rng", "config", "step", "epoch"):
        assert key in state, key
    assert not any(k.startswith("_teachers") or "teacher" in k for k in state["method"])  # teachers stay out
    assert state["config"]["train"]["accum_steps"] == 2
    assert len(list((run / "ckpt").glob("step_*.pt"))) == 1  # pruned to keep_ckpts
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 10
    for key in ("loss", "ce", "kd", "lr", "img_per_s", "data_wait_frac", "peak_mem_mb", "step_time_s"):
        assert key in train[-1], key
    assert 0.0 <= train[-1]["data_wait_frac"] <= 1.0
    # warmup then cosine: lr rises for 2 steps, then falls to min_lr
    lrs = [r["lr"] for r in train]
    assert lrs[1] > lrs[0] and lrs[-1] < lrs[2]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2 and "top1" in evals[-1] and "ema_top1" in evals[-1]
    # the method evaluates its EMA student (not the trained one) when asked, and the log holds that accuracy
    method = tr.method.eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(method.predict(images, ema=True), method.ema.module(images), rtol=0, atol=0)
        assert not torch.equal(method.predict(images, ema=True), method.predict(images))
    ema = evaluate_topk(functools.partial(method.predict, ema=True), tr.val_loader)
    assert evals[-1]["ema_top1"] == ema["top1"] and evals[-1]["ema_top5"] == ema["top5"]
    assert summary["steps"] == 10 and "top1" in summary
    assert (run / "summary.json").is_file()


def test_training_learns_the_tiny_task(tmp_path):
    cfg = _cfg(tmp_path, "learn", "train.epochs=6", "optim.lr=1e-2", "method.name=supervised", "train.ema=false",
               "train.accum_steps=1", "train.drop_path=0.0")
    torch.manual_seed(0)
    from fastkd.methods.supervised import Supervised

    tr = Trainer(cfg, method=Supervised(tiny_vit()), train_loader=MemoryLoader(n=64, batch_size=8),
                 val_loader=MemoryLoader(n=64, batch_size=8, shuffle=False), console=False)  # the training images
    tr.train()
    assert tr.history[-1]["loss"] < 0.7 * tr.history[0]["loss"]
    assert tr.last_eval["top1"] >= 60.0


def test_nonfinite_loss_saves_then_stops_naming_the_part(tmp_path):
    tr = _trainer(_cfg(tmp_path, "nan"))
    original = tr.method.forward
    calls = {"n": 0}

    def forward(batch):
        out = original(batch)
        calls["n"] += 1
        if calls["n"] > 4:  # third optimizer step (2 micro-batches each)
            out["kd"] = out["kd"] * float("nan")
            out["loss"] = out["ce"] + out["kd"]
        return out

    tr.method.forward = forward
    before = None
    with pytest.raises(NonFiniteLossError) as info:
        tr.train()
    err = info.value
    assert "'kd'" in str(err) and "step 3" in str(err)
    assert err.parts == ["kd"] and err.step == 3
    saved = torch.load(err.checkpoint, weights_only=True)
    assert saved["step"] == 2
    for k, v in saved["method"].items():
        assert torch.isfinite(v).all(), k
    del before


def test_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 4 == 1 batch of 8 (no drop-path, plain SGD, no clipping)."""
    base = ["train.epochs=1", "train.ema=false", "train.clip_grad=null", "train.drop_path=0.0",
            "optim.name=momentum", "optim.momentum=0.0", "optim.weight_decay=0.0", "schedule.name=constant",
            "schedule.warmup_steps=0", "method.name=supervised", "train.eval=false"]
    from fastkd.methods.supervised import Supervised

    outs = []
    for name, accum, bs in (("a", 2, 4), ("b", 1, 8)):
        torch.manual_seed(0)
        cfg = _cfg(tmp_path, name, *base, f"train.accum_steps={accum}")
        tr = Trainer(cfg, method=Supervised(tiny_vit()), train_loader=MemoryLoader(n=16, batch_size=bs, shuffle=False),
                     console=False)
        tr.train()
        outs.append(_params(tr))
    for k in outs[0]:
        assert_close_rel(outs[0][k], outs[1][k], 2 * tol(torch.float32, 8 * 5), k)  # 2 fp32 sums of 8x5 token terms
