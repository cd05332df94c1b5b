"""The one registry of fastkd's ops and their implementations (backends).

Each op (``attention_kl``, ``head_importance``) has implementations registered here, one module each:

* ``triton``    -- fused Triton kernels (``fastkd.kernels.<op>``); CUDA tensors, or any tensors when
  Triton's interpreter is on (``TRITON_INTERPRET=1``, used by the CPU test-suite). fp16/bf16/fp32 only.
* ``torch``     -- streaming torch implementation (``fastkd.kernels.<op>_torch``): chunked over query
  rows with its own recomputing backward, memory O(chunk * N); the default for CPU tensors.
* ``reference`` -- materializing eager implementation (``fastkd.kernels.reference``); for tests and
  benchmarks, never the default.

A backend module provides the op's entry points under fixed names (``attention_kl_forward`` /
``attention_kl_backward``; ``attribution_rows`` / ``entropy_rows``); :mod:`fastkd.custom_ops` registers one
PyTorch custom op per entry point and calls the backend chosen here. A new backend is one module plus one
:func:`register` call at the bottom of this file.

Selection (:func:`select`), one set of checks for every path: ``impl=`` of a call, else
``FASTKD_KERNELS=triton|torch|reference`` (forces one implementation for every op), else the first
registered backend that is a default for the device type and accepts the inputs. A forced or requested
backend that cannot run gets a clear error; the default quietly moves to the next one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import torch

from fastkd.kernels._common import interpret

ENV_VAR = "FASTKD_KERNELS"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One implementation of one op."""

    name: str
    module: str  # import path of the module that holds the op's entry points
    summary: str
    default_for: tuple[str, ...]  # device types on which it is a default choice ("*": any)
    dtypes: tuple[torch.dtype, ...]  # input dtypes it computes in
    # why it cannot run on this device in this process (None: it can)
    unavailable: Callable[[torch.device], str | None]

    def runs(self, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> bool:
        return self.unavailable(device) is None and all(d in self.dtypes for d in dtypes)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(
    op: str,
    name: str,
    module: str,
    *,
    summary: str,
    default_for: Iterable[str] = (),
    dtypes: Iterable[torch.dtype] = FLOATS,
    unavailable: Callable[[torch.device], str | None] | None = None,
) -> Backend:
    """Add backend ``name`` of ``op``; registration order is the default preference order."""
    backend = Backend(name, module, summary, tuple(default_for), tuple(dtypes), unavailable or (lambda device: None))
    _REGISTRY.setdefault(op, {})[name] = backend
    return backend


def ops() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def backends(op: str) -> dict[str, Backend]:
    if op not in _REGISTRY:
        raise ValueError(f"op={op!r} is unknown; expected one of {ops()}")
    return _REGISTRY[op]


def implementations() -> tuple[str, ...]:
    """Every registered backend name, over all ops."""
    return tuple(dict.fromkeys(name for table in _REGISTRY.values() for name in table))


def forced() -> str | None:
    """The implementation forced by ``FASTKD_KERNELS``, or None."""
    import os

    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in implementations():
        raise ValueError(f"{ENV_VAR}={value!r} is not valid; expected one of {', '.join(implementations())} or 'auto'")
    return value


def select(
    device: torch.device | str, op: str = "attention_kl", *, impl: str | None = None, dtypes: Iterable = ()
) -> str:
    """Name of the implementation that runs ``op`` for inputs of ``dtypes`` on ``device``.

    ``impl`` (a call's ``impl=`` argument) wins over ``FASTKD_KERNELS``; both get the same checks.
    """
    table = backends(op)
    device = torch.device(device)
    dtypes = tuple(dtypes)
    if impl is not None:
        if impl not in table:
            raise ValueError(f"impl={impl!r} is not an implementation of {op}; expected one of {tuple(table)}")
        choice, source = impl, f"impl={impl!r}"
    else:
        choice, source = forced(), f"{ENV_VAR}={forced()}"
    if choice is not None:
        if choice not in table:
            raise ValueError(f"{source}: {op} has no {choice!r} implementation; expected one of {tuple(table)}")
        backend = table[choice]
        reason = backend.unavailable(device)
        if reason is not None:
            raise RuntimeError(f"{source}: {reason}")
        for dtype in dtypes:
            if dtype not in backend.dtypes:
                others = " and ".join(b.name for b in table.values() if dtype in b.dtypes)
                name = str(dtype).replace("torch.", "")
                raise ValueError(f"{source}: {name} inputs are supported by the {others} implementations only")
        return choice
    for backend in table.values():
        if (device.type in backend.default_for or "*" in backend.default_for) and backend.runs(device, dtypes):
            return backend.name
    raise RuntimeError(f"no implementation of {op} runs on {device} for {dtypes}; registered: {tuple(table)}")


def load(op: str, impl: str) -> ModuleType:
    """The module of backend ``impl`` of ``op`` (imported on first use)."""
    return backends(op)[impl].load()


def describe() -> dict[str, dict[str, str]]:
    """{device: {op: implementation}} for fp32 inputs on the devices this process sees (``fastkd info``)."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    table: dict[str, dict[str, str]] = {}
    for dev in devices:
        row = {}
        for op in ops():
            try:
                row[op] = select(dev, op, dtypes=(torch.float32,))
            except (RuntimeError, ValueError) as exc:
                row[op] = f"unavailable ({exc})"
        table[dev] = row
    return table


# ------------------------------------------------------------------------------------------- the backends
@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_unavailable(device: torch.device) -> str | None:
    if not triton_available():
        return "triton is not installed; install it (pip install triton) or use the torch implementation"
    if device.type != "cuda" and not interpret():
        return (
            f"the Triton kernels need CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 before "
            f"importing fastkd to run them on the CPU through Triton's interpreter, or use {ENV_VAR}=torch"
        )
    return None


_TRITON = "fused Triton kernels (CUDA; CPU through TRITON_INTERPRET=1)"
_TORCH = "streaming torch, chunked over query rows (FASTKD_TORCH_CHUNK_ELEMS)"
_REFERENCE = "materializing eager reference (tests and benchmarks)"

_LOW = (torch.float16, torch.bfloat16, torch.float32)

register("attention_kl", "triton", "fastkd.kernels.attention_kl", summary=_TRITON, default_for=("cuda",), dtypes=_LOW,
         unavailable=_triton_unavailable)  # fmt: skip
register("attention_kl", "torch", "fastkd.kernels.attention_kl_torch", summary=_TORCH, default_for=("*",))
register("attention_kl", "reference", "fastkd.kernels.reference", summary=_REFERENCE)
register("head_importance", "triton", "fastkd.kernels.head_importance", summary=_TRITON, default_for=("cuda",),
         dtypes=_LOW, unavailable=_triton_unavailable)  # fmt: skip
register("head_importance", "torch", "fastkd.kernels.head_importance_torch", summary=_TORCH, default_for=("*",))
register("head_importance", "reference", "fastkd.kernels.reference", summary=_REFERENCE)
