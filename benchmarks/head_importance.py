"""Head-importance benchmark: streaming (Triton / torch) vs materializing reference, time and peak memory.

    python benchmarks/head_importance.py                       # default shapes for this device
    python benchmarks/head_importance.py --shapes 8x6x197x64 --ops attribution
    fastkd bench importance ...                                # the same, through the CLI

Providers: ``triton`` (CUDA only; the fused kernels), ``torch`` (streaming, chunked over query rows), ``reference``
(materializing eager fp32: the full B x H x N x N map, what a user would write). Ops: ``attribution``
(sum_ij |P_ij dO_i.v_j|, from q, k, v, dO) and ``entropy`` (mean row entropy, from q, k), each with the LSE
computed inside (no LSE from the attention forward). ``gradient`` needs no attention map in any provider and is
not benchmarked.

Timing: CUDA -> ``triton.testing.do_bench`` (median, p20, p80); CPU -> wall clock over repeats after a warm-up
(CPU numbers are for relative comparisons only). Peak memory: CUDA -> ``max_memory_allocated`` above what was
allocated before the call; CPU -> rise of the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) during one call, measured in a fresh child process with glibc's mmap threshold fixed
at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed buffers leave the RSS and the allocator caches nothing between
calls. Rows append to ``benchmarks/results/head_importance_<device>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# CPU: one map below the streaming chunk (2^22 elements, one chunk = the whole map) and two above it
CPU_SHAPES = ["4x6x197x64", "8x6x577x64", "4x6x785x64"]
GPU_SHAPES = ["64x6x197x64", "256x6x197x64", "32x12x577x64", "16x6x785x64", "4x6x3137x64"]
FIELDS = [
    "date",
    "device",
    "threads",
    "torch",
    "triton",
    "commit",
    "op",
    "provider",
    "B",
    "H",
    "N",
    "d",
    "dtype",
    "time_ms_p50",
    "time_ms_p20",
    "time_ms_p80",
    "peak_extra_mib",
    "speedup_vs_reference",
    "memory_vs_reference",
    "max_rel_err_vs_reference",
]


def _device_slug(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return name, slug


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _fn(op: str, provider: str, q, k, v, do, scale: float):
    from fastkd.kernels import reference as ref

    if provider == "reference":
        if op == "attribution":
            return lambda: ref.attribution_importance_reference(q, k, v, do, scale, upcast=False)
        return lambda: ref.entropy_importance_reference(q, k, scale, upcast=False)
    if provider == "triton":
        from fastkd.kernels import head_importance as impl
    else:
        from fastkd.kernels import head_importance_torch as impl
    if op == "attribution":
        return lambda: impl.attribution_importance(q, k, v, do, scale)
    return lambda: impl.entropy_importance(q, k, scale)


def _time(fn, device: torch.device, reps: int) -> tuple[float, float, float]:
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return float(p50), float(p20), float(p80)
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    pick = lambda f: ts[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def _peak_cpu_child(op: str, provider: str, shape: tuple[int, int, int, int], dtype: str, threads: int) -> float:
    """Peak extra RSS (MiB) of one call, measured in a fresh process (see the module docstring)."""
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import head_importance as hi; "
        f"print(hi._peak_here({op!r}, {provider!r}, {shape!r}, {dtype!r}, {threads:d}))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    try:
        return float(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"memory child failed: {res.stderr[-500:]}")
        return float("nan")


def _peak_here(op: str, provider: str, shape, dtype: str, threads: int) -> float:
    torch.set_num_threads(threads)
    q, k, v, do = _inputs(shape, torch.device("cpu"), getattr(torch, dtype), torch.Generator().manual_seed(0))
    fn = _fn(op, provider, q, k, v, do, shape[3] ** -0.5)
    fn()  # warm-up: thread pools, kernels (its buffers are freed on return)
    return _peak(fn, torch.device("cpu"))


def _inputs(shape, device, dtype, gen):
    B, H, N, d = shape
    return [torch.randn(B, H, N, d, generator=gen).mul_(1.5 if i == 0 else 1.0).to(device, dtype) for i in range(4)]


def _peak(fn, device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20
    if not _rss_peak_reset():
        return float("nan")
    base = _vm("VmRSS")
    out = fn()
    peak = _vm("VmHWM") - base
    del out
    return peak / 2**20


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        B, H, N, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes: {text!r} is not BxHxNxd (e.g. 8x6x197x64)") from None
    return B, H, N, d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="head_importance", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--shapes", nargs="+", default=None, help="BxHxNxd shapes (default: a set per device)")
    p.add_argument("--ops", nargs="+", default=["attribution", "entropy"], choices=["attribution", "entropy"])
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        choices=["triton", "torch", "reference"],
        help="default: triton+torch+reference on CUDA, torch+reference on CPU",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=5, help="CPU timing repeats")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/head_importance_<device>.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace the CSV instead of appending")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    providers = args.providers or (
        ["triton", "torch", "reference"] if device.type == "cuda" else ["torch", "reference"]
    )
    if "triton" in providers and device.type != "cuda":
        print("note: triton provider skipped on CPU (the interpreter is not a performance measurement)")
        providers = [p for p in providers if p != "triton"]
    shapes = [_parse_shape(s) for s in (args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES))]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    name, slug = _device_slug(device)
    out = Path(args.out) if args.out else RESULTS / f"head_importance_{slug}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": C.git_commit(),
        "threads": threads if device.type == "cpu" else "",
    }
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for B, H, N, d in shapes:
        for op in args.ops:
            q, k, v, do = _inputs((B, H, N, d), device, dtype, gen)
            scale = d**-0.5
            results = {}
            for provider in providers:
                fn = _fn(op, provider, q, k, v, do, scale)
                try:
                    value = fn()
                    t50, t20, t80 = _time(fn, device, args.reps)
                    if device.type == "cuda":
                        peak = _peak(fn, device)
                    else:
                        peak = _peak_cpu_child(op, provider, (B, H, N, d), args.dtype, threads)
                except torch.OutOfMemoryError:
                    print(f"{op} {provider} {B}x{H}x{N}x{d}: out of memory")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                results[provider] = (value.float(), t50, t20, t80, peak)
            ref = results.get("reference")
            for provider, (value, t50, t20, t80, peak) in results.items():
                err = float("nan")
                if ref is not None:
                    err = float((value - ref[0]).abs().max() / ref[0].abs().max().clamp_min(1e-30))
                rows.append(
                    {
                        **stamp,
                        "op": op,
                        "provider": provider,
                        "B": B,
                        "H": H,
                        "N": N,
                        "d": d,
                        "dtype": args.dtype,
                        "time_ms_p50": round(t50, 4),
                        "time_ms_p20": round(t20, 4),
                        "time_ms_p80": round(t80, 4),
                        "peak_extra_mib": round(peak, 2),
                        "speedup_vs_reference": round(ref[1] / t50, 3) if ref else "",
                        "memory_vs_reference": round(peak / ref[4], 4) if ref and ref[4] > 0 else "",
                        "max_rel_err_vs_reference": f"{err:.2e}",
                    }
                )
                r = rows[-1]
                print(
                    f"{op:11s} {provider:9s} {B}x{H}x{N}x{d} {args.dtype}: {t50:9.3f} ms  peak +{peak:8.1f} MiB  "
                    f"speedup {r['speedup_vs_reference'] or '-'}  mem x{r['memory_vs_reference'] or '-'}  err {err:.1e}"
                )
            del q, k, v, do
    append = out.exists() and not args.overwrite
    with open(out, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if not append:
            w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
