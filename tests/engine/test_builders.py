"""Optimizer parameter groups and LR schedules built from a config, against rules and formulas written here from
the official recipes (DeiT's timm scheduler stepped per epoch, MAE/DINO's cosine after warmup, mmcls' multi-step
SGD) and timm's weight-decay convention."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import fastkd.methods as M
from fastkd.config import ConfigError
from fastkd.config import load_config
from fastkd.engine import builders


def tiny_vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=10, **kw)


def _cfg(*extra):
    return load_config(None, ["run.device=cpu", "optim.weight_decay=0.05", *extra])


def _decay_of(opt: torch.optim.Optimizer, method: nn.Module) -> dict[str, float]:
    ids = {id(p): n for n, p in method.named_parameters()}
    return {ids[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def _expected_exempt(name: str, p: torch.Tensor) -> bool:
    """timm's rule, written out: 1-d parameters and biases, and the position embeddings / tokens by name."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim <= 1 or leaf in ("bias", "pos_embed", "cls_token", "dist_token")


def _methods():
    teacher = tiny_vit()
    yield "hinton", M.build("hinton", student=tiny_vit(), teachers=[teacher])
    yield "deit", M.build("deit", student=timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
        num_classes=10), teachers=[teacher])
    yield "coadvise", M.build("coadvise", student=tiny_vit(), teachers=[teacher, tiny_vit()], stem_channels=32)


@pytest.mark.parametrize("name,method", list(_methods()), ids=lambda v: v if isinstance(v, str) else "")
def test_no_weight_decay_on_pos_embed_tokens_and_1d(name, method):
    opt = builders.build_optimizer(_cfg(), method, lr=1e-3)
    decay = _decay_of(opt, method)
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert set(decay) == set(trainable)
    for n, p in trainable.items():
        assert decay[n] == (0.0 if _expected_exempt(n, p) else 0.05), n
    assert decay["student.pos_embed"] == 0.0 and decay["student.cls_token"] == 0.0
    if name == "deit":
        assert decay["student.dist_token"] == 0.0


def test_projector_position_embeddings_not_decayed_and_decay_all():
    """ScaleKD's CAP position embeddings are exempt (the official DeiT-B config's ``.pos_embed`` key);
    ``optim.decay_all`` decays every parameter (mmcls SGD without paramwise_cfg: the ResNet recipe)."""
    teacher = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2, embed_dim=16,
                                depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=10)
    student = timm.create_model("resnet18", num_classes=10)
    method = M.build("scalekd", student=student, teachers=[teacher], cap_heads=(2, 2))
    decay = _decay_of(builders.build_optimizer(_cfg(), method, lr=1e-3), method)
    caps = [n for n in decay if n.endswith("pos_embed")]
    assert len(caps) == 4 and all(decay[n] == 0.0 for n in caps)
    assert decay["cap_s3_spat.query.weight"] == 0.05
    opt = builders.build_optimizer(_cfg("optim.name=sgd", "optim.decay_all=true", "optim.weight_decay=1e-4"),
                                   method, lr=0.1)
    decay = _decay_of(opt, method)
    assert len(decay) == sum(1 for p in method.parameters() if p.requires_grad)
    assert set(decay.values()) == {1e-4}
    with pytest.raises(ConfigError, match="layer_decay"):
        builders.build_optimizer(_cfg("optim.decay_all=true", "optim.layer_decay=0.75"), method, lr=0.1)


# ------------------------------------------------------------------------------------------------------ schedules


def _lrs(cfg, total_steps, steps_per_epoch, base=1.0):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = builders.build_scheduler(cfg, opt, total_steps, steps_per_epoch)
    out = []
    for step in range(total_steps):  # the LR used by optimizer step `step` (the trainer updates after each step)
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step_update(num_updates=step + 1)
    return out


def test_cosine_after_warmup_matches_mae_lr_sched():
    """MAE ``util/lr_sched.py`` / DINO ``cosine_scheduler`` per iteration: linear warmup from 0, then a half cosine
    over the remaining iterations to min_lr."""
    spe, epochs, warm, base, lo = 7, 5, 2, 2.0, 0.1
    cfg = _cfg("schedule.name=cosine", f"schedule.warmup_epochs={warm}", "schedule.warmup_lr=0.0",
               f"schedule.min_lr={lo}", "schedule.warmup_prefix=true")
    got = _lrs(cfg, epochs * spe, spe, base)
    W, T = warm * spe, epochs * spe
    for it, lr in enumerate(got):
        if it < W:
            ref = base * it / W
        else:
            ref = lo + (base - lo) * 0.5 * (1.0 + math.cos(math.pi * (it - W) / (T - W)))
        assert lr == pytest.approx(ref, rel=1e-12, abs=1e-12), it


def test_per_epoch_cosine_matches_deit():
    """DeiT: timm's cosine in epoch units, ``lr_scheduler.step(epoch)`` once per epoch: the LR is constant inside an
    epoch; warmup from warmup_lr over warmup epochs, then cosine over all epochs (timm ``warmup_prefix=False``)."""
    spe, epochs, warm, base, lo, w0 = 4, 9, 3, 1.0, 1e-2, 1e-3
    cfg = _cfg("schedule.name=cosine", f"schedule.warmup_epochs={warm}", f"schedule.warmup_lr={w0}",
               f"schedule.min_lr={lo}", "schedule.per_epoch=true")
    got = _lrs(cfg, epochs * spe, spe, base)
    for it, lr in enumerate(got):
        e = it // spe
        ref = w0 + e * (base - w0) / warm if e < warm else lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * e / epochs))
        assert lr == pytest.approx(ref, rel=1e-12), it


@pytest.mark.parametrize("per_epoch", [True, False])
def test_multistep_matches_torch_multisteplr(per_epoch):
    """mmcls ``MultiStepLR`` (PyTorch semantics): LR × 0.1 from epoch 30, 60 and 90 on (epoch 29 is undecayed)."""
    spe, epochs = 3, 100
    cfg = _cfg("schedule.name=multistep", "schedule.warmup_epochs=0", f"schedule.per_epoch={str(per_epoch).lower()}")
    got = _lrs(cfg, epochs * spe, spe, 0.1)
    for it, lr in enumerate(got):
        e = it // spe
        ref = 0.1 * 0.1 ** sum(e >= m for m in (30, 60, 90))
        assert lr == pytest.approx(ref, rel=1e-12), it
    p = nn.Parameter(torch.zeros(1))
    with pytest.raises(ConfigError, match="decay_rate"):
        builders.build_scheduler(_cfg("schedule.name=multistep", "schedule.decay_rate=0"),
                                 torch.optim.SGD([p], lr=0.1), 10, 2)


def test_epoch_scheduler_state_round_trip():
    cfg = _cfg("schedule.per_epoch=true", "schedule.warmup_epochs=1")
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = builders.build_scheduler(cfg, opt, 20, 4)
    sched.step_update(num_updates=9)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    other = builders.build_scheduler(cfg, opt2, 20, 4)
    other.load_state_dict(sched.state_dict())
    other.step_update(num_updates=9)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 1.0


@pytest.mark.parametrize("method,params,expected", [
    ("ssta", [], True),  # importance="auto" by default: scored on clean images
    ("ssta", ["method.params.teacher_head=0", "method.params.ta_head=1"], False),
    ("hinton", [], False),
])
def test_training_loader_keeps_clean_images_for_the_method(monkeypatch, method, params, expected):
    import fastkd.data

    class Stub:
        keep_clean_images = False

    monkeypatch.setattr(fastkd.data, "build_loader", lambda *a, **k: Stub())
    cfg = _cfg(f"method.name={method}", *params)
    train, _, _ = builders.build_loaders(cfg, cfg.data, 0, 1)
    assert train.keep_clean_images is expected
