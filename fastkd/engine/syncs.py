"""Count host synchronisations: the calls that make the host wait for a device (issue 12).

:class:`SyncCounter` records, while it is active: ``_local_scalar_dense`` (``.item()``, ``float()``, ``bool()``),
ops whose output size depends on the data (``nonzero``, ``unique``, ``masked_select``, ``repeat_interleave``
without a size), ``equal``, copies from a device to the CPU (a :class:`~torch.utils._python_dispatch.
TorchDispatchMode`), and what never reaches the dispatcher for a CPU tensor: ``.tolist()``, ``.numpy()``,
boolean-mask indexing (a :class:`~torch.overrides.TorchFunctionMode`). On the CPU these are not real waits, but
they are exactly the calls that would be on CUDA, so a CPU test or benchmark counts what a GPU step would pay.
Used by the trainer's tests and ``benchmarks/train_step.py`` (host syncs per step).
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero.out, aten._unique.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.masked_select.default,
    aten.repeat_interleave.Tensor, aten.equal.default,
}
COPY_OPS = {aten._to_copy.default, aten.copy_.default}


HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _where() -> str:
    """The innermost fastkd frame of the current stack (``fastkd/<file>:<line>``), for the failure message."""
    frames = [f for f in traceback.extract_stack() if "/fastkd/" in f.filename and f.filename != __file__]
    return f"{frames[-1].filename.rsplit('/fastkd/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class _HostReads(TorchFunctionMode):
    def __init__(self, calls: list[str]):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(f"{func.__name__} at {_where()}")
        elif func is torch.Tensor.__getitem__ and _bool_index(args[1]):
            self.calls.append(f"boolean-mask index at {_where()}")
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchDispatchMode):
    """Records the host synchronisations of the ops run under it: ``self.calls``, one ``"<op> at <file>:<line>"``
    per sync (the innermost fastkd frame)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._reads = _HostReads(self.calls)

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SYNC_OPS:
            self.calls.append(f"{func} at {_where()}")
        elif func in COPY_OPS:
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device.type != "cpu" \
                    and dst.device.type == "cpu":
                self.calls.append(f"{func} device->host at {_where()}")
        return out


__all__ = ["SyncCounter"]
