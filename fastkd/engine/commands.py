"""``fastkd train`` and ``fastkd eval``.

Examples::

    fastkd train --config hinton_deit_s train.epochs=3 optim.lr=1e-3
    torchrun --nproc_per_node 8 -m fastkd train --config deit_s.yaml distributed.student=ddp
    deepspeed --num_gpus 8 --module fastkd train --config deit_s.yaml distributed.student=deepspeed \\
        distributed.zero_stage=2 distributed.teacher_placement=zero3
    fastkd eval --config deit_s.yaml --checkpoint runs/deit_s/ckpt/last.pt
"""

from __future__ import annotations

import argparse
import os
import sys

from fastkd.config import load_config


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options and ``key=value`` overrides come in any order (``--resume CKPT a=1`` as well as
    ``a=1 --resume CKPT``): plain argparse stops filling a ``nargs="*"`` positional at the first option."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _common(parser: argparse.ArgumentParser) -> None:
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = _IntermixedParser
    parser.add_argument(
        "--config", "-c", required=True, metavar="RECIPE",
        help="YAML recipe: a file, or the name of a recipe shipped in fastkd/recipes (e.g. hinton_tiny)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value",
        help="override any recipe field by its dotted path, e.g. train.epochs=3 optim.lr=1e-3 "
             "teachers.0.weights=t.safetensors method.params.temperature=2 (values are parsed as YAML)",
    )
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow weights files and DeepSpeed checkpoints that hold pickled objects (they can run code when "
             "loaded): only for files you trust (same as run.trust_checkpoint=true)",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="CKPT",
        help="continue a run exactly: a checkpoint file, or no value for the latest one in the run folder "
             "(same as run.resume=auto)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="a fastkd training checkpoint (runs/<name>/ckpt/last.pt)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in the checkpoint")


def _load(args):
    overrides = list(args.overrides)
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not os.path.exists(resume):  # "--resume a.b=1": an override, not a file
        overrides.append(resume)
        resume = "auto"
    if resume:
        overrides.append(f"run.resume={resume}")
    if getattr(args, "trust_checkpoint", False):
        overrides.append("run.trust_checkpoint=true")
    return load_config(args.config, overrides)


def _distributed_errors():
    """A collective that timed out becomes :class:`~fastkd.distributed.RankTimeoutError` naming the missing ranks
    (while the process group still exists); any other error passes unchanged. Expected errors (bad config,
    damaged checkpoint, missing files, ...) are turned into one line by :func:`fastkd.cli.main`."""
    import contextlib

    from fastkd.distributed import explain_timeout

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except RuntimeError as exc:
            timeout = explain_timeout(exc)
            if timeout is None or timeout is exc:
                raise
            raise timeout from exc

    return guard()


def run_train(args) -> int:
    from fastkd.distributed import cleanup

    cfg = _load(args)
    if getattr(args, "print_config", False):
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from fastkd.engine.trainer import NonFiniteLossError
    from fastkd.engine.trainer import Trainer

    trainer = None
    try:
        with _distributed_errors():
            trainer = Trainer(cfg, local_rank=getattr(args, "local_rank", None))
            trainer.train()
        return 0
    except NonFiniteLossError as exc:
        print(f"fastkd train: {exc}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
        cleanup()


def run_eval(args) -> int:
    from fastkd.distributed import cleanup
    from fastkd.engine import checkpoint as ckpt
    from fastkd.engine.logging import format_table

    cfg = _load(args)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    from fastkd.engine.evaluate import Evaluator

    try:
        with _distributed_errors():
            ev = Evaluator(cfg, local_rank=getattr(args, "local_rank", None))
            state = ckpt.load(args.checkpoint)
            ev.load_weights(state, ema=args.ema)
            res = ev.evaluate()
    finally:
        cleanup()
    if ev.info.is_main:
        rows = [{"metric": k, "value": v} for k, v in res.items()]
        print(format_table(rows, ["metric", "value"]))
    return 0


__all__ = ["add_eval_arguments", "add_train_arguments", "run_eval", "run_train"]
