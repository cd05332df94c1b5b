"""Co-advise / CivT: cross-inductive-bias distillation from a convolution and an involution teacher."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn

from fastkd.methods._kd import check_range
from fastkd.methods._kd import check_teacher_count
from fastkd.methods._kd import freeze_teachers
from fastkd.methods._kd import images_of
from fastkd.methods._kd import kl_div_t
from fastkd.methods._kd import task_ce
from fastkd.methods._kd import teacher_logits
from fastkd.methods.base import Method
from fastkd.methods.base import register
from fastkd.models.involution import ConvBNAct
from fastkd.models.involution import rednet_stem

__all__ = ["CoAdvise", "CoAdviseViT"]


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]


class CoAdviseViT(nn.Module):
    """The Co-advise student: a ViT whose linear patch projection is replaced by a convolution stem and an
    involution stem, with a CLS, a conv and an inv token (N = 3 + patches = 199 at 224 px / 16) and three heads.

    Built from a timm ``VisionTransformer`` (its ``blocks``, ``norm``, ``cls_token``, ``head`` are reused; its
    ``patch_embed`` and ``pos_embed`` are dropped):

    - conv stem: Conv7×7/2 (3 → c) + BN + ReLU, Conv3×3 (c → c) + BN + ReLU, Conv3×3 (c → c) + BN + ReLU, then
      Conv(p/2)×(p/2)/(p/2) (c → D): ``E_conv ∈ [B, P, D]`` (p = the ViT's patch size, c = ``stem_channels``);
    - involution stem: the RedNet stem (``fastkd.models.involution.rednet_stem``), then the same kind of
      Conv(p/2)/(p/2) (c → D): ``E_inv ∈ [B, P, D]``; it runs in fp32 outside autocast when ``inv_stem_fp32``;
    - tokens ``[CLS, mean_p E_conv, mean_p E_inv, E_conv + E_inv] + pos_embed`` (learnable ``[1, 3 + P, D]``,
      trunc-normal std 0.02);
    - after the final LayerNorm, tokens 0/1/2 go through ``head`` / ``head_conv`` / ``head_inv``.

    ``forward`` (inference) returns the mean of the three heads' logits; ``forward_heads`` returns all three.
    """

    def __init__(self, vit: nn.Module, stem_channels: int = 64, group_channels: int = 16,
                 inv_stem_fp32: bool = True):
        super().__init__()
        missing = [a for a in ("blocks", "norm", "cls_token", "patch_embed", "embed_dim", "head") if
                   not hasattr(vit, a)]
        if missing:
            raise TypeError(f"method 'coadvise' needs a timm VisionTransformer student (e.g. deit_small_patch16_224); "
                            f"{type(vit).__name__} lacks {', '.join(missing)}")
        if vit.cls_token is None:
            raise ValueError("method 'coadvise' needs a student with a CLS token (class_token=True)")
        if getattr(vit, "num_classes", 0) <= 0:
            raise ValueError("method 'coadvise' needs a student with a classifier head (num_classes > 0)")
        if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "global_pool", "token") != "token":
            raise ValueError("method 'coadvise' builds its own token layout; give it a plain ViT with one CLS token "
                             "and global_pool='token' (not a distilled ViT or one with registers)")
        patch = _pair(vit.patch_embed.patch_size)
        if patch[0] != patch[1] or patch[0] % 2:
            raise ValueError(f"method 'coadvise' needs a square, even patch size (the stems have stride 2); "
                             f"got patch_size={patch}")
        if stem_channels % 2 or (stem_channels // 2) % group_channels:
            raise ValueError(f"stem_channels={stem_channels}: half of it must be a multiple of "
                             f"group_channels={group_channels} (the involution groups)")
        d, k = vit.embed_dim, patch[0] // 2
        self.embed_dim = self.num_features = d
        self.num_classes = vit.num_classes
        self.patch_size = patch[0]
        self.img_size = _pair(vit.patch_embed.img_size)
        self.grid = (self.img_size[0] // patch[0], self.img_size[1] // patch[1])
        self.num_prefix_tokens = 3
        self.inv_stem_fp32 = inv_stem_fp32
        c = stem_channels
        self.conv_stem = nn.Sequential(
            ConvBNAct(3, c, 7, stride=2), ConvBNAct(c, c, 3), ConvBNAct(c, c, 3), nn.Conv2d(c, d, k, stride=k))
        self.inv_stem = nn.Sequential(rednet_stem(3, c, group_channels), nn.Conv2d(c, d, k, stride=k))
        self.cls_token = vit.cls_token
        self.pos_embed = nn.Parameter(torch.zeros(1, 3 + self.grid[0] * self.grid[1], d))
        trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = getattr(vit, "pos_drop", nn.Identity())
        self.norm_pre = getattr(vit, "norm_pre", nn.Identity())
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.head_drop = getattr(vit, "head_drop", nn.Identity())
        self.head = vit.head
        self.head_conv = nn.Linear(d, self.num_classes)
        self.head_inv = nn.Linear(d, self.num_classes)
        for head in (self.head_conv, self.head_inv):
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        # official init: kaiming-normal with torch's defaults (fan-in, gain √2) on every conv of both stems,
        # the 1×1 involution convs and the patch projections included
        for m in (*self.conv_stem.modules(), *self.inv_stem.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def no_weight_decay(self) -> set[str]:
        """timm's convention: the position embedding and the CLS token are not decayed."""
        return {"pos_embed", "cls_token"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` → the token sequence ``[B, 3 + P, D]`` (positions added)."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"CoAdviseViT was built for {self.img_size[0]}×{self.img_size[1]} images; "
                             f"got {tuple(x.shape[-2:])}")
        e_conv = self.conv_stem(x).flatten(2).transpose(1, 2)  # [B, P, D]
        if self.inv_stem_fp32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                e_inv = self.inv_stem(x.float())
        else:
            e_inv = self.inv_stem(x)
        e_inv = e_inv.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls.to(e_conv.dtype), e_conv.mean(1, keepdim=True), e_inv.mean(1, keepdim=True).to(
            e_conv.dtype), e_conv + e_inv], dim=1)
        return self.pos_drop(tokens + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.embed(x))
        x = self.blocks(x)
        return self.norm(x)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_cls, z_conv, z_inv)``."""
        x = self.head_drop(self.forward_features(x))
        return self.head(x[:, 0]), self.head_conv(x[:, 1]), self.head_inv(x[:, 2])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        if pre_logits:
            return x[:, :3].mean(1)
        return (self.head(x[:, 0]) + self.head_conv(x[:, 1]) + self.head_inv(x[:, 2])) / 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register("coadvise")
class CoAdvise(Method):
    r"""Co-advise / CivT (Ren, Gao, Hua, Xue, Tian, He, Zhao, "Co-advise: Cross Inductive Bias Distillation",
    CVPR 2022, https://arxiv.org/abs/2106.12378; official code ``OliverRensu/co-advise``).

    A convolution teacher (CNN, e.g. RegNetY) and an involution teacher (RedNet, ``fastkd.models.involution``),
    both frozen, teach a ViT student whose conv and inv tokens come from a conv and an involution stem
    (:class:`CoAdviseViT`; a plain timm ViT given as ``student`` is converted, its patch projection and position
    embedding replaced). With student logits ``z_cls, z_conv, z_inv`` from tokens 0/1/2 and teacher logits
    ``z_c`` (conv teacher), ``z_i`` (inv teacher), all on the same (Mixup/CutMix-mixed) images:

    .. math::

        L = \lambda_0\,\mathrm{CE}(z_{cls}, y)
          + \lambda_1\,\tau_1^2\,\mathrm{KL}\big(\sigma(z_c/\tau_1)\,\|\,\sigma(z_{conv}/\tau_1)\big)
          + \lambda_2\,\tau_2^2\,\mathrm{KL}\big(\sigma(z_i/\tau_2)\,\|\,\sigma(z_{inv}/\tau_2)\big)

    KL is summed over classes and averaged over the batch (``batchmean``); CE is soft-target CE against
    ``batch["targets"]`` under Mixup. Inference (``predict``) averages the three heads' logits. The official
    code uses soft KD only, λ0 = λ1 = λ2 = 1, τ1 = τ2 = 1 (METHODS.md §3.4).

    Args:
        student: a timm ``VisionTransformer`` (DeiT-S-sized in the official code: ``deit_small_patch16_224``) or
            an existing :class:`CoAdviseViT`.
        teachers: ``[conv_teacher, inv_teacher]`` (the released code: ``regnety_040`` and ``rednet101``).
        lambda_cls, lambda_conv, lambda_inv: ``λ0, λ1, λ2`` (default 1.0 each).
        tau_conv, tau_inv: ``τ1, τ2`` (default 1.0 each).
        label_smoothing: smoothing of the hard-label CE, used only when the batch carries no soft ``targets``
            (default 0.1, the official config's; under Mixup it is folded into the targets).
        stem_channels: width ``c`` of both stems (default 64, as RedNet's stem).
        group_channels: involution group width (default 16).
        inv_stem_fp32: run the involution stem in fp32 outside autocast (default True, as the official code,
            which has no half-precision involution).

    Returns (``forward``): ``{"loss", "ce", "kd_conv", "kd_inv"}`` with the weighted terms (``ce = λ0·CE``,
    ``kd_conv = λ1·τ1²·KL``, ``kd_inv = λ2·τ2²·KL``; ``loss`` is their sum).
    """

    logit_teachers = True  # the teacher gives logits only: teachers.cache can replace it

    def __init__(self, student: nn.Module, teachers=(), *, lambda_cls: float = 1.0, lambda_conv: float = 1.0,
                 lambda_inv: float = 1.0, tau_conv: float = 1.0, tau_inv: float = 1.0,
                 label_smoothing: float = 0.1, stem_channels: int = 64, group_channels: int = 16,
                 inv_stem_fp32: bool = True):
        if not isinstance(student, CoAdviseViT):
            student = CoAdviseViT(student, stem_channels=stem_channels, group_channels=group_channels,
                                  inv_stem_fp32=inv_stem_fp32)
        super().__init__(student, teachers)
        check_teacher_count("coadvise", self.teachers, 2, "[conv_teacher, involution_teacher]")
        freeze_teachers(self.teachers)
        inf = float("inf")
        self.lambda_cls = check_range("lambda_cls", lambda_cls, 0.0, inf)
        self.lambda_conv = check_range("lambda_conv", lambda_conv, 0.0, inf)
        self.lambda_inv = check_range("lambda_inv", lambda_inv, 0.0, inf)
        self.tau_conv = check_range("tau_conv", tau_conv, 0.0, inf, lo_open=True)
        self.tau_inv = check_range("tau_inv", tau_inv, 0.0, inf, lo_open=True)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        if not all(math.isfinite(v) for v in (self.lambda_cls, self.lambda_conv, self.lambda_inv)):
            raise ValueError("lambda_cls, lambda_conv and lambda_inv must be finite")

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = images_of(batch, "coadvise")
        z_cls, z_conv, z_inv = self.student.forward_heads(images)
        z_c = teacher_logits(self.teachers[0], images, "the conv teacher (teachers[0])", batch=batch, i=0)
        z_i = teacher_logits(self.teachers[1], images, "the involution teacher (teachers[1])", batch=batch,
                             i=1)
        ce = self.lambda_cls * task_ce(z_cls, batch, self.label_smoothing)
        kd_conv = self.lambda_conv * kl_div_t(z_conv, z_c, self.tau_conv, "batchmean")
        kd_inv = self.lambda_inv * kl_div_t(z_inv, z_i, self.tau_inv, "batchmean")
        return {"loss": ce + kd_conv + kd_inv, "ce": ce, "kd_conv": kd_conv, "kd_inv": kd_inv}

    def extra_repr(self) -> str:
        return (f"lambda=({self.lambda_cls}, {self.lambda_conv}, {self.lambda_inv}), "
                f"tau=({self.tau_conv}, {self.tau_inv}), label_smoothing={self.label_smoothing}")
