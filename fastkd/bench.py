"""``fastkd bench kernels|importance|data|train|model|cache [options]``: run a benchmark script from ``benchmarks/``.

The scripts live in the repository's ``benchmarks/`` folder (next to ``fastkd/``), so this command works
from a source checkout or an editable install (``pip install -e .``). Options after the benchmark name are
passed to the script; ``fastkd bench kernels --help`` lists them.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

SCRIPTS = {
    "kernels": ("attention_kl.py", "attention_kl: fastkd vs eager vs torch.compile, fwd/bwd/full, CSV + plot"),
    "importance": ("head_importance.py", "head-importance scores: streaming vs materializing"),
    "data": ("data_pipeline.py", "data pipeline images/s: DALI vs torchvision"),
    "train": ("train_step.py", "end-to-end training step: images/s, step time, peak memory"),
    "model": ("kernel_model.py", "predicted kernel times from the compiled sm_90 code (no GPU needed), CSV"),
    "cache": ("teacher_cache.py", "teacher cache: size per image, top-K KD error, cached vs online vs no-teacher step"),
}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    filename = SCRIPTS[name][0]
    path = benchmarks_dir() / filename
    if not path.is_file():
        raise SystemExit(
            f"fastkd bench {name}: {path} not found. The benchmarks ship with the source tree: run from a checkout "
            "installed with `pip install -e .`"
        )
    spec = importlib.util.spec_from_file_location(f"fastkd_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=sorted(SCRIPTS), help="; ".join(f"{k}: {v[1]}" for k, v in SCRIPTS.items()))
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="options passed to the benchmark script")


def run_bench(args: argparse.Namespace) -> int:
    return int(load_script(args.which).main(list(args.script_args)) or 0)
