"""Compile the attention_kl and head_importance kernels for real GPUs (sm_80, sm_90) without a GPU.

The kernels are compiled exactly as the launchers specialise them at run time (benchmarks/kernel_model.py: a
stub driver reports the CUDA target and the real launchers run on timm-style ``qkv`` views, every launch turned
into a compile-only warm-up), so the shared memory, registers and spills checked here are those of the binary a
GPU would run. The interpreter accepts things the compiler rejects (non-constexpr globals, bad block shapes,
shared memory beyond the hardware limit); Triton's bundled ptxas lets CI catch those here. The compilation runs
in a child process without TRITON_INTERPRET (this test session has the interpreter on).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "benchmarks" / "kernel_model.py"
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block (A100, H100)
ATTENTION_KL = {"_attention_kl_fwd_kernel", "_attention_kl_bwd_kernel"}  # the default: one fused backward
TWO_KERNEL = {"_attention_kl_fwd_kernel", "_attention_kl_bwd_dq_kernel", "_attention_kl_bwd_dk_kernel"}  # fused=False


def _child(code: str, timeout: int = 900) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    prelude = f"import sys, json; sys.path.insert(0, {str(MODEL.parent)!r}); import kernel_model as M\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _launch_call(which: str, arch: int, dtype: str, kw: dict) -> str:
    """The kernel_model call that compiles every launch of one launcher configuration (N=197, d=64)."""
    call = {"attention_kl": "attention_kl_launches", "attribution": "head_importance_launches",
            "entropy": "head_importance_launches"}[which]  # fmt: skip
    extra = "" if which == "attention_kl" else f", {which!r}"
    kwargs = "".join(f", {k}={v!r}" for k, v in kw.items())
    return f"M.{call}({arch}, 197, {dtype!r}{extra}{kwargs})"


def _key(which: str, arch: int, dtype: str, kw: dict) -> str:
    return json.dumps([which, arch, dtype, kw], sort_keys=True)


def compiled_all(configs: list[tuple[str, int, str, dict]]) -> dict:
    """{config key: {kernel name (+ " (tail)"): facts}} of every launch each launcher configuration makes, compiled
    for its sm_<arch> -- all in one child process (one import of torch/Triton/fastkd, and kernels that several
    configurations share are compiled once). A configuration that fails to compile maps to {"error": traceback}."""
    calls = "".join(f"    ({_key(*c)!r}, lambda: {_launch_call(*c)}),\n" for c in configs)
    return _child(f"""
import traceback
results = {{}}
for key, launch in [
{calls}]:
    try:
        out = {{}}
        for l in launch():
            s = M.read_sass(l.kernel.asm["cubin"])
            name = l.name + (" (tail)" if M.is_tail(l) else "")
            out[name] = dict(shared=l.kernel.metadata.shared, asm=sorted(l.kernel.asm), regs=s.regs,
                             spill=s.local_bytes + s.spill_instr, loops=len(s.loops),
                             mma=sum(x["mma"] for x in s.loops), warps=l.num_warps)
        results[key] = out
    except Exception:
        results[key] = {{"error": traceback.format_exc()[-3000:]}}
print(json.dumps(results))
""")


HEAD_IMPORTANCE_CONFIGS = [("attribution", "bf16", 90), ("entropy", "bf16", 90), ("attribution", "fp32", 80)]
ATTENTION_KL_CONFIGS = [
    ("bf16", 90, {}), ("bf16", 90, {"reverse": True}), ("fp16", 80, {}), ("bf16", 80, {}), ("fp32", 90, {}),
    ("bf16", 90, {"given_lse": True}), ("bf16", 90, {"deterministic": False}), ("bf16", 90, {"fused": False}),
    ("fp16", 80, {"fused": False}),
]  # fmt: skip


def _all_configs() -> list[tuple[str, int, str, dict]]:
    head = [(which, arch, dtype, {"given_lse": which == "attribution"}) for which, dtype, arch in
            HEAD_IMPORTANCE_CONFIGS]
    return head + [("attention_kl", arch, dtype, kw) for dtype, arch, kw in ATTENTION_KL_CONFIGS]


@pytest.fixture(scope="module")
def compiled_results() -> dict:
    """Every configuration the tests below check, compiled once for the module."""
    pytest.importorskip("triton")
    return compiled_all(_all_configs())


def compiled(results: dict, which: str, arch: int, dtype: str, **kw) -> dict:
    """One configuration's {kernel name: facts}; fails with the child's traceback if it did not compile."""
    result = results[_key(which, arch, dtype, kw)]
    assert "error" not in result, f"{which} sm_{arch} {dtype} {kw} did not compile:\n{result.get('error')}"
    return result


def _check(result: dict, arch: int, dtype: str) -> None:
    for name, info in result.items():
        assert "ptx" in info["asm"] and "cubin" in info["asm"], f"{name}: no PTX/cubin produced"
        assert 0 < info["shared"] <= SMEM_LIMIT[arch], f"{name}: {info['shared']} bytes of shared memory, sm_{arch}"
        assert info["regs"] * 32 * info["warps"] <= 65536, f"{name}: {info['regs']} registers do not fit"
        assert info["loops"] >= 1, f"{name}: no inner loop found in the SASS"
        if arch == 90 or name.split()[0] in ATTENTION_KL:  # no spills on H100; on sm_80 the two-kernel dK spills
            assert info["spill"] == 0, f"{name}: spills ({info['spill']} bytes / instructions) in {dtype}"
        if dtype != "fp32":
            assert info["mma"] > 0, f"{name}: no tensor-core instruction in the inner loop ({dtype})"


@pytest.mark.parametrize("which, dtype, arch", HEAD_IMPORTANCE_CONFIGS)
def test_head_importance_kernel_compiles_for_gpu(compiled_results, which, dtype, arch):
    result = compiled(compiled_results, which, arch, dtype, given_lse=which == "attribution")
    assert {name.split()[0] for name in result} == {"_head_importance_kernel"}
    _check(result, arch, dtype)


@pytest.mark.parametrize("dtype, arch, kw", ATTENTION_KL_CONFIGS)
def test_kernels_compile_for_gpu(compiled_results, dtype, arch, kw):
    """The default fused backward (and the options' kernels) compiled as launched: registers, shared memory, no
    spills (sm_80's two-kernel dK excepted, NOTES.md), an inner loop with tensor-core instructions."""
    result = compiled(compiled_results, "attention_kl", arch, dtype, **kw)
    assert {name.split()[0] for name in result} == (ATTENTION_KL if kw.get("fused", True) else TWO_KERNEL)
    assert any("tail" in name for name in result), "N=197 must compile the narrow remainder launches too"
    _check(result, arch, dtype)
    print(f"sm_{arch} {dtype} {kw}: " + "; ".join(f"{n}: {i['regs']} regs, {i['spill']} spill, {i['shared']} B smem"
                                               for n, i in result.items()))


def test_bench_model_writes_predicted_csv(tmp_path):
    """`fastkd bench model` at one shape: every row says "predicted", the totals carry the floor."""
    pytest.importorskip("triton")
    out = tmp_path / "model.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "fastkd.cli", "bench", "model", "--N", "197", "--dtype", "bf16",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["figures"] == "predicted" for r in rows)
    totals = [r for r in rows if r["kernel"] == "attention_kl total"]
    assert {r["hardware"] for r in totals} == {"H100", "H200"}
    for r in totals:
        total = float(r["predicted_ms_total"])
        assert total == pytest.approx(float(r["predicted_ms_fwd"]) + float(r["predicted_ms_bwd"]), rel=1e-3)
        assert float(r["predicted_fraction_of_floor"]) == pytest.approx(float(r["floor_ms"]) / total, rel=1e-3)
        assert float(r["floor_ms"]) <= float(r["predicted_bound_ms"]) * 1.0001 <= total * 1.0001
