"""Attention taps: record what a timm ViT's attention blocks compute, without leaving fused attention.

:class:`AttentionTaps` wraps the ``forward`` of the chosen blocks' attention modules (an instance attribute, so
other instances and the class stay untouched). The wrapped forward runs the module's *own* forward and hands its
one ``F.scaled_dot_product_attention`` call to the taps (a :class:`torch.overrides.TorchFunctionMode` scoped to
that forward): the taps see the ``q, k, v`` the module really attends with and the output it really gets, and may
run that one call on a backend that also returns the log-sum-exp. Everything around the call (projections,
norms, gates, head merge) stays timm's code.

Each attention family has one :class:`AttentionAdapter` (the module class, how to make it take its fused path,
how many attention calls one forward makes); :func:`register_adapter` adds a family. An attention module with no
adapter is refused by name, and a forward that does not make the expected call (say, after a timm upgrade
changed the module) raises instead of recording something else. Supported today: ``timm.layers.Attention``
(ViT, DeiT, distilled DeiT, DINO/Mugs ViTs). Swin's window attention and BEiT's relative-position attention are
not tapped: their ``q @ k.T`` is not the whole attention logit.

Recorded per tapped block (:class:`AttentionRecord`):

* ``q``, ``k``, ``v``: ``[B, H, N, d]`` exactly as the attention uses them (after ``q_norm``/``k_norm``,
  before scaling); the logits are ``scale * q @ k.T`` with ``scale`` (the call's own) recorded alongside.
* ``out``: ``[B, H, N, d]`` the per-head attention output ``softmax(scale q k^T) v`` before the heads are
  merged and projected (what Michel et al. 2019 gate).
* ``grad_out``: ``dL/d out`` ``[B, H, N, d]``, filled in during backward (a tensor hook).
* ``lse``: ``[B, H, N]`` fp32 natural-log log-sum-exp of ``scale * q @ k.T`` per query row, when ``"lse"`` is
  recorded and the kernel that runs the attention returns it: PyTorch's fused SDPA kernels (CPU flash; CUDA
  flash, memory-efficient, cuDNN) called through the ATen ops that return it, xformers, or FlexAttention.
  None when the call has a mask, causal masking or dropout, or when SDPA would take its math path.
  ``extra["kernel"]`` names the kernel that ran.

Tensors are recorded as they are (no copy, no detach): on a student they carry autograd, so a loss on
``taps[-1].q`` trains the student; on a frozen teacher run under ``no_grad`` they carry none. ``q``/``k``/``v``
are views of the qkv projection: last dim contiguous, other strides arbitrary.

Removing the taps (``remove()``, or leaving a ``with`` block) restores the module's own forward: no cost
when unused. While ``enabled`` is False the wrapped forward calls the module's forward directly.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

__all__ = [
    "AttentionAdapter",
    "AttentionRecord",
    "AttentionTaps",
    "adapter_for",
    "attention_modules",
    "register_adapter",
    "resolve_blocks",
    "BACKENDS",
    "RECORDABLE",
]

BACKENDS = ("sdpa", "xformers", "flex", "auto")
RECORDABLE = ("q", "k", "v", "out", "grad_out", "lse")
_ALIASES = {"qk": ("q", "k"), "qkv": ("q", "k", "v"), "all": RECORDABLE}


@dataclass
class AttentionRecord:
    """What one tapped attention block computed in the latest forward (fields not recorded are None)."""

    block: int  #: block index (non-negative)
    scale: float  #: logits = scale * q @ k^T
    q: torch.Tensor | None = None  #: [B, H, N, d] after q_norm, before scaling
    k: torch.Tensor | None = None  #: [B, H, N, d] after k_norm
    v: torch.Tensor | None = None  #: [B, H, N, d]
    out: torch.Tensor | None = None  #: [B, H, N, d] per-head attention output before head merge / proj
    lse: torch.Tensor | None = None  #: [B, H, N] fp32 natural-log LSE of scale*q@k^T (where the kernel returns it)
    grad_out: torch.Tensor | None = None  #: [B, H, N, d] dL/d out, set during backward
    extra: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        t = self.q if self.q is not None else self.out
        return int(t.shape[1])


def unwrap_model(model: nn.Module) -> nn.Module:
    """The timm model inside a Teacher / DDP / DeepSpeed / torch.compile wrapper (stops at a module with ``blocks``)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "blocks"):
            return model
        for attr in ("model", "module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            break
    return model


@dataclass(frozen=True)
class AttentionAdapter:
    """How the taps run one family of attention modules.

    The module's own ``forward`` runs unchanged; its ``F.scaled_dot_product_attention`` call(s) are handed to
    the taps. An adapter states what makes that valid for its family.

    Args:
        cls: the attention module class. A subclass is the same family only if it keeps ``cls.forward``.
        family: the models that use it, for messages (e.g. ``"ViT, DeiT"``).
        fused: context manager factory ``fused(module)`` run around the forward to make the module take its
            fused (SDPA) path, e.g. timm's ``fused_attn`` switch; None if it always does.
        calls: attention calls one forward makes; anything else is an error (the module changed).
    """

    cls: type
    family: str
    fused: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    calls: int = 1

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, self.cls) and type(module).forward is self.cls.forward

    @property
    def name(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


@contextlib.contextmanager
def _timm_fused(module: nn.Module) -> Iterator[None]:
    # timm's explicit branch (fused_attn False, e.g. TIMM_FUSED_ATTN=0) computes the same softmax(scale q k^T) v
    # with matmuls: switch the module to its SDPA branch for this forward, which is the call the taps read
    prev = module.fused_attn
    module.fused_attn = True
    try:
        yield
    finally:
        module.fused_attn = prev


_ADAPTERS: list[AttentionAdapter] = []


def _adapters() -> list[AttentionAdapter]:
    if not _ADAPTERS:
        from timm.layers.attention import Attention

        _ADAPTERS.append(AttentionAdapter(Attention, "ViT, DeiT, distilled DeiT, DINO/Mugs ViTs", _timm_fused))
    return _ADAPTERS


def register_adapter(adapter: AttentionAdapter) -> AttentionAdapter:
    """Make a new attention family tappable (one adapter per module class)."""
    if not isinstance(adapter, AttentionAdapter):
        raise TypeError(f"adapter must be an AttentionAdapter, got {type(adapter).__name__}")
    if any(a.cls is adapter.cls for a in _adapters()):
        raise ValueError(f"an adapter for {adapter.name} is already registered")
    _ADAPTERS.append(adapter)
    return adapter


def adapter_for(module: nn.Module, where: str = "attention module") -> AttentionAdapter:
    """The adapter of ``module``'s attention family, or a clear error naming its class."""
    for a in _adapters():
        if a.accepts(module):
            return a
    cls = type(module)
    supported = "; ".join(f"{a.name} ({a.family})" for a in _adapters())
    why = ""
    for a in _adapters():
        if isinstance(module, a.cls):
            why = f" (a subclass of {a.name} with its own forward, which the taps cannot vouch for)"
    raise ValueError(
        f"{where}: {cls.__module__}.{cls.__qualname__}{why} has no attention-tap adapter; taps support "
        f"{supported}. A new family needs an AttentionAdapter (fastkd.models.taps.register_adapter) and a test "
        "against its own output"
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every transformer block of a timm ViT (``model.blocks[i].attn``)."""
    inner = unwrap_model(model)
    blocks = getattr(inner, "blocks", None)
    if blocks is None:
        found = sorted({type(m).__name__ for m in inner.modules() if type(m).__name__.endswith("Attention")})
        seen = f"; its attention modules are {', '.join(found)}" if found else ""
        raise ValueError(
            f"model ({type(inner).__name__}) has no `blocks`{seen}: attention taps need a timm ViT-style model "
            "(VisionTransformer, DeiT, distilled DeiT, ...)"
        )
    mods = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None:
            raise ValueError(f"block {i} ({type(blk).__name__}) has no `attn` module")
        mods.append(attn)
    return mods


def resolve_blocks(model: nn.Module, blocks: int | Sequence[int] | str | None) -> list[int]:
    """Block indices as non-negative ints; negative indices count from the end; ``"all"``/None = every block."""
    depth = len(attention_modules(model))
    if blocks is None or (isinstance(blocks, str) and blocks == "all"):
        return list(range(depth))
    if isinstance(blocks, int):
        blocks = [blocks]
    out = []
    for b in blocks:
        if not isinstance(b, int) or isinstance(b, bool):
            raise ValueError(f"blocks must be ints (negative allowed) or 'all', got {b!r}")
        if not -depth <= b < depth:
            raise ValueError(f"blocks={list(blocks)}: index {b} is out of range for a model with {depth} blocks")
        r = b % depth
        if r not in out:
            out.append(r)
    return sorted(out)


def _expand_record(record: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(record, str):
        record = (record,)
    items: list[str] = []
    for r in record:
        for x in _ALIASES.get(r, (r,)):
            if x not in RECORDABLE:
                raise ValueError(
                    f"record={tuple(record)!r}: {x!r} is not recordable; expected items of {RECORDABLE} "
                    f"or aliases {tuple(_ALIASES)}"
                )
            if x not in items:
                items.append(x)
    return tuple(items)


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend in ("sdpa", "flex"):
        return backend
    if backend == "auto":
        return "xformers" if device.type == "cuda" and _xformers_available() else "sdpa"
    if backend == "xformers":
        if device.type != "cuda":
            raise RuntimeError(
                f"backend='xformers' needs CUDA tensors (xformers has no CPU kernel; got {device}); "
                "use backend='sdpa' or 'auto' (xformers on CUDA where installed, SDPA elsewhere)"
            )
        if not _xformers_available():
            raise RuntimeError("backend='xformers' but xformers is not importable; pip install fastkd[xformers]")
        return "xformers"
    raise ValueError(f"backend={backend!r} is unknown; expected one of {BACKENDS}")


class _XformersAttention(torch.autograd.Function):
    """xformers memory-efficient attention that also returns its LSE (``[B, H, N]``, natural log)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):  # q, k, v: [B, N, H, d] (xformers' BMHK layout)
        from xformers.ops import fmha

        out, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        from xformers.ops import fmha

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = fmha.memory_efficient_attention_backward(grad_out.contiguous(), out, lse, q, k, v, scale=ctx.scale)
        return dq, dk, dv, None


_SDPA = F.scaled_dot_product_attention  # the real one, whatever a caller later patches over the name


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, k, v, scale):
    """FlexAttention with its LSE: compiled (fused, differentiable) on CUDA; eager on the CPU, where torch's
    compiled CPU path cannot return the LSE and the eager one has no backward (frozen teachers only)."""
    from torch.nn.attention.flex_attention import AuxRequest
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        fn = _compiled_flex()
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "backend='flex' on the CPU has no backward (torch's FlexAttention); use it under no_grad (a frozen "
            "teacher) or use backend='sdpa', whose CPU flash kernel also returns the LSE"
        )
    else:
        fn = flex_attention
    out, aux = fn(q, k, v, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _sdpa_with_lse(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The fused kernel SDPA would pick for this call, through the ATen op that also returns its LSE.

    Same kernel, same autograd formula as ``F.scaled_dot_product_attention``; falls back to SDPA itself (no
    LSE) where SDPA would take its math path or where it pads the head dim before the kernel (CUDA, d % 8).
    Under ``torch.compile`` SDPA itself, without an LSE: the kernel choice is a host decision that would break
    the graph (a loss given no LSE computes it).
    """
    if torch.compiler.is_compiling():
        return _SDPA(q, k, v, scale=scale), None, "sdpa-compiled"
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale))
    aten = torch.ops.aten
    if q.device.type == "cpu" and choice == SDPBackend.FLASH_ATTENTION:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse, "sdpa-flash-cpu"
    if q.device.type == "cuda" and q.shape[-1] % 8 == 0:
        if choice == SDPBackend.FLASH_ATTENTION:
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            return out, lse, "sdpa-flash"
        if choice == SDPBackend.EFFICIENT_ATTENTION:
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
            return out, lse, "sdpa-efficient"
        if choice == SDPBackend.CUDNN_ATTENTION:
            out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
            return out, lse, "sdpa-cudnn"
    return _SDPA(q, k, v, scale=scale), None, f"sdpa-{choice.name.lower()}"


def _attend(module, taps, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stands in for the module's ``F.scaled_dot_product_attention(q, k, v, ...)`` call: runs it, records it."""
    state: _TapState = module._fastkd_taps
    state.calls += 1
    B, H, N, d = q.shape
    used_scale = float(scale) if scale is not None else d**-0.5
    plain = attn_mask is not None or is_causal or dropout_p > 0.0 or enable_gqa or k.shape != q.shape
    backend = _resolve_backend(state.backend, q.device)
    lse = None
    if plain:  # masks, causal, dropout, GQA: SDPA as the module asked; the LSE of q k^T alone does not exist
        out = _SDPA(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
        kernel = "sdpa"
    elif backend == "xformers":
        out, lse = _XformersAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), used_scale)
        out, kernel = out.transpose(1, 2), "xformers"  # [B, H, N, d]
    elif backend == "flex":
        out, lse = _flex_attention(q, k, v, used_scale)
        kernel = "flex"
    elif any("lse" in t.record for t in taps):
        out, lse, kernel = _sdpa_with_lse(q, k, v, used_scale)
    else:
        out, kernel = _SDPA(q, k, v, scale=scale), "sdpa"
    if lse is not None:  # [B, H, N]; some kernels pad the last dim or add a trailing 1
        lse = lse.reshape(B, H, -1)[..., :N].float().contiguous()

    tensors = {"q": q, "k": k, "v": v, "out": out, "lse": lse}
    want_grad = out.requires_grad and torch.is_grad_enabled()
    hooked: list[AttentionRecord] = []
    for tap in taps:
        rec = tap._new_record(module, used_scale)
        rec.extra["kernel"] = kernel
        for name in tap.record:
            if name in tensors:
                setattr(rec, name, tensors[name])
        if "grad_out" in tap.record and want_grad:
            hooked.append(rec)
    if hooked:

        def _keep_grad(g: torch.Tensor, records=tuple(hooked)):
            for r in records:
                r.grad_out = g

        out.register_hook(_keep_grad)
    return out


class _RouteAttention(TorchFunctionMode):
    """Within one module forward: every ``F.scaled_dot_product_attention`` call goes to ``attend``."""

    def __init__(self, attend: Callable):
        super().__init__()
        self.attend = attend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.attend(*args, **kwargs)
        return func(*args, **kwargs)


class _TapState:
    """Per attention module: its adapter, the taps attached to it, and the backend they agreed on."""

    def __init__(self, adapter: AttentionAdapter, backend: str):
        self.adapter = adapter
        self.backend = backend
        self.taps: list[AttentionTaps] = []
        self.calls = 0

    def __deepcopy__(self, memo):
        # a deep copy of a tapped model (e.g. an EMA teacher made from the student) records nothing: the taps
        # belong to the original; the copy's wrapped forward then just calls the module's forward
        return _TapState(self.adapter, self.backend)


@contextlib.contextmanager
def _outside_inference_mode() -> Iterator[None]:
    """A tapped block inside ``torch.inference_mode`` (a frozen :class:`fastkd.models.Teacher`) runs under
    ``no_grad`` instead, so its records are ordinary tensors a loss may save for its backward."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():  # compiled: no_grad, see Teacher
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def _tapped_forward(self: nn.Module, *args, **kwargs):
    """The module's own forward, its attention call handed to :func:`_attend`; see the module docstring."""
    state: _TapState = self._fastkd_taps
    active = [t for t in state.taps if t.enabled]
    if not active:
        return type(self).forward(self, *args, **kwargs)
    adapter = state.adapter
    state.calls = 0
    with _outside_inference_mode(), adapter.fused(self) if adapter.fused is not None else contextlib.nullcontext():
        with _RouteAttention(functools.partial(_attend, self, active)):
            y = type(self).forward(self, *args, **kwargs)
    if state.calls != adapter.calls:
        raise RuntimeError(
            f"{adapter.name}.forward made {state.calls} F.scaled_dot_product_attention call(s), the taps' adapter "
            f"expects {adapter.calls}: the module no longer computes its attention the way fastkd reads it "
            "(a timm upgrade?); update its AttentionAdapter in fastkd/models/taps.py"
        )
    return y


class AttentionTaps:
    """Record per forward the attention tensors of chosen blocks of a timm ViT.

    Args:
        model: a timm ViT (``model.blocks[i].attn`` an attention module with an :class:`AttentionAdapter`,
            e.g. :class:`timm.layers.Attention`), or a wrapper around one (:class:`fastkd.models.Teacher`, DDP,
            ``torch.compile``).
        blocks: block indices to tap (negative indices count from the end), ``"all"`` or None for every block.
        record: what to keep, any of ``"q" "k" "v" "out" "grad_out" "lse"`` or the aliases ``"qk"``,
            ``"qkv"``, ``"all"``. ``"grad_out"`` is filled when a backward runs through ``out``.
        backend: ``"sdpa"`` (default: the fused kernel ``F.scaled_dot_product_attention`` picks; with
            ``"lse"`` recorded, called through the ATen op that returns its LSE), ``"xformers"`` (CUDA only),
            ``"flex"`` (FlexAttention: compiled on CUDA; eager and forward-only on the CPU), or ``"auto"``
            (xformers on CUDA where importable, else SDPA). Attention masks, causal attention and attention
            dropout always run on SDPA, without an LSE.
        history: keep every forward's record in ``taps.history[block]`` (e.g. several views per step)
            instead of only the latest; call :meth:`clear` each step.

    Usage::

        taps = AttentionTaps(student, blocks=[-1], record=("q", "k", "lse"))
        logits = student(images)
        rec = taps[-1]                      # AttentionRecord of the last block
        loss = attention_kl(rec.q, rec.k, t_rec.q, t_rec.k, scale_s=rec.scale, scale_t=t_rec.scale,
                            lse_s=rec.lse, lse_t=t_rec.lse)  # LSEs hold at the recorded scales only
        taps.remove()                       # or: with AttentionTaps(...) as taps: ...
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: int | Sequence[int] | str | None = -1,
        *,
        record: Iterable[str] | str = ("qk",),
        backend: str = "sdpa",
        history: bool = False,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; expected one of {BACKENDS}")
        self.record = _expand_record(record)
        self.backend = backend
        self.enabled = True
        self.keep_history = bool(history)
        mods = attention_modules(model)
        self.blocks = resolve_blocks(model, blocks)
        self._depth = len(mods)
        self._modules: dict[int, nn.Module] = {b: mods[b] for b in self.blocks}
        self._adapters = {b: adapter_for(m, f"block {b}") for b, m in self._modules.items()}
        self._block_of = {id(m): b for b, m in self._modules.items()}
        self.records: dict[int, AttentionRecord] = {}
        self.history: dict[int, list[AttentionRecord]] = {b: [] for b in self.blocks}
        self._attached = False
        self._attach()

    # ---- attach / detach -------------------------------------------------------------------------
    def _attach(self) -> None:
        for b, m in self._modules.items():
            state = m.__dict__.get("_fastkd_taps")
            if state is None:
                state = _TapState(self._adapters[b], self.backend)
                m._fastkd_taps = state
                m.forward = _tapped_forward.__get__(m, type(m))
            elif state.backend != self.backend:
                raise ValueError(
                    f"backend={self.backend!r} conflicts with taps already attached to this module "
                    f"(backend={state.backend!r}); remove them first"
                )
            state.taps.append(self)
        self._attached = True

    def remove(self) -> None:
        """Detach from the model; when no taps remain on a module its own forward is restored."""
        if not self._attached:
            return
        for m in self._modules.values():
            state = m.__dict__.get("_fastkd_taps")
            if state is None:
                continue
            state.taps = [t for t in state.taps if t is not self]
            if not state.taps:
                del m._fastkd_taps
                m.__dict__.pop("forward", None)
        self._attached = False
        self.clear()

    def __enter__(self) -> AttentionTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block, forwards record nothing (and run the module's own forward untouched)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    # ---- records ---------------------------------------------------------------------------------
    def _new_record(self, module: nn.Module, scale: float) -> AttentionRecord:
        b = self._block_of[id(module)]
        rec = AttentionRecord(block=b, scale=scale)
        self.records[b] = rec
        if self.keep_history:
            self.history[b].append(rec)
        return rec

    def _index(self, block: int) -> int:
        if not isinstance(block, int) or not -self._depth <= block < self._depth:
            raise KeyError(f"block {block!r} is out of range for a model with {self._depth} blocks")
        b = block % self._depth
        if b not in self._modules:
            raise KeyError(f"block {block} is not tapped; tapped blocks: {self.blocks}")
        return b

    def __getitem__(self, block: int) -> AttentionRecord:
        b = self._index(block)
        if b not in self.records:
            raise KeyError(f"block {block} has no record yet: run a forward of the model first")
        return self.records[b]

    def __contains__(self, block: int) -> bool:
        try:
            return self._index(block) in self.records
        except KeyError:
            return False

    def __iter__(self) -> Iterator[AttentionRecord]:
        return (self.records[b] for b in self.blocks if b in self.records)

    def __len__(self) -> int:
        return len(self.blocks)

    def module(self, block: int) -> nn.Module:
        """The tapped attention module of ``block``."""
        return self._modules[self._index(block)]

    def clear(self) -> None:
        """Drop every record (frees the recorded tensors)."""
        self.records.clear()
        for v in self.history.values():
            v.clear()

    def __repr__(self) -> str:
        return (
            f"AttentionTaps(blocks={self.blocks}, record={self.record}, backend={self.backend!r}, "
            f"enabled={self.enabled})"
        )
