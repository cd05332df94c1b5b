"""Head-importance benchmark: streaming (Triton / torch) vs materializing reference, time and peak memory.

    python benchmarks/head_importance.py                       # default shapes for this device
    python benchmarks/head_importance.py --shapes 8x6x197x64 --ops attribution
    fastkd bench importance ...                                # the same, through the CLI

Providers: ``triton`` (CUDA only; the fused kernels), ``torch`` (streaming, chunked over query rows), ``reference``
(materializing eager fp32: the full B x H x N x N map, what a user would write). Ops: ``attribution``
(sum_ij |P_ij dO_i.v_j|, from q, k, v, dO) and ``entropy`` (mean row entropy, from q, k), each with the LSE
computed inside (no LSE from the attention forward). ``gradient`` needs no attention map in any provider and is
not benchmarked.

Timing and peak memory: benchmarks/_common.py (device events on CUDA; on the CPU, wall clock, and each
(op, provider, shape) measured in a fresh child process so the peak resident set is that configuration's).
Rows (the long schema of benchmarks/_common.py: metrics ``time`` ms, ``peak_extra_memory`` MiB and
``max_rel_err_vs_fp64``) go to ``benchmarks/results/head_importance_<device>.csv``. CPU numbers are for
relative comparisons only; each row records the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# CPU: one map below the streaming chunk (2^22 elements, one chunk = the whole map) and two above it
CPU_SHAPES = ["4x6x197x64", "8x6x577x64", "4x6x785x64"]
GPU_SHAPES = ["64x6x197x64", "256x6x197x64", "32x12x577x64", "16x6x785x64", "4x6x3137x64"]
OPS = ("attribution", "entropy")
PROVIDERS = ("triton", "torch", "reference")


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


def _inputs(shape, device, dtype):
    B, H, N, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(B, H, N, d, generator=gen).mul_(1.5 if i == 0 else 1.0).to(device, dtype) for i in range(4)]


def measure(op: str, provider: str, shape, dtype: str, device: torch.device, reps: int) -> dict:
    """Time, peak extra memory and the relative error against the reference of one (op, provider, shape)."""
    q, k, v, do = _inputs(shape, device, getattr(torch, dtype))
    fn = _fn(op, provider, q, k, v, do, shape[3] ** -0.5)
    fn()  # warm-up: thread pools, kernels (its buffers are freed on return)
    with C.PeakMemory(device) as mem:
        value = fn()
    timing = C.time_fn(fn, device, warmup=1, reps=None if device.type == "cuda" else reps, rep_ms=100.0)
    from fastkd.kernels import reference as oracle  # fp64 (upcast=True), not the fp32 "reference" provider

    q, k, v, do = (x.double() for x in (q, k, v, do))
    if op == "attribution":
        ref = oracle.attribution_importance_reference(q, k, v, do, shape[3] ** -0.5, upcast=True)
    else:
        ref = oracle.entropy_importance_reference(q, k, shape[3] ** -0.5, upcast=True)
    err = float((value.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return {"times": list(timing), "peak_mib": mem.extra_mib, "rel_err": err}


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        B, H, N, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not BxHxNxd (e.g. 8x6x197x64)") from None
    return B, H, N, d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="head_importance", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--shapes", nargs="+", default=None, help="BxHxNxd shapes (default: a set per device)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS,
                   help="default: triton+torch+reference on CUDA, torch+reference on CPU")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=5, help="CPU timing repeats")
    p.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/head_importance_<device>.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace the CSV instead of appending")
    C.add_force_dirty(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["op"], spec["provider"], spec["shape"], spec["dtype"], device, spec["reps"])))
        return 0
    providers = args.providers or (list(PROVIDERS) if device.type == "cuda" else ["torch", "reference"])
    shapes = [_parse_shape(s) for s in (args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES))]
    out = Path(args.out) if args.out else C.RESULTS / f"head_importance_{C.device_slug(device)}.csv"
    C.check_output(out, args.force_dirty)
    env = C.stamp(device)
    rows = []
    for B, H, N, d in shapes:
        for op in args.ops:
            for provider in providers:
                config = {"B": B, "H": H, "N": N, "d": d, "dtype": args.dtype}
                base = dict(benchmark="head_importance", op=op, provider=provider, config=config)
                if provider == "triton" and device.type != "cuda":
                    reason = "the Triton kernels need CUDA (the CPU interpreter is not a performance measurement)"
                    rows.append(C.row(env, **base, status="not_applicable", note=reason))
                    print(f"{op:11s} {provider:9s} {B}x{H}x{N}x{d}: not applicable ({reason})")
                    continue
                spec = {"op": op, "provider": provider, "shape": [B, H, N, d], "dtype": args.dtype,
                        "reps": args.reps}
                if device.type == "cuda":
                    try:
                        res = measure(op, provider, (B, H, N, d), args.dtype, device, args.reps)
                    except torch.OutOfMemoryError:
                        res = {"error": "out of memory"}
                        torch.cuda.empty_cache()
                else:
                    res = C.run_child(__file__, spec)
                if "error" in res:
                    rows.append(C.row(env, **base, status="error", note=res["error"]))
                    print(f"{op:11s} {provider:9s} {B}x{H}x{N}x{d}: error {res['error']}")
                    continue
                t = C.Timing(*res["times"])
                rows += [
                    C.row(env, **base, metric="time", unit="ms", value=t),
                    C.row(env, **base, metric="peak_extra_memory", unit="MiB", value=res["peak_mib"]),
                    C.row(env, **base, metric="max_rel_err_vs_fp64", unit="1", value=res["rel_err"]),
                ]
                print(f"{op:11s} {provider:9s} {B}x{H}x{N}x{d} {args.dtype}: {t.p50:9.3f} ms  "
                      f"peak +{res['peak_mib']:8.1f} MiB  rel err vs fp64 {res['rel_err']:.1e}")
    C.write_rows(out, rows, append=not args.overwrite)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
