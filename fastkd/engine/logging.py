"""Run logging: JSONL metrics, TensorBoard when installed, a tqdm progress bar, and a final summary table."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on GPU, resident-set peak on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def corrupt_totals(loaders: dict[str, Any]) -> dict[str, int]:
    """Corrupt files met so far per split, over all ranks (the union of the ranks' file names): ``{split: count}``
    for each loader that keeps the record (``loader.corrupt_summary()``). Collective when several ranks run."""
    from fastkd.distributed import all_gather_object

    mine = {split: sorted(loader.corrupt_summary()["files"]) for split, loader in loaders.items()
            if loader is not None and callable(getattr(loader, "corrupt_summary", None))}
    totals: dict[str, set[str]] = {}
    for per_rank in all_gather_object(mine):
        for split, files in per_rank.items():
            totals.setdefault(split, set()).update(files)
    return {split: len(files) for split, files in sorted(totals.items())}


class MetricLogger:
    """Writes one JSON object per line to ``<run_dir>/metrics.jsonl`` (rank 0 only) and mirrors scalars to
    TensorBoard (``<run_dir>/tb``) when ``torch.utils.tensorboard`` can be imported."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
                except Exception:  # tensorboard not installed: JSONL only
                    self._tb = None

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **record}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k in ("step", "time", "kind") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return str(v)


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """A tqdm bar over optimizer steps, or a stand-in with the same methods when disabled."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True, file=sys.stderr)
    return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def write(self, s):
        print(s, file=sys.stderr)

    def close(self):
        pass


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, *, markdown: bool = True) -> str:
    """A small Markdown table (also readable as plain text)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


__all__ = ["MetricLogger", "format_table", "peak_memory_mb", "progress_bar"]
