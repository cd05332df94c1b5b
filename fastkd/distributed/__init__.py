"""Process groups and model placement for multi-process training.

The same entry point runs under ``python -m fastkd``, ``torchrun --nproc_per_node K -m fastkd ...`` and
``deepspeed --num_gpus K --module fastkd ...``: both launchers export ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; DeepSpeed also passes ``--local_rank`` (accepted by the
top-level parser and used when the environment lacks ``LOCAL_RANK``).

Placement (DESIGN.md §7):

* student: :func:`wrap_student_ddp` (torch DDP) or :func:`fastkd.distributed.deepspeed.wrap_student`
  (a DeepSpeed engine owning the optimizer, ZeRO 0/1/2, bf16 on GPU);
* teachers: ``replicate`` (a full frozen copy per process, never inside DDP) or ``zero3``
  (:func:`fastkd.distributed.deepspeed.wrap_teacher_zero3`: a DeepSpeed stage-3 engine with no optimizer;
  parameters partitioned across ranks and gathered per layer during the forward).
"""

from __future__ import annotations

import datetime
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class RankTimeoutError(RuntimeError):
    """A collective or the start-up waited ``distributed.timeout`` seconds for ranks that never answered."""


_timeout_s: float = 300.0  # distributed.timeout of the current process group


@dataclass
class DistInfo:
    """Where this process sits."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device={preference!r} must be auto, cpu or cuda")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("run.device=cuda: no CUDA device is visible on this machine; use run.device=cpu or auto")
    index = local_rank % max(torch.cuda.device_count(), 1)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def setup(
    *,
    device: str = "auto",
    backend: str = "auto",
    local_rank: int | None = None,
    use_deepspeed: bool = False,
    timeout: float = 300.0,
) -> DistInfo:
    """Initialise the process group when launched with several processes; single-process runs need none.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` (``run.device``).
        backend: ``auto`` (nccl on CUDA, gloo on CPU) | ``nccl`` | ``gloo`` (``distributed.backend``).
        local_rank: DeepSpeed's ``--local_rank`` argument; ``LOCAL_RANK`` in the environment wins.
        use_deepspeed: initialise through ``deepspeed.init_distributed`` (needed when DeepSpeed engines are used).
        timeout: seconds the start-up and every collective wait for the other ranks (``distributed.timeout``);
            then :class:`RankTimeoutError` (see :func:`explain_timeout`) instead of PyTorch's 30-minute default.
    """
    global _timeout_s
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", local_rank if local_rank is not None else 0)
    dev = resolve_device(device, local)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"distributed.backend={backend!r} must be auto, nccl or gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if use_deepspeed and dev.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=None)
    if world > 1 or use_deepspeed:
        if not dist.is_initialized():
            if world > 1 and "MASTER_ADDR" not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={world} but MASTER_ADDR is unset: start with torchrun or the deepspeed launcher"
                )
            _timeout_s = float(timeout)
            wait = datetime.timedelta(seconds=_timeout_s)
            if use_deepspeed:
                from fastkd.distributed.deepspeed import _import

                deepspeed = _import()

                if world == 1:  # a single process still needs a group for the engines
                    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                    os.environ.setdefault("MASTER_PORT", str(_free_port()))
                    os.environ.setdefault("RANK", "0")
                    os.environ.setdefault("WORLD_SIZE", "1")
                    os.environ.setdefault("LOCAL_RANK", "0")
                init = lambda: deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=wait)  # noqa: E731
            else:
                kwargs = {"device_id": dev} if dev.type == "cuda" else {}
                init = lambda: dist.init_process_group(backend=backend, timeout=wait, **kwargs)  # noqa: E731
            try:
                init()
            except RuntimeError as exc:  # DistStoreError / DistNetworkError: the rendezvous timed out
                if not _looks_like_timeout(exc):
                    raise
                joined = re.search(r"(\d+)/(\d+) clients joined", str(exc))
                who = f" ({joined.group(1)} of {joined.group(2)} joined)" if joined else ""
                raise RankTimeoutError(
                    f"distributed.timeout={_timeout_s:g}s expired at start-up: not every one of the {world} ranks "
                    f"reached the rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                    f"{who}; a rank never started or cannot reach it"
                ) from exc
        info.backend = dist.get_backend()
        info.rank = dist.get_rank()
        info.world_size = dist.get_world_size()
    return info


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _looks_like_timeout(exc: BaseException) -> bool:
    return re.search(r"time[sd]? ?out|timeout|deadline", str(exc), re.IGNORECASE) is not None


def explain_timeout(exc: BaseException, grace: float | None = None) -> RankTimeoutError | None:
    """When ``exc`` is a collective that timed out, a :class:`RankTimeoutError` naming the ranks that did not
    answer; None for any other error. Call it before the process group is destroyed.

    Every rank that meets the timeout writes ``fastkd/timeout/<rank>`` into the process group's store and waits
    up to ``grace`` seconds (default: ``min(distributed.timeout, 10)``) for the others: the ranks that never write
    are the stalled or dead ones. A store that does not answer means its host (rank 0, or the launcher) is gone.
    """
    if isinstance(exc, RankTimeoutError):
        return exc
    if not (_looks_like_timeout(exc) and dist.is_available() and dist.is_initialized()):
        return None
    rank, world = rank_and_world()
    grace = min(_timeout_s, 10.0) if grace is None else grace
    prefix = f"distributed.timeout={_timeout_s:g}s expired on rank {rank} of {world}"
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set_timeout(datetime.timedelta(seconds=max(grace, 1.0)))
        store.set(f"fastkd/timeout/{rank}", "1")
        missing = list(range(world))
        deadline = time.monotonic() + grace
        while True:
            missing = [r for r in missing if not store.check([f"fastkd/timeout/{r}"])]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store itself is unreachable
        return RankTimeoutError(
            f"{prefix}: the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
            "does not answer either: rank 0 (which hosts it) or the launcher stalled or died"
        )
    if not missing:
        return RankTimeoutError(f"{prefix}: every rank is alive but a collective did not complete in time "
                                "(a rank is much slower than the others, or raise distributed.timeout)")
    names = ", ".join(map(str, missing))
    return RankTimeoutError(
        f"{prefix}: rank{'s' if len(missing) > 1 else ''} {names} did not answer (stalled, stopped or killed); "
        "raise distributed.timeout if that rank is only slow"
    )


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (ranks may hold different lengths). No gradient flows
    through the other ranks' rows (see :func:`all_gather_with_grad`)."""
    world = rank_and_world()[1]
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (exact gradient of a loss that
    uses all ranks' rows, given DDP's mean over ranks)."""

    @staticmethod
    def forward(ctx, x):
        rank, world = rank_and_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate an equally sized tensor from every rank along dim 0, differentiably (contrastive losses
    whose negatives come from all ranks)."""
    return t if rank_and_world()[1] == 1 else _GatherWithGrad.apply(t)


def all_gather_object(obj):
    if rank_and_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_student_ddp(method: nn.Module, info: DistInfo, *, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap the method (student + trainable extras; teachers are not submodules) in DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not info.distributed:
        return method
    if not any(p.requires_grad for p in method.parameters()):
        raise ValueError("the method has no trainable parameters to wrap in DDP")
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(method, device_ids=ids, find_unused_parameters=find_unused_parameters)


__all__ = [
    "DistInfo",
    "RankTimeoutError",
    "all_gather_cat",
    "all_gather_object",
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "explain_timeout",
    "rank_and_world",
    "resolve_device",
    "setup",
    "wrap_student_ddp",
]
