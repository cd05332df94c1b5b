"""Head importance: which attention heads matter.

* :mod:`fastkd.importance.ops` -- per-layer scores from one batch's q, k, v, out, dO (the functional layer,
  re-exported by :mod:`fastkd.functional`);
* :mod:`fastkd.importance.scoring` -- those scores averaged over a data set, and rankings (used by SSTA);
* :mod:`fastkd.importance.commands` -- the ``fastkd importance`` command (JSON and heatmap).

Importing this package loads the library parts only, not the command.
"""

from fastkd.importance.ops import SCORES
from fastkd.importance.ops import Score
from fastkd.importance.ops import attribution_importance
from fastkd.importance.ops import entropy_importance
from fastkd.importance.ops import gradient_importance
from fastkd.importance.ops import head_importance
from fastkd.importance.scoring import LOSSES
from fastkd.importance.scoring import build_eval_loader
from fastkd.importance.scoring import compute_importance
from fastkd.importance.scoring import rank_heads
from fastkd.importance.scoring import resolve_loss

__all__ = [
    "LOSSES",
    "SCORES",
    "Score",
    "attribution_importance",
    "build_eval_loader",
    "compute_importance",
    "entropy_importance",
    "gradient_importance",
    "head_importance",
    "rank_heads",
    "resolve_loss",
]
