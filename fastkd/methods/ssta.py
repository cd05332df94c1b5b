"""SSTA: self-supervised models as teaching assistants for vision transformers (Wu et al., ICML 2022).

Paper: https://proceedings.mlr.press/v162/wu22c.html -- the official repository (https://github.com/GlassyWu/SSTA)
holds no code, so everything below the abstract level is a labelled reconstruction (METHODS.md section 1, all
marked UNVERIFIED there); every open choice is an option of :class:`SSTA`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastkd.functional import attention_kl
from fastkd.methods._attention import TokenLayout
from fastkd.methods._attention import require_vit
from fastkd.methods._attention import teacher_input
from fastkd.methods._attention import token_layout
from fastkd.methods._kd import as_logits
from fastkd.methods._kd import check_choice
from fastkd.methods._kd import check_range
from fastkd.methods._kd import check_teacher_count
from fastkd.methods._kd import freeze_teachers
from fastkd.methods._kd import images_of
from fastkd.methods._kd import kl_div_t
from fastkd.methods._kd import task_ce
from fastkd.methods.base import Method
from fastkd.methods.base import register
from fastkd.models import AttentionTaps
from fastkd.models.taps import unwrap_model

_ROLES = ("teacher", "ta")


def canonical_tokens(layout: TokenLayout, keep_cls: bool) -> list[int]:
    """Token indices in the common order ``[CLS] + patches``: extra prefix tokens (distillation token, registers)
    are dropped, and CLS too when ``keep_cls`` is False."""
    return ([0] if keep_cls else []) + list(range(layout.prefix, layout.num_tokens))


def read_importance(path: str | os.PathLike, layer: int, num_layers: int, num_heads: int, argument: str) -> int:
    """The most important head of ``layer`` from a ``fastkd importance`` JSON (``top_head_per_layer``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{argument}={str(path)!r} does not exist; write one with `fastkd importance --model ... --weights ... "
            "--data ...`, pass the head index directly, or use 'auto' (scored on the first training batch)"
        )
    data = json.loads(path.read_text())
    tops = data.get("top_head_per_layer")
    if not isinstance(tops, list) or not tops:
        raise ValueError(f"{argument}={str(path)!r} has no 'top_head_per_layer' list (not a fastkd importance file)")
    if len(tops) != num_layers:
        raise ValueError(
            f"{argument}={str(path)!r} scores {len(tops)} layers but the model has {num_layers}: wrong model?"
        )
    if int(data.get("num_heads", num_heads)) != num_heads:
        raise ValueError(
            f"{argument}={str(path)!r} scores {data.get('num_heads')} heads per layer but the model has {num_heads}"
        )
    return int(tops[layer])


@register("ssta")
class SSTA(Method):
    r"""SSTA (Wu, Gao, Zhang, Lin, Xie, Sun, Li, ICML 2022, https://proceedings.mlr.press/v162/wu22c.html): a
    supervised teacher and a self-supervised teaching assistant (TA) each give the student the attention map of
    their *most important head*. METHODS.md 1.3 reconstruction (UNVERIFIED; the official repository has no code):

    .. math::
        L = L_{logit}
          + \beta_T\,\frac{1}{B N}\sum_{b,i}\mathrm{KL}\big(P_T[b,i,:]\,\|\,P^{(1)}_S[b,i,:]\big)
          + \beta_A\,\frac{1}{B N}\sum_{b,i}\mathrm{KL}\big(P_A[b,i,:]\,\|\,P^{(2)}_S[b,i,:]\big)

    ``P = softmax(q k^T / (τ √d))`` of one head at one layer, row-wise over keys, computed by
    :func:`fastkd.functional.attention_kl` (streamed: no ``N×N`` map is stored). ``L_logit`` is DeiT's:

    * ``"hard"``: ``(1-α) CE(z_cls, y) + α CE(z_kd, argmax z_T)``
    * ``"soft"``: ``(1-α) CE(z_cls, y) + α T² KL(softmax(z_T/T) ‖ softmax(z_kd/T))``
    * ``"none"``: ``CE(z_cls, y)``

    where ``z_kd`` is the distillation-token head for a distilled student and ``z_cls`` otherwise.

    Head importance (METHODS.md 1.3, Michel et al. 2019, https://arxiv.org/abs/1905.10650): ``I_h = E|Σ O_h ·
    ∂L/∂O_h|`` from :mod:`fastkd.importance` (``top_head_per_layer`` of an ``importance.json``), or computed once
    on the first training batch's clean images and labels (``"auto"``: ``batch["clean_images"]`` under Mixup/CutMix,
    which the engine's loader keeps for it; the loss is ``fastkd importance``'s ``auto``: CE on the labels for a
    classifier, ``½‖f‖²`` of the pooled feature for a headless SSL backbone; scores are summed over ranks so every
    rank picks the same head). The chosen heads are saved in the state dict (buffer ``heads``), so a resumed run
    keeps them.

    Args:
        student: timm ViT/DeiT (a distilled DeiT's distillation token is dropped from the attention rows and
            columns through ``key_mask``/``rows``; its head then receives the logit KD).
        teachers: ``[teacher, ta]``: a supervised timm ViT classifier (same classes as the student) and a
            self-supervised timm ViT (e.g. DINO / MAE). CNNs are rejected (no attention heads).
        beta_t, beta_a: weights of the teacher / TA attention terms (1.0, 1.0).
        tau: attention temperature on both sides (1.0; ``scale = d^{-1/2} / τ``).
        student_layer, teacher_layer, ta_layer: block index of each model (-1 = last block, default).
        student_heads: student heads receiving (teacher, TA) targets ((0, 1)); the same head twice is allowed.
        teacher_head, ta_head: the head to distil from, overriding importance (None: use importance).
        teacher_importance, ta_importance: path of an ``importance.json`` for that model, or ``"auto"`` (default):
            Michel gradient importance on the first training batch.
        importance_loss: objective for ``"auto"`` importance (``fastkd.importance.LOSSES``; default ``"auto"``).
        rows: ``"all"`` (default: every query row, mean over ``B·N``) or ``"cls"`` (the CLS row only).
        direction: ``"forward"`` (KL(teacher ‖ student), default) or ``"reverse"``.
        logit_kd: ``"hard"`` (default, DeiT's default), ``"soft"`` or ``"none"``.
        alpha: weight of the logit-KD term (0.5, DeiT).
        kd_temperature: ``T`` of the soft logit KD (1.0, DeiT).
        kd_reduction: ``"batchmean"`` (default, KL / B) or ``"numel"`` (DeiT's official / (B·C)).
        label_smoothing: CE label smoothing without soft targets (0.1, the DeiT recipe).

    Token grids must line up (same patch size and resolution for student, teacher and TA): all-rows attention
    maps have no resize rule, so a mismatch is an error. Extra prefix tokens (distillation token, registers) are
    dropped; CLS is kept when all three models have one.

    Returns (``forward``): ``{"loss", "ce", "kd", "attn_teacher", "attn_ta"}``, unweighted (``kd`` is 0 when
    ``logit_kd="none"``).
    """

    def __init__(
        self,
        student: nn.Module,
        teachers=(),
        *,
        beta_t: float = 1.0,
        beta_a: float = 1.0,
        tau: float = 1.0,
        student_layer: int = -1,
        teacher_layer: int = -1,
        ta_layer: int = -1,
        student_heads: tuple[int, int] | list[int] = (0, 1),
        teacher_head: int | None = None,
        ta_head: int | None = None,
        teacher_importance: str | None = "auto",
        ta_importance: str | None = "auto",
        importance_loss: str = "auto",
        rows: str = "all",
        direction: str = "forward",
        logit_kd: str = "hard",
        alpha: float = 0.5,
        kd_temperature: float = 1.0,
        kd_reduction: str = "batchmean",
        label_smoothing: float = 0.1,
    ):
        super().__init__(student, teachers)
        check_teacher_count("ssta", self.teachers, 2, "[supervised teacher, self-supervised teaching assistant]")
        freeze_teachers(self.teachers)
        models = {
            "student": require_vit(student, "student", "ssta"),
            "teacher": require_vit(self.teachers[0], "teachers[0] (the supervised teacher)", "ssta"),
            "ta": require_vit(self.teachers[1], "teachers[1] (the teaching assistant)", "ssta"),
        }
        self.beta_t = check_range("beta_t", beta_t, 0.0, float("inf"))
        self.beta_a = check_range("beta_a", beta_a, 0.0, float("inf"))
        self.tau = check_range("tau", tau, 0.0, float("inf"), lo_open=True)
        self.rows = check_choice("rows", rows, ("all", "cls"))
        self.direction = check_choice("direction", direction, ("forward", "reverse"))
        self.logit_kd = check_choice("logit_kd", logit_kd, ("hard", "soft", "none"))
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.kd_temperature = check_range("kd_temperature", kd_temperature, 0.0, float("inf"), lo_open=True)
        self.kd_reduction = check_choice("kd_reduction", kd_reduction, ("batchmean", "numel"))
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        from fastkd.importance import LOSSES

        self.importance_loss = check_choice("importance_loss", importance_loss, LOSSES)

        # layers
        self.layers = {}
        for who, arg, value in (
            ("student", "student_layer", student_layer),
            ("teacher", "teacher_layer", teacher_layer),
            ("ta", "ta_layer", ta_layer),
        ):
            depth = len(models[who].blocks)
            if not isinstance(value, int) or not -depth <= value < depth:
                raise ValueError(f"{arg}={value!r} is out of range for a model with {depth} blocks")
            self.layers[who] = value % depth
        self.num_heads = {who: int(models[who].blocks[self.layers[who]].attn.num_heads) for who in models}

        # student heads
        if len(student_heads) != 2:
            raise ValueError(f"student_heads={student_heads!r} must be two head indices (teacher target, TA target)")
        for h in student_heads:
            if not isinstance(h, int) or not 0 <= h < self.num_heads["student"]:
                raise ValueError(
                    f"student_heads={list(student_heads)}: head {h!r} is out of range; the student has "
                    f"{self.num_heads['student']} heads in block {self.layers['student']}"
                )
        self.student_heads = (int(student_heads[0]), int(student_heads[1]))

        # teacher / TA heads: explicit, from importance.json, or auto (first batch)
        self.register_buffer("heads", torch.full((2,), -1, dtype=torch.long))
        self._auto: dict[str, bool] = {}
        for i, (who, head, imp, harg, iarg) in enumerate(
            (
                ("teacher", teacher_head, teacher_importance, "teacher_head", "teacher_importance"),
                ("ta", ta_head, ta_importance, "ta_head", "ta_importance"),
            )
        ):
            H = self.num_heads[who]
            if head is None and imp not in (None, "auto"):
                head = read_importance(imp, self.layers[who], len(models[who].blocks), H, iarg)
                harg = f"{iarg} (top head of layer {self.layers[who]})"
            if head is not None:
                if not isinstance(head, int) or not 0 <= head < H:
                    raise ValueError(f"{harg}={head!r} is out of range: the {who} has {H} heads in that block")
                self.heads[i] = head
            self._auto[who] = head is None

        # token layouts
        lay = {who: token_layout(m) for who, m in models.items()}
        grids = {who: l.grid for who, l in lay.items()}
        if len(set(grids.values())) != 1:
            raise ValueError(
                f"token grids differ (student {grids['student']}, teacher {grids['teacher']}, TA {grids['ta']}): "
                "ssta compares full attention maps, which have no resize rule; use the same patch size and "
                "image size for all three models"
            )
        keep_cls = all(l.has_cls for l in lay.values())
        if self.rows == "cls" and not keep_cls:
            raise ValueError("rows='cls' needs a CLS token in the student, the teacher and the TA")
        self._layout = lay
        self._tokens = {who: canonical_tokens(l, keep_cls) for who, l in lay.items()}
        # built once, not per step: the chosen heads as Python ints (host reads of the buffer happen once, and
        # again only after load_state_dict) and the token index tensors per device
        self._heads: tuple[int, int] | None = None
        self._index: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._read_heads()
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_heads())
        self._distilled = hasattr(student, "dist_token") and hasattr(student, "head_dist")
        if self._distilled and hasattr(student, "set_distilled_training"):
            student.set_distilled_training(True)

    @classmethod
    def needs_clean_images(cls, params: dict[str, Any]) -> bool:
        """``importance="auto"`` scores the heads on the first batch's clean images (before Mixup/CutMix)."""
        return any(params.get(f"{who}_head") is None and params.get(f"{who}_importance", "auto") in (None, "auto")
                   for who in _ROLES)

    # ---- heads ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _auto_select(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        from fastkd.importance import compute_importance

        for i, who in enumerate(_ROLES):
            if not self._auto[who] or int(self.heads[i]) >= 0:
                continue
            teacher = self.teachers[i]
            bare = unwrap_model(teacher)
            x = teacher_input(teacher, images)
            y = labels if labels is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            num_classes = int(getattr(bare, "num_classes", 0) or 0)
            student_classes = int(getattr(self.student, "num_classes", 0) or 0)
            with torch.enable_grad():
                res = compute_importance(
                    bare, [(x, y)], scores=("gradient",), loss=self.importance_loss,
                    num_data_classes=student_classes if labels is not None and num_classes else None,
                    device=x.device, progress=False,
                )  # fmt: skip
            score = torch.tensor(res["scores"]["gradient"][self.layers[who]], dtype=torch.float64, device=x.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(score)  # every rank picks the same head
            self.heads[i] = int(score.argmax())

    def selected_heads(self) -> dict[str, int | None]:
        """``{"teacher": h_T*, "ta": h_A*}`` (None until chosen)."""
        return {who: (int(h) if int(h) >= 0 else None) for who, h in zip(_ROLES, self.heads.tolist())}

    def _read_heads(self) -> None:
        """Keep the chosen heads as Python ints (None until both are chosen): the forward reads no buffer."""
        heads = self.heads.tolist()
        self._heads = (int(heads[0]), int(heads[1])) if min(heads) >= 0 else None

    def _chosen_heads(self, batch: dict[str, Any], images: torch.Tensor) -> tuple[int, int]:
        """``(h_T, h_A)``, chosen on the first batch when ``"auto"`` (scored on clean images and their labels, not
        the Mixup/CutMix batch)."""
        if self._heads is None:
            clean = batch.get("clean_images")
            if clean is None and "targets" in batch:
                raise ValueError("ssta importance='auto' scores heads on clean images, but this mixed batch has "
                                 "no batch['clean_images'] (set keep_clean_images=True on the training loader, "
                                 "or pass teacher_head/ta_head or an importance.json)")
            self._auto_select(images if clean is None else clean, batch.get("labels"))
            self._read_heads()
        return self._heads

    def _tokens_on(self, who: str, device: torch.device) -> torch.Tensor:
        """``self._tokens[who]`` as an index tensor on ``device`` (made once per device)."""
        key = (who, device)
        if key not in self._index:
            self._index[key] = torch.tensor(self._tokens[who], device=device)
        return self._index[key]

    def _student_key_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """``[N_s]`` bool: True on the student's canonical tokens (made once per device)."""
        key = ("key_mask", device)
        if key not in self._index:
            mask = torch.zeros(num_tokens, dtype=torch.bool, device=device)
            mask[self._tokens_on("student", device)] = True
            self._index[key] = mask
        return self._index[key]

    # ---- attention term ------------------------------------------------------------------------------
    def _attention_term(self, rec_s, rec_t, who: str, student_head: int, teacher_head: int) -> torch.Tensor:
        q_s, k_s = rec_s.q, rec_s.k
        B, _, N_s, _ = q_s.shape
        idx_s, idx_t = self._tokens["student"], self._tokens[who]
        dev = q_s.device
        # the teacher-side head, laid out on the student's token positions (it is one head: a cheap copy)
        q_t = rec_t.q[:, teacher_head : teacher_head + 1].detach()
        k_t = rec_t.k[:, teacher_head : teacher_head + 1].detach()
        if rec_t.q.shape[2] != self._layout[who].num_tokens or N_s != self._layout["student"].num_tokens:
            raise ValueError(
                f"recorded token counts (student {N_s}, {who} {rec_t.q.shape[2]}) do not match the models' patch "
                "grids: run every model at the image size it was built for"
            )
        key_mask = rows = None
        # the LSEs the attention forward computed (natural log, [B, H, N]) hold for the kernel's logits only at
        # the attention's own scale (tau = 1) and on the unchanged token set of each side
        own_scale = self.tau == 1.0
        lse_s = rec_s.lse if own_scale else None
        lse_t = rec_t.lse[:, teacher_head : teacher_head + 1] if own_scale and rec_t.lse is not None else None
        if len(idx_s) == N_s:  # the student has no extra token: take the teacher's canonical tokens
            if len(idx_t) != rec_t.q.shape[2]:
                it = self._tokens_on(who, dev)
                q_t, k_t = q_t[:, :, it], k_t[:, :, it]
                lse_t = None  # keys dropped: another softmax
        else:  # drop the student's extra tokens through key_mask (columns) and rows
            it, is_ = self._tokens_on(who, dev), self._tokens_on("student", dev)
            pad_q = q_t.new_zeros(B, 1, N_s, q_t.shape[-1])
            pad_k = k_t.new_zeros(B, 1, N_s, k_t.shape[-1])
            pad_q[:, :, is_] = q_t[:, :, it]
            pad_k[:, :, is_] = k_t[:, :, it]
            q_t, k_t = pad_q, pad_k
            key_mask = self._student_key_mask(N_s, dev)
            rows = is_
            lse_s = lse_t = None  # masked keys: another softmax (and key_mask with given LSEs is not supported)
        if self.rows == "cls":
            rows = self._tokens_on("student", dev)[:1]
        return attention_kl(
            q_s, k_s, q_t, k_t, pairs=[(student_head, 0)], scale_s=rec_s.scale / self.tau,
            scale_t=rec_t.scale / self.tau, rows=rows, key_mask=key_mask, reduction="mean", direction=self.direction,
            lse_s=lse_s, lse_t=lse_t,
        )  # fmt: skip

    # ---- Method API ----------------------------------------------------------------------------------
    def _student_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.student(images)
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return out[0], out[1]
        z = as_logits(out, "the student")
        return z, z

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = images_of(batch, "ssta")
        h_t, h_a = self._chosen_heads(batch, images)
        teacher, ta = self.teachers
        record = ("q", "k", "lse") if self.tau == 1.0 else ("q", "k")  # see _attention_term
        with AttentionTaps(self.student, blocks=[self.layers["student"]], record=record) as s_taps:
            z_cls, z_kd = self._student_logits(images)
            rec_s = s_taps[self.layers["student"]]
        with torch.no_grad():
            with AttentionTaps(teacher, blocks=[self.layers["teacher"]], record=record) as t_taps:
                z_t = as_logits(teacher(images), "teachers[0]").float() if self.logit_kd != "none" else None
                if z_t is None:
                    teacher.forward_features(images)
                rec_t = t_taps[self.layers["teacher"]]
            with AttentionTaps(ta, blocks=[self.layers["ta"]], record=record) as a_taps:
                ta.forward_features(images)
                rec_a = a_taps[self.layers["ta"]]

        ce = task_ce(z_cls, batch, self.label_smoothing)
        if self.logit_kd == "none":
            kd = ce.new_zeros(())
            loss = ce
        else:
            if z_t.shape != z_kd.shape:
                raise ValueError(f"teacher logits {tuple(z_t.shape)} and student logits {tuple(z_kd.shape)} differ; "
                                 "the student and the teacher need the same number of classes")
            if self.logit_kd == "hard":
                kd = F.cross_entropy(z_kd.float(), z_t.argmax(dim=-1))
            else:
                kd = kl_div_t(z_kd, z_t, self.kd_temperature, self.kd_reduction)
            loss = (1.0 - self.alpha) * ce + self.alpha * kd
        attn_t = self._attention_term(rec_s, rec_t, "teacher", self.student_heads[0], h_t)
        attn_a = self._attention_term(rec_s, rec_a, "ta", self.student_heads[1], h_a)
        loss = loss + self.beta_t * attn_t + self.beta_a * attn_a
        return {"loss": loss, "ce": ce, "kd": kd, "attn_teacher": attn_t, "attn_ta": attn_a}

    def extra_repr(self) -> str:
        return (
            f"beta_t={self.beta_t}, beta_a={self.beta_a}, tau={self.tau}, layers={self.layers}, "
            f"student_heads={self.student_heads}, heads={self.selected_heads()}, rows={self.rows!r}, "
            f"logit_kd={self.logit_kd!r}, alpha={self.alpha}"
        )
