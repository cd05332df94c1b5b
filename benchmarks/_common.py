"""Shared benchmark plumbing: one timing helper, one memory method, one long CSV schema, environment stamps.

Every benchmark (attention_kl, head_importance, data_pipeline, train_step) writes rows of ``FIELDS``: one
measured quantity per row (``metric`` in ``unit``, median ``p50`` with ``p20``/``p80`` over ``reps``
repetitions), what was measured (``benchmark``, ``op``, ``provider``, ``mode``, and ``config``: a JSON object
with the shape, dtype, batch size, ...), and where and when: device, CPU model, threads, 1-minute load average
at the time of the row (CPU timings on a shared machine are relative only), torch/triton/other versions,
commit (``<sha>-dirty`` when the tree had uncommitted changes) and date. A configuration that cannot run on
this device is a row with ``status=not_applicable`` and the reason in ``note``, never a silent gap.

Timing (:func:`time_fn`): CUDA -> device events around each call, L2 flushed before each call, after warm-up
(the method of ``triton.testing.do_bench``, with an untimed ``setup`` per repetition for resetting gradients or
running the forward a timed backward needs); CPU (or ``wall=True``) -> ``time.perf_counter`` around each call.
Memory (:class:`PeakMemory`): CUDA -> ``max_memory_allocated`` above what was allocated at entry; CPU -> rise
of the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set at entry,
exact rather than sampled; run it in a process started by :func:`run_child` (glibc's mmap threshold fixed at
64 KiB, so freed buffers leave the resident set and the allocator caches nothing between calls).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Physical limits used by the roofline floors (PERFORMANCE.md): dense bf16 FLOP/s, HBM bytes/s, exp/s.
PEAKS = {
    "H100": {"flops": 989e12, "bytes": 3.35e12, "exp": 3.9e12},
    "H200": {"flops": 989e12, "bytes": 4.8e12, "exp": 3.9e12},
}

FIELDS = [
    "benchmark", "op", "provider", "mode", "config", "metric", "unit", "p50", "p20", "p80", "reps",
    "floor_ms", "floor_bound", "design_bound_ms", "status", "note",
    "device", "cpu_model", "threads", "load_avg_1m", "torch", "triton", "versions", "commit", "date",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def tree_dirty() -> bool:
    """Uncommitted changes to tracked or untracked (not ignored) files, outside ``benchmarks/results/``.

    The results folder is left out so that one benchmark writing its CSV does not make the next one dirty.
    """
    out = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return bool(out and out.strip())


def git_commit() -> str:
    """Short commit of the checkout the benchmarks live in, ``<sha>-dirty`` with uncommitted changes."""
    sha = (_git("rev-parse", "--short", "HEAD") or "").strip()
    if not sha:
        return "unknown"
    return f"{sha}-dirty" if tree_dirty() else sha


def check_output(path: Path, force: bool) -> None:
    """Refuse to write into ``benchmarks/results/`` from a dirty tree unless forced (the rows then say dirty)."""
    try:
        inside = Path(path).resolve().is_relative_to(RESULTS.resolve())
    except OSError:
        inside = False
    if inside and not force and tree_dirty():
        raise SystemExit(
            f"refusing to write {path}: the checkout has uncommitted changes, so the numbers would not belong to "
            "any commit. Commit first, write elsewhere (--out), or pass --force-dirty (rows then say <sha>-dirty)."
        )


def _version(module: str) -> str:
    import importlib

    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - a missing or broken optional package is a version string too
        return "not installed"


def stamp(device: torch.device, extra_versions: tuple[str, ...] = ()) -> dict[str, Any]:
    """The environment columns of every row (``load_avg_1m`` is added per row by :func:`row`)."""
    return {
        "device": device_name(device),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "versions": json.dumps({m: _version(m) for m in extra_versions}, sort_keys=True) if extra_versions else "",
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sig(x: float) -> float:
    """Six significant digits (a relative error of 1e-7 must not round to 0)."""
    return float(f"{float(x):.6g}")


def row(env: dict[str, Any], *, benchmark: str, op: str, provider: str, mode: str = "", config: dict[str, Any],
        metric: str = "", unit: str = "", value: Timing | float | None = None, status: str = "ok", note: str = "",
        **extra: Any) -> dict[str, Any]:
    """One CSV row. ``value``: a :class:`Timing` (p50/p20/p80/reps) or one number (``p50`` only)."""
    r: dict[str, Any] = {k: "" for k in FIELDS}
    r.update(env, benchmark=benchmark, op=op, provider=provider, mode=mode, metric=metric, unit=unit,
             config=json.dumps(config, sort_keys=True), status=status, note=note,
             load_avg_1m=round(os.getloadavg()[0], 2))
    if isinstance(value, Timing):
        r.update(p50=_sig(value.p50), p20=_sig(value.p20), p80=_sig(value.p80), reps=value.reps)
    elif value is not None:
        r.update(p50=_sig(value), reps=1)
    unknown = set(extra) - set(FIELDS)
    if unknown:
        raise ValueError(f"row: unknown columns {sorted(unknown)}; the schema is {FIELDS}")
    r.update(extra)
    return r


def write_csv(path: Path, rows: list[dict[str, Any]], append: bool = False, fields: list[str] | None = None) -> Path:
    """Write (or append to) a CSV; ``fields`` default to the rows' keys in order of appearance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
    mode = "a" if append and path.exists() else "w"
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)
    return path


def write_rows(path: Path, rows: list[dict[str, Any]], append: bool = False) -> Path:
    """Write (or append to) a benchmark CSV of ``FIELDS``; appending to a file with another header is refused."""
    path = Path(path)
    if append and path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != FIELDS:
            raise SystemExit(f"{path} has another header than benchmarks/_common.FIELDS: write a new file (--out)")
    return write_csv(path, rows, append=append, fields=FIELDS)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a benchmark CSV, with ``cfg``: the parsed ``config``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["cfg"] = json.loads(r["config"]) if r.get("config") else {}
    return rows


# ----------------------------------------------------------------------------------------------- timing
class Timing(NamedTuple):
    p50: float  # milliseconds
    p20: float
    p80: float
    reps: int
    total_ms: float


def _summary(times_ms: list[float]) -> Timing:
    if len(times_ms) == 1:
        t = times_ms[0]
        return Timing(t, t, t, 1, t)
    qs = statistics.quantiles(times_ms, n=10, method="inclusive")
    return Timing(statistics.median(times_ms), qs[1], qs[7], len(times_ms), sum(times_ms))


def time_fn(fn: Callable[[], object], device: torch.device, *, setup: Callable[[], object] | None = None,
            warmup: int = 3, rep_ms: float = 200.0, reps: int | None = None, max_reps: int = 1000,
            wall: bool = False) -> Timing:
    """Milliseconds of ``fn`` per call: median with p20/p80 over repetitions after ``warmup`` untimed calls.

    ``setup`` runs before every call (warm-up and timed), outside the timed window. ``reps`` fixes the number of
    timed calls; otherwise as many as fit in ``rep_ms`` (at least 3, at most ``max_reps``). CUDA: device events,
    L2 flushed before each call, unless ``wall`` (host wall clock with a synchronisation on both sides, for
    pipelines whose cost is on the host, like a data loader).
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync()
    if cuda and not wall:
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

        def one() -> float:
            if setup is not None:
                setup()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:

        def one() -> float:
            if setup is not None:
                setup()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return (time.perf_counter() - t0) * 1e3

    times: list[float] = []
    if reps is not None:
        times = [one() for _ in range(reps)]
    else:
        budget = time.perf_counter() + rep_ms / 1e3
        while len(times) < 3 or (time.perf_counter() < budget and len(times) < max_reps):
            times.append(one())
    return _summary(times)


# ----------------------------------------------------------------------------------------------- memory
def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak extra memory (MiB, ``extra_mib``, set on exit) of the code inside ``with PeakMemory(device) as m:``.

    CUDA: allocator peak above the allocation at entry. CPU: peak resident set above the resident set at entry
    (NaN where ``/proc/self/clear_refs`` cannot reset the peak); meaningful in a :func:`run_child` process.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self._base = _proc_status("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self.extra_mib = (_proc_status("VmHWM") - self._base) / 2**20
        return False


CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(script: str | Path, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --child <json spec>`` in a fresh process (``CHILD_ENV``); its last stdout line is JSON.

    One configuration per process keeps CPU peak memory per configuration; a failure comes back as
    ``{"error": <last line of stderr>}``.
    """
    try:
        out = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], capture_output=True,
                             text=True, timeout=timeout, env={**os.environ, **CHILD_ENV})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = (out.stdout or "").strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout or "no output").strip().splitlines() or ["no output"]
        return {"error": tail[-1][:300]}
    return json.loads(lines[-1])


def add_force_dirty(p) -> None:
    """``--force-dirty``, the same in every benchmark (see :func:`check_output`)."""
    p.add_argument("--force-dirty", action="store_true",
                   help="write into benchmarks/results/ although the checkout has uncommitted changes")
