"""Attention taps: record what a timm ViT's attention blocks compute, without leaving fused attention.

:class:`AttentionTaps` wraps the ``forward`` of the chosen blocks' :class:`timm.layers.Attention` modules
(an instance attribute, so other instances and the class stay untouched). The wrapped forward is the same
computation as timm's fused path -- ``qkv`` projection, ``q_norm``/``k_norm``,
``F.scaled_dot_product_attention`` (or xformers), head merge, ``norm``, ``gate``, ``proj`` -- and
hands the intermediate tensors to the taps on the way:

* ``q``, ``k``, ``v``: ``[B, H, N, d]`` exactly as the attention uses them (after ``q_norm``/``k_norm``,
  before scaling); the logits are ``scale * q @ k.T`` with ``scale`` recorded alongside.
* ``out``: ``[B, H, N, d]`` the per-head attention output ``softmax(scale q k^T) v`` before the heads are
  merged and projected (what Michel et al. 2019 gate).
* ``grad_out``: ``dL/d out`` ``[B, H, N, d]``, filled in during backward (a tensor hook).
* ``lse``: ``[B, H, N]`` fp32 natural-log log-sum-exp of ``scale * q @ k.T`` per query row, where the
  attention backend returns it (``backend="xformers"``); ``None`` with SDPA, whose public API does not.

Tensors are recorded as they are (no copy, no detach): on a student they carry autograd, so a loss on
``taps[-1].q`` trains the student; on a frozen teacher run under ``no_grad`` they carry none. ``q``/``k``/``v``
are views of the qkv projection: last dim contiguous, other strides arbitrary.

Removing the taps (``remove()``, or leaving a ``with`` block) restores the module's own forward: no cost
when unused. While ``enabled`` is False the wrapped forward calls timm's forward directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionRecord", "AttentionTaps", "attention_modules", "resolve_blocks", "BACKENDS", "RECORDABLE"]

BACKENDS = ("sdpa", "xformers", "auto")
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
    lse: torch.Tensor | None = None  #: [B, H, N] fp32 natural-log LSE of scale*q@k^T (xformers backend only)
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


def _timm_attention_cls():
    from timm.layers.attention import Attention

    return Attention


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every transformer block of a timm ViT (``model.blocks[i].attn``)."""
    inner = unwrap_model(model)
    blocks = getattr(inner, "blocks", None)
    if blocks is None:
        raise ValueError(
            f"model ({type(inner).__name__}) has no `blocks`: attention taps need a timm ViT-style model "
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
    if backend == "sdpa":
        return "sdpa"
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


class _TapState:
    """Per attention module: the taps attached to it, and the backend they agreed on."""

    def __init__(self, backend: str):
        self.backend = backend
        self.taps: list[AttentionTaps] = []

    def __deepcopy__(self, memo):
        # a deep copy of a tapped model (e.g. an EMA teacher made from the student) records nothing: the taps
        # belong to the original; the copy's wrapped forward then just calls timm's forward
        return _TapState(self.backend)


def _tapped_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``Attention.forward`` (fused path) with taps; see the module docstring."""
    state: _TapState = self._fastkd_taps
    active = [t for t in state.taps if t.enabled]
    if not active:
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    dropout_p = self.attn_drop.p if self.training else 0.0

    lse = None
    backend = _resolve_backend(state.backend, x.device)
    if backend == "xformers" and attn_mask is None and not is_causal and dropout_p == 0.0:
        out, lse = _XformersAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), float(self.scale))
        out = out.transpose(1, 2)  # [B, H, N, d]
        lse = lse[..., :N].float()  # some xformers ops pad the LSE's last dim
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
        )

    tensors = {"q": q, "k": k, "v": v, "out": out, "lse": lse}
    want_grad = out.requires_grad and torch.is_grad_enabled()
    hooked: list[AttentionRecord] = []
    for tap in active:
        rec = tap._new_record(self)
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

    x = out.transpose(1, 2).reshape(B, N, self.attn_dim)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


class AttentionTaps:
    """Record per forward the attention tensors of chosen blocks of a timm ViT.

    Args:
        model: a timm ViT (``model.blocks[i].attn`` is a :class:`timm.layers.Attention`), or a wrapper
            around one (:class:`fastkd.models.Teacher`, DDP, ``torch.compile``).
        blocks: block indices to tap (negative indices count from the end), ``"all"`` or None for every block.
        record: what to keep, any of ``"q" "k" "v" "out" "grad_out" "lse"`` or the aliases ``"qk"``,
            ``"qkv"``, ``"all"``. ``"grad_out"`` is filled when a backward runs through ``out``.
        backend: ``"sdpa"`` (default; ``F.scaled_dot_product_attention``, no LSE), ``"xformers"`` (CUDA
            only; records the LSE), or ``"auto"`` (xformers on CUDA where importable, else SDPA).
            Attention masks, causal attention and attention dropout always run on SDPA.
        history: keep every forward's record in ``taps.history[block]`` (e.g. several views per step)
            instead of only the latest; call :meth:`clear` each step.

    Usage::

        taps = AttentionTaps(student, blocks=[-1], record="qk")
        logits = student(images)
        rec = taps[-1]                      # AttentionRecord of the last block
        loss = attention_kl(rec.q, rec.k, t_rec.q, t_rec.k, scale_s=rec.scale, scale_t=t_rec.scale)
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
        attn_cls = _timm_attention_cls()
        self._modules: dict[int, nn.Module] = {}
        for b in self.blocks:
            m = mods[b]
            if not isinstance(m, attn_cls) or type(m).forward is not attn_cls.forward:
                raise ValueError(
                    f"block {b}: attention module {type(m).__module__}.{type(m).__name__} is not supported; "
                    f"taps support timm.layers.Attention (ViT, DeiT, distilled DeiT, ...)"
                )
            self._modules[b] = m
        self._block_of = {id(m): b for b, m in self._modules.items()}
        self.records: dict[int, AttentionRecord] = {}
        self.history: dict[int, list[AttentionRecord]] = {b: [] for b in self.blocks}
        self._attached = False
        self._attach()

    # ---- attach / detach -------------------------------------------------------------------------
    def _attach(self) -> None:
        for m in self._modules.values():
            state = m.__dict__.get("_fastkd_taps")
            if state is None:
                state = _TapState(self.backend)
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
        """Within the block, forwards record nothing (and run timm's own forward)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    # ---- records ---------------------------------------------------------------------------------
    def _new_record(self, module: nn.Module) -> AttentionRecord:
        b = self._block_of[id(module)]
        rec = AttentionRecord(block=b, scale=float(module.scale))
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
