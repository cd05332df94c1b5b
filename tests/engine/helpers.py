"""Tiny stand-ins for engine tests: an in-memory loader with the fastkd.data contract, tiny timm ViTs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny_vit(num_classes: int = 4, **kw):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **{**TINY_VIT, **kw})


class MemoryLoader:
    """Deterministic batches of generated images (class = which quadrant is bright), resumable like fastkd.data."""

    backend = "memory"

    def __init__(self, n: int = 32, batch_size: int = 8, num_classes: int = 4, size: int = 16, seed: int = 0,
                 shuffle: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        self.images = torch.randn(n, 3, size, size, generator=g) * 0.3
        h = size // 2
        for i, y in enumerate(self.labels.tolist()):
            r, c = divmod(y % 4, 2)
            self.images[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.5
        self.batch_size, self.num_classes, self.seed, self.shuffle = batch_size, num_classes, seed, shuffle
        self.epoch, self.position = 0, 0

    def __len__(self):
        return len(self.labels) // self.batch_size

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, s):
        self.epoch, self.position = int(s["epoch"]), int(s["position"])

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)) \
            if self.shuffle else torch.arange(n)
        epoch = self.epoch
        while self.position + self.batch_size <= n:
            idx = order[self.position:self.position + self.batch_size]
            self.position += self.batch_size
            yield {"images": self.images[idx].clone(), "labels": self.labels[idx].clone()}
        self.epoch, self.position = epoch + 1, 0


def env_for_subprocess(tmp_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_cli(args: list[str], *, cwd: Path, timeout: float = 240, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable, "-m", "fastkd"]) + args
    return subprocess.run(cmd, cwd=cwd, env=env_for_subprocess(), capture_output=True, text=True, timeout=timeout)


def run_cli_together(*runs: list[str], cwd: Path, timeout: float = 240,
                     launcher: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    """:func:`run_cli` of independent runs (argument lists) at the same time, results in the same order: each
    process uses one thread (``OMP_NUM_THREADS=1``), so two of them keep a 2-core machine busy."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        return list(pool.map(lambda args: run_cli(args, cwd=cwd, timeout=timeout, launcher=launcher), runs))
