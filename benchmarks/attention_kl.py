"""Benchmark attention_kl: fastkd (Triton on GPU, streaming torch on CPU) vs eager and torch.compile'd eager.

Modes: forward, backward, full (forward + backward). Median time with p20/p80, peak extra memory, and the
achieved fraction of the roofline floor from PERFORMANCE.md's model (GPUs with known peaks only):

    E = B*H*N^2 attention elements (per layer pair, one teacher head per student head)
    exps : forward 2E, backward 2E                (teacher + student softmax, recomputed in backward)
    FLOP : forward 4*E*d, backward 8*E*d          (two QK^T; backward: one recompute + dQ + dK)
    bytes: forward 4*B*H*N*d*s, backward 6*B*H*N*d*s (read Q_s, K_s, Q_t, K_t; write dQ_s, dK_s)
    floor = max(bytes / HBM, FLOP / tensor-core peak, exps / exp-unit rate)

Usage:
    python benchmarks/attention_kl.py                 # standard shapes for this device, writes the CSV + plot
    python benchmarks/attention_kl.py --quick         # a smoke run (one small shape)
    fastkd bench kernels [same options]
Results: benchmarks/results/attention_kl_<device>.csv and .png. CPU timings are for relative comparisons only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PROVIDERS = ("fastkd", "eager", "compile")
MODES = ("forward", "backward", "full")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def gpu_shapes() -> list[tuple[int, int, int, int]]:
    shapes = [(B, H, N, 64) for B in (64, 256) for H in (6, 12) for N in (197, 577, 785)]
    shapes += [(B, 6, 3137, 64) for B in (64, 256)]  # N=3137 (448 px / 8): eager is skipped where it cannot fit
    return shapes


def cpu_shapes() -> list[tuple[int, int, int, int]]:
    return [(2, H, N, 64) for H in (6, 12) for N in (197, 577, 785)]


def model(B: int, H: int, N: int, d: int, elt: int) -> dict[str, dict[str, float]]:
    E = B * H * N * N
    bhnd = B * H * N * d * elt
    fwd = {"exp": 2 * E, "flops": 4 * E * d, "bytes": 4 * bhnd}
    bwd = {"exp": 2 * E, "flops": 8 * E * d, "bytes": 6 * bhnd}
    return {"forward": fwd, "backward": bwd, "full": {k: fwd[k] + bwd[k] for k in fwd}}


def floor_ms(cost: dict[str, float], peaks: dict[str, float] | None) -> tuple[float | None, str]:
    if peaks is None:
        return None, ""
    parts = {
        "memory": cost["bytes"] / peaks["bytes"],
        "tensor cores": cost["flops"] / peaks["flops"],
        "exp unit": cost["exp"] / peaks["exp"],
    }
    bound = max(parts, key=parts.get)
    return parts[bound] * 1e3, bound


def eager_loss(q_s, k_s, q_t, k_t):
    """What public ViT KD code does: materialize both softmaxes, then F.kl_div (batchmean)."""
    scale = q_s.shape[-1] ** -0.5
    log_s = torch.log_softmax((q_s @ k_s.transpose(-1, -2)).float() * scale, dim=-1)
    log_t = torch.log_softmax((q_t @ k_t.transpose(-1, -2)).float() * scale, dim=-1)
    return torch.nn.functional.kl_div(log_s, log_t, reduction="sum", log_target=True) / log_s.shape[0]


def make_fn(provider: str):
    if provider == "fastkd":
        from fastkd.functional import attention_kl

        return lambda q_s, k_s, q_t, k_t: attention_kl(q_s, k_s, q_t, k_t, reduction="batchmean")
    if provider == "eager":
        return eager_loss
    if provider == "compile":
        # backward is timed on one retained graph (retain_graph=True), which donated buffers forbid
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        return torch.compile(eager_loss, dynamic=False)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def measure(provider: str, B: int, H: int, N: int, d: int, dtype_name: str, device: torch.device,
            rep_ms: float) -> dict:
    """Time every mode of one provider at one shape; peak extra memory of one forward+backward."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd():
        return torch.randn(B, H, N, d, device=device, dtype=dtype, generator=gen)

    q_s, k_s, q_t, k_t = rnd().requires_grad_(), rnd().requires_grad_(), rnd(), rnd()
    fn = make_fn(provider)
    loss = fn(q_s, k_s, q_t, k_t)  # compiles / warms up
    loss.backward()
    q_s.grad = k_s.grad = None

    # peak extra memory of forward + backward (GPU: allocator statistics; CPU: sampled resident set size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(q_s, k_s, q_t, k_t).backward()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with C.PeakRSS() as mem:
            fn(q_s, k_s, q_t, k_t).backward()
        peak_mib = mem.extra_mib
    q_s.grad = k_s.grad = None

    results = {}
    results["forward"] = C.time_fn(lambda: fn(q_s, k_s, q_t, k_t), device, rep_ms=rep_ms)
    holder = {}

    def fwd_for_bwd():
        holder["loss"] = fn(q_s, k_s, q_t, k_t)

    def bwd():
        holder["loss"].backward(retain_graph=True)

    if device.type == "cuda":
        fwd_for_bwd()
        results["backward"] = C.time_fn(bwd, device, rep_ms=rep_ms)
    else:  # backward alone on CPU: full minus forward would double-count noise; time it directly
        import statistics
        import time

        samples = []
        for _ in range(max(3, min(20, int(rep_ms // max(1.0, results["forward"][0])) + 1))):
            fwd_for_bwd()
            t0 = time.perf_counter()
            bwd()
            samples.append((time.perf_counter() - t0) * 1e3)
        qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
        results["backward"] = (statistics.median(samples), qs[1], qs[7])
    results["full"] = C.time_fn(lambda: fn(q_s, k_s, q_t, k_t).backward(), device, rep_ms=rep_ms)
    return {"peak_mib": peak_mib, "times": results}


def fits(provider: str, B: int, H: int, N: int, device: torch.device) -> bool:
    """Whether a materializing provider can hold its maps (two fp32 maps + autograd copies: ~6 maps)."""
    if provider == "fastkd":
        return True
    need = 6 * B * H * N * N * 4
    if device.type == "cuda":
        return need < 0.8 * torch.cuda.get_device_properties(device).total_memory
    return need < 4 * 2**30


def run_child(spec: dict) -> dict:
    """Measure one (provider, shape) in a fresh process so CPU peak memory (RSS) is per configuration."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
        timeout=1800, env={**os.environ},
    )  # fmt: skip
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of fastkd,eager,compile")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16,fp32,fp16")
    p.add_argument("--shapes", default=None, help="B,H,N,d;B,H,N,d;... (default: the standard set for the device)")
    p.add_argument("--quick", action="store_true", help="one small shape, fastkd and eager only (smoke run)")
    p.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (default 300 GPU, 1000 CPU)")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/attention_kl_<device>.csv)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        spec = json.loads(args.child)
        res = measure(spec["provider"], *spec["shape"], spec["dtype"], device, spec["rep_ms"])
        print(json.dumps(res))
        return 0

    providers = [p for p in args.providers.split(",") if p]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"--providers: {p!r} is not one of {PROVIDERS}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: {d!r} is not one of {tuple(DTYPES)}")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    elif args.quick:
        shapes, providers, dtypes = [(2, 6, 197, 64)], [p for p in providers if p != "compile"], dtypes[:1]
    else:
        shapes = gpu_shapes() if device.type == "cuda" else cpu_shapes()
    rep_ms = args.rep_ms or (300.0 if device.type == "cuda" else 1000.0)
    peaks = C.peaks_for(device)
    env = C.stamp(device)
    rows = []
    out = Path(args.out) if args.out else C.RESULTS / f"attention_kl_{C.device_slug(device)}.csv"
    print(f"attention_kl benchmark on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    header = ("provider", "dtype", "B", "H", "N", "mode", "p50 ms", "peak MiB", "floor")
    print("{:<8} {:<5} {:>4} {:>3} {:>5} {:<8} {:>10} {:>9} {:>7}".format(*header))
    for dtype_name in dtypes:
        for B, H, N, d in shapes:
            for provider in providers:
                if not fits(provider, B, H, N, device):
                    print(f"{provider:<8} {dtype_name:<5} {B:>4} {H:>3} {N:>5} skipped: the maps do not fit in memory")
                    continue
                spec = {"provider": provider, "shape": [B, H, N, d], "dtype": dtype_name, "rep_ms": rep_ms}
                if device.type == "cuda":
                    try:
                        res = measure(provider, B, H, N, d, dtype_name, device, rep_ms)
                    except torch.cuda.OutOfMemoryError:
                        res = {"error": "out of memory"}
                        torch.cuda.empty_cache()
                else:
                    res = run_child(spec)
                if "error" in res:
                    print(f"{provider:<8} {dtype_name:<5} {B:>4} {H:>3} {N:>5} failed: {res['error']}")
                    continue
                costs = model(B, H, N, d, DTYPES[dtype_name].itemsize)
                new_rows = []
                for mode in MODES:
                    p50, p20, p80 = res["times"][mode]
                    fl, bound = floor_ms(costs[mode], peaks)
                    row = {
                        "kernel": "attention_kl", "provider": provider, "mode": mode, "dtype": dtype_name,
                        "B": B, "H": H, "N": N, "d": d, "p50_ms": round(p50, 5), "p20_ms": round(p20, 5),
                        "p80_ms": round(p80, 5), "peak_mem_mib": round(res["peak_mib"], 2),
                        "model_flops": costs[mode]["flops"], "model_bytes": costs[mode]["bytes"],
                        "model_exps": costs[mode]["exp"], "floor_ms": "" if fl is None else round(fl, 5),
                        "bound": bound, "frac_of_floor": "" if fl is None else round(fl / p50, 4), **env,
                    }  # fmt: skip
                    new_rows.append(row)
                    frac = "" if fl is None else f"{fl / p50:6.1%}"
                    print(f"{provider:<8} {dtype_name:<5} {B:>4} {H:>3} {N:>5} {mode:<8} {p50:>10.3f} "
                          f"{res['peak_mib']:>9.1f} {frac:>7}")
                # written as it goes, so a run cut short (a time limit) keeps what it measured
                C.write_csv(out, new_rows, append=bool(rows))
                rows += new_rows
    print(f"wrote {out}")
    if not args.no_plot and rows:
        try:
            plot(rows, out.with_suffix(".png"))
            print(f"wrote {out.with_suffix('.png')}")
        except ImportError:
            print("matplotlib is not installed: no plot (the CSV has every number)", file=sys.stderr)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["mode"] == "full"]
    keys = sorted({(r["dtype"], r["B"], r["H"]) for r in full})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (dtype, B, H) in zip(axes[0], keys):
        for provider in PROVIDERS:
            pts = sorted((r["N"], r["p50_ms"]) for r in full if r["provider"] == provider and
                         (r["dtype"], r["B"], r["H"]) == (dtype, B, H))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_title(f"{dtype}, B={B}, H={H}")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("forward+backward ms (p50)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"attention_kl on {rows[0]['device']} ({rows[0]['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
