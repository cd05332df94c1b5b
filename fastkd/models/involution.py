"""Involution and RedNet (Li et al., CVPR 2021), which timm lacks; needed by Co-advise (teacher and student stem).

"Involution: Inverting the Inherence of Convolution for Visual Recognition", Duo Li, Jie Hu, Changhu Wang,
Xiangtai Li, Qi She, Lei Zhu, Tong Zhang, Qifeng Chen. CVPR 2021. https://arxiv.org/abs/2103.06255
(official code: ``d-li14/involution``, built on mmcls).

An involution kernel is generated per pixel from the pixel's own features and shared across the channels of a
group (the inverse of a convolution, whose kernel is shared across space and differs per channel)::

    W[b, g, :, i, j] = span( reduce( x̄[b, :, i, j] ) )         # K² weights per group g and output pixel
    y[b, g·C_g + c, i, j] = Σ_{u,v} W[b, g, (u,v), i, j] · x[b, g·C_g + c, s·i + u − p, s·j + v − p]

``reduce`` is a 1×1 conv (C → C/r) + BN + ReLU, ``span`` a 1×1 conv (C/r → K²·G) with bias; ``x̄`` is ``x``
average-pooled by the stride ``s`` (identity when s = 1); the padding is ``p = (K−1)/2``; the group width is
``C_g`` = 16 channels and the reduction ``r`` = 4.

RedNet is a ResNet whose bottleneck 3×3 convolutions are 7×7 involutions and whose stem has a 3×3 involution
between two 3×3 convolutions (RedNet-26/38/50/101/152). Parameter names follow the mmcls layout
(``stem.0.conv``, ``layer1.0.conv2.conv1.conv``, ...), so official mmcls checkpoints load after the prefix
remapping in :func:`checkpoint_filter_fn` (``backbone.`` stripped, ``head.fc.`` → ``fc.``); the Co-advise authors'
teacher file (``{"model": ...}`` with the same names, DDP's ``module.`` prefix allowed) loads the same way.

The models are registered with timm (``timm.create_model("rednet26")`` once this module is imported). Involution
is computed in the input dtype; Co-advise runs its involution stem in fp32 (the official code has no half
precision path for it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data import IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models import generate_default_cfgs
from timm.models import register_model
from torch import nn

__all__ = ["ConvBNAct", "Involution", "RedNet", "RedNetBottleneck", "rednet_stem", "checkpoint_filter_fn"]


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + optional ReLU; names ``conv``/``bn`` as mmcv's ConvModule."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _Conv(nn.Module):
    """A plain conv with bias under the attribute ``conv`` (mmcv ConvModule without norm/act)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Involution(nn.Module):
    """Involution layer (see the module docstring for the formula).

    Args:
        channels: input = output channels ``C``; must be a multiple of ``group_channels``.
        kernel_size: odd spatial extent ``K`` of the generated kernel.
        stride: output stride ``s``; the kernel generator sees the input average-pooled by ``s``.
        reduction_ratio: ``r`` of the kernel generator's bottleneck (default 4).
        group_channels: channels ``C_g`` sharing one kernel (default 16).

    Shape: ``[B, C, H, W] → [B, C, H/s, W/s]`` (``H``, ``W`` divisible by ``s``).
    """

    def __init__(
        self, channels: int, kernel_size: int, stride: int = 1, reduction_ratio: int = 4, group_channels: int = 16
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size} must be odd")
        if channels % group_channels != 0:
            raise ValueError(f"channels={channels} must be a multiple of group_channels={group_channels}")
        if channels // reduction_ratio < 1:
            raise ValueError(f"channels={channels} is smaller than reduction_ratio={reduction_ratio}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.group_channels = group_channels
        self.groups = channels // group_channels
        self.conv1 = ConvBNAct(channels, channels // reduction_ratio, 1)  # reduce
        self.conv2 = _Conv(channels // reduction_ratio, kernel_size * kernel_size * self.groups)  # span
        self.avgpool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"Involution expects {self.channels} channels; got input of shape {tuple(x.shape)}")
        if h % self.stride or w % self.stride:
            raise ValueError(f"Involution with stride {self.stride} needs H and W divisible by it; got {h}×{w}")
        k, s, g = self.kernel_size, self.stride, self.groups
        weight = self.conv2(self.conv1(self.avgpool(x)))  # [B, K²·G, H/s, W/s]
        ho, wo = weight.shape[-2:]
        weight = weight.view(b, g, 1, k * k, ho, wo)
        patches = F.unfold(x, k, dilation=1, padding=(k - 1) // 2, stride=s)  # [B, C·K², Ho·Wo]
        patches = patches.view(b, g, self.group_channels, k * k, ho, wo)
        return (weight * patches).sum(dim=3).reshape(b, c, ho, wo)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"


def rednet_stem(in_chans: int = 3, stem_channels: int = 64, group_channels: int = 16) -> nn.Sequential:
    """RedNet stem (stride 2): Conv3×3/2 (in → s/2) + BN + ReLU, Involution3×3 (s/2) + BN + ReLU,
    Conv3×3 (s/2 → s) + BN + ReLU. (RedNet follows it with a 3×3/2 max-pool; Co-advise does not.)"""
    half = stem_channels // 2
    return nn.Sequential(
        ConvBNAct(in_chans, half, 3, stride=2),
        Involution(half, 3, 1, group_channels=group_channels),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        ConvBNAct(half, stem_channels, 3),
    )


class RedNetBottleneck(nn.Module):
    """ResNet bottleneck (expansion 4, stride on the middle layer) with a 7×7 involution in the middle."""

    expansion = 4

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, group_channels: int = 16, zero_init_residual: bool = True
    ):
        super().__init__()
        mid = out_chs // self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = Involution(mid, 7, stride, group_channels=group_channels)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        if zero_init_residual:
            nn.init.zeros_(self.bn3.weight)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_ARCH = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class RedNet(nn.Module):
    """RedNet classifier with timm's model contract (``forward_features``, ``forward_head(pre_logits)``,
    ``reset_classifier``, ``num_features``).

    Args:
        depth: 26, 38, 50, 101 or 152 (or pass ``layers`` explicitly).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input channels.
        stem_channels: stem output width (64).
        widths: output channels of the four stages (256, 512, 1024, 2048).
        layers: blocks per stage (default from ``depth``).
        group_channels: involution group width (16).
    """

    def __init__(
        self,
        depth: int = 26,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_channels: int = 64,
        widths: tuple[int, ...] = (256, 512, 1024, 2048),
        layers: tuple[int, ...] | None = None,
        group_channels: int = 16,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **kwargs: Any,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"RedNet got unexpected arguments: {', '.join(sorted(kwargs))}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r} must be 'avg' or ''")
        if layers is None:
            if depth not in _ARCH:
                raise ValueError(f"depth={depth} must be one of {sorted(_ARCH)} (or pass layers=)")
            layers = _ARCH[depth]
        if len(layers) != len(widths):
            raise ValueError(f"layers={tuple(layers)} and widths={tuple(widths)} must have the same length")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.stem = rednet_stem(in_chans, stem_channels, group_channels)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_chs = stem_channels
        self.feature_info = []
        reduction = 4
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                blocks.append(RedNetBottleneck(in_chs, width, stride if j == 0 else 1, group_channels))
                in_chs = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layer{i + 1}"))
        self.num_stages = len(layers)
        self.num_features = self.head_hidden_size = in_chs
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, Any]:
    """Map an mmcls RedNet checkpoint (``{"state_dict": {"backbone.…", "head.fc.…"}}``) to :class:`RedNet` keys."""
    state_dict = state_dict.get("state_dict", state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.startswith("backbone."):
            k = k[len("backbone.") :]
        elif k.startswith("head.fc."):
            k = "fc." + k[len("head.fc.") :]
        out[k] = v
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"rednet{d}": _cfg() for d in _ARCH})


def _create(variant: str, depth: int, pretrained: bool = False, **kwargs: Any) -> RedNet:
    return build_model_with_cfg(
        RedNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        depth=depth,
        **kwargs,
    )


@register_model
def rednet26(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-26 (Co-advise's involution stem is this model's stem)."""
    return _create("rednet26", 26, pretrained, **kwargs)


@register_model
def rednet38(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-38."""
    return _create("rednet38", 38, pretrained, **kwargs)


@register_model
def rednet50(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-50."""
    return _create("rednet50", 50, pretrained, **kwargs)


@register_model
def rednet101(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-101 (the involution teacher of the released Co-advise code)."""
    return _create("rednet101", 101, pretrained, **kwargs)


@register_model
def rednet152(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-152."""
    return _create("rednet152", 152, pretrained, **kwargs)
