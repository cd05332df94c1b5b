"""Benchmark attention_kl: fastkd vs what a user would otherwise write, forward / backward / forward+backward.

Providers (all compute the same loss: KL(P_t || P_s) of every query row, one teacher head per student head,
summed and divided by the batch size):
    fastkd   fastkd.functional.attention_kl (Triton on GPU, streaming torch on CPU)
    eager    what a user writes: logits of the selected heads in the input dtype (bf16 maps in a bf16 run),
             log_softmax, F.kl_div(log_target=True)
    compile  torch.compile of that eager loss, compiled fresh for each configuration (torch._dynamo.reset())
    flex     the exact attention-KL from FlexAttention: one teacher-side call with V = [K_t | K_s] gives
             sum_j P_t*k_t and sum_j P_t*k_s (dotted with the scaled queries: sum_j P_t*t and sum_j P_t*s), a
             student-side call gives LSE_s; KL_i = sum_j P_t*t - sum_j P_t*s - LSE_t + LSE_s; compiled,
             backward through autograd. GPU only: on the CPU FlexAttention has no backward and its compiled
             path cannot return the LSE (its eager forward is checked against the fp64 oracle in the tests)

Timing and memory: benchmarks/_common.py (device events on GPUs, wall clock on CPUs; gradients reset before
every repetition outside the timed window; the backward is timed after an untimed forward of its own). The
roofline floor from PERFORMANCE.md's model (GPUs with known peaks only):

    E = B*H*N^2 attention elements (per layer pair, one teacher head per student head)
    exps : forward 2E, backward 2E                (teacher + student softmax, recomputed in backward)
    FLOP : forward 4*E*d, backward 8*E*d          (two QK^T; backward: one recompute + dQ + dK)
    bytes: forward 4*B*H*N*d*s, backward 6*B*H*N*d*s (read Q_s, K_s, Q_t, K_t; write dQ_s, dK_s)
    floor = max(bytes / HBM, FLOP / tensor-core peak, exps / exp-unit rate)

``design_bound_ms`` (mode ``full``): the bound of fastkd's own kernel design, the *predicted* ``predicted_bound_ms``
of ``benchmarks/results/attention_kl_model_sm90.csv`` (``fastkd bench model``: the kernels' own exponentials,
MMA and bytes at free instruction issue), filled where that file predicts this device (H100/H200), shape
(B, H, d as in ``kernel_model.SHAPES``), N and dtype; empty elsewhere.

Usage:
    python benchmarks/attention_kl.py                 # standard shapes for this device, writes the CSV + plot
    python benchmarks/attention_kl.py --quick         # a smoke run (one small shape)
    fastkd bench kernels [same options]
Results: benchmarks/results/attention_kl_<device>.csv and .png (the long schema of benchmarks/_common.py).
CPU timings are relative comparisons only; each row records the 1-minute load average.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PROVIDERS = ("fastkd", "eager", "compile", "flex")
MODES = ("forward", "backward", "full")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
FLEX_CPU = ("FlexAttention on the CPU (torch " + torch.__version__.split("+")[0] + ") has no backward and its "
            "compiled path cannot return the LSE; timed on GPUs only")


def gpu_shapes() -> list[tuple[int, int, int, int]]:
    shapes = [(B, H, N, 64) for B in (64, 256) for H in (6, 12) for N in (197, 577, 785)]
    shapes += [(B, 6, 3137, 64) for B in (64, 256)]  # N=3137 (448 px / 8): eager is skipped where it cannot fit
    return shapes


def cpu_shapes() -> list[tuple[int, int, int, int]]:
    return [(2, 6, N, 64) for N in (197, 577, 785)]


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


def design_bounds(device: torch.device) -> dict[tuple[int, int, int, int, str], float]:
    """(B, H, N, d, dtype) -> the cost model's predicted design bound in ms for this GPU (empty if none)."""
    path = C.RESULTS / "attention_kl_model_sm90.csv"
    if device.type != "cuda" or not path.is_file():
        return {}
    try:
        from kernel_model import SHAPES  # benchmarks/kernel_model.py: the shape its predictions are for
    except ImportError:
        return {}
    name = torch.cuda.get_device_name(device)
    out = {}
    with open(path, newline="") as f:
        model_rows = list(csv.DictReader(f))
    for r in model_rows:
        if r.get("kernel") == "attention_kl total" and r.get("hardware") and r["hardware"] in name:
            key = (SHAPES["B"], SHAPES["H"], int(r["N"]), SHAPES["d"], r["dtype"])
            out[key] = float(r["predicted_bound_ms"])
    return out


def eager_loss(q_s, k_s, q_t, k_t, heads_s=None, heads_t=None):
    """What public ViT KD code does: logits of the selected heads in the input dtype, log_softmax, F.kl_div.

    ``heads_s`` / ``heads_t``: the paired head indices (default: head h with head h).
    """
    if heads_s is not None:
        q_s, k_s, q_t, k_t = q_s[:, heads_s], k_s[:, heads_s], q_t[:, heads_t], k_t[:, heads_t]
    s = (q_s @ k_s.transpose(-1, -2)) * q_s.shape[-1] ** -0.5
    t = (q_t @ k_t.transpose(-1, -2)) * q_t.shape[-1] ** -0.5
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="sum", log_target=True)
    return kl / q_s.shape[0]


def flex_kl_rows(q_s, k_s, q_t, k_t, flex=None):
    """KL(P_t || P_s) of every query row, ``[B, H, N]`` fp32, from two FlexAttention calls (``flex``: compiled)."""
    from torch.nn.attention.flex_attention import AuxRequest
    from torch.nn.attention.flex_attention import flex_attention

    flex = flex or flex_attention
    d = q_s.shape[-1]
    scale_s, scale_t = q_s.shape[-1] ** -0.5, q_t.shape[-1] ** -0.5
    out, aux_t = flex(q_t, k_t, torch.cat([k_t, k_s], dim=-1), scale=scale_t, return_aux=AuxRequest(lse=True))
    _, aux_s = flex(q_s, k_s, k_s, scale=scale_s, return_aux=AuxRequest(lse=True))
    pt_t = scale_t * (q_t.float() * out[..., :d].float()).sum(-1)  # sum_j P_t,ij t_ij
    pt_s = scale_s * (q_s.float() * out[..., d:].float()).sum(-1)  # sum_j P_t,ij s_ij
    return pt_t - pt_s - aux_t.lse + aux_s.lse


def flex_loss(q_s, k_s, q_t, k_t, flex=None):
    """The exact attention-KL (batchmean) through FlexAttention."""
    return flex_kl_rows(q_s, k_s, q_t, k_t, flex).sum() / q_s.shape[0]


def make_fn(provider: str):
    """A fresh loss function for one configuration (``compile``/``flex``: compiled from scratch)."""
    if provider == "fastkd":
        from fastkd.functional import attention_kl

        return lambda q_s, k_s, q_t, k_t: attention_kl(q_s, k_s, q_t, k_t, reduction="batchmean")
    if provider == "eager":
        return eager_loss
    if provider == "compile":
        torch._dynamo.reset()
        return torch.compile(lambda *a: eager_loss(*a), dynamic=False)
    if provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q_s, k_s, q_t, k_t: flex_loss(q_s, k_s, q_t, k_t, flex=compiled)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def not_applicable(provider: str, device: torch.device) -> str:
    """Why ``provider`` cannot run on ``device`` ("" when it can)."""
    return FLEX_CPU if provider == "flex" and device.type != "cuda" else ""


def measure(provider: str, B: int, H: int, N: int, d: int, dtype_name: str, device: torch.device,
            rep_ms: float) -> dict:
    """Time every mode of one provider at one shape; peak extra memory of one forward+backward."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd():
        return torch.randn(B, H, N, d, device=device, dtype=dtype, generator=gen)

    q_s, k_s, q_t, k_t = rnd().requires_grad_(), rnd().requires_grad_(), rnd(), rnd()
    fn = make_fn(provider)

    def zero_grads():
        q_s.grad = k_s.grad = None

    fn(q_s, k_s, q_t, k_t).backward()  # compiles / warms up
    zero_grads()
    with C.PeakMemory(device) as mem:
        fn(q_s, k_s, q_t, k_t).backward()
    zero_grads()

    holder = {}

    def forward_then_zero():
        zero_grads()
        holder["loss"] = fn(q_s, k_s, q_t, k_t)

    times = {
        "forward": C.time_fn(lambda: fn(q_s, k_s, q_t, k_t), device, rep_ms=rep_ms),
        "backward": C.time_fn(lambda: holder["loss"].backward(), device, setup=forward_then_zero, rep_ms=rep_ms),
        "full": C.time_fn(lambda: fn(q_s, k_s, q_t, k_t).backward(), device, setup=zero_grads, rep_ms=rep_ms),
    }
    return {"peak_mib": mem.extra_mib, "times": {m: list(t) for m, t in times.items()}}


def fits(provider: str, B: int, H: int, N: int, device: torch.device) -> bool:
    """Whether a materializing provider can hold its maps (two fp32 maps + autograd copies: ~6 maps)."""
    if provider in ("fastkd", "flex"):
        return True
    need = 6 * B * H * N * N * 4
    if device.type == "cuda":
        return need < 0.8 * torch.cuda.get_device_properties(device).total_memory
    return need < 4 * 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {','.join(PROVIDERS)}")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16,fp32,fp16")
    p.add_argument("--shapes", default=None, help="B,H,N,d;B,H,N,d;... (default: the standard set for the device)")
    p.add_argument("--quick", action="store_true", help="one small shape, fastkd and eager only (smoke run)")
    p.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (default 300 GPU, 1000 CPU)")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/attention_kl_<device>.csv)")
    p.add_argument("--no-plot", action="store_true")
    C.add_force_dirty(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _print(provider, dtype_name, B, H, N, text):
    print(f"{provider:<8} {dtype_name:<5} {B:>4} {H:>3} {N:>5} {text}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["provider"], *spec["shape"], spec["dtype"], device, spec["rep_ms"])))
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
        try:
            shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
        except ValueError:
            raise SystemExit(f"--shapes: {args.shapes!r} is not B,H,N,d;B,H,N,d;... (integers)") from None
        if any(len(s) != 4 for s in shapes):
            raise SystemExit(f"--shapes: {args.shapes!r}: every shape needs four integers B,H,N,d")
    elif args.quick:
        shapes, providers, dtypes = [(2, 6, 197, 64)], [p for p in providers if p in ("fastkd", "eager")], dtypes[:1]
    else:
        shapes = gpu_shapes() if device.type == "cuda" else cpu_shapes()
    rep_ms = args.rep_ms or (300.0 if device.type == "cuda" else 1000.0)
    out = Path(args.out) if args.out else C.RESULTS / f"attention_kl_{C.device_slug(device)}.csv"
    C.check_output(out, args.force_dirty)
    peaks = C.peaks_for(device)
    bounds = design_bounds(device)
    env = C.stamp(device)
    rows: list[dict] = []
    print(f"attention_kl benchmark on {env['device']} / {env['cpu_model']} (torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']})")
    print("{:<8} {:<5} {:>4} {:>3} {:>5} {:<8} {:>10} {:>9} {:>7}".format(
        "provider", "dtype", "B", "H", "N", "mode", "p50 ms", "peak MiB", "floor"))
    for dtype_name in dtypes:
        for B, H, N, d in shapes:
            costs = model(B, H, N, d, DTYPES[dtype_name].itemsize)
            for provider in providers:
                config = {"B": B, "H": H, "N": N, "d": d, "dtype": dtype_name}
                base = dict(benchmark="attention_kl", op="attention_kl", provider=provider)
                reason = not_applicable(provider, device)
                if not reason and not fits(provider, B, H, N, device):
                    reason = "the materialized maps do not fit in memory"
                res = {}
                if not reason:
                    spec = {"provider": provider, "shape": [B, H, N, d], "dtype": dtype_name, "rep_ms": rep_ms}
                    if device.type == "cuda":
                        try:
                            res = measure(provider, B, H, N, d, dtype_name, device, rep_ms)
                        except torch.cuda.OutOfMemoryError:
                            res = {"error": "out of memory"}
                            torch.cuda.empty_cache()
                    else:
                        res = C.run_child(__file__, spec)
                if reason or "error" in res:
                    status = "not_applicable" if reason else "error"
                    new_rows = [C.row(env, **base, mode="full", config=config, status=status,
                                      note=reason or res["error"])]
                    _print(provider, dtype_name, B, H, N, f"{status}: {reason or res['error']}")
                else:
                    new_rows = []
                    for mode in MODES:
                        t = C.Timing(*res["times"][mode])
                        fl, bound = floor_ms(costs[mode], peaks)
                        cfg = {**config, "model_flops": costs[mode]["flops"], "model_bytes": costs[mode]["bytes"],
                               "model_exps": costs[mode]["exp"]}
                        design = bounds.get((B, H, N, d, dtype_name), "") if mode == "full" else ""
                        new_rows.append(C.row(env, **base, mode=mode, config=cfg, metric="time", unit="ms", value=t,
                                              floor_ms="" if fl is None else round(fl, 5), floor_bound=bound,
                                              design_bound_ms=design))
                        frac = "" if fl is None else f"{fl / t.p50:6.1%}"
                        _print(provider, dtype_name, B, H, N, f"{mode:<8} {t.p50:>10.3f} {res['peak_mib']:>9.1f} "
                               f"{frac:>7}")
                    new_rows.append(C.row(env, **base, mode="full", config=config, metric="peak_extra_memory",
                                          unit="MiB", value=res["peak_mib"]))
                # written as it goes, so a run cut short (a time limit) keeps what it measured
                C.write_rows(out, new_rows, append=bool(rows))
                rows += new_rows
    print(f"wrote {out}")
    if not args.no_plot and any(r["metric"] == "time" for r in rows):
        try:
            plot(out, out.with_suffix(".png"))
            print(f"wrote {out.with_suffix('.png')}")
        except ImportError:
            print("matplotlib is not installed: no plot (the CSV has every number)", file=sys.stderr)
    return 0


def plot(csv_path: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in C.read_rows(csv_path) if r["metric"] == "time" and r["mode"] == "full"]
    for r in rows:
        r.update(dtype=r["cfg"]["dtype"], B=r["cfg"]["B"], H=r["cfg"]["H"], N=r["cfg"]["N"], p50_ms=float(r["p50"]))
    full = rows
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
    fig.suptitle(f"attention_kl on {rows[0]['device']} / {rows[0]['cpu_model']}, commit {rows[0]['commit']} "
                 f"({rows[0]['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
