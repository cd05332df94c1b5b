"""Distillation methods: a registry of ``name -> Method class``, discovered from this package.

Every public module of ``fastkd/methods/`` (a file whose name does not start with ``_``) is imported the first
time the registry is asked, and each class it decorates with ``@register("name")`` becomes a method. Adding a
method is one new file here (and, by convention, its recipes in ``fastkd/recipes/``); nothing else lists the
methods. A method module that fails to import is an error, never a silently missing method.

>>> import fastkd.methods as M
>>> M.available()                                   # doctest: +SKIP
['attndistill', 'coadvise', 'deit', 'hinton', 'scalekd', 'sdssl', 'ssta', 'supervised']
>>> method = M.build("hinton", student=student, teachers=[teacher], temperature=4.0)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import pkgutil

from fastkd.methods.base import REGISTRY
from fastkd.methods.base import Method
from fastkd.methods.base import register


def discover() -> None:
    """Import every public module of this package (each registers its methods). Cheap after the first call:
    modules already imported are not imported again."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    """Names of the registered methods."""
    discover()
    return sorted(REGISTRY)


def get(name: str) -> type[Method]:
    """The class registered as ``name``; a ValueError listing the available names when there is none."""
    if name not in REGISTRY:
        discover()
    if name not in REGISTRY:
        raise ValueError(f"method.name={name!r} is unknown; available: {', '.join(available())}")
    return REGISTRY[name]


def build(name: str, *, student, teachers=(), **overrides) -> Method:
    """Build method ``name`` around ``student`` and ``teachers`` with keyword ``overrides`` of its defaults."""
    return get(name)(student=student, teachers=list(teachers), **overrides)


__all__ = ["Method", "available", "build", "discover", "get", "register"]
