"""Training checkpoints: one file per save, written atomically, loaded with ``weights_only=True``.

A checkpoint holds only tensors and plain data (dicts, lists, numbers, strings), so resuming never runs
pickled code:

``step, epoch, method`` (student + trainable extras: ``method.state_dict()``), ``optimizer``, ``scheduler``,
``ema`` (the student's EMA), ``loader`` (the training loader's position), ``rng`` (per rank: python, numpy, torch,
cuda), ``config`` (the resolved config), ``metrics`` and, for a DeepSpeed student, ``deepspeed_tag`` naming
the engine's own checkpoint folder (its ZeRO-partitioned optimizer state is saved by DeepSpeed beside this
file, under ``deepspeed/<tag>``).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastkd.models.build import CheckpointError  # one error for every file of weights that cannot be used


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, flush to disk, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load checkpoint {path} with torch.load(weights_only=True): {exc}. "
            "fastkd checkpoints hold only tensors and plain data; is this file a fastkd checkpoint?"
        ) from exc


# ---------------------------------------------------------------------------------------------------------------------
# RNG states as tensors and plain data (numpy's state holds an ndarray, which weights_only refuses)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------------------------
# file naming in a run folder: ckpt/step_00000123.pt, ckpt/last.pt


_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def step_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "ckpt" / f"step_{step:08d}.pt"


def last_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "ckpt" / "last.pt"


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in a run folder (``last.pt`` when present), or None."""
    last = last_path(run_dir)
    if last.is_file():
        return last
    steps = sorted(Path(run_dir, "ckpt").glob("step_*.pt"), key=lambda p: int(_STEP_RE.search(p.name).group(1)))
    return steps[-1] if steps else None


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints (``last.pt`` is never deleted)."""
    if keep < 0:
        return
    steps = sorted(Path(run_dir, "ckpt").glob("step_*.pt"), key=lambda p: int(_STEP_RE.search(p.name).group(1)))
    for p in steps[: max(len(steps) - keep, 0)]:
        p.unlink(missing_ok=True)


__all__ = [
    "CheckpointError",
    "atomic_save",
    "last_path",
    "latest",
    "load",
    "prune",
    "rng_state",
    "set_rng_state",
    "step_path",
]
