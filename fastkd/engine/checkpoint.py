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
    """``torch.save`` to a temporary file in the same folder, flush to disk, then rename over ``path``.

    A failed write (a full disk: ENOSPC from a write, the flush, ``fsync`` or the close; a quota or file-size
    limit) raises :class:`CheckpointError` naming the last good checkpoint, which is left as it was; the
    temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        cause = _write_error(exc)
        if cause is None:
            raise
        raise CheckpointError(
            f"could not write checkpoint {path} ({cause}); nothing was replaced: {_kept(path)}"
        ) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_error(exc: BaseException) -> str | None:
    """Why a write failed, or None when ``exc`` is not a write failure (a bug). ``torch.save`` turns an OSError
    raised by the file's ``write`` into a RuntimeError ("unexpected pos ...") whose context is that OSError."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or " ".join(str(seen).split())
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(exc).split())
    return text if any(w in text.lower() for w in ("write", "space", "quota", "errno")) else None


def _kept(path: Path) -> str:
    """The last good checkpoint beside ``path`` (``ckpt/last.pt`` and the step file it links to), for a message."""
    others = [p for p in candidates(path.parent.parent) if p != path] if path.parent.name == "ckpt" else []
    if not others:
        return f"there was no earlier checkpoint in {path.parent}"
    newest = others[0]
    same = next((p.name for p in others[1:] if _same_file(p, newest)), None)
    return f"the last good checkpoint {newest}" + (f" (= {same})" if same else "") + " is intact"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
    found = candidates(run_dir)
    return found[0] if found else None


def candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint of a run folder, newest first: ``last.pt``, then the step files by step."""
    steps = sorted(Path(run_dir, "ckpt").glob("step_*.pt"), key=lambda p: int(_STEP_RE.search(p.name).group(1)))
    last = last_path(run_dir)
    return ([last] if last.is_file() else []) + steps[::-1]


def load_latest_good(run_dir: str | os.PathLike, warn=None) -> tuple[Path, dict[str, Any]] | None:
    """``run.resume=auto``: the newest checkpoint of the run folder that loads (a damaged ``last.pt`` falls back
    to the newest good step file; ``warn(message)`` is told about each file skipped), or None when there is none.
    Raises the first file's error when every file is damaged."""
    errors = []
    for path in candidates(run_dir):
        try:
            return path, load(path)
        except CheckpointError as exc:
            errors.append(exc)
            if warn is not None:
                warn(f"run.resume=auto: skipping damaged checkpoint {path}: {' '.join(str(exc).split())[:300]}")
    if errors:
        raise CheckpointError(f"run.resume=auto: every checkpoint in {Path(run_dir, 'ckpt')} is damaged: {errors[0]}")
    return None


_TMP_RE = re.compile(r"^\..+\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_temporary(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the partial ``.<name>.tmp<pid>`` files that a killed process left in ``<run_dir>/ckpt`` (those
    of processes still alive are kept). Returns the files removed."""
    removed = []
    folder = Path(run_dir, "ckpt")
    for p in folder.glob(".*.tmp*") if folder.is_dir() else ():
        m = _TMP_RE.match(p.name)
        if m and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    link = folder / ".last.pt.link"
    if link.is_file():
        link.unlink(missing_ok=True)
        removed.append(link)
    return removed


def prepare_run_dir(run_dir: str | os.PathLike, *, resume: str | None, overwrite: bool, main: bool) -> None:
    """Check that a run may use ``run_dir`` and make it (``main``: the rank that writes).

    A fresh run (no ``run.resume``) in a folder that holds another run's checkpoints is refused unless
    ``run.overwrite`` is set; with it, those checkpoints (and DeepSpeed's files) are removed first, so the folder
    never mixes two runs. Partial files of killed processes are removed.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} (run.output_dir/run.name) is a file, not a folder")
    old = candidates(run_dir) if run_dir.is_dir() else []
    if old and not resume and not overwrite:
        raise CheckpointError(
            f"run folder {run_dir} already holds checkpoints ({old[0].name}, ...): continue that run with --resume, "
            "choose a new run.name, or pass run.overwrite=true to replace it"
        )
    if not main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create the run folder {run_dir} (run.output_dir/run.name): {exc.strerror or exc}"
        ) from None
    if old and not resume:  # overwrite
        import shutil

        for p in Path(run_dir, "ckpt").glob("*.pt"):
            p.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "deepspeed", ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    clean_temporary(run_dir)


# config keys that may change when a run is resumed: where/how it runs and how often it logs, saves and evaluates;
# every other key shapes the trained weights, so a difference is reported instead of resuming into a mixed run
RESUME_FREE = (
    "run.resume", "run.overwrite", "run.trust_checkpoint", "run.device", "run.output_dir", "run.name",
    "train.epochs", "train.steps", "train.progress", "train.log_every", "train.ckpt_every", "train.keep_ckpts",
    "train.eval", "train.eval_every", "data.num_workers", "data.device", "distributed.timeout",
    "distributed.backend",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: tree}


def config_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for each config value that differs between a checkpoint and this run (keys in
    :data:`RESUME_FREE` aside)."""
    if not saved:
        return []
    a, b = _flat(saved), _flat(current)
    free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_FREE)  # noqa: E731
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if not free(k) and a.get(k) != b.get(k)]


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints (``last.pt`` is never deleted)."""
    if keep < 0:
        return
    steps = sorted(Path(run_dir, "ckpt").glob("step_*.pt"), key=lambda p: int(_STEP_RE.search(p.name).group(1)))
    for p in steps[: max(len(steps) - keep, 0)]:
        p.unlink(missing_ok=True)


__all__ = [
    "CheckpointError",
    "RESUME_FREE",
    "atomic_save",
    "candidates",
    "clean_temporary",
    "config_changes",
    "last_path",
    "latest",
    "load",
    "load_latest_good",
    "prepare_run_dir",
    "prune",
    "rng_state",
    "set_rng_state",
    "step_path",
]
