"""Shared benchmark plumbing: timing, environment stamps, CSV output, device names."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Physical limits used by the roofline floors (PERFORMANCE.md): dense bf16 FLOP/s, HBM bytes/s, exp/s.
PEAKS = {
    "H100": {"flops": 989e12, "bytes": 3.35e12, "exp": 3.9e12},
    "H200": {"flops": 989e12, "bytes": 4.8e12, "exp": 3.9e12},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def peaks_for(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


def git_commit() -> str:
    """Short commit of the checkout the benchmarks live in ("unknown" outside git)."""
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep_ms: float = 200.0,
            max_reps: int = 50) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn``: device events via triton.testing.do_bench on GPUs, wall clock on CPUs."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=int(rep_ms), quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    for _ in range(warmup):
        fn()
    times: list[float] = []
    budget = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), qs[1], qs[7]


def write_csv(path: Path, rows: list[dict], append: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    mode = "a" if append and path.exists() else "w"
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)
    return path


class PeakRSS:
    """Peak resident memory above the level at entry, sampled from /proc/self/statm every ``interval`` s.

    CPU stand-in for ``torch.cuda.max_memory_allocated``: torch's CPU ops release the GIL, so the sampler
    sees the live working set while they run. ``extra_mib`` is set on exit.
    """

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.extra_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def _release_free_memory() -> None:
        """Hand memory freed earlier (warm-up) back to the OS, so the baseline is the live set only."""
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def __enter__(self):
        import threading

        self._release_free_memory()
        self._base = self._rss()
        self._peak = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.extra_mib = (self._peak - self._base) / 2**20
        return False
