"""SDSSL: self-distilled self-supervised learning (per-layer CLS tokens learn from the final-layer target)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.distributed import all_gather_cat
from fastkd.distributed import all_gather_with_grad
from fastkd.distributed import rank_and_world
from fastkd.methods._kd import check_choice
from fastkd.methods._kd import check_range
from fastkd.methods._kd import upcast
from fastkd.methods.base import Method
from fastkd.methods.base import register

__all__ = ["SDSSL", "build_mlp", "sincos_2d_pos_embed"]

_LAMBDA_MAX = {"moco": 1.0, "byol": 0.8, "simclr": 0.8}


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool,
              last_bn_affine: bool = False) -> nn.Sequential:
    """``[Linear(no bias) → BN → ReLU] × (num_layers − 1) → Linear(no bias) [→ BN(affine=last_bn_affine)]``."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine))
    return nn.Sequential(*layers)


def sincos_2d_pos_embed(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[gh·gw, dim]`` (MoCo v3 layout: sin/cos of the w coordinate, then
    sin/cos of the h coordinate, each over ``dim/4`` frequencies ``temperature^(−k/(dim/4))``)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4; got {dim}")
    gh, gw = grid
    h, w = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                          indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    out_w = w.flatten()[:, None] * omega[None]
    out_h = h.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1).float()


@register("sdssl")
class SDSSL(Method):
    r"""SDSSL (Jang, Kim, Yoo, Kong, Kim, Kwak, "Self-Distilled Self-Supervised Representation Learning",
    WACV 2023, https://arxiv.org/abs/2111.12958; official code ``hagiss/SDSSL``), on SimCLR, BYOL or MoCo v3.

    For each block ``l = 1..L`` of the student ViT, the CLS token through the **shared final LayerNorm** gives
    ``r_l^v`` (view ``v ∈ {1, 2}``). Each layer has a projector ``g_l`` (3-layer MLP, hidden ``proj_hidden`` for
    ``l < L`` and ``proj_hidden_last`` for ``l = L``, output ``out_dim``) and, for MoCo/BYOL, a predictor ``q_l``
    (2-layer MLP, hidden ``pred_hidden``); ``p_l^v = q_l(g_l(r_l^v))``. MoCo/BYOL targets come from an EMA copy of
    the backbone and of ``g_L``: ``z^v = g^T(r^{T,v})`` (final CLS after the final LN).

    MoCo v3 (``ℓ`` = InfoNCE against the targets all-gathered over ranks, ``τ`` = 0.2)::

        ℓ(P, Z) = 2τ · mean_rows CE( P̂ Ẑ_allᵀ / τ, label = own index )
        L_final = ℓ(p_L², z¹) + ℓ(p_L¹, z²)
        L_mid   = ℓ(stack_{l<L} p_l², z¹) + ℓ(stack_{l<L} p_l¹, z²)          # mean over the (L−1)·B rows
        L_pred  = w_pred · [ℓ(stack_{l≤L} q_l(sg(g_l(r_l²))), z¹) + swapped]  # trains the predictors only
        L = L_final + λ(t) · L_mid + L_pred

    BYOL: the same three terms with ``ℓ(p, z) = mean_rows (2 − 2·cos(p, z))``. SimCLR (one encoder, no
    predictor, no EMA): ``L_final`` = NT-Xent over the ``2B·G`` final projections (τ = 0.2); in ``L_mid`` the
    anchor ``ĝ_l(r_l^v)[b]`` (``l < L``) has as positive the stop-gradient final projection of the other view of
    image ``b``, as negatives all other gathered final projections except its own view's; ``L = L_final +
    λ(t)·L_mid``. ``λ(t) = λ_max·(1 − cos(π t/T))/2`` ramps 0 → λ_max over training; the EMA momentum follows
    ``m(t) = 1 − (1 − m_0)(1 + cos(π t/T))/2`` (0.996 → 1). Both are updated by :meth:`on_step_end`.

    The MoCo-v3 stability tricks of the official ViT are applied to the student in place (options below): a frozen
    random patch projection and a fixed 2-D sin-cos position embedding (CLS position zero).

    Args:
        student: timm ``VisionTransformer`` with a CLS token (``num_classes=0`` is typical; the head is unused).
        teachers: must be empty (the target is the EMA student, or the stop-grad final layer for SimCLR).
        variant: ``"moco"`` (default), ``"byol"`` or ``"simclr"``.
        temperature: ``τ`` of InfoNCE / NT-Xent (default 0.2; unused by BYOL).
        lambda_max: final weight of ``L_mid`` (default: 1.0 MoCo v3, 0.8 BYOL/SimCLR, the official ``ratio``).
        out_dim: projector/predictor output (default 256).
        proj_hidden: hidden width of the projectors of layers ``l < L`` (default 2048).
        proj_hidden_last: hidden width of the final layer's projector (default 4096).
        pred_hidden: hidden width of the predictors (default 4096).
        pred_weight: weight ``w_pred`` of ``L_pred`` (default ``None`` = the depth ``L``; 12 for ViT-B, the
            official ×12, i.e. a per-layer sum).
        last_bn: final BatchNorm (affine-free) at the end of the projectors and predictors (default ``None`` =
            per variant: on for MoCo v3 and SimCLR, off for BYOL; METHODS.md §4.3).
        momentum: EMA momentum at the start of training ``m_0`` (default 0.996; cosine to ``momentum_final``).
        momentum_final: EMA momentum at the end (default 1.0).
        freeze_patch_embed: freeze the (random) patch projection (default True, MoCo v3 trick).
        sincos_pos_embed: replace the position embedding by a fixed 2-D sin-cos one (default True).
        knn_on_target: ``features`` (k-NN) uses the EMA target's final CLS, as the official monitoring
            (default True; SimCLR has no target and uses the student).
        sync_bn: ``SyncBatchNorm`` in the projectors and predictors (BN statistics over all processes, as the
            official trainers). None (default): on when more than one process trains on CUDA.

    SimCLR sends both views through each projector in one pass, so its BatchNorm statistics cover both views (the
    official code); MoCo v3 and BYOL project one view at a time, as theirs.

    Returns (``forward``): ``{"loss", "final", "mid", "pred"}`` with the weighted terms (``mid = λ(t)·L_mid``,
    ``pred = w_pred·[…]``, 0 for SimCLR; ``loss`` is their sum). The current ``λ(t)`` is the buffer ``lam``.
    """

    self_supervised = True

    def __init__(self, student: nn.Module, teachers=(), *, variant: str = "moco", temperature: float = 0.2,
                 lambda_max: float | None = None, out_dim: int = 256, proj_hidden: int = 2048,
                 proj_hidden_last: int = 4096, pred_hidden: int = 4096, pred_weight: float | None = None,
                 last_bn: bool | None = None, momentum: float = 0.996, momentum_final: float = 1.0,
                 freeze_patch_embed: bool = True, sincos_pos_embed: bool = True, knn_on_target: bool = True,
                 sync_bn: bool | None = None):
        super().__init__(student, teachers)
        if len(self.teachers):
            raise ValueError(f"method 'sdssl' trains without teachers (its target is an EMA copy of the student); "
                             f"got teachers of length {len(self.teachers)}")
        missing = [a for a in ("blocks", "norm", "cls_token", "patch_embed", "embed_dim", "forward_intermediates")
                   if not hasattr(student, a)]
        if missing:
            raise TypeError(f"method 'sdssl' needs a timm VisionTransformer student; {type(student).__name__} lacks "
                            f"{', '.join(missing)}")
        if student.cls_token is None:
            raise ValueError("method 'sdssl' needs a student with a CLS token (class_token=True)")
        self.depth = len(student.blocks)
        if self.depth < 2:
            raise ValueError(f"method 'sdssl' needs a student with at least 2 blocks; got depth {self.depth}")
        self.variant = check_choice("variant", variant, ("moco", "byol", "simclr"))
        self.temperature = check_range("temperature", temperature, 0.0, float("inf"), lo_open=True)
        self.lambda_max = check_range("lambda_max", _LAMBDA_MAX[variant] if lambda_max is None else lambda_max,
                                      0.0, float("inf"))
        self.pred_weight = check_range("pred_weight", self.depth if pred_weight is None else pred_weight,
                                       0.0, float("inf"))
        self.momentum_base = check_range("momentum", momentum, 0.0, 1.0)
        self.momentum_final = check_range("momentum_final", momentum_final, 0.0, 1.0)
        for name, v in (("out_dim", out_dim), ("proj_hidden", proj_hidden), ("proj_hidden_last", proj_hidden_last),
                        ("pred_hidden", pred_hidden)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name}={v} must be a positive integer")
        self.last_bn = (variant != "byol") if last_bn is None else bool(last_bn)
        self.knn_on_target = knn_on_target

        if freeze_patch_embed:
            student.patch_embed.requires_grad_(False)
        if sincos_pos_embed:
            self._set_sincos_pos_embed(student)

        d = student.embed_dim
        self.projectors = nn.ModuleList(
            build_mlp(3, d, proj_hidden_last if l == self.depth - 1 else proj_hidden, out_dim, self.last_bn)
            for l in range(self.depth))
        self.predictors = None
        self.target_backbone = None
        self.target_projector = None
        if variant != "simclr":
            self.predictors = nn.ModuleList(
                build_mlp(2, out_dim, pred_hidden, out_dim, self.last_bn) for _ in range(self.depth))
            self.target_backbone = copy.deepcopy(student).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projectors[-1]).requires_grad_(False)
        if sync_bn is None:  # SyncBatchNorm has no CPU path: CPU (gloo) runs keep per-process statistics
            sync_bn = rank_and_world()[1] > 1 and torch.cuda.is_available()
        self.sync_bn = bool(sync_bn)
        if self.sync_bn:  # the official trainers synchronise the heads' BatchNorm across processes
            for name in ("projectors", "predictors", "target_projector"):
                heads = getattr(self, name)
                if heads is not None:
                    setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(heads))
        self.register_buffer("lam", torch.zeros(()))
        self.register_buffer("momentum", torch.tensor(self.momentum_base))

    @staticmethod
    def _set_sincos_pos_embed(student: nn.Module) -> None:
        pe = getattr(student, "pos_embed", None)
        if pe is None:
            raise ValueError("sincos_pos_embed=True needs a student with an absolute pos_embed")
        grid = tuple(student.patch_embed.grid_size)
        n_patch = grid[0] * grid[1]
        if pe.shape[1] < n_patch:
            raise ValueError(f"pos_embed has {pe.shape[1]} positions, fewer than the {n_patch} patches")
        with torch.no_grad():
            pe.zero_()
            pe[0, pe.shape[1] - n_patch:] = sincos_2d_pos_embed(grid, pe.shape[-1]).to(pe)
        pe.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------------------
    # features

    def layer_cls(self, images: torch.Tensor, model: nn.Module | None = None) -> list[torch.Tensor]:
        """``[r_1, …, r_L]``: each block's CLS token through the final LayerNorm, ``[B, D]`` each."""
        model = self.student if model is None else model
        out = model.forward_intermediates(images, indices=self.depth, norm=True, output_fmt="NLC",
                                          intermediates_only=True, return_prefix_tokens=True)
        return [prefix[:, 0] for _, prefix in out]

    def _target(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            r = self.target_backbone.forward_features(images)[:, 0]
            return self.target_projector(r)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        model = self.target_backbone if (self.knn_on_target and self.target_backbone is not None) else self.student
        return model.forward_features(images)[:, 0]

    # ------------------------------------------------------------------------------------------------------------
    # losses

    def _infonce(self, p: torch.Tensor, z_all: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(upcast(p), dim=1) @ z_all.t() / self.temperature
        return 2 * self.temperature * F.cross_entropy(logits, labels)

    @staticmethod
    def _byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * F.cosine_similarity(upcast(p), upcast(z), dim=-1)).mean()

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        views = batch.get("images")
        if not isinstance(views, (list, tuple)) or len(views) != 2 or not all(torch.is_tensor(v) for v in views):
            raise TypeError("method 'sdssl' needs batch['images'] as a list of 2 augmented views [B, 3, H, W]")
        x1, x2 = views
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(f"the two views have different batch sizes: {x1.shape[0]} and {x2.shape[0]}")
        r1, r2 = self.layer_cls(x1), self.layer_cls(x2)
        if self.variant == "simclr":  # official: both views through each projector in one pass (BN over 2B rows)
            g1, g2 = zip(*(proj(torch.cat([a, b])).split(a.shape[0]) for proj, a, b in zip(self.projectors, r1, r2)))
        else:  # official MoCo v3 / BYOL: one view at a time
            g1 = [proj(r) for proj, r in zip(self.projectors, r1)]
            g2 = [proj(r) for proj, r in zip(self.projectors, r2)]
        lam = self.lam.detach()
        if self.variant == "simclr":
            final, mid = self._simclr(g1, g2)
            pred = torch.zeros((), device=final.device)
        else:
            final, mid, pred = self._moco_byol(x1, x2, g1, g2)
        mid = lam * mid
        return {"loss": final + mid + pred, "final": final, "mid": mid, "pred": pred}

    def _moco_byol(self, x1, x2, g1, g2):
        B = x1.shape[0]
        p1 = [pred(g) for pred, g in zip(self.predictors, g1)]
        p2 = [pred(g) for pred, g in zip(self.predictors, g2)]
        q1 = [pred(g.detach()) for pred, g in zip(self.predictors, g1)]
        q2 = [pred(g.detach()) for pred, g in zip(self.predictors, g2)]
        z1, z2 = upcast(self._target(x1)), upcast(self._target(x2))
        if self.variant == "moco":
            rank, _ = rank_and_world()
            z1a = all_gather_cat(F.normalize(z1, dim=1))
            z2a = all_gather_cat(F.normalize(z2, dim=1))
            own = torch.arange(B, device=z1.device) + rank * B

            def ell(rows, za):
                n = len(rows)
                return self._infonce(torch.cat(rows), za, own.repeat(n))

            final = ell(p2[-1:], z1a) + ell(p1[-1:], z2a)
            mid = ell(p2[:-1], z1a) + ell(p1[:-1], z2a)
            pred = self.pred_weight * (ell(q2, z1a) + ell(q1, z2a))
        else:
            def ell(rows, z):
                return self._byol(torch.cat(rows), z.repeat(len(rows), 1))

            final = ell(p2[-1:], z1) + ell(p1[-1:], z2)
            mid = ell(p2[:-1], z1) + ell(p1[:-1], z2)
            pred = self.pred_weight * (ell(q2, z1) + ell(q1, z2))
        return final, mid, pred

    def _simclr(self, g1, g2):
        B = g1[0].shape[0]
        rank, world = rank_and_world()
        f1, f2 = F.normalize(upcast(g1[-1]), dim=1), F.normalize(upcast(g2[-1]), dim=1)
        # [2·B·G]: view-1 rows of all ranks, then view-2
        keys = torch.cat([all_gather_with_grad(f1), all_gather_with_grad(f2)])
        n_all = B * world
        idx = torch.arange(B, device=f1.device) + rank * B
        self_idx = torch.cat([idx, idx + n_all])  # anchor (v, b) → its own key
        pos_idx = torch.cat([idx + n_all, idx])  # → the other view of the same image
        tau = self.temperature

        def nt_xent(anchors, key_set, reps):
            logits = anchors @ key_set.t() / tau
            mask = torch.zeros_like(logits, dtype=torch.bool)
            rows = torch.arange(logits.shape[0], device=logits.device)
            mask[rows, self_idx.repeat(reps)] = True
            logits = logits.masked_fill(mask, float("-inf"))
            return F.cross_entropy(logits, pos_idx.repeat(reps))

        final = nt_xent(torch.cat([f1, f2]), keys, 1)
        mids = [torch.cat([F.normalize(upcast(a), dim=1), F.normalize(upcast(b), dim=1)])
                for a, b in zip(g1[:-1], g2[:-1])]
        mid = nt_xent(torch.cat(mids), keys.detach(), len(mids))
        return final, mid

    # ------------------------------------------------------------------------------------------------------------
    # schedules

    def lambda_at(self, step: int, total_steps: int) -> float:
        """``λ(t) = λ_max·(1 − cos(π t/T))/2`` (half cosine 0 → λ_max)."""
        t = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return self.lambda_max * (1 - math.cos(math.pi * t)) / 2

    def momentum_at(self, step: int, total_steps: int) -> float:
        """``m(t) = m_final − (m_final − m_0)(1 + cos(π t/T))/2`` (cosine m_0 → m_final)."""
        t = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return self.momentum_final - (self.momentum_final - self.momentum_base) * (1 + math.cos(math.pi * t)) / 2

    @torch.no_grad()
    def ema_update(self, m: float | torch.Tensor) -> None:
        """``θ_T ← m·θ_T + (1 − m)·θ`` for the target backbone (from the student) and projector (from ``g_L``).
        ``m``: a number or a 0-d tensor (the ``momentum`` buffer, not read back to the host)."""
        if self.target_backbone is None:
            return
        pairs = [(self.target_backbone, self.student), (self.target_projector, self.projectors[-1])]
        for target, online in pairs:
            t_params = list(target.parameters())
            o_params = [p.detach() for p in online.parameters()]
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, torch._foreach_mul(o_params, 1 - m))

    def on_step_end(self, step: int, total_steps: int) -> None:
        """After optimizer step ``step`` (the number of steps done, 1 after the first) of ``total_steps``: EMA
        update with ``m(step−1)``, then ``λ`` and ``m`` for the next step."""
        self.ema_update(self.momentum)  # on the device: no host read per step
        self.lam.fill_(self.lambda_at(step, total_steps))
        self.momentum.fill_(self.momentum_at(step, total_steps))

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, depth={self.depth}, temperature={self.temperature}, "
                f"lambda_max={self.lambda_max}, pred_weight={self.pred_weight}, last_bn={self.last_bn}")
