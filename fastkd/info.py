"""``fastkd info``: versions, devices, and the kernel implementation each op uses (read from the registry in
:mod:`fastkd.dispatch`)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform

import torch

import fastkd
from fastkd import dispatch
from fastkd.kernels._common import interpret

PACKAGES = [
    ("torch", "torch"),
    ("triton", "triton"),
    ("timm", "timm"),
    ("DALI", "nvidia-dali-cuda130"),
    ("DeepSpeed", "deepspeed"),
    ("xformers", "xformers"),
    ("numpy", "numpy"),
]


def package_version(dist: str) -> str:
    candidates = [dist]
    if dist.startswith("nvidia-dali"):
        candidates += ["nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"]
    for name in candidates:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return "not installed"


def versions() -> dict[str, str]:
    out = {"fastkd": fastkd.__version__, "python": platform.python_version()}
    for label, dist in PACKAGES:
        out[label] = package_version(dist)
    return out


def devices() -> list[str]:
    out = [f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append(
                f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"compute capability {props.major}.{props.minor}"
            )
    else:
        out.append(f"cuda: none visible (torch {torch.__version__}, CUDA build {torch.version.cuda or 'no'})")
    return out


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a text report")


def registered() -> dict[str, dict[str, str]]:
    """{op: {backend: summary}} of every registered implementation."""
    return {op: {name: b.summary for name, b in dispatch.backends(op).items()} for op in dispatch.ops()}


def run_info(args: argparse.Namespace) -> int:
    ver, devs, table = versions(), devices(), dispatch.describe()
    if getattr(args, "json", False):
        import json

        print(json.dumps({"versions": ver, "devices": devs, "kernels": table, "backends": registered()}, indent=2))
        return 0
    print("fastkd", ver["fastkd"])
    print("\nversions")
    for key, value in ver.items():
        print(f"  {key:<10} {value}")
    print("\ndevices")
    for line in devs:
        print("  " + line)
    forced = dispatch.forced()
    print("\nkernels" + (f" (forced by {dispatch.ENV_VAR}={forced})" if forced else ""))
    for dev, ops in table.items():
        for op, impl in ops.items():
            print(f"  {dev:<8} {op:<16} {impl}")
    if interpret():
        print("  (TRITON_INTERPRET=1: Triton kernels run through the CPU interpreter)")
    print("\nregistered implementations (impl= or FASTKD_KERNELS= picks one)")
    for op, impls in registered().items():
        for name, summary in impls.items():
            print(f"  {op:<16} {name:<10} {summary}")
    return 0
