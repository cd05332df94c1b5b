"""The ``fastkd`` command line: ``fastkd <command> [options]``.

One convention for every command: :data:`COMMANDS` below names the module that implements it, and that module
defines ``add_<command>_arguments(parser)`` and ``run_<command>(args) -> int`` (a hyphen in the command's name
is an underscore there: ``teacher-cache`` -> ``run_teacher_cache``). The module is its area's
``commands`` module (``fastkd/engine/commands.py`` holds ``train`` and ``eval``, ``fastkd/data/commands.py``
holds ``data``), or the area's single module when the command is all there is to it (``fastkd/bench.py``,
``fastkd/info.py``, ``fastkd/demo.py``). A command module imports optional backends (DALI, DeepSpeed,
xformers) inside ``run_<command>``, never at import time: one that fails to import is an error, not a
missing command.

Errors: :func:`main` turns every expected error (:func:`expected_error`: bad values, missing or damaged files,
a full disk, a rank that stopped answering, ...) into one line ``fastkd <command>: <message>`` and exit code 2;
other exceptions are bugs and keep their traceback, and ``FASTKD_DEBUG=1`` keeps it for every error.
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
    "importance": (
        "fastkd.importance.commands", "score the attention heads of a ViT and write importance.json + a heatmap"
    ),
    "data": ("fastkd.data.commands", "prepare a small real data set (data prepare)"),
    "bench": ("fastkd.bench", "benchmarks: kernels | importance | data | train | model | cache"),
    "info": ("fastkd.info", "versions, devices, and which kernel implementation each op uses"),
    "teacher-cache": ("fastkd.cache.commands", "build a soft-label cache of a recipe's teachers (teacher-cache build)"),
}


def _functions(name: str) -> tuple[str, str]:
    """``(add_<cmd>_arguments, run_<cmd>)`` of command ``name`` ("teacher-cache" -> ``run_teacher_cache``)."""
    ident = name.replace("-", "_")
    return f"add_{ident}_arguments", f"run_{ident}"


def _load(name: str):
    """The module of command ``name``, checked to follow the convention; import errors propagate."""
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"fastkd {name}: its module {module_name} cannot be imported: {exc}") from exc
    for attr in _functions(name):
        if not callable(getattr(module, attr, None)):
            raise AttributeError(f"fastkd {name}: module {module_name} defines no {attr}()")
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        module = _load(name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        add, run = _functions(name)
        getattr(module, add)(p)
        p.set_defaults(_run=getattr(module, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"fastkd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from fastkd._validate import debug_enabled  # FASTKD_DEBUG=1: every error keeps its traceback

        if debug_enabled() or not expected_error(exc):
            raise
        print(f"fastkd {args.command}: {one_line(exc)}", file=sys.stderr)
        return 2


def expected_error(exc: BaseException) -> bool:
    """Errors that come from the user's input or machine rather than from a bug in fastkd: a bad value
    (``ValueError``: ConfigError, CheckpointError, ...), a file or disk problem (``OSError``), an unreadable
    image under ``data.corrupt=error``, a rank that stopped answering, a missing optional dependency."""
    from fastkd.data.loader import CorruptImageError
    from fastkd.distributed import RankTimeoutError

    if isinstance(exc, ImportError):
        return "pip install" in str(exc)
    return isinstance(exc, (ValueError, OSError, CorruptImageError, RankTimeoutError))


def one_line(exc: BaseException) -> str:
    """The error's message on one line (an OSError names its file)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error itself
        text = next(line for line in reversed(text.splitlines()) if line.strip())
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
