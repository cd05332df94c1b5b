"""Teacher-free epochs for logit distillation: a soft-label cache (``fastkd teacher-cache build``).

The format (the one place it is described) is in :mod:`fastkd.cache.store`; the builder and its command in
:mod:`fastkd.cache.build`; the training side (a loader wrapper that drives the loader from the recorded views, checks
each batch and adds its cached logits) in :mod:`fastkd.cache.replay`.
"""

from fastkd.cache.replay import CachedLoader
from fastkd.cache.replay import dense_logits
from fastkd.cache.replay import open_for_run
from fastkd.cache.store import CacheError
from fastkd.cache.store import TeacherCache

__all__ = ["CacheError", "CachedLoader", "TeacherCache", "dense_logits", "open_for_run"]
