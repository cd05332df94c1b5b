"""AttnDistill: attention distillation for self-supervised ViT students (Wang, Yang, van de Weijer, BMVC 2022).

Paper: https://arxiv.org/abs/2210.00944 -- official code: https://github.com/wangkai930418/attndistill
(``engine/engine_dino_transfer.py``, ``models/dino_vit_student.py``, ``models/mlp.py``). Spec: METHODS.md section 2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from fastkd.functional import attention_kl
from fastkd.methods._attention import cls_row_probs
from fastkd.methods._attention import require_vit
from fastkd.methods._attention import token_layout
from fastkd.methods._kd import check_range
from fastkd.methods._kd import check_teacher_count
from fastkd.methods._kd import freeze_teachers
from fastkd.methods._kd import images_of
from fastkd.methods.base import Method
from fastkd.methods.base import register
from fastkd.models import AttentionTaps


def build_projector(dim: int, teacher_dim: int, layers: int = 4) -> nn.Sequential:
    """The official student projector (``models/mlp.py::get_mlp_student`` + the final ``LayerNorm(D_T)``).

    ``layers = 4``: LN(D) -> Linear(D, 2D) -> GELU -> Linear(2D, D) -> GELU -> Linear(D, 2D) -> GELU ->
    Linear(2D, D_T) -> LN(D_T); LayerNorm eps 1e-6, Linear weights trunc-normal(0.02), biases 0. Other depths keep
    the alternating 2D / D hidden widths and end in D_T.
    """
    if layers < 1:
        raise ValueError(f"proj_layers={layers} must be >= 1")
    widths = [dim] + [2 * dim if i % 2 == 0 else dim for i in range(layers - 1)] + [teacher_dim]
    mods: list[nn.Module] = [nn.LayerNorm(dim, eps=1e-6)]
    for i in range(layers):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < layers - 1:
            mods.append(nn.GELU())
    mods.append(nn.LayerNorm(teacher_dim, eps=1e-6))
    proj = nn.Sequential(*mods)
    for m in proj.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return proj


_FLOOR = 1e-12  # smallest teacher probability after a bicubic resize (its log must stay finite)


def resize_teacher_row(a_t: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Official ``--interpolate``: keep CLS->CLS, bicubically resize the CLS->patch probabilities to the student's grid
    (``F.interpolate(mode='bicubic')``, ``align_corners=False``) and rescale them to sum to ``1 - a_t[..., 0]``.

    ``a_t: [B, H, 1 + gh*gw]`` -> ``[B, H, 1 + gh'*gw']``.
    """
    B, H, _ = a_t.shape
    cls = a_t[:, :, :1]
    patch = a_t[:, :, 1:].reshape(B, H, *src_grid)
    patch = F.interpolate(patch, size=dst_grid, mode="bicubic").reshape(B, H, -1)
    patch = patch * ((1.0 - cls) / patch.sum(-1, keepdim=True))
    return torch.cat([cls, patch], dim=-1)


@register("attndistill")
class AttnDistill(Method):
    r"""AttnDistill (Wang, Yang, van de Weijer, BMVC 2022, https://arxiv.org/abs/2210.00944; official code
    https://github.com/wangkai930418/attndistill ``engine/engine_dino_transfer.py``).

    Self-supervised KD without labels: a frozen self-supervised ViT teacher trains a ViT student through (i) MSE
    between the projected student CLS and the teacher's final CLS embedding and (ii) KL on the last block's
    CLS-query attention row:

    .. math::
        L = w_{cls}\,\frac{1}{B D_T}\sum_{b,c} (\hat c_S - c_T)^2
            + w_{attn}\,\frac{1}{B}\sum_b\sum_h\sum_j \tilde a_T[b,h,j](\log\tilde a_T[b,h,j] - \log\tilde a_S[b,h,j])

    ``ĉ_S = LN_{D_T}(MLP(x^L_S))[:, 0]`` (the last block's tokens through the projector, before the student's own
    final norm), ``c_T`` = the teacher's CLS after its final LayerNorm. ``a = softmax(scale q_0 k^T)`` is the
    CLS row of the last block, per head ``[B, H, N]``. In order, as the official engine does:

    1. ``interpolate``: teacher CLS->patch probabilities reshaped to the teacher grid, resized bicubically to the
       student grid, rescaled to sum to ``1 - a_T[..., 0]`` (when the patch grids differ, e.g. ViT-S/8 -> ViT-S/16).
    2. ``aggregation``: ``ā = softmax((1/T_agg) Σ_h log a_h)`` on both sides (when the head counts differ); the KL
       is then over ``[B, N]``. Otherwise heads are matched one-to-one and the KL is summed over heads.
    3. clamp both to ``[1e-5, 0.996]`` and L1-renormalize.

    Args:
        student: timm ViT (with a CLS token).
        teachers: exactly one frozen self-supervised timm ViT (with a CLS token), e.g. DINO ViT-S/8, Mugs ViT-B/16.
        w_cls: weight of the CLS MSE (1.0; released scripts and code default).
        w_attn: weight of the attention KL (0.1 in the released scripts; the code default is 20.0).
        aggregation: ``"auto"`` (default: on iff the head counts differ), True or False. Off with different head
            counts is an error.
        t_agg: head-aggregation temperature ``T_agg`` (10.0, the released Mugs ViT-B -> ViT-S script; code default 20).
        interpolate: ``"auto"`` (default: on iff the patch grids differ), True or False. Off with different grids is
            an error (the token grids do not line up).
        clamp: ``(1e-5, 0.996)``, the official safety clamp; None disables it (and the renormalization). With
            None and ``interpolate``, the resized teacher row is floored at 1e-12 and renormalized (bicubic overshoot
            can make an entry <= 0, whose log would be NaN).
        proj_layers: projector depth (4, official).
        exact_official: True (default) computes the official math on the materialized ``[B, H, N]`` CLS rows
            (resize, clamp and renormalize act on probabilities). False skips the clamp and computes the KL in
            logit space with :func:`fastkd.functional.attention_kl` (``rows=[0]``; the aggregated case as one
            "head" of concatenated q/k, since ``Σ_h s_h = q_cat · k_cat``): exact without the clamp, and no
            resize (needs equal grids).
        eval_feature: embedding for k-NN (``features``): ``"projector"`` (default, ``ĉ_S``, the trained path) or
            ``"backbone"`` (the student's own final-norm CLS). Which one the paper evaluates is unknown
            (METHODS.md 2.7).

    Extra prefix tokens (e.g. a distillation token) are dropped from the keys of the CLS row (the row is
    renormalized over CLS + patches) on either side.

    Returns (``forward``): ``{"loss", "cls", "attn"}``; ``cls`` (MSE) and ``attn`` (KL) are unweighted.
    """

    self_supervised = True

    def __init__(
        self,
        student: nn.Module,
        teachers=(),
        *,
        w_cls: float = 1.0,
        w_attn: float = 0.1,
        aggregation: bool | str = "auto",
        t_agg: float = 10.0,
        interpolate: bool | str = "auto",
        clamp: tuple[float, float] | list[float] | None = (1e-5, 0.996),
        proj_layers: int = 4,
        exact_official: bool = True,
        eval_feature: str = "projector",
    ):
        super().__init__(student, teachers)
        check_teacher_count("attndistill", self.teachers, 1, "a self-supervised ViT")
        freeze_teachers(self.teachers)
        t = require_vit(self.teachers[0], "teachers[0]", "attndistill")
        s = require_vit(student, "student", "attndistill")
        if not hasattr(student, "forward_intermediates"):
            raise TypeError(f"student {type(student).__name__} has no forward_intermediates: attndistill reads the last "
                            "block's CLS token through it (timm's VisionTransformer family has it)")
        self.w_cls = check_range("w_cls", w_cls, 0.0, float("inf"))
        self.w_attn = check_range("w_attn", w_attn, 0.0, float("inf"))
        self.t_agg = check_range("t_agg", t_agg, 0.0, float("inf"), lo_open=True)
        if clamp is not None:
            if len(clamp) != 2 or not 0.0 < float(clamp[0]) < float(clamp[1]) <= 1.0:
                raise ValueError(f"clamp={clamp!r} must be (low, high) with 0 < low < high <= 1, or None")
            clamp = (float(clamp[0]), float(clamp[1]))
        self.clamp = clamp
        if eval_feature not in ("projector", "backbone"):
            raise ValueError(f"eval_feature={eval_feature!r} must be 'projector' or 'backbone'")
        self.eval_feature = eval_feature
        self.exact_official = bool(exact_official)

        self.lt, self.ls = token_layout(t), token_layout(s)
        for who, lay in (("teachers[0]", self.lt), ("student", self.ls)):
            if not lay.has_cls:
                raise ValueError(f"{who} has no CLS token: attndistill distils the CLS-query attention row")
        self.h_t, self.h_s = int(t.blocks[-1].attn.num_heads), int(s.blocks[-1].attn.num_heads)
        if aggregation == "auto":
            aggregation = self.h_t != self.h_s
        if not aggregation and self.h_t != self.h_s:
            raise ValueError(
                f"aggregation=False but the head counts differ (student {self.h_s}, teacher {self.h_t}): heads can "
                "only be matched one-to-one when they are equal; set aggregation=True (or 'auto')"
            )
        self.aggregation = bool(aggregation)
        if interpolate == "auto":
            interpolate = self.lt.grid != self.ls.grid
        if not interpolate and self.lt.grid != self.ls.grid:
            raise ValueError(
                f"token grids differ (student {self.ls.grid}, teacher {self.lt.grid}) and interpolate=False: set "
                "interpolate=True (or 'auto') to resize the teacher's CLS->patch row bicubically"
            )
        self.interpolate = bool(interpolate)
        if self.interpolate and not self.exact_official:
            raise ValueError("interpolate=True needs exact_official=True (the resize acts on probabilities)")

        self.projector = build_projector(int(s.embed_dim), int(t.embed_dim), proj_layers)
        # the attention forward's LSEs serve the kernel path when it compares the heads at their own scale
        self._record = ("q", "k") if self.exact_official or self.aggregation else ("q", "k", "lse")

    # ---- pieces ----------------------------------------------------------------------------------
    def _keys(self, layout, device: torch.device) -> torch.Tensor | None:
        """Key indices CLS + patches on ``device`` (None when there is no extra prefix token to drop); made once per
        layout and device, not per step."""
        if layout.extra == 0:
            return None
        cache = self.__dict__.setdefault("_key_index", {})
        key = (layout, device)
        if key not in cache:
            cache[key] = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(layout.prefix, layout.num_tokens)]
                                   ).to(device)
        return cache[key]

    def _student_forward(self, images: torch.Tensor):
        with AttentionTaps(self.student, blocks=[-1], record=self._record) as taps:
            prefix = self._last_prefix(images)
            rec = taps[-1]
        return prefix, rec

    def _last_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The prefix tokens (CLS first) after the student's last block, before its final norm: timm's
        ``forward_intermediates`` instead of a forward hook registered per step, which ``torch.compile`` cannot trace
        (a compiled step stays one graph)."""
        ((_, prefix),) = self.student.forward_intermediates(images, indices=1, output_fmt="NLC",
                                                            intermediates_only=True, return_prefix_tokens=True)
        return prefix

    def _teacher_forward(self, images: torch.Tensor):
        with torch.no_grad(), AttentionTaps(self.teachers[0], blocks=[-1], record=self._record) as taps:
            c_t = self.teachers[0].forward_features(images)[:, 0]
            rec = taps[-1]
        return c_t.float(), rec

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ĉ_S``: the CLS token (``tokens[:, 0]``) of the last block's output through the projector (per-token ops:
        CLS only)."""
        return self.projector(tokens[:, 0])

    def attention_loss(self, q_s, k_s, scale_s, q_t, k_t, scale_t, lse_s=None, lse_t=None) -> torch.Tensor:
        """The official attention KL from the last block's ``q, k`` (``[B, H, N, d]``) of both models.

        ``lse_s``, ``lse_t``: the attention forward's ``[B, H, N]`` LSEs at ``scale_s``/``scale_t`` where the taps
        recorded them (used by the ``exact_official=False`` kernel path when no tokens are dropped)."""
        ks_idx, kt_idx = self._keys(self.ls, k_s.device), self._keys(self.lt, k_t.device)
        if not self.exact_official:
            return self._attention_loss_kernel(q_s, k_s, scale_s, q_t, k_t, scale_t, ks_idx, kt_idx, lse_s, lse_t)
        if ks_idx is not None:
            k_s = k_s[:, :, ks_idx]
        if kt_idx is not None:
            k_t = k_t[:, :, kt_idx]
        if self.aggregation:
            # softmax((1/T) Σ_h log a_h), with log a_h = log_softmax(logits_h): the same math as the official
            # log(softmax(.)), without an fp16 underflow to log(0)
            a_s = self._aggregate(q_s, k_s, scale_s, src_grid=None)
            a_t = self._aggregate(q_t, k_t, scale_t, src_grid=self.lt.grid if self.interpolate else None)
        else:
            a_s = cls_row_probs(q_s, k_s, scale_s)
            a_t = cls_row_probs(q_t, k_t, scale_t)
            if self.interpolate:
                a_t = resize_teacher_row(a_t, self.lt.grid, self.ls.grid)
                if self.clamp is None:  # bicubic overshoot can make a probability <= 0: floor it, renormalize
                    a_t = F.normalize(a_t.clamp_min(_FLOOR), p=1, dim=-1)
        if self.clamp is not None:
            a_s = F.normalize(a_s.clamp(*self.clamp), p=1, dim=-1)
            a_t = F.normalize(a_t.clamp(*self.clamp), p=1, dim=-1)
        return F.kl_div(a_s.log(), a_t.detach(), reduction="batchmean")

    def _aggregate(self, q, k, scale, src_grid) -> torch.Tensor:
        if src_grid is None:
            logits = scale * torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float())
            log_a = torch.log_softmax(logits, dim=-1)
        else:  # teacher row resized first (official order: interpolate, then aggregate). Bicubic overshoot can
            # make a resized probability <= 0, whose log is NaN in the official code: floor it at 1e-12 first
            log_a = resize_teacher_row(cls_row_probs(q, k, scale), src_grid, self.ls.grid).clamp_min(_FLOOR).log()
        return torch.softmax(log_a.sum(dim=1) / self.t_agg, dim=-1)

    def _attention_loss_kernel(
        self, q_s, k_s, scale_s, q_t, k_t, scale_t, ks_idx, kt_idx, lse_s=None, lse_t=None
    ) -> torch.Tensor:
        """``exact_official=False``: logit-space KL through attention_kl, CLS row only, no clamp."""
        if ks_idx is not None:  # drop extra tokens (both q and k: row 0 is CLS either way); another softmax
            q_s, k_s = q_s[:, :, ks_idx], k_s[:, :, ks_idx]
            lse_s = None
        if kt_idx is not None:
            q_t, k_t = q_t[:, :, kt_idx], k_t[:, :, kt_idx]
            lse_t = None
        q_t, k_t = q_t.detach(), k_t.detach()
        rows = torch.zeros(1, dtype=torch.long, device=q_s.device)
        if self.aggregation:  # Σ_h q_h·k_h = concat_h(q_h)·concat_h(k_h): one "head" of width H·d

            def cat(x):
                return x.transpose(1, 2).reshape(x.shape[0], 1, x.shape[2], -1)

            return attention_kl(
                cat(q_s), cat(k_s), cat(q_t), cat(k_t), scale_s=scale_s / self.t_agg, scale_t=scale_t / self.t_agg,
                rows=rows, reduction="batchmean",
            )  # fmt: skip
        return attention_kl(
            q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, rows=rows, reduction="batchmean",
            lse_s=lse_s, lse_t=lse_t,
        )  # fmt: skip

    # ---- Method API ------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = images_of(batch, "attndistill")
        prefix, rec_s = self._student_forward(images)
        c_t, rec_t = self._teacher_forward(images)
        c_s = self.project(prefix)
        if c_s.shape != c_t.shape:
            raise ValueError(f"projected student CLS {tuple(c_s.shape)} != teacher CLS {tuple(c_t.shape)}")
        mse = F.mse_loss(c_s.float(), c_t)
        attn = self.attention_loss(rec_s.q, rec_s.k, rec_s.scale, rec_t.q, rec_t.k, rec_t.scale, rec_s.lse, rec_t.lse)
        return {"loss": self.w_cls * mse + self.w_attn * attn, "cls": mse, "attn": attn}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.eval_feature == "backbone":
            return self.student.forward_features(images)[:, 0]
        return self.project(self._last_prefix(images))

    def extra_repr(self) -> str:
        return (
            f"w_cls={self.w_cls}, w_attn={self.w_attn}, aggregation={self.aggregation}, t_agg={self.t_agg}, "
            f"interpolate={self.interpolate}, clamp={self.clamp}, exact_official={self.exact_official}"
        )
