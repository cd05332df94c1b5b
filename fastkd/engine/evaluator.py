"""Evaluate a checkpoint: the model pieces of a run without the optimizer (``fastkd eval``)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from fastkd.config import Config
from fastkd.config import ConfigError
from fastkd.distributed import setup as setup_distributed
from fastkd.engine import builders
from fastkd.engine.evaluate import evaluate_knn
from fastkd.engine.evaluate import evaluate_topk


class Evaluator:
    """Builds the validation loader (and the k-NN bank for self-supervised methods), the student, the teachers
    (methods take them at construction; they are not run) and the method; loads a checkpoint's weights."""

    def __init__(self, cfg: Config, *, local_rank: int | None = None, method=None, val_loader=None,
                 bank_loader=None):
        self.cfg = cfg
        self.info = setup_distributed(device=cfg.run.device, backend=cfg.distributed.backend, local_rank=local_rank)
        self.device = self.info.device
        amp = cfg.train.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "fp32"
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        data_cfg = builders.data_config(cfg, self.device)
        cls = builders.method_class(cfg.method.name) if method is None else type(method)
        self.self_supervised = bool(getattr(cls, "self_supervised", False))
        if val_loader is None:
            from fastkd.data import build_loader

            val_loader = build_loader(data_cfg, "val", self.info.rank, self.info.world_size)
            if self.self_supervised:
                bank_loader = builders._knn_bank_loader(build_loader, data_cfg, self.info.rank, self.info.world_size)
        self.val_loader, self.bank_loader = val_loader, bank_loader
        self.num_classes = getattr(val_loader, "num_classes", None) or getattr(data_cfg, "num_classes", None)
        if method is None:
            student = builders.build_student(cfg, self.num_classes)
            teachers = builders.build_teachers(cfg, self.num_classes, data_cfg)
            method = builders.build_method(cfg, student, teachers)
        self.method = method.to(self.device)

    def load_weights(self, state: dict[str, Any], *, ema: bool = False) -> None:
        if "method" not in state:
            raise ValueError("the checkpoint has no 'method' entry; is it a fastkd training checkpoint?")
        missing, unexpected = self.method.load_state_dict(state["method"], strict=False)
        if missing or unexpected:
            raise ValueError(f"--checkpoint does not fit method {self.cfg.method.name}: missing {list(missing)[:8]}, "
                             f"unexpected {list(unexpected)[:8]}")
        if ema:
            if state.get("ema") is None:
                raise ValueError("--ema: the checkpoint holds no EMA weights (the run had train.ema=false)")
            self.method.student.load_state_dict(state["ema"])

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.method.eval()
        if self.self_supervised:
            if self.bank_loader is None:
                raise ConfigError("k-NN evaluation needs the training split as the feature bank (data.root)")
            return evaluate_knn(self.method.features, self.bank_loader, self.val_loader,
                                num_classes=int(self.num_classes), autocast=self.autocast())
        return evaluate_topk(self.method.predict, self.val_loader, autocast=self.autocast(), device=self.device)


__all__ = ["Evaluator"]
