"""ScaleKD: strong vision transformers as teachers (Fan et al., NeurIPS 2024).

Paper: https://arxiv.org/abs/2411.06786 -- official code: https://github.com/deep-optimization/ScaleKD
(``mmcls/models/classifiers/distiller.py``, ``mmcls/models/dis_losses/{fmd,fmdv2,attention,kd}.py``).
Spec: METHODS.md section 5.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers import trunc_normal_
from torch import nn

from fastkd.methods._attention import classification_loss
from fastkd.methods._attention import param_dtype
from fastkd.methods._attention import teacher_input
from fastkd.methods._kd import as_logits
from fastkd.methods._kd import check_choice
from fastkd.methods._kd import check_range
from fastkd.methods._kd import check_teacher_count
from fastkd.methods._kd import freeze_teachers
from fastkd.methods._kd import images_of
from fastkd.methods.base import Method
from fastkd.methods.base import register
from fastkd.models.taps import unwrap_model

# ---------------------------------------------------------------------------------------------------------------------
# dual-view feature mimicking (DFM)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in fp32 at least (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def spatial_mimic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Direct view: ``(1/B) sum_{b,h,w} || n(P)[b,:,h,w] - n(T)[b,:,h,w] ||^2``, ``n`` = L2 over channels.

    ``pred``, ``target``: ``[B, C, H, W]``. The official ``MSELoss(reduction='sum') / B`` (``fmd.py``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    diff = F.normalize(_acc(pred), dim=1) - F.normalize(_acc(target), dim=1)
    return diff.pow(2).sum() / pred.shape[0]


def frequency_mimic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Alternative view: the direct view after removing the DCT "direct component" of each channel.

    Zeroing the (0, 0) coefficient of a separable 2-D DCT-II and inverting is exactly per-channel spatial mean
    removal (METHODS.md 5.3), so ``L_freq(P, T) = L_spat(P - mean_hw P, T - mean_hw T)``; no DCT is needed.
    """
    pred, target = _acc(pred), _acc(target)
    return spatial_mimic_loss(
        pred - pred.mean(dim=(2, 3), keepdim=True), target - target.mean(dim=(2, 3), keepdim=True)
    )


# ---------------------------------------------------------------------------------------------------------------------
# cross-attention projector (CAP)


class CrossAttentionProjector(nn.Module):
    """ScaleKD's cross-attention projector (official ``AttentionProjector``): student grid -> teacher tokens.

    .. math::
        X' = \\mathrm{ReLU}(\\mathrm{BN}(\\mathrm{Conv}_{3\\times3}(X))) + E_{pos},\\quad
        Q_0' = \\mathrm{ReLU}(\\mathrm{Conv}_{1\\times1}(Q_0)),\\quad
        Y_0 = W_o\\,\\mathrm{concat}_h\\,\\mathrm{softmax}(q k^T \\cdot s / \\sqrt{C_t/h})\\, v,\\quad
        Y = Z + \\mathrm{FFN}(Z),\\ Z = \\mathrm{LN}(Y_0)

    with ``q = W_q Q_0'``, ``k = W_k X'``, ``v = W_v X'`` and the sharpening factor ``s = softmax_scale`` (5).

    Args:
        student_dim: channels ``C_s`` of the student grid.
        teacher_dim: channels ``C_t`` of the output tokens (and of input-dependent queries).
        query_hw: ``(H_q, W_q)``: the teacher grid, ``N_q = H_q * W_q`` output tokens.
        student_hw: ``(H_s, W_s)`` of the student grid (size of the learnable position embedding).
        num_heads: attention heads (official: 8 by default, 16/24 at s3/s4 for a Swin-L teacher + CNN student).
        softmax_scale: ``s``.
        learnable_query: True: a learnable ``[N_q, C_t]`` query table (used at s3); False: queries are passed to
            ``forward`` (at s4 they come from the teacher-parameter-perception output).
        ffn_act: activation of the FFN. Official: mmcv ``FFN`` default, ReLU (METHODS.md 5.2 says GELU; the mmcv
            default ``act_cfg=dict(type='ReLU')`` is what the released code runs).

    Shape:
        x: ``[B, C_s, H_s, W_s]``; query: ``[B, N_q, C_t]`` or None. Output ``[B, N_q, C_t]``.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        query_hw: tuple[int, int],
        student_hw: tuple[int, int],
        *,
        num_heads: int = 8,
        softmax_scale: float = 5.0,
        learnable_query: bool = True,
        ffn_act: str = "relu",
    ):
        super().__init__()
        if teacher_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide teacher_dim={teacher_dim}")
        if ffn_act not in ("relu", "gelu"):
            raise ValueError(f"ffn_act={ffn_act!r} must be 'relu' or 'gelu'")
        self.query_hw = tuple(query_hw)
        self.student_hw = tuple(student_hw)
        self.teacher_dim = teacher_dim
        self.num_heads = num_heads
        self.head_dim = teacher_dim // num_heads
        self.softmax_scale = float(softmax_scale)
        self.proj_query = nn.Sequential(nn.Conv2d(teacher_dim, teacher_dim, 1), nn.ReLU())
        self.proj_student = nn.Sequential(
            nn.Conv2d(student_dim, student_dim, 3, padding=1), nn.BatchNorm2d(student_dim), nn.ReLU()
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, student_dim, *self.student_hw))
        trunc_normal_(self.pos_embed, std=0.02)
        self.q = nn.Linear(teacher_dim, teacher_dim)
        self.k = nn.Linear(student_dim, teacher_dim)
        self.v = nn.Linear(student_dim, teacher_dim)
        self.proj = nn.Linear(teacher_dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim)
        self.ffn = Mlp(teacher_dim, 4 * teacher_dim, act_layer=nn.ReLU if ffn_act == "relu" else nn.GELU)
        self.query = nn.Embedding(self.query_hw[0] * self.query_hw[1], teacher_dim) if learnable_query else None

    def no_weight_decay(self) -> set[str]:
        """The position embedding is not decayed (the official DeiT-B config's ``.pos_embed`` custom key)."""
        return {"pos_embed"}

    def forward(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        Hq, Wq = self.query_hw
        if tuple(x.shape[-2:]) != self.student_hw:
            raise ValueError(f"student grid {tuple(x.shape[-2:])} != student_hw {self.student_hw} of the projector")
        if query is None:
            if self.query is None:
                raise ValueError("this projector has no learnable queries (learnable_query=False): pass query=")
            q0 = self.query.weight.view(1, Hq, Wq, self.teacher_dim).permute(0, 3, 1, 2).expand(B, -1, -1, -1)
        else:
            if query.shape[1:] != (Hq * Wq, self.teacher_dim):
                raise ValueError(f"query {tuple(query.shape)} must be [B, {Hq * Wq}, {self.teacher_dim}]")
            q0 = query.transpose(1, 2).reshape(B, self.teacher_dim, Hq, Wq)
        xs = self.proj_student(x) + self.pos_embed
        q0 = self.proj_query(q0).flatten(2).transpose(1, 2)  # [B, N_q, C_t]
        xs = xs.flatten(2).transpose(1, 2)  # [B, N_s, C_s]
        q = self.q(q0).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(xs).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(xs).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5 * self.softmax_scale)
        y = self.proj(y.transpose(1, 2).reshape(B, -1, self.teacher_dim))
        z = self.norm(y)
        return z + self.ffn(z)


# ---------------------------------------------------------------------------------------------------------------------
# model adapters: which tensors are "stage 3" / "stage 4" for each family


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def _is_swin(model: nn.Module) -> bool:
    return hasattr(model, "layers") and hasattr(model, "patch_embed") and all(
        hasattr(layer, "downsample") and hasattr(layer, "blocks") for layer in model.layers
    )


def _vit_grid(model: nn.Module) -> tuple[int, int]:
    return tuple(int(g) for g in model.patch_embed.grid_size)


def _tokens_to_grid(tokens: torch.Tensor, prefix: int, hw: tuple[int, int]) -> torch.Tensor:
    x = tokens[:, prefix:]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


class _SwinTeacher:
    """timm Swin: T4 = final stage after the final LN; TPP = stage-4 (patch merging + blocks) + LN (NHWC)."""

    def __init__(self, model: nn.Module):
        last, prev = model.layers[-1], model.layers[-2]
        self.s3_hw = tuple(prev.output_resolution)
        self.s3_dim = int(model.feature_info[-2]["num_chs"])
        self.s4_hw = tuple(last.output_resolution)
        self.s4_dim = int(model.feature_info[-1]["num_chs"])

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = model.forward_features(x)  # [B, H, W, C]
        return feats.permute(0, 3, 1, 2), model.forward_head(feats)

    def tpp(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N3, C3]`` stage-3-shaped tokens -> ``[B, N4, C4]`` through the frozen last stage, with grad."""
        B = tokens.shape[0]
        x = tokens.reshape(B, *self.s3_hw, self.s3_dim)
        x = model.norm(model.layers[-1](x))
        return x.reshape(B, -1, self.s4_dim)

    def s4_stage(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class _ViTTeacher:
    """timm ViT teacher, staged as the official ``forward_specific_stage`` (METHODS.md 5.8).

    The TPP at s3 runs blocks ``[stage4_start, depth - last_blocks)`` (0-based) and the last stage (applied to the
    s4 projection) runs the last ``last_blocks`` blocks; the final LN closes whichever stage ends at the last block.
    Defaults: 12 blocks (the official ViT): TPP = blocks 8..10, last stage = block 11 + LN; 24 blocks (the official
    BEiT-L/EVA-L teacher): TPP = blocks 22..23 + LN, last stage = nothing. Other depths: TPP from ``min(2·depth//3,
    depth-2)``, last stage = the last block (unverified). T4 = the final patch tokens after the LN. Only patch tokens
    go through the teacher blocks (no CLS).
    """

    def __init__(self, model: nn.Module, stage4_start: int | None, last_blocks: int | None = None):
        depth = len(model.blocks)
        if depth < 2:
            raise ValueError("a ViT teacher for scalekd needs at least 2 blocks")
        if last_blocks is None:
            last_blocks = 0 if depth == 24 and stage4_start is None else 1
        self.last = int(last_blocks)
        if not 0 <= self.last < depth:
            raise ValueError(f"vit_teacher_last_blocks={last_blocks} must be in [0, {depth - 1}] for {depth} blocks")
        if stage4_start is None:
            stage4_start = depth - 2 if depth == 24 else min((2 * depth) // 3, depth - 2)
        self.start = int(stage4_start)
        if not 0 <= self.start < depth - self.last:
            raise ValueError(f"vit_teacher_stage4_start={stage4_start} must be in [0, {depth - self.last - 1}] for "
                             f"{depth} blocks and vit_teacher_last_blocks={self.last}")
        self.depth = depth
        self.prefix = int(model.num_prefix_tokens)
        self.s3_hw = self.s4_hw = _vit_grid(model)
        self.s3_dim = self.s4_dim = int(model.embed_dim)

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = model.forward_features(x)
        return _tokens_to_grid(feats, self.prefix, self.s4_hw), model.forward_head(feats)

    def _run(self, model: nn.Module, tokens: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        for blk in model.blocks[lo:hi]:
            tokens = blk(tokens)
        return model.norm(tokens) if hi == self.depth else tokens

    def tpp(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(model, tokens, self.start, self.depth - self.last)

    def s4_stage(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(model, tokens, self.depth - self.last, self.depth) if self.last else tokens


class _ViTStudent:
    """timm ViT/DeiT student: s3 = patch tokens after block ``s3_block``, s4 = final tokens (``forward_features``)."""

    def __init__(self, model: nn.Module, s3_block: int | None):
        if not hasattr(model, "forward_intermediates"):
            raise TypeError(f"student {type(model).__name__} has no forward_intermediates: scalekd reads block s3's "
                            "tokens through it (timm's VisionTransformer family has it)")
        depth = len(model.blocks)
        self.s3_block = max(0, (3 * depth) // 4 - 1) if s3_block is None else int(s3_block)
        if not 0 <= self.s3_block < depth:
            raise ValueError(f"student_s3_block={self.s3_block} is out of range for a student with {depth} blocks")
        self.prefix = int(model.num_prefix_tokens)
        self.hw = _vit_grid(model)
        self.s3_dim = self.s4_dim = int(model.embed_dim)
        self.s3_hw = self.s4_hw = self.hw

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # timm's forward_intermediates (= forward_features, plus block s3's patch tokens), not a forward hook
        # registered per step: torch.compile traces it in one graph
        feats, (s3,) = model.forward_intermediates(x, indices=[self.s3_block], output_fmt="NLC")
        logits = model.forward_head(feats)
        if isinstance(logits, tuple):  # distilled DeiT in distilled-training mode: average the two heads
            logits = (logits[0] + logits[1]) / 2
        return _tokens_to_grid(s3, 0, self.hw), _tokens_to_grid(feats, self.prefix, self.hw), logits


class _CNNStudent:
    """timm CNN (ResNet, ...): s3/s4 = outputs of the last two ``feature_info`` modules (layer3 / layer4)."""

    def __init__(self, model: nn.Module, img_size: tuple[int, int]):
        info = getattr(model, "feature_info", None)
        if not info or len(info) < 2:
            raise ValueError(
                f"student {type(model).__name__} is neither a timm ViT nor a CNN with feature_info; scalekd "
                "supports ViT/DeiT and CNN (ResNet, MobileNet, ...) students"
            )
        self.names = (info[-2]["module"], info[-1]["module"])
        self.s3_dim, self.s4_dim = int(info[-2]["num_chs"]), int(info[-1]["num_chs"])
        r3, r4 = int(info[-2]["reduction"]), int(info[-1]["reduction"])
        self.s3_hw = (-(-img_size[0] // r3), -(-img_size[1] // r3))
        self.s4_hw = (-(-img_size[0] // r4), -(-img_size[1] // r4))

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        store = {}
        handles = [
            model.get_submodule(self.names[0]).register_forward_hook(lambda m, i, o: store.__setitem__("s3", o)),
            model.get_submodule(self.names[1]).register_forward_hook(lambda m, i, o: store.__setitem__("s4", o)),
        ]
        try:
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        return store["s3"], store["s4"], logits


# ---------------------------------------------------------------------------------------------------------------------


def _stage_alpha(name: str, value, spat: float, freq: float) -> tuple[float, float]:
    if value is None:
        return float(spat), float(freq)
    if len(value) != 2:
        raise ValueError(f"{name}={value!r} must be two weights [spatial, frequency]")
    return float(value[0]), float(value[1])


@contextlib.contextmanager
def _teacher_mode(model: nn.Module, train: bool):
    """Run the (frozen) teacher in train mode inside the block when ``train``; eval mode again afterwards."""
    if not train:
        yield
        return
    model.train(True)
    try:
        yield
    finally:
        model.train(False)


@register("scalekd")
class ScaleKD(Method):
    """ScaleKD (Fan et al., NeurIPS 2024): CAP + dual-view feature mimicking + teacher parameter perception + KD.

    Paper https://arxiv.org/abs/2411.06786, code https://github.com/deep-optimization/ScaleKD (``distiller.py``).
    One frozen teacher (timm Swin, or timm ViT), one student (timm ViT/DeiT, or a timm CNN such as ResNet).

    .. math::
        L = (1-\\alpha_{kd})\\,\\mathrm{CE}(z_S, y) + \\alpha_{kd} T^2 \\big[-\\textstyle\\sum_c
            \\sigma(z_T/T)_c \\log\\sigma(z_S/T)_c\\big]
            + \\sum_{k\\in\\{s3,s4\\}} \\alpha_{spat} L_{spat}(\\cdot, T_4) + \\alpha_{freq} L_{freq}(\\cdot, T_4)

    with ``L_spat(P, T) = (1/B) sum_{b,h,w} ||n(P) - n(T)||^2`` (``n``: L2 over channels) and ``L_freq`` the same
    after per-channel spatial mean removal (= zeroing the DCT DC coefficient). Per view ``v`` (spatial uses CAP
    ``*_spat``, frequency uses CAP ``*_freq``; every view has its own projectors):

    * Swin teacher: ``R_v = TeacherStage4(CAP_s3,v(S3))`` (patch merging + stage-4 blocks + LN, frozen weights,
      gradient through activations) is compared to ``T4``; ``P4_v = CAP_s4,v(S4; queries=R_v)`` is compared to ``T4``.
    * ViT teacher (official ``is_vit`` path): ``R_v = blocks[start:-1](CAP_s3,v(S3))`` vs ``T4``;
      ``P4_v = LN(block[-1](CAP_s4,v(S4; queries=R_v)))`` vs ``T4``.

    Options (official defaults, METHODS.md 5.5):
        alpha_kd: 0.5 (weight of the soft-target KD; CE gets ``1 - alpha_kd``).
        temperature: 1.0.
        alpha_spat, alpha_freq: 0.08, 0.06: the (spatial, frequency) view weights of both stages.
        alpha_s3, alpha_s4: per-stage ``[spatial, frequency]`` weights (the official ``alpha`` of each stage's loss);
            None (default): ``[alpha_spat, alpha_freq]``. The Swin-S -> ResNet-50 config uses ``[0.08, 0.0]``.
        teacher_train_mode: run the teacher in train mode while the method trains (stochastic depth and dropout of the
            teacher on, weights still frozen). Default True, the official behaviour: its distiller sets
            ``teacher.eval()`` once, but the runner's ``model.train()`` on the whole distiller switches the teacher
            back to train mode every epoch. False: the teacher stays in eval mode.
        softmax_scale: 5.0 (CAP sharpening, both views).
        cap_heads: (8, 8) heads of CAP at (s3, s4); the official DeiT-B config uses the default 8; the ResNet-50
            configs with a Swin-L teacher use (16, 24), Swin-B (8, 16).
        cap_ffn_act: "relu" (mmcv FFN default in the official code).
        ce_loss: "ce" (label-smoothing / soft-target cross entropy) or "bce" (RSB-style ResNet recipe: BCE with
            sigmoid against one-hot / soft targets).
        label_smoothing: 0.0 (the official DeiT-B recipe uses 0.1; set in the recipe). Ignored when the batch carries
            soft ``targets`` (Mixup/CutMix fold smoothing into them).
        student_s3_block: ViT student block whose output is stage 3 (0-based); default ``3*depth//4 - 1`` (8 of 12,
            "block 9" in the official 1-based count).
        vit_teacher_stage4_start: ViT teacher: first block of the "stage 4" used by TPP at s3 (0-based); default
            ``min(2*depth//3, depth-2)`` (8 of 12, the official ``range(8, 11)``); 22 of 24 (the official BEiT-L
            staging: the TPP runs the last two blocks + LN). Other depths are unverified (METHODS.md 5.8).
        vit_teacher_last_blocks: ViT teacher: blocks of the last stage applied to the s4 projection; default 1
            (block + LN), 0 for 24-block teachers (the official BEiT-L "stage 4" runs nothing).
        img_size: input size used to size a CNN student's grids; default: the teacher's patch-embed image size.

    Returns (``forward``): ``{"loss", "ce", "kd", "s3_spat", "s3_freq", "s4_spat", "s4_freq"}``; the parts are
    unweighted (``kd`` includes ``T²``), ``loss`` combines them as in the formula above.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        *,
        alpha_kd: float = 0.5,
        temperature: float = 1.0,
        alpha_spat: float = 0.08,
        alpha_freq: float = 0.06,
        alpha_s3: tuple[float, float] | list[float] | None = None,
        alpha_s4: tuple[float, float] | list[float] | None = None,
        teacher_train_mode: bool = True,
        softmax_scale: float = 5.0,
        cap_heads: tuple[int, int] | list[int] = (8, 8),
        cap_ffn_act: str = "relu",
        ce_loss: str = "ce",
        label_smoothing: float = 0.0,
        student_s3_block: int | None = None,
        vit_teacher_stage4_start: int | None = None,
        vit_teacher_last_blocks: int | None = None,
        img_size: int | tuple[int, int] | None = None,
    ):
        super().__init__(student, teachers)
        check_teacher_count("scalekd", self.teachers, 1, "a timm Swin or ViT")
        freeze_teachers(self.teachers)
        check_choice("ce_loss", ce_loss, ("ce", "bce"))
        check_range("alpha_kd", alpha_kd, 0.0, 1.0)
        check_range("temperature", temperature, 0.0, float("inf"), lo_open=True)
        check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        if len(cap_heads) != 2:
            raise ValueError(f"cap_heads={cap_heads!r} must be two head counts (s3, s4)")
        self.alpha_kd, self.temperature = float(alpha_kd), float(temperature)
        self.alpha_spat, self.alpha_freq = float(alpha_spat), float(alpha_freq)
        self.alpha = {"s3": _stage_alpha("alpha_s3", alpha_s3, alpha_spat, alpha_freq),
                      "s4": _stage_alpha("alpha_s4", alpha_s4, alpha_spat, alpha_freq)}
        self.teacher_train_mode = bool(teacher_train_mode)
        self.ce_loss, self.label_smoothing = ce_loss, float(label_smoothing)

        tmodel = unwrap_model(self.teachers[0])
        if _is_swin(tmodel):
            self._t = _SwinTeacher(tmodel)
        elif _is_vit(tmodel):
            self._t = _ViTTeacher(tmodel, vit_teacher_stage4_start, vit_teacher_last_blocks)
        else:
            raise ValueError(
                f"teachers[0] ({type(tmodel).__name__}) is not a timm Swin or ViT: scalekd's teacher parameter "
                "perception runs the teacher's last transformer stage"
            )
        if img_size is None:
            img_size = tuple(int(s) for s in tmodel.patch_embed.img_size)
        elif isinstance(img_size, int):
            img_size = (img_size, img_size)
        if _is_vit(student):
            self._s = _ViTStudent(student, student_s3_block)
        else:
            self._s = _CNNStudent(student, tuple(img_size))

        t, s = self._t, self._s
        common = dict(softmax_scale=softmax_scale, ffn_act=cap_ffn_act)
        s3 = (s.s3_dim, t.s3_dim, t.s3_hw, s.s3_hw)
        self.cap_s3_spat = CrossAttentionProjector(*s3, num_heads=cap_heads[0], **common)
        self.cap_s3_freq = CrossAttentionProjector(*s3, num_heads=cap_heads[0], **common)
        self.cap_s4_spat = CrossAttentionProjector(
            s.s4_dim, t.s4_dim, t.s4_hw, s.s4_hw, num_heads=cap_heads[1], learnable_query=False, **common
        )
        self.cap_s4_freq = CrossAttentionProjector(
            s.s4_dim, t.s4_dim, t.s4_hw, s.s4_hw, num_heads=cap_heads[1], learnable_query=False, **common
        )

    def _grid(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *hw)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = images_of(batch, "scalekd")
        s3, s4, logits = self._s.forward(self.student, images)
        logits = as_logits(logits, "the student")
        teacher = self.teachers[0]
        tmodel = unwrap_model(teacher)  # resolved per call: the engine may re-place the teachers
        with _teacher_mode(tmodel, self.training and self.teacher_train_mode):
            loss, parts = self._losses(batch, images, s3, s4, logits, teacher, tmodel)
        return {"loss": loss, **parts}

    def _losses(self, batch, images, s3, s4, logits, teacher, tmodel):
        with torch.no_grad():
            t4, t_logits = self._t.forward(tmodel, teacher_input(teacher, images))
        t4, t_logits = _acc(t4.detach()), _acc(t_logits.detach())
        if t_logits.shape != logits.shape:
            raise ValueError(f"teacher logits {tuple(t_logits.shape)} and student logits {tuple(logits.shape)} "
                             "differ; the student and the teacher need the same number of classes")

        T = self.temperature
        parts = {
            "ce": classification_loss(logits, batch, kind=self.ce_loss, label_smoothing=self.label_smoothing),
            "kd": T * T * torch.sum(
                -F.softmax(t_logits / T, dim=-1) * F.log_softmax(_acc(logits) / T, dim=-1), dim=-1
            ).mean(),
        }
        loss = (1.0 - self.alpha_kd) * parts["ce"] + self.alpha_kd * parts["kd"]

        hw4, dtype = self._t.s4_hw, param_dtype(tmodel)
        for i, (view, cap3, cap4, fn) in enumerate((
            ("spat", self.cap_s3_spat, self.cap_s4_spat, spatial_mimic_loss),
            ("freq", self.cap_s3_freq, self.cap_s4_freq, frequency_mimic_loss),
        )):
            # teacher parameter perception: the frozen teacher stage runs with autograd on its activations
            r = self._t.tpp(tmodel, cap3(s3).to(dtype))
            p4 = self._t.s4_stage(tmodel, cap4(s4, query=r.to(cap4.q.weight.dtype)).to(dtype))
            parts[f"s3_{view}"] = fn(self._grid(r, hw4), t4)
            parts[f"s4_{view}"] = fn(self._grid(p4, hw4), t4)
            loss = loss + self.alpha["s3"][i] * parts[f"s3_{view}"] + self.alpha["s4"][i] * parts[f"s4_{view}"]
        return loss, parts
