"""The training loop: one optimizer step = ``train.accum_steps`` micro-batches through ``method(batch)``.

Per step: bf16 autocast on CUDA (fp32 on CPU unless ``train.amp`` says otherwise), the method's forward
(``torch.compile``-d with ``train.compile``: student, teachers with their taps and the loss), backward, gradient
clipping, optimizer step (torch, DDP, or a DeepSpeed engine: :mod:`fastkd.engine.placement`), per-step LR
schedule (timm), the method's EMA of the student (``method.update_ema``), ``method.on_step_end``. The method
owns what is trained (its parameters), evaluated (``predict`` / ``features``) and checkpointed
(``checkpoint_state``); the trainer owns the loop, the optimizer, the schedule and the run folder.

No host synchronisation in a steady-state step: the loss parts, the gradient norm and a non-finite flag stay on
the device. A step whose loss or gradient norm is NaN/Inf is skipped on the device (the fused optimizer's
``found_inf``, as AMP does); the record is read on logging steps (every step where the placement cannot skip on
the device), which then save a checkpoint (no non-finite update was applied) and stop with a
:class:`NonFiniteLossError` naming the loss part and the step. With ``train.amp=fp16`` non-finite *gradients*
are the loss scaler's business (an overflow of the scaled fp16 backward): the step is skipped on the device, the
scale halved, and training goes on; logging steps report those skipped steps and the scale. A non-finite loss
still stops the run, as DeiT's loop does (AttnDistill's drops that batch and goes on).

Logging: a tqdm bar with loss and img/s; JSONL records every ``train.log_every`` steps (loss parts, lr, img/s,
step time, data-wait fraction, peak memory); TensorBoard when installed; a summary table at the end.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastkd.config import Config
from fastkd.config import ConfigError
from fastkd.distributed import DistInfo
from fastkd.distributed import all_gather_object
from fastkd.distributed import all_reduce_max
from fastkd.distributed import all_reduce_sum
from fastkd.distributed import barrier
from fastkd.distributed import setup as setup_distributed
from fastkd.engine import builders
from fastkd.engine import checkpoint as ckpt
from fastkd.engine.evaluate import evaluate_method
from fastkd.engine.logging import MetricLogger
from fastkd.engine.logging import corrupt_totals
from fastkd.engine.logging import format_table
from fastkd.engine.logging import peak_memory_mb
from fastkd.engine.logging import progress_bar
from fastkd.engine.placement import place_student
from fastkd.methods import Method
from fastkd.methods._kd import freeze_teachers

log = logging.getLogger("fastkd.engine")


class NonFiniteLossError(RuntimeError):
    """The loss (or one of its parts) became NaN/Inf; a checkpoint was saved before stopping."""

    def __init__(self, message: str, *, step: int, parts: list[str], checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.parts = parts
        self.checkpoint = checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _batch_size(batch: dict[str, Any]) -> int:
    images = batch["images"]
    if isinstance(images, (list, tuple)):
        images = images[0]
    return int(images.shape[0])


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True) if v.device != device else v
        if isinstance(v, (list, tuple)):
            return type(v)(move(x) for x in v)
        return v

    return {k: move(v) for k, v in batch.items()}


class Trainer:
    """Builds a run from a :class:`~fastkd.config.Config` and trains it.

    The pieces can be injected (tests, benchmarks, the demo): ``method`` (a :class:`fastkd.methods.Method` with
    its teachers), ``train_loader``, ``val_loader``, ``bank_loader`` (k-NN feature bank). Missing ones are built
    from the config with ``fastkd.data`` / ``fastkd.models`` / ``fastkd.methods``.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        local_rank: int | None = None,
        info: DistInfo | None = None,
        method: Method | None = None,
        train_loader=None,
        val_loader=None,
        bank_loader=None,
        console: bool = True,
    ):
        self.cfg = cfg
        t = cfg.train
        d = cfg.distributed
        needs_ds = d.student == "deepspeed" or d.teacher_placement == "zero3"
        self.info = info or setup_distributed(device=cfg.run.device, backend=d.backend, local_rank=local_rank,
                                              use_deepspeed=needs_ds, timeout=d.timeout)
        self.device = self.info.device
        self.is_main = self.info.is_main
        self.console = console and self.is_main
        seed_everything(cfg.run.seed + self.info.rank)
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        ckpt.prepare_run_dir(self.run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite, main=self.is_main)
        if self.is_main:
            cfg.dump(self.run_dir / "config.yaml")

        # ---- precision
        self.amp_dtype = builders.amp_dtype(cfg, self.device)
        self.amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.amp_dtype]

        # ---- data
        self.data_cfg = builders.data_config(cfg, self.device)
        method_cls = type(method) if method is not None else builders.method_class(cfg.method.name)
        if train_loader is None:  # the k-NN bank (training images, validation transforms) only for SSL methods
            train_loader, val_loader, bank_loader = builders.build_loaders(
                cfg, self.data_cfg, self.info.rank, self.info.world_size, need_train_eval=method_cls.self_supervised
            )
        self.train_loader, self.val_loader, self.bank_loader = train_loader, val_loader, bank_loader
        self.num_classes = getattr(train_loader, "num_classes", None) or getattr(self.data_cfg, "num_classes", None)
        micro = getattr(self.data_cfg, "batch_size", None) or _guess_batch(train_loader)  # per process and pass
        if t.global_batch is not None:  # the paper's images per step on any number of processes
            t.accum_steps = builders.accum_for_global_batch(t.global_batch, micro, self.info.world_size)
        micro_batches = len(train_loader)
        self.steps_per_epoch = micro_batches // t.accum_steps
        self.total_steps = builders.total_steps_for(cfg, self.steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training loader has {micro_batches} batches per epoch, fewer than train.accum_steps="
                f"{t.accum_steps}"
            )

        # ---- teacher cache (logit distillation without running the teachers: fastkd.cache)
        if cfg.teacher_cache.dir:
            from fastkd import cache

            try:
                cache.replay.check_method(method_cls)
                epochs = cache.replay.epochs_for(self.total_steps, self.steps_per_epoch)
                store = cache.open_for_run(cfg, self.data_cfg, train_loader, epochs_needed=epochs)
            except cache.CacheError as exc:
                raise ConfigError(str(exc)) from exc
            self.train_loader = cache.CachedLoader(train_loader, store, wrap=cfg.teacher_cache.wrap)

        # ---- models and method
        if method is None:
            student = builders.build_student(cfg, self.num_classes)
            if cfg.teacher_cache.dir:
                from fastkd.cache.replay import placeholder_teachers

                teachers = placeholder_teachers(cfg)
            else:  # the run's later randomness (method extras, dropout) must not depend on building the teachers
                with torch.random.fork_rng(devices=[]):
                    # fp16: the teachers keep fp32 weights under autocast (DeiT's and AttnDistill's teachers do)
                    teachers = builders.build_teachers(cfg, self.num_classes, self.data_cfg,
                                                       dtype=self.amp_dtype if self.amp == "bf16" else None)
            method = builders.build_method(cfg, student, teachers)
        self.method = method
        method.to(self.device)
        if t.channels_last:
            method.student.to(memory_format=torch.channels_last)
        self._place_teachers()
        if t.compile:  # in place: parameter names, state_dict and checkpoints stay those of the method
            method.compile()

        # ---- optimizer, schedule
        self.global_batch = micro * t.accum_steps * self.info.world_size
        self.base_lr = builders.scaled_lr(cfg, self.global_batch)
        self.optimizer = builders.build_optimizer(cfg, method, self.base_lr)
        self.scheduler = builders.build_scheduler(cfg, self.optimizer, self.total_steps, self.steps_per_epoch)

        # ---- placement of the student (torch / DDP / DeepSpeed), then its EMA
        self.placement = place_student(cfg, method, self.optimizer, self.info, micro_batch=micro,
                                       bf16=self.amp == "bf16" and self.device.type == "cuda",
                                       scaler=builders.grad_scaler(self.device, self.amp_dtype))
        if t.ema:
            method.setup_ema(t.ema_decay)

        # ---- state
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.step_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.last_eval: dict[str, float] = {}
        self.logger = MetricLogger(self.run_dir, enabled=self.is_main)
        self._mid_epoch_resume = False
        self._train_time = 0.0
        self._train_images = 0
        self._last_parts: dict[str, float] = {}  # the last logged step's loss parts (host floats)
        # on the device, read on logging steps: the window's loss sums, the last step's parts and gradient norm,
        # the first non-finite step (-1: none) with its parts
        self._win_parts: dict[str, torch.Tensor] = {}
        self._step_parts: dict[str, torch.Tensor] = {}
        self._last_grad_norm: torch.Tensor | None = None
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_parts: dict[str, torch.Tensor] = {}
        self._win_skipped = torch.zeros((), dtype=torch.float32, device=self.device)  # fp16: overflow steps skipped

        self._log_setup()

        resume = cfg.run.resume
        if resume:
            found = ckpt.load_latest_good(self.run_dir, warn=self._warn) if resume == "auto" else (Path(resume), None)
            if found is not None:
                self.load_checkpoint(*found)
            elif self.console:
                print(f"run.resume=auto: no checkpoint in {self.run_dir}/ckpt, starting fresh", file=sys.stderr)

    # -----------------------------------------------------------------------------------------------------------------
    # placement

    def _place_teachers(self) -> None:
        placement = self.cfg.distributed.teacher_placement
        teachers = self.method.teachers
        for teacher in teachers:
            teacher.to(self.device)
        freeze_teachers(teachers)
        if placement == "zero3" and teachers:
            from fastkd.distributed import deepspeed as ds

            micro = getattr(self.data_cfg, "batch_size", None) or 1
            for teacher in teachers:
                ds.wrap_teacher_zero3(teacher, micro_batch=micro, world_size=self.info.world_size,
                                        bf16=self.amp == "bf16" and self.device.type == "cuda")

    def _log_setup(self) -> None:
        """One JSONL record describing the placement (what every rank holds), written once at start."""
        from fastkd.distributed.deepspeed import is_partitioned
        from fastkd.distributed.deepspeed import partition_numel

        teachers = []
        for teacher in self.method.teachers:
            local, full = partition_numel(teacher)
            teachers.append({"partitioned": is_partitioned(teacher), "local_numel": local, "numel": full})
        per_rank = all_gather_object(teachers)
        rec = {
            "kind": "setup",
            "world_size": self.info.world_size,
            "backend": self.info.backend,
            "device": str(self.device),
            "amp": self.amp,
            "student": self.placement.kind,
            "zero_stage": self.placement.zero_stage,
            "teacher_placement": self.cfg.distributed.teacher_placement,
            "teachers": [
                {"numel": t["numel"], "partitioned": all(r[i]["partitioned"] for r in per_rank),
                 "local_numel": [r[i]["local_numel"] for r in per_rank]}
                for i, t in enumerate(teachers)
            ],
            "global_batch": self.global_batch,
            "lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "trainable_params": sum(p.numel() for p in self.method.parameters() if p.requires_grad),
        }
        self.logger.log(rec, self.step)

    # -----------------------------------------------------------------------------------------------------------------
    # helpers

    def autocast(self):
        return builders.autocast(self.device, self.amp_dtype)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = _to_device(batch, self.device)
        if self.cfg.train.channels_last:
            im = batch["images"]
            if isinstance(im, torch.Tensor):
                batch["images"] = im.contiguous(memory_format=torch.channels_last)
        return batch

    # -----------------------------------------------------------------------------------------------------------------
    # one optimizer step

    def train_step(self, batches) -> dict[str, Any]:
        """Run ``accum_steps`` micro-batches from the iterator ``batches`` and one optimizer step.

        Nothing is read back to the host here except on logging steps (``train.log_every``): the loss parts are
        summed on the device, a non-finite step is skipped on the device (:mod:`fastkd.engine.placement`) and
        remembered there; :meth:`check_finite` reads it on logging steps (every step for placements that cannot
        skip on the device) and stops before the next update is applied."""
        t = self.cfg.train
        accum = t.accum_steps
        t0 = time.perf_counter()
        data_wait = 0.0
        n_images = 0
        parts: dict[str, torch.Tensor] = {}
        flag = torch.zeros((), dtype=torch.float32, device=self.device)
        self.method.train()
        for micro in range(accum):
            td = time.perf_counter()
            batch = self._prepare(next(batches))
            data_wait += time.perf_counter() - td
            n_images += _batch_size(batch)
            out = self.placement.forward_backward(batch, last=micro == accum - 1, autocast=self.autocast())
            flag = torch.maximum(flag, (~torch.isfinite(out["loss"].detach())).float())
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    parts[k] = parts.get(k, 0.0) + v.detach().float().reshape(()) / accum
        flag = all_reduce_max(flag)  # every rank skips the same steps (a collective on the device, no host read)
        grad_norm = self.placement.grad_norm()  # fp16: of the unscaled gradients
        skip = flag
        if grad_norm is not None:
            skip = torch.maximum(flag, (~torch.isfinite(grad_norm)).float())
        # fp16: non-finite gradients are an overflow of the loss scale, skipped and counted; a bad loss stops the run
        scaled = self.placement.scaler is not None
        self._remember(parts, flag if scaled else skip, grad_norm)
        if scaled:
            self._win_skipped = self._win_skipped + skip
        log_now = (self.step + 1) % t.log_every == 0 or self.step + 1 == self.total_steps
        if log_now or not self.placement.device_skip:
            self.check_finite()
        grad_norm = self.placement.step(skip, grad_norm)
        self._last_grad_norm = grad_norm
        self.step += 1
        self.step_in_epoch += 1
        self.scheduler.step_update(num_updates=self.step)
        self.method.update_ema(self.step)
        self.method.on_step_end(self.step, self.total_steps)
        dt = time.perf_counter() - t0
        return {"images": n_images * self.info.world_size, "time": dt, "data_wait": data_wait, "log": log_now}

    def _remember(self, parts: dict[str, torch.Tensor], flag: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """On the device: the window's sums of the loss parts, the last step's parts, and the first non-finite
        step (its number and parts)."""
        for k, v in parts.items():
            self._win_parts[k] = self._win_parts[k] + v if k in self._win_parts else v
        self._step_parts = parts
        first = (self._bad_step < 0) & (flag > 0)
        self._bad_step = torch.where(first, self.step + 1, self._bad_step)
        bad = dict(parts)
        if grad_norm is not None:
            bad["grad_norm"] = grad_norm.float()
        for k, v in bad.items():
            self._bad_parts[k] = torch.where(first, v, self._bad_parts.get(k, torch.zeros_like(v)))

    def check_finite(self) -> None:
        """Read the device's record of non-finite steps (one host synchronisation); after one: save a checkpoint
        of the last applied state and raise :class:`NonFiniteLossError`."""
        bad_step = int(self._bad_step)
        if bad_step >= 0:
            self._on_nonfinite(bad_step, {k: float(v) for k, v in self._bad_parts.items()})

    def _on_nonfinite(self, bad_step: int, parts: dict[str, float]) -> None:
        bad = [k for k, v in parts.items() if not math.isfinite(v) and k not in ("loss", "grad_norm")]
        if not bad:
            bad = ["loss"] if not math.isfinite(parts.get("loss", 0.0)) else ["grad_norm"]
        self.placement.discard_gradients()
        path = self.save_checkpoint(name=f"nonfinite_step_{bad_step:08d}.pt", link_last=False)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        what = "the gradient norm" if bad == ["grad_norm"] else (
            f"loss part{'s' if len(bad) > 1 else ''} {', '.join(repr(b) for b in bad)}")
        msg = (
            f"non-finite loss at step {bad_step} (epoch {self.epoch}): {what} became NaN/Inf ({shown}). "
            f"That optimizer step was skipped; training stopped after step {self.step} and its state (no "
            f"non-finite update applied) was saved to {path}. "
            "Try a lower optim.lr, train.clip_grad, or train.amp=fp32."
        )
        raise NonFiniteLossError(msg, step=bad_step, parts=bad, checkpoint=str(path) if path else None)

    # -----------------------------------------------------------------------------------------------------------------
    # loop

    def train(self, *, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` / ``train.epochs`` (or, for tests, ``stop_at`` steps: saves a checkpoint and
        returns as if interrupted). Returns the summary."""
        t = self.cfg.train
        bar = progress_bar(self.total_steps, self.step, enabled=t.progress and self.console)
        win = {"n": 0, "images": 0, "time": 0.0, "data_wait": 0.0}
        ckpt_every = t.ckpt_every
        try:
            while self.step < self.total_steps:
                if not self._mid_epoch_resume and hasattr(self.train_loader, "set_epoch"):
                    self.train_loader.set_epoch(self.epoch)
                self._mid_epoch_resume = False
                batches = iter(self.train_loader)
                while self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                    r = self.train_step(batches)
                    self._train_time += r["time"]
                    self._train_images += r["images"]
                    win["n"] += 1
                    win["images"] += r["images"]
                    win["time"] += r["time"]
                    win["data_wait"] += r["data_wait"]
                    bar.update(1)
                    if r["log"]:
                        rec = self._log_window(win)
                        bar.set_postfix_str(f"loss {rec.get('loss', float('nan')):.4f} | {rec['img_per_s']:.0f} img/s")
                        win = {"n": 0, "images": 0, "time": 0.0, "data_wait": 0.0}
                    if stop_at is not None and self.step >= stop_at:
                        self.save_checkpoint()
                        return self.summary()
                    if ckpt_every and self.step % ckpt_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                if self.step_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    done = self.step >= self.total_steps
                    if t.eval and (done or self.epoch % max(t.eval_every, 1) == 0):
                        self.run_eval()
                    if not done:
                        self.save_checkpoint()
            if t.eval and not self.last_eval.get("_step") == self.step:
                self.run_eval()
            self.save_checkpoint()
        finally:
            bar.close()
        summary = self.summary()
        if self.console:
            print(self.summary_table(summary), flush=True)
        return summary

    def _log_window(self, win: dict[str, Any]) -> dict[str, Any]:
        """The JSONL record of a logging step: reads the device's sums of the window (one synchronisation)."""
        n = max(win["n"], 1)
        world = self.info.world_size
        names = sorted(self._win_parts)
        last = sorted(self._step_parts)
        values = [self._win_parts[k] for k in names] + [self._step_parts[k] for k in last]
        scaled = self.placement.scaler is not None
        if scaled:
            values.append(self._win_skipped)
            self._win_skipped = torch.zeros_like(self._win_skipped)
        if self._last_grad_norm is not None:
            values.append(self._last_grad_norm.float().reshape(()))
        packed = all_reduce_sum(torch.stack(values).to(torch.float64)).tolist() if values else []
        rec: dict[str, Any] = {"kind": "train", "epoch": self.epoch}
        rec.update({k: packed[i] / world / n for i, k in enumerate(names)})
        self._last_parts = {k: packed[len(names) + i] / world for i, k in enumerate(last)}
        self._win_parts = {}
        rec["lr"] = self.lr()
        rec["img_per_s"] = win["images"] / max(win["time"], 1e-9)
        rec["step_time_s"] = win["time"] / n
        rec["data_wait_frac"] = win["data_wait"] / max(win["time"], 1e-9)
        peak = torch.tensor(peak_memory_mb(self.device), dtype=torch.float64, device=self.device)
        rec["peak_mem_mb"] = float(all_reduce_max(peak))
        if self._last_grad_norm is not None:
            rec["grad_norm"] = packed[-1] / world  # identical on every rank (the gradients are all-reduced)
        if scaled:  # fp16: steps of the window skipped for non-finite gradients, and the loss scale now
            rec["skipped_steps"] = round(packed[len(names) + len(last)] / world)
            rec["loss_scale"] = self.placement.loss_scale()
        self.history.append({"step": self.step, **rec})
        self.logger.log(rec, self.step)
        return rec

    # -----------------------------------------------------------------------------------------------------------------
    # evaluation

    def run_eval(self) -> dict[str, float]:
        """top-1/top-5 with ``method.predict`` (also for the EMA student), or k-NN for self-supervised methods;
        skipped (empty) without a validation split, or without the k-NN bank."""
        res: dict[str, float] = {}
        if self.val_loader is not None and (self.bank_loader is not None or not self.method.self_supervised):
            res = evaluate_method(self.method, self.val_loader, self.bank_loader, num_classes=self.num_classes,
                                  autocast=self.autocast(), device=self.device)
        if res:
            res.pop("n", None)
            self.logger.log({"kind": "eval", "epoch": self.epoch, **res}, self.step)
            if self.console:
                shown = ", ".join(f"{k} {v:.2f}" for k, v in res.items())
                print(f"eval @ step {self.step} (epoch {self.epoch}): {shown}", file=sys.stderr, flush=True)
        self.last_eval = {**res, "_step": self.step}
        return res

    # -----------------------------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": "fastkd-checkpoint/1",
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.info.world_size,
            **self.method.checkpoint_state(),  # "method", "ema"
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None,
            "config": self.cfg.to_dict(),
            "metrics": {k: v for k, v in self.last_eval.items() if not k.startswith("_")},
            "train_time": self._train_time,
            "train_images": self._train_images,
        }
        return state

    def save_checkpoint(self, name: str | None = None, *, link_last: bool = True) -> Path | None:
        """Write the run state (collective: every rank calls it). Returns the path on rank 0."""
        rng = all_gather_object(ckpt.rng_state())
        state = self.state_dict()
        state["rng"] = rng
        self.placement.save(state, self.run_dir, self.step)  # "optimizer" (a DeepSpeed engine: its own files)
        path = None
        if self.is_main:
            path = self.run_dir / "ckpt" / name if name else ckpt.step_path(self.run_dir, self.step)
            ckpt.atomic_save(state, path)
            if link_last:
                last = ckpt.last_path(self.run_dir)
                tmp = last.with_name(".last.pt.link")
                tmp.unlink(missing_ok=True)
                try:
                    os.link(path, tmp)
                except OSError:
                    ckpt.atomic_save(state, tmp)
                os.replace(tmp, last)
                ckpt.prune(self.run_dir, self.cfg.train.keep_ckpts)
        barrier()
        return path

    def _warn(self, message: str) -> None:
        if self.console:
            print(message, file=sys.stderr, flush=True)

    def load_checkpoint(self, path: str | os.PathLike, state: dict[str, Any] | None = None) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (``state``: the file's content, when already loaded);
        training continues exactly where it stopped."""
        path = Path(path)
        if state is None:
            state = ckpt.load(path, map_location="cpu")
        if not isinstance(state, dict) or state.get("format") != "fastkd-checkpoint/1":
            raise ckpt.CheckpointError(f"run.resume={path}: not a fastkd training checkpoint (no format tag)")
        changes = ckpt.config_changes(state.get("config"), self.cfg.to_dict())
        if changes:
            raise ckpt.CheckpointError(
                f"run.resume={path}: the checkpoint comes from a different run configuration ({'; '.join(changes)});"
                " resume with the same recipe and overrides, or start a new run.name"
            )
        try:
            self.method.load_checkpoint_state(state)
            self.placement.load(state, path)
            if state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
                self.train_loader.load_state_dict(state["loader"])
        except (ckpt.CheckpointError, ValueError) as exc:
            if str(exc).startswith("run.resume="):
                raise
            raise ckpt.CheckpointError(f"run.resume={path}: {exc}") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state.get("rng") or []
        if self.info.rank < len(rng):
            ckpt.set_rng_state(rng[self.info.rank])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._mid_epoch_resume = self.step_in_epoch > 0
        self._train_time = float(state.get("train_time", 0.0))
        self._train_images = int(state.get("train_images", 0))
        self.scheduler.step_update(num_updates=self.step)
        if self.console:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch})", file=sys.stderr, flush=True)

    # -----------------------------------------------------------------------------------------------------------------
    # summary

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run": self.cfg.run.name,
            "method": self.cfg.method.name,
            "steps": self.step,
            "epochs": round(self.step / max(self.steps_per_epoch, 1), 3),
            "loss": self._last_parts.get("loss", float("nan")),
            "img_per_s": self._train_images / max(self._train_time, 1e-9),
            "train_time_s": self._train_time,
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        out.update({k: v for k, v in self.last_eval.items() if not k.startswith("_")})
        corrupt = corrupt_totals({"train": self.train_loader, "val": self.val_loader})
        if corrupt:
            out.update({f"corrupt_{split}": n for split, n in corrupt.items()})
            self.logger.log({"kind": "corrupt", **corrupt}, self.step)
        if self.is_main:
            import json

            (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2, default=str))
        return out

    def summary_table(self, summary: dict[str, Any]) -> str:
        rows = [{"metric": k, "value": v} for k, v in summary.items()]
        return f"\nrun {self.run_dir}\n" + format_table(rows, ["metric", "value"])

    def close(self) -> None:
        self.logger.close()


def _guess_batch(loader) -> int:
    bs = getattr(loader, "batch_size", None)
    if isinstance(bs, int) and bs > 0:
        return bs
    return 1


__all__ = ["NonFiniteLossError", "Trainer", "seed_everything"]
