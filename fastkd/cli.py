"""The ``fastkd`` command line: ``fastkd <command> [options]``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``fastkd info`` stays fast and works where
optional backends (DALI, DeepSpeed, xformers) are missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Keep sorted by how often users need them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fastkd.demo", "the whole pipeline on a small real data set: teacher, student with and without KD"),
    "train": ("fastkd.engine.commands", "train a student from a YAML recipe (key.sub=value overrides)"),
    "eval": ("fastkd.engine.commands", "evaluate a checkpoint (top-1/top-5, or k-NN for self-supervised methods)"),
    "importance": ("fastkd.importance", "score the attention heads of a ViT and write importance.json + a heatmap"),
    "data": ("fastkd.data.commands", "prepare a small real data set (data prepare)"),
    "bench": ("fastkd.bench", "benchmarks: kernels | importance | data | train"),
    "info": ("fastkd.info", "versions, devices, and which kernel implementation each op uses"),
}


def _load(name: str):
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # command not built into this version
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(_module=module, _command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    runner = getattr(args._module, f"run_{args._command}", None) or args._module.run
    return int(runner(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
