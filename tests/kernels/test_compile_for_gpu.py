"""Compile the attention_kl and head_importance kernels ahead of time for real GPUs (sm_80, sm_90), without a GPU.

The interpreter accepts things the compiler rejects (non-constexpr globals, bad block shapes, shared
memory beyond the hardware limit); Triton's bundled ptxas lets CI catch those here. The compilation runs
in a child process without TRITON_INTERPRET (this test session has the interpreter on).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block (A100, H100)
KERNELS = {"_attention_kl_fwd_kernel", "_attention_kl_bwd_dq_kernel", "_attention_kl_bwd_dk_kernel"}


def compile_all(dtype: str, arch: int, reverse: bool) -> dict:
    """Compile the three kernels with the launcher's GPU block choice at N=197, d=64; {name: metadata}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import fastkd.kernels.attention_kl as K
    from fastkd.kernels._common import head_block

    def signature(fn, pointer_types, constexprs):
        sig = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in pointer_types:
                sig[name] = pointer_types[name]
            else:  # logit scales are fp32; strides and sizes i32
                sig[name] = "fp32" if name.startswith("scale") else "i32"
        return sig

    block_m, block_n, warps = K.gpu_blocks(197, 197)
    qk = {name: f"*{dtype}" for name in ("QS", "KS", "QT", "KT")}
    qk.update(PAIRS="*i32", ROWS="*i32", MASK="*u8")
    common = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DS=head_block(64), BLOCK_DT=head_block(64), HAS_MASK=True,
        REVERSE=reverse, UPCAST=dtype == "fp32", PRECISION="ieee" if dtype == "fp32" else "tf32",
    )
    stats = dict(LSE_S="*fp32", LSE_T="*fp32", KL="*fp32", GRAD="*fp32")
    kernels = [
        (K._attention_kl_fwd_kernel,
         dict(qk, LSE_A_IN="*fp32", LSE_B_IN="*fp32", KL="*fp32", LSE_S_OUT="*fp32", LSE_T_OUT="*fp32"),
         dict(common, HAS_LSE_A=not reverse, HAS_LSE_B=False)),
        (K._attention_kl_bwd_dq_kernel, dict(qk, **stats, DQ=f"*{dtype}"), dict(common, DIRECT=True)),
        (K._attention_kl_bwd_dk_kernel, dict(qk, **stats, DK="*fp32"), dict(common, DIRECT=False)),
    ]  # fmt: skip
    out = {}
    for fn, pointers, constexprs in kernels:
        src = ASTSource(fn, signature(fn, pointers, constexprs), constexprs=dict(constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        out[fn.fn.__name__] = {"shared": compiled.metadata.shared, "asm": sorted(compiled.asm)}
    return out


def compile_head_importance(dtype: str, arch: int, score: int) -> dict:
    """Compile the head-importance kernel (score 0 = attribution, 1 = entropy) as its launcher would at N=197."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import fastkd.kernels.head_importance as HI
    from fastkd.kernels._common import head_block
    from fastkd.kernels._common import next_pow2

    fn = HI._head_importance_kernel
    constexprs = dict(
        BLOCK_M=max(16, min(64, next_pow2(197))), BLOCK_N=64, BLOCK_D=head_block(64), BLOCK_DV=head_block(64),
        SCORE=score, HAS_LSE=score == 0, UPCAST=dtype == "fp32", PRECISION="ieee" if dtype == "fp32" else "tf32",
    )
    pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "DO")}
    pointers.update(LSE="*fp32", OUT="*fp32")
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name, "fp32" if name == "scale" else "i32")
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": 4})
    return {fn.fn.__name__: {"shared": compiled.metadata.shared, "asm": sorted(compiled.asm)}}


def _compile_in_child(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result: dict, arch: int) -> None:
    for name, info in result.items():
        assert "ptx" in info["asm"] and "cubin" in info["asm"], f"{name}: no PTX/cubin produced"
        assert 0 < info["shared"] <= SMEM_LIMIT[arch], f"{name}: {info['shared']} bytes of shared memory, sm_{arch}"


@pytest.mark.parametrize("dtype, arch, score", [("bf16", 90, 0), ("bf16", 90, 1), ("fp32", 80, 0)])
def test_head_importance_kernel_compiles_for_gpu(dtype, arch, score):
    pytest.importorskip("triton")
    result = _compile_in_child("head_importance", dtype, str(arch), str(score))
    assert set(result) == {"_head_importance_kernel"}
    _check(result, arch)


@pytest.mark.parametrize(
    "dtype, arch, reverse",
    [("bf16", 90, False), ("bf16", 90, True), ("fp16", 80, False), ("fp32", 90, False)],
)
def test_kernels_compile_for_gpu(dtype, arch, reverse):
    pytest.importorskip("triton")
    result = _compile_in_child("attention_kl", dtype, str(arch), str(int(reverse)))
    assert set(result) == KERNELS
    _check(result, arch)


if __name__ == "__main__":
    op, dtype, arch, flag = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if op == "attention_kl":
        print(json.dumps(compile_all(dtype, arch, bool(flag))))
    else:
        print(json.dumps(compile_head_importance(dtype, arch, flag)))
