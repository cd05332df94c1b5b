"""Predicted kernel times from the compiled code, without a GPU (``fastkd bench model``).

Every figure this script writes is *predicted*: it compiles the Triton kernels for sm_90 (and sm_80 / sm_100
where the installed Triton can) exactly as the launchers specialise them at run time, reads the cubins with the
``cuobjdump`` / ``nvdisasm`` bundled with Triton, and feeds the counts into an explicit timing model.

How "as at run time" is obtained: a stub Triton driver reports a CUDA target, and the real launchers
(``attention_kl_forward`` / ``attention_kl_backward`` / head importance) are called on CPU tensors laid out like
timm's fused ``qkv`` projection (``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``), with every launch turned
into a warm-up (compile, no run). Stride values, 16-byte divisibility and the launchers' block choices are then
the ones a GPU run would see.

From the SASS, per kernel: registers, local-memory spills (``STL``/``LDL``), shared memory, blocks per SM, and
for the innermost loops (a backward branch closes each): warp-instructions, ``MUFU.EX2`` (exponentials) and
tensor-core instructions per (row, key) element.

Timing model (per kernel, at the launch's grid scaled to the benchmark batch):

    per SM     : the busiest SM runs ceil(CTAs / SMs) CTAs
    issue      : warp-instructions per SM / (4 schedulers x clock)       (loop bodies x trips + straight code)
    exp unit   : MUFU.EX2 lanes per SM / (16 per clock x clock)
    tensor     : MMA FLOP per SM / (dense peak / SMs)
    memory     : HBM bytes (each input read once, outputs written once; re-reads of K tiles hit L2) / bandwidth
    predicted  = max(issue, exp, tensor, memory) + launch overhead
    (fused backward, default: the fp32 dQ scratch is read and written in L2 by consecutive key blocks of one head,
    which run at the same time; it is counted as one fp32 write-back to HBM, plus the zeroed int32 tickets. The
    waits of the key-block ordering are NOT modelled (no stall model): a program that finds its ticket not yet
    turned idles, which the model does not see. Its spin loops are counted as one pass per row block.
    deterministic=False: the fp32 dQ buffer's zero fill, read and cast are HBM traffic; the atomics themselves
    are counted as issued instructions, their L2 throughput is not modelled)
    bound      = max(exp, tensor, memory)  -- the design's own bound: its own exps, MMA and bytes, free issue

The floor is PERFORMANCE.md's (``benchmarks/attention_kl.py``: 4 exponentials per element for forward +
backward, unpadded). The model assumes latency is hidden (no stall model): it is optimistic for kernels with
few warps per scheduler. Its error is recorded in benchmarks/NOTES.md once a GPU run exists.

Usage:
    python benchmarks/kernel_model.py                  # writes benchmarks/results/attention_kl_model_sm90.csv
    python benchmarks/kernel_model.py --arch 80 --arch 100 --no-csv     # compile report for other targets
    fastkd bench model [same options]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the checkout this script belongs to, ahead of any installed fastkd (an editable install of another worktree would
# otherwise be the one compiled, while the CSV is stamped with this checkout's commit)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import _common as C  # noqa: E402

# Hardware constants. Sources:
#  [1] NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): H100 SXM5 132 SMs, 4 warp schedulers per SM
#      (1 warp-instruction/clock each), 989 TFLOP/s dense bf16/fp16, 3.35 TB/s HBM3. 989e12 / (132 SMs x
#      4096 FLOP/clock/SM) gives the 1.83 GHz clock used here.
#  [2] NVIDIA H200 datasheet (2024): same GH100 SMs and tensor-core peak, 4.8 TB/s HBM3e.
#  [3] CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table, compute capability 8.x/9.0:
#      16 results/clock/SM for ex2 (MUFU); "Features and Technical Specifications": 64K registers/SM,
#      228 KB shared memory/SM (227 KB per block) on 9.0, 164 KB (163 KB per block) on 8.0, 2048 threads/SM,
#      32 blocks/SM.
#  [4] NVIDIA A100 whitepaper (2020): 108 SMs, 1.41 GHz boost, 312 TFLOP/s dense bf16, 2.04 TB/s (80 GB SXM).
#  Launch overhead: an assumption (a few microseconds per kernel launch on an idle stream), not a measurement.
HARDWARE = {
    "H100": dict(arch=90, sms=132, clock=1.83e9, flops=C.PEAKS["H100"]["flops"], bytes=C.PEAKS["H100"]["bytes"],
                 regs=65536, smem=228 * 1024, smem_block=227 * 1024, threads=2048, blocks=32),
    "H200": dict(arch=90, sms=132, clock=1.83e9, flops=C.PEAKS["H200"]["flops"], bytes=C.PEAKS["H200"]["bytes"],
                 regs=65536, smem=228 * 1024, smem_block=227 * 1024, threads=2048, blocks=32),
    "A100": dict(arch=80, sms=108, clock=1.41e9, flops=312e12, bytes=2.04e12,
                 regs=65536, smem=164 * 1024, smem_block=163 * 1024, threads=2048, blocks=32),
}  # fmt: skip
SCHEDULERS = 4  # warp-instructions issued per clock per SM [1]
EXP_PER_CLOCK = 16  # MUFU.EX2 lanes per clock per SM [3]
LAUNCH_S = 4e-6  # per kernel launch (assumption)
SHAPES = dict(B=256, H=6, d=64, N=(197, 577, 785, 3137))
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------ compile as the launchers do


class Launch:
    """One kernel launch as the launcher made it (compiled, not run). Plain classes here: the script is also
    loaded by path (``fastkd bench``), where dataclasses cannot resolve their module."""

    def __init__(self, name: str, kernel, grid: tuple[int, ...], constexprs: dict, num_warps: int):
        self.name, self.kernel, self.grid, self.constexprs, self.num_warps = name, kernel, grid, constexprs, num_warps


class _StubDriver:
    """Reports a CUDA target to Triton's JIT so that it compiles for it; never launches anything."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # Triton caches compiled kernels per device: one "device" per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compiling_for(arch: int):
    """Within the block, kernel launches compile for ``sm_<arch>`` instead of running; yields the list of launches."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("compiling_for: unset TRITON_INTERPRET (the interpreter replaces the compiled kernels)")
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        launches.append(Launch(self.fn.__name__, kernel, tuple(grid), consts, kwargs.get("num_warps", 4)))
        return kernel

    previous = driver._active
    driver.set_active(_StubDriver(arch))
    JITFunction.run = compile_only
    try:
        yield launches
    finally:
        JITFunction.run = original
        driver._active = previous


def timm_qk(B: int, H: int, N: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of one ``[B, N, 3, H, d]`` qkv projection, as timm's Attention makes them."""
    qkv = torch.empty(B, N, 3, H, d, dtype=dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention_kl_launches(arch: int, N: int, dtype: str, H: int = 6, d: int = 64, B: int = 2, reverse: bool = False,
                          given_lse: bool = False, deterministic: bool = True, fused: bool = True) -> list[Launch]:
    """Compile forward + backward of attention_kl as one training step launches them (all heads, all rows)."""
    from fastkd.kernels import attention_kl as K

    dt = TORCH_DTYPES[dtype]
    q_s, k_s, _ = timm_qk(B, H, N, d, dt)
    q_t, k_t, _ = timm_qk(B, H, N, d, dt)
    pairs = torch.stack([torch.arange(H), torch.arange(H)], 1)
    rows = torch.arange(N)
    lse = torch.empty(B, H, N) if given_lse else None
    scale = d**-0.5
    with compiling_for(arch) as launches:
        kl, ls, lt = K.attention_kl_forward(q_s, k_s, q_t, k_t, pairs, rows, None, scale, scale, reverse, lse, lse)
        K.attention_kl_backward(torch.empty(B, H, N), q_s, k_s, q_t, k_t, pairs, rows, None, scale, scale, reverse,
                                ls, lt, kl, deterministic=deterministic, fused=fused)
    return launches


def head_importance_launches(arch: int, N: int, dtype: str, score: str, H: int = 6, d: int = 64, B: int = 2,
                             given_lse: bool = True) -> list[Launch]:
    """Compile one head-importance statistic (``attribution`` or ``entropy``) as its launcher specialises it."""
    from fastkd.kernels import head_importance as HI

    q, k, v = timm_qk(B, H, N, d, TORCH_DTYPES[dtype])
    lse = torch.empty(B, H, N) if given_lse else None
    with compiling_for(arch) as launches:
        if score == "attribution":
            HI.attribution_rows(q, k, v, torch.empty(B, H, N, d, dtype=q.dtype), d**-0.5, lse)
        else:
            HI.entropy_rows(q, k, d**-0.5, lse)
    return launches


# ------------------------------------------------------------------------------------------- reading SASS


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


class Sass:
    """Counts read from one cubin. ``loops``: the innermost loops, each {"instr", "mufu_ex2", "mma", "mma_flops"}
    per warp and trip; ``straight``: the same counts for everything outside them."""

    def __init__(self, regs: int, local_bytes: int, spill_instr: int, static_shared: int, loops: list[dict],
                 straight: dict, text: str = ""):
        self.regs, self.local_bytes, self.spill_instr = regs, local_bytes, spill_instr
        self.static_shared = static_shared
        self.loops, self.straight, self.text = loops, straight, text


_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_MMA = re.compile(r"\b(HGMMA|HMMA|UTCHMMA|UTCQMMA|UTCMMA)\.(\d+)x(\d+)x(\d+)")
_MMA_SM80 = re.compile(r"\bHMMA\.168(\d+)")  # HMMA.16816 / HMMA.1688: m16 n8 k16 / k8 per warp


def _mma_flops(op: str) -> tuple[int, int]:
    """(MMA instructions, FLOP per warp) of one SASS instruction. HGMMA mXnYkZ is per warpgroup: a quarter each."""
    m = _MMA.search(op)
    if m:
        kind, a, b, c = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        per = 4 if kind == "HGMMA" else 1
        return 1, 2 * a * b * c // per
    m = _MMA_SM80.search(op)
    if m:
        return 1, 2 * 16 * 8 * int(m.group(1))
    return 0, 0


def _count(ops: list[str]) -> dict:
    out = {"instr": 0, "mufu_ex2": 0, "mma": 0, "mma_flops": 0}
    for op in ops:
        if op.startswith("NOP"):
            continue
        out["instr"] += 1
        out["mufu_ex2"] += "MUFU.EX2" in op
        n, f = _mma_flops(op)
        out["mma"] += n
        out["mma_flops"] += f
    return out


_SASS_CACHE: dict[bytes, Sass] = {}


def read_sass(cubin: bytes) -> Sass:
    """Counts of one cubin (cached: the same binary serves every N)."""
    key = hashlib.sha1(cubin).digest()
    if key not in _SASS_CACHE:
        _SASS_CACHE[key] = _read_sass(cubin)
    return _SASS_CACHE[key]


def _read_sass(cubin: bytes) -> Sass:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        text = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res.stdout))
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    ops = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _INSTR.match(line))]
    spans = []  # (label line, branch line) of each backward branch
    for i, op in ops:
        m = re.search(r"BRA\s+`?\((\.L_x_\d+)\)", op)
        if m and labels.get(m.group(1), i + 1) < i:
            spans.append((labels[m.group(1)], i))
    spans = [(lo, hi) for lo, hi in spans if sum(1 for i, _ in ops if lo < i <= hi) > 1]  # a lone BRA is a trap
    # a spin-wait (a short loop around an atomic compare-and-swap: the fused backward's ticket) is not a tile loop;
    # its body counts once, inside the loop around it (no wait modelled)
    spans = [(lo, hi) for lo, hi in spans
             if not (any("ATOMG" in op and ".CAS" in op for i, op in ops if lo < i <= hi)
                     and sum(1 for i, _ in ops if lo < i <= hi) < 40)]
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    in_loop = set()
    loops = []
    for lo, hi in sorted(inner):
        body = [op for i, op in ops if lo < i <= hi]
        in_loop.update(i for i, _ in ops if lo < i <= hi)
        loops.append(_count(body))
    straight = _count([op for i, op in ops if i not in in_loop])
    spill = sum(1 for _, op in ops if re.match(r"(@!?U?P\w+\s+)?(STL|LDL)\b", op))
    return Sass(int(usage.get("REG", 0)), int(usage.get("LOCAL", 0)), spill, int(usage.get("SHARED", 0)), loops,
                straight, text)


# ---------------------------------------------------------------------------------------------- the model


def blocks_per_sm(regs: int, shared: int, warps: int, hw: dict) -> int:
    threads = 32 * warps
    by_regs = hw["regs"] // max(1, regs * threads)
    by_smem = hw["smem"] // shared if shared else hw["blocks"]
    return max(0, min(by_regs, by_smem, hw["threads"] // threads, hw["blocks"]))


# How each kernel walks its tiles: the dimension its loop streams over and whether the last, partial tile is
# peeled out of the loop (then the loop runs over full tiles only, the tail is straight-line code).
STREAMS = {
    "_attention_kl_fwd_kernel": ("keys", True),
    "_attention_kl_bwd_dq_kernel": ("keys", True),
    "_attention_kl_bwd_dk_kernel": ("rows", True),
    "_attention_kl_bwd_kernel": ("rows", True),
    "_head_importance_kernel": ("keys", True),
}


def _tile_of(launch: Launch) -> tuple[int, int]:
    c = launch.constexprs
    return int(c["BLOCK_M"]), int(c["BLOCK_N"])


def analyse(launch: Launch, sass: Sass, N: int, R: int) -> dict:
    """Per-launch counts: instructions, exps, MMA FLOP per CTA, per (row, key) element of the inner loops.

    The fused backward's programs take one of two branches, each with its own row loop: a full key block, or the
    narrow remainder block (program S-1 when N % BLOCK_N != 0). Its per-CTA counts are the average over its S
    programs, the per-element counts those of the full-block loop (the loop with the most MMA work); the
    straight-line code of both branches is counted for every program (a small over-count)."""
    bm, bn = _tile_of(launch)
    stream, peeled = STREAMS[launch.name]
    length, block = (N, bn) if stream == "keys" else (R, bm)
    trips = length // block if peeled else -(-length // block)
    w = launch.num_warps
    per_cta = dict(sass.straight)
    loops = sass.loops
    tail_keys = int(launch.constexprs.get("BLOCK_T", 0)) if launch.name == "_attention_kl_bwd_kernel" else 0
    if tail_keys and len(loops) == 2:
        main, tail = sorted(loops, key=lambda x: (x["mma_flops"], x["instr"]), reverse=True)
        S = launch.grid[0]
        for k in per_cta:
            per_cta[k] += (main[k] * (S - 1) + tail[k]) * trips / S
        loops = [main]
    else:
        for loop in loops:
            for k in per_cta:
                per_cta[k] += loop[k] * trips
    elems = bm * bn
    loop_instr = sum(loop["instr"] for loop in loops)
    loop_exp = sum(loop["mufu_ex2"] for loop in loops)
    loop_mma = sum(loop["mma"] for loop in loops)
    return {
        "warps": w, "block_m": bm, "block_n": bn, "trips": trips,
        "loop_instr_per_tile": loop_instr,
        "instr_per_elem": loop_instr * w / elems,
        "exp_per_elem": loop_exp * w * 32 / elems,
        "mma_per_elem": loop_mma * w / elems,
        "cta_instr": per_cta["instr"] * w, "cta_exp": per_cta["mufu_ex2"] * w * 32,
        "cta_flops": per_cta["mma_flops"] * w,
    }  # fmt: skip


def predict(launch: Launch, counts: dict, hw: dict, batch_scale: float, hbm_bytes: float, occupancy: int) -> dict:
    """Seconds per bound for one launch (grid's batch dimension scaled by ``batch_scale``)."""
    ctas = math.prod(launch.grid[:1]) * math.ceil(math.prod(launch.grid[1:]) * batch_scale)
    per_sm = -(-ctas // hw["sms"])
    parts = {
        "issue": per_sm * counts["cta_instr"] / (SCHEDULERS * hw["clock"]),
        "exp": per_sm * counts["cta_exp"] / (EXP_PER_CLOCK * hw["clock"]),
        "tensor": per_sm * counts["cta_flops"] / (hw["flops"] / hw["sms"]),
        "memory": hbm_bytes / hw["bytes"],
    }
    if occupancy == 0:
        parts["issue"] = math.inf  # does not fit on an SM
    bound = max(parts["exp"], parts["tensor"], parts["memory"])
    return {"s": max(parts.values()) + LAUNCH_S, "bound_s": bound + LAUNCH_S, "limiter": max(parts, key=parts.get),
            "ctas": ctas, "waves": ctas / (hw["sms"] * max(occupancy, 1)), **{f"{k}_s": v for k, v in parts.items()}}


def _attention_kl_bytes(launch: Launch, B: int, H: int, N: int, d: int, elt: int) -> float:
    tensor = B * H * N * d * elt
    rows = B * H * N * 4
    if "fwd" in launch.name:
        return 4 * tensor + 3 * rows
    fp32 = B * H * N * d * 4
    if launch.name == "_attention_kl_bwd_kernel":  # fused: inputs, row statistics and grad, dq and dk written
        if launch.constexprs.get("ATOMIC"):  # + the fp32 dQ buffer: zero fill, read and cast (atomics stay in L2)
            return 4 * tensor + 4 * rows + 3 * fp32 + tensor + tensor
        tickets = B * H * -(-N // int(launch.constexprs["BLOCK_M"])) * 4  # zeroed int32, one per row block
        scratch = fp32 if launch.grid[0] > 1 else 0  # one write-back of the fp32 dQ scratch; its reads hit L2
        return 4 * tensor + 4 * rows + 2 * tensor + scratch + tickets
    return 4 * tensor + 4 * rows + tensor  # inputs + saved row statistics and grad, one of dq / dk written


def floor_and_design(B: int, H: int, N: int, d: int, elt: int, hw_name: str) -> tuple[float, str]:
    """PERFORMANCE.md's floor for forward + backward (via benchmarks/attention_kl.py's model)."""
    import attention_kl as AK  # benchmarks/attention_kl.py

    peaks = dict(C.PEAKS[hw_name])
    fl, bound = AK.floor_ms(AK.model(B, H, N, d, elt)["full"], peaks)
    return fl, bound


def is_tail(launch: Launch) -> bool:
    """A launch for the remainder of the program dimension (narrow block), not the main grid."""
    return bool(launch.constexprs.get("ROW_TAIL") or launch.constexprs.get("OWN_TAIL"))


def _report_row(launch: Launch, sass: Sass, counts: dict, hw: dict, occ: int) -> dict:
    return {
        "kernel": launch.name + (" (tail launch)" if is_tail(launch) else ""), "regs": sass.regs,
        "spill_bytes": sass.local_bytes, "spill_instr": sass.spill_instr,
        "shared_bytes": launch.kernel.metadata.shared, "blocks_per_sm": occ, "warps": counts["warps"],
        "block_m": counts["block_m"], "block_n": counts["block_n"],
        "loop_instr_per_tile": counts["loop_instr_per_tile"], "instr_per_elem": round(counts["instr_per_elem"], 3),
        "exp_per_elem": round(counts["exp_per_elem"], 3), "mma_per_elem": round(counts["mma_per_elem"], 4),
    }  # fmt: skip


# the backward launcher's options: (deterministic, fused, suffix of the CSV's "attention_kl total" row)
VARIANTS = (
    (True, True, ""),  # the default: fused backward, dQ summed in key-block order
    (False, True, " (deterministic=False: fused backward, dQ atomics)"),
    (True, False, " (fused=False: two-kernel backward)"),
)


def model_attention_kl(hw_name: str, dtypes: list[str], shapes: dict = SHAPES, verbose: bool = True) -> list[dict]:
    """One CSV row per (kernel, N, dtype) plus a ``total`` row per (N, dtype) with the floor."""
    hw = HARDWARE[hw_name]
    B, H, d = shapes["B"], shapes["H"], shapes["d"]
    rows = []
    for dtype in dtypes:
        elt = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        for N, (deterministic, fused, variant) in ((n, v) for n in shapes["N"] for v in VARIANTS):
            launches = attention_kl_launches(hw["arch"], N, dtype, H=H, d=d, deterministic=deterministic, fused=fused)
            cache: dict[int, Sass] = {}
            fwd = bwd = 0.0
            fwd_b = bwd_b = 0.0
            ipe = 0.0
            for launch in launches:
                sass = cache.setdefault(id(launch.kernel), read_sass(launch.kernel.asm["cubin"]))
                counts = analyse(launch, sass, N, N)
                occ = blocks_per_sm(sass.regs, launch.kernel.metadata.shared, launch.num_warps, hw)
                hbm = 0.0 if is_tail(launch) else _attention_kl_bytes(launch, B, H, N, d, elt)  # once per op
                pred = predict(launch, counts, hw, B / 2, hbm, occ)
                row = {"N": N, "dtype": dtype, **_report_row(launch, sass, counts, hw, occ)}
                row["kernel"] += " (dQ atomics)" if launch.constexprs.get("ATOMIC") else ""
                ms = pred["s"] * 1e3
                row.update({
                    "predicted_ms_fwd": round(ms, 5) if "fwd" in launch.name else "",
                    "predicted_ms_bwd": round(ms, 5) if "fwd" not in launch.name else "",
                    "predicted_ms_total": round(ms, 5), "predicted_bound_ms": round(pred["bound_s"] * 1e3, 5),
                    "predicted_limiter": pred["limiter"], "ctas": pred["ctas"], "waves": round(pred["waves"], 2),
                })  # fmt: skip
                rows.append(row)
                ipe += 0.0 if is_tail(launch) else counts["instr_per_elem"]
                if "fwd" in launch.name:
                    fwd, fwd_b = fwd + pred["s"], fwd_b + pred["bound_s"]
                else:
                    bwd, bwd_b = bwd + pred["s"], bwd_b + pred["bound_s"]
            floor, floor_bound = floor_and_design(B, H, N, d, elt, hw_name)
            total = (fwd + bwd) * 1e3
            rows.append({
                "kernel": "attention_kl total" + variant, "N": N, "dtype": dtype, "instr_per_elem": round(ipe, 3),
                "predicted_ms_fwd": round(fwd * 1e3, 5), "predicted_ms_bwd": round(bwd * 1e3, 5),
                "predicted_ms_total": round(total, 5), "predicted_bound_ms": round((fwd_b + bwd_b) * 1e3, 5),
                "floor_ms": round(floor, 5), "floor_bound": floor_bound,
                "predicted_fraction_of_floor": round(floor / total, 4),
                "predicted_bound_fraction_of_floor": round(floor / ((fwd_b + bwd_b) * 1e3), 4),
            })  # fmt: skip
            if verbose:
                r = rows[-1]
                print(f"[predicted {hw_name}] attention_kl{variant} N={N} {dtype}: fwd {r['predicted_ms_fwd']:.4f} ms, "
                      f"bwd {r['predicted_ms_bwd']:.4f} ms, total {r['predicted_ms_total']:.4f} ms; floor "
                      f"{r['floor_ms']:.4f} ms ({floor_bound}); {r['predicted_fraction_of_floor']:.0%} of floor; "
                      f"{r['instr_per_elem']:.2f} warp-instr/elem", flush=True)
    return rows


def model_head_importance(hw_name: str, dtypes: list[str], shapes: dict = SHAPES, verbose: bool = True) -> list[dict]:
    """Attribution (given LSE) and entropy (no LSE): predicted time and their own floor (exp / MMA / bytes)."""
    hw = HARDWARE[hw_name]
    B, H, d = shapes["B"], shapes["H"], shapes["d"]
    rows = []
    for dtype in dtypes:
        elt = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        for score, given in (("attribution", True), ("entropy", False)):
            for N in shapes["N"]:
                tensor = B * H * N * d * elt
                n_in = 4 if score == "attribution" else 2
                E = B * H * N * N
                floor_parts = {  # one exponential and one or two QK^T-sized products per element
                    "memory": (n_in * tensor + B * H * N * 4) / hw["bytes"],
                    "exp unit": E / (EXP_PER_CLOCK * hw["sms"] * hw["clock"]),
                    "tensor cores": (4 if score == "attribution" else 2) * E * d / hw["flops"],
                }
                floor_bound = max(floor_parts, key=floor_parts.get)
                floor = floor_parts[floor_bound] * 1e3
                total = bound = 0.0
                for launch in head_importance_launches(hw["arch"], N, dtype, score, H=H, d=d, given_lse=given):
                    sass = read_sass(launch.kernel.asm["cubin"])
                    counts = analyse(launch, sass, N, N)
                    occ = blocks_per_sm(sass.regs, launch.kernel.metadata.shared, launch.num_warps, hw)
                    share = 0.0 if is_tail(launch) else 1.0  # HBM traffic counted once, on the main launch
                    pred = predict(launch, counts, hw, B / 2, share * (n_in * tensor + B * H * N * 4), occ)
                    total, bound = total + pred["s"] * 1e3, bound + pred["bound_s"] * 1e3
                    rows.append({
                        **_report_row(launch, sass, counts, hw, occ), "N": N, "dtype": dtype,
                        "kernel": f"head_importance {score}" + (" (tail launch)" if is_tail(launch) else ""),
                        "predicted_ms_fwd": round(pred["s"] * 1e3, 5), "predicted_ms_bwd": "",
                        "predicted_ms_total": round(pred["s"] * 1e3, 5),
                        "predicted_bound_ms": round(pred["bound_s"] * 1e3, 5), "predicted_limiter": pred["limiter"],
                        "ctas": pred["ctas"], "waves": round(pred["waves"], 2),
                    })  # fmt: skip
                rows.append({
                    "kernel": f"head_importance {score} total", "N": N, "dtype": dtype,
                    "predicted_ms_fwd": round(total, 5), "predicted_ms_bwd": "", "predicted_ms_total": round(total, 5),
                    "predicted_bound_ms": round(bound, 5), "floor_ms": round(floor, 5), "floor_bound": floor_bound,
                    "predicted_fraction_of_floor": round(floor / total, 4),
                    "predicted_bound_fraction_of_floor": round(floor / bound, 4),
                })  # fmt: skip
                if verbose:
                    print(f"[predicted {hw_name}] head_importance {score} N={N} {dtype}: {total:.4f} ms, "
                          f"{floor / total:.0%} of floor", flush=True)
    return rows


def compile_report(arch: int, dtypes: list[str], N: int = 197) -> list[dict]:
    """Registers / spills / shared memory / per-element counts of every kernel for one architecture."""
    hw = next((h for h in HARDWARE.values() if h["arch"] == arch), HARDWARE["H100"])
    out = []
    for dtype in dtypes:
        launches = attention_kl_launches(arch, N, dtype) + attention_kl_launches(arch, N, dtype, reverse=True)
        launches += head_importance_launches(arch, N, dtype, "attribution")
        launches += head_importance_launches(arch, N, dtype, "entropy", given_lse=False)
        seen = set()
        for launch in launches:
            if id(launch.kernel) in seen:
                continue
            seen.add(id(launch.kernel))
            sass = read_sass(launch.kernel.asm["cubin"])
            counts = analyse(launch, sass, N, N)
            occ = blocks_per_sm(sass.regs, launch.kernel.metadata.shared, launch.num_warps, hw)
            out.append({"arch": f"sm_{arch}", "dtype": dtype, **_report_row(launch, sass, counts, hw, occ)})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("--hardware", default="H100", choices=sorted(k for k, v in HARDWARE.items() if v["arch"] == 90),
                   help="constants for the timing model (default H100; the CSV holds H100 and H200 rows)")
    p.add_argument("--dtype", action="append", choices=sorted(TORCH_DTYPES), help="default: bf16 and fp16")
    p.add_argument("--N", type=int, action="append", help="token counts (default 197 577 785 3137)")
    p.add_argument("--arch", type=int, action="append", default=[],
                   help="also print a compile report for sm_<arch> (80, 100)")
    p.add_argument("--no-csv", action="store_true", help="print only")
    p.add_argument("--out", type=Path, default=C.RESULTS / "attention_kl_model_sm90.csv")
    p.add_argument("--force-dirty", action="store_true", help="write into results/ from an uncommitted tree")
    return p


def _child_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, __file__, *argv], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        return _child_without_interpreter(argv)  # the kernels must be compiled, not interpreted
    if not args.no_csv:
        C.check_output(args.out, args.force_dirty)
    dtypes = args.dtype or ["bf16", "fp16"]
    shapes = dict(SHAPES, N=tuple(args.N) if args.N else SHAPES["N"])
    rows = []
    for hw_name in ("H100", "H200"):
        verbose = hw_name == args.hardware
        rows += [{"hardware": hw_name, **r} for r in model_attention_kl(hw_name, dtypes, shapes, verbose)]
        rows += [{"hardware": hw_name, **r} for r in model_head_importance(hw_name, dtypes, shapes, verbose)]
    for arch in args.arch:
        for r in compile_report(arch, dtypes):
            print(f"[compiled] {r}")
    if not args.no_csv:
        env = C.stamp(torch.device("cpu"))
        env["device"] = f"predicted for sm_90 (model constants {', '.join(('H100', 'H200'))}) on {env['device']}"
        path = C.write_csv(args.out, [{**r, "figures": "predicted", **env} for r in rows])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
