"""Where the student trains: one small interface over a torch optimizer (one process or DDP) and a DeepSpeed
engine, so the trainer never branches on the two.

Per optimizer step the trainer calls :meth:`forward_backward` once per micro-batch (``last=True`` on the final
one) and then :meth:`step`; checkpoints go through :meth:`save` / :meth:`load`.

Non-finite steps: ``step(found_inf, grad_norm)`` gets a device flag (1 when a loss of this step or the gradient
norm was NaN/Inf). A placement with ``device_skip = True`` skips the update on the device (torch's fused
AdamW/Adam/SGD take ``found_inf`` as AMP's GradScaler hands it to them): no host read. Other placements
(DeepSpeed, optimizers without a fused kernel) need the trainer to read the flag before calling :meth:`step`.

fp16 (``train.amp=fp16``): :class:`TorchStudent` holds torch's ``GradScaler``. The backward runs on the scaled loss;
:meth:`grad_norm` unscales the gradients first (so clipping and the norm see true gradients; non-finite ones make the
norm non-finite, hence ``found_inf``); :meth:`step` hands ``found_inf`` to the fused optimizer as the scaler itself
would, then updates the scale on the device (halved after a skipped step, doubled after ``growth_interval`` good
ones). Without a fused kernel ``GradScaler.step`` skips the step (one host read, as in timm's ``NativeScaler``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from fastkd.config import ConfigError
from fastkd.distributed import DistInfo
from fastkd.distributed import wrap_student_ddp
from fastkd.models.build import CheckpointError


class TorchStudent:
    """fastkd's own optimizer step; the method is wrapped in DDP when several processes run."""

    zero_stage = None

    def __init__(self, method, optimizer: torch.optim.Optimizer, info: DistInfo, *, accum_steps: int,
                 clip_grad: float | None, find_unused_parameters: bool = False,
                 scaler: torch.amp.GradScaler | None = None):
        self.method, self.optimizer, self.scaler = method, optimizer, scaler
        self._unscaled = False  # grad_norm() unscaled this step's gradients (the scaler then has found_inf)
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        self.model = wrap_student_ddp(method, info, find_unused_parameters=find_unused_parameters)
        self.kind = "ddp" if info.distributed else "single"
        # the fused kernels skip the whole update (parameters, moments, step count) when found_inf is 1
        self.device_skip = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.params = [p for p in method.parameters() if p.requires_grad]

    def forward_backward(self, batch: dict[str, Any], *, last: bool, autocast) -> dict[str, torch.Tensor]:
        """``method(batch)`` and the backward of ``loss / accum_steps``; DDP syncs gradients only when ``last``."""
        accumulate = not last and hasattr(self.model, "no_sync")
        with self.model.no_sync() if accumulate else contextlib.nullcontext():
            with autocast:
                out = self.model(batch)
            loss = out["loss"] / self.accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return out

    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm (a device scalar, not read here); None when nothing has a gradient. With a
        loss scaler the gradients are unscaled first (once per step, on the device)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True
        return torch.nn.utils.get_total_norm(grads)

    def step(self, found_inf: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor | None:
        """Clip to ``clip_grad`` with ``grad_norm`` (from :meth:`grad_norm`), step, zero the gradients; returns
        ``grad_norm``. With ``device_skip`` the fused optimizer skips the update when ``found_inf`` (float32
        device scalar) is 1. A loss scaler then updates its scale from the gradients' ``found_inf``."""
        if self.clip_grad and grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_grad, grad_norm)
        scaled = self.scaler is not None and self._unscaled
        if self.device_skip:
            self.optimizer.found_inf, self.optimizer.grad_scale = found_inf, None  # already unscaled
            self.optimizer.step()
        elif scaled:
            self.scaler.step(self.optimizer)  # reads the scaler's found_inf and skips the step on an overflow
        else:
            self.optimizer.step()
        if scaled:
            self.scaler.update()
        self._unscaled = False
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def loss_scale(self) -> float | None:
        """The loss scale now (a host read: logging steps only); None without a scaler."""
        return self.scaler.get_scale() if self.scaler is not None else None

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, state: dict[str, Any], run_dir: Path, step: int) -> None:
        state["optimizer"] = self.optimizer.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()

    def load(self, state: dict[str, Any], checkpoint: Path) -> None:
        if state.get("optimizer") is None:
            raise CheckpointError(
                f"run.resume={checkpoint}: saved by a DeepSpeed student; resume with distributed.student=deepspeed"
            )
        if self.scaler is not None and not state.get("scaler"):
            raise CheckpointError(f"run.resume={checkpoint}: holds no fp16 loss scale (saved without train.amp=fp16)")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedStudent:
    """A DeepSpeed engine (ZeRO 0/1/2) around the method with fastkd's optimizer; it scales the loss for
    accumulation, clips and steps, and saves its (partitioned) optimizer state beside the checkpoint."""

    kind = "deepspeed"
    device_skip = False
    scaler = None  # train.amp=fp16 is refused for a DeepSpeed student (fastkd.config.check)

    def __init__(self, method, optimizer: torch.optim.Optimizer, info: DistInfo, *, micro_batch: int,
                 accum_steps: int, zero_stage: int, clip_grad: float | None, bf16: bool,
                 trust_checkpoint: bool = False):
        from fastkd.distributed import deepspeed as ds

        config = ds.student_config(micro_batch=micro_batch, accum_steps=accum_steps, world_size=info.world_size,
                                   zero_stage=zero_stage, clip_grad=clip_grad, bf16=bf16)
        self.engine, _ = ds.wrap_student(method, optimizer, config)
        self.zero_stage = zero_stage
        self.trust_checkpoint = trust_checkpoint

    def forward_backward(self, batch: dict[str, Any], *, last: bool, autocast) -> dict[str, torch.Tensor]:
        with autocast:
            out = self.engine(batch)
        self.engine.backward(out["loss"])
        if not last:
            self.engine.step()  # inside an accumulation window DeepSpeed only counts the micro-step
        return out

    def grad_norm(self) -> None:
        """DeepSpeed computes the norm inside its step."""
        return None

    def step(self, found_inf: torch.Tensor, grad_norm: None) -> torch.Tensor | None:
        """DeepSpeed clips and steps (the trainer has read ``found_inf`` already); its gradient norm."""
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(grad_norm, dtype=torch.float32) if grad_norm is not None else None

    def discard_gradients(self) -> None:
        """Nothing to do: the trainer stops before DeepSpeed's next step."""

    def save(self, state: dict[str, Any], run_dir: Path, step: int) -> None:
        """Collective: every rank writes its part under ``<run_dir>/deepspeed/<tag>``."""
        tag = f"step_{step:08d}"
        self.engine.save_checkpoint(str(run_dir / "deepspeed"), tag=tag)
        state["optimizer"] = None
        state["deepspeed_tag"] = tag

    def load(self, state: dict[str, Any], checkpoint: Path) -> None:
        tag = state.get("deepspeed_tag")
        if tag is None:
            raise CheckpointError(
                f"run.resume={checkpoint}: saved without a DeepSpeed student; its optimizer state is not DeepSpeed's"
            )
        from fastkd.distributed import deepspeed as ds

        ds.load_student_checkpoint(self.engine, checkpoint.parent.parent, tag, trust=self.trust_checkpoint)


def place_student(cfg, method, optimizer: torch.optim.Optimizer, info: DistInfo, *, micro_batch: int,
                  bf16: bool, scaler: torch.amp.GradScaler | None = None) -> TorchStudent | DeepSpeedStudent:
    """The placement ``distributed.student`` asks for; ``scaler``: fp16's loss scaler (torch students only)."""
    d, t = cfg.distributed, cfg.train
    if d.student == "deepspeed":
        return DeepSpeedStudent(method, optimizer, info, micro_batch=micro_batch, accum_steps=t.accum_steps,
                                zero_stage=d.zero_stage, clip_grad=t.clip_grad, bf16=bf16,
                                trust_checkpoint=cfg.run.trust_checkpoint)
    if d.zero_stage != 0:
        raise ConfigError(
            f"distributed.zero_stage={d.zero_stage} needs distributed.student=deepspeed (DDP has no ZeRO)"
        )
    return TorchStudent(method, optimizer, info, accum_steps=t.accum_steps, clip_grad=t.clip_grad,
                        find_unused_parameters=d.find_unused_parameters, scaler=scaler)


__all__ = ["DeepSpeedStudent", "TorchStudent", "place_student"]
