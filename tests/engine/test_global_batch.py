"""train.global_batch: a paper's images per optimizer step, whatever the number of processes."""

from __future__ import annotations

import pytest
import torch

from fastkd.config import ConfigError
from fastkd.config import load_config
from fastkd.engine import builders
from fastkd.engine.trainer import Trainer
from fastkd.methods.supervised import Supervised
from tests.engine.helpers import MemoryLoader
from tests.engine.helpers import tiny_vit


@pytest.mark.parametrize("global_batch, micro, world, accum", [(512, 16, 32, 1), (512, 16, 8, 4), (512, 16, 1, 32),
                                                               (96, 4, 3, 8), (7, 7, 1, 1)])
def test_accumulation_gives_the_global_batch(global_batch, micro, world, accum):
    got = builders.accum_for_global_batch(global_batch, micro, world)
    assert got == accum and got * micro * world == global_batch


@pytest.mark.parametrize("global_batch, micro, world", [(512, 16, 3), (512, 24, 1), (100, 8, 1)])
def test_a_global_batch_the_processes_cannot_make_is_refused(global_batch, micro, world):
    with pytest.raises(ConfigError, match=rf"train.global_batch={global_batch}: expected a multiple of batch size x "
                                          rf"processes = {micro} x {world} = {micro * world}"):
        builders.accum_for_global_batch(global_batch, micro, world)


def test_global_batch_must_be_positive():
    with pytest.raises(ConfigError, match=r"train.global_batch=0: expected an integer >= 1"):
        load_config(None, ["train.global_batch=0"])


def _trainer(tmp_path, *extra):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=gb", "run.device=cpu", "train.epochs=1",
                             "train.progress=false", "train.eval=false", "method.name=supervised", *extra])
    torch.manual_seed(0)
    return Trainer(cfg, method=Supervised(tiny_vit()), train_loader=MemoryLoader(n=48, batch_size=4),
                   console=False)


def test_trainer_derives_the_accumulation_and_steps(tmp_path):
    tr = _trainer(tmp_path, "train.global_batch=16", "data.batch_size=4")
    # one process of 4 images: 4 micro-batches per step, 48 / 16 = 3 optimizer steps per epoch
    assert tr.cfg.train.accum_steps == 4 and tr.placement.accum_steps == 4
    assert tr.global_batch == 16 and tr.steps_per_epoch == 3
    tr.train()
    assert tr.step == 3


def test_trainer_refuses_a_global_batch_it_cannot_make(tmp_path):
    with pytest.raises(ConfigError, match=r"train.global_batch=10: expected a multiple of batch size x processes = "
                                          r"4 x 1 = 4"):
        _trainer(tmp_path, "train.global_batch=10", "data.batch_size=4")


def test_scalekd_deit_b_recipe_asks_for_the_official_global_batch():
    cfg = load_config("scalekd_swin_l_deit_b", [])
    assert cfg.train.global_batch == 512
    per_gpu = cfg.train.batch_size or cfg.data.batch_size
    assert builders.accum_for_global_batch(cfg.train.global_batch, per_gpu, 32) == 1  # the official 16 x 32 GPUs
    assert builders.accum_for_global_batch(cfg.train.global_batch, per_gpu, 8) == 4
