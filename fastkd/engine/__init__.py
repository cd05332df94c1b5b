"""The training engine: trainer loop, evaluation (top-1/top-5, k-NN), checkpoints, logging, CLI commands.

* :class:`fastkd.engine.trainer.Trainer` -- builds a run from a :class:`fastkd.config.Config` and trains it.
* :class:`fastkd.engine.evaluate.Evaluator` -- evaluates a checkpoint (top-1/top-5, k-NN).
* :mod:`fastkd.engine.placement` -- where the student trains: torch (one process or DDP) or a DeepSpeed engine.
* :mod:`fastkd.engine.checkpoint` -- atomic checkpoint files, ``weights_only`` loading, RNG state.
* :mod:`fastkd.engine.commands` -- ``fastkd train`` / ``fastkd eval``.
"""
