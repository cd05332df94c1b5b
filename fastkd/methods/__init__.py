"""Distillation methods: a registry of ``name -> Method class``.

>>> import fastkd.methods as M
>>> M.available()                                   # doctest: +SKIP
['attndistill', 'coadvise', 'deit', 'hinton', 'scalekd', 'sdssl', 'ssta']
>>> method = M.build("hinton", student=student, teachers=[teacher], temperature=4.0)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from fastkd.methods.base import REGISTRY
from fastkd.methods.base import Method
from fastkd.methods.base import register

# name -> module that registers it (imported on first use, so optional pieces stay optional)
_MODULES = {
    "hinton": "fastkd.methods.hinton",
    "deit": "fastkd.methods.deit",
    "ssta": "fastkd.methods.ssta",
    "attndistill": "fastkd.methods.attndistill",
    "coadvise": "fastkd.methods.coadvise",
    "sdssl": "fastkd.methods.sdssl",
    "scalekd": "fastkd.methods.scalekd",
}


def _import_all() -> None:
    for module in _MODULES.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def available() -> list[str]:
    """Names of the registered methods."""
    _import_all()
    return sorted(REGISTRY)


def build(name: str, *, student, teachers=(), **overrides) -> Method:
    """Build method ``name`` around ``student`` and ``teachers`` with keyword ``overrides`` of its defaults."""
    if name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in REGISTRY:
        raise ValueError(f"method={name!r} is unknown; available: {', '.join(available())}")
    return REGISTRY[name](student=student, teachers=list(teachers), **overrides)


__all__ = ["Method", "available", "build", "register"]
