"""Shared network building blocks: stochastic depth, conv-BN-ReLU modules, token MLPs, init helpers.

These are the only layers shared between the backbones and decode heads in :mod:`udaseg.models`.
Submodule names follow the mmcv/mmseg conventions (``conv``, ``bn``, ``depthwise_conv``,
``pointwise_conv``, ``proj``) so that mmseg-style checkpoint keys such as
``decode_head.fuse_layer.bottleneck.conv.weight`` or ``...bn.running_mean`` map 1:1 onto our
modules.

Reference behaviour (spec sections 1.5, 1.6, 2.1; written from the spec, not copied):

* DropPath (stochastic depth, Huang et al. 2016) with timm semantics: during training each *sample*
  of the batch keeps its residual branch with probability ``1 - p`` and kept samples are rescaled,
  ``y_b = x_b * m_b / (1 - p)`` with ``m_b ~ Bernoulli(1 - p)``; identity at eval time.
* ConvModule = Conv2d (no bias) -> BatchNorm2d (eps 1e-5, momentum 0.1) -> ReLU; the conv is
  initialised Kaiming-normal (fan_out, ReLU gain), BN weight 1 and bias 0.
* Transformer init: Linear ``trunc_normal(std=0.02)`` and bias 0; LayerNorm weight 1 and bias 0;
  Conv2d ``N(0, sqrt(2 / fan_out))`` with ``fan_out = k_h * k_w * C_out / groups`` and bias 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "DropPath",
    "ConvBNReLU",
    "DepthwiseSeparableConvModule",
    "MLP",
    "init_transformer_weights",
    "kaiming_init_conv",
    "memory_format_of",
    "normal_init",
    "resize",
]


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch (timm semantics).

    ``y_b = x_b * m_b / (1 - p)`` with one ``m_b ~ Bernoulli(1 - p)`` per sample ``b`` in training
    mode, and ``y = x`` in eval mode or when ``p == 0``.

    Args:
        drop_prob: probability ``p`` in ``[0, 1)`` of dropping the branch for a sample.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


def kaiming_init_conv(conv: nn.Conv2d) -> None:
    """mmcv ConvModule init: Kaiming-normal (fan_out, ReLU gain) weights, zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def normal_init(module: nn.Conv2d | nn.Linear, std: float = 0.01) -> None:
    """``N(0, std)`` weights and zero bias (mmseg ``conv_seg`` init uses ``std=0.01``)."""
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, i.e. mmcv ``ConvModule`` with ``norm_cfg=BN``.

    Submodules are named ``conv`` and ``bn`` so mmseg keys (``*.conv.weight``,
    ``*.bn.running_mean``, ...) map 1:1. Padding is ``dilation * (kernel_size // 2)`` unless given.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        self.activate = nn.ReLU(inplace=True)
        kaiming_init_conv(self.conv)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise ``k x k`` ConvBNReLU (groups = C_in) followed by a pointwise 1x1 ConvBNReLU.

    Submodules ``depthwise_conv`` and ``pointwise_conv`` (each a :class:`ConvBNReLU`) match the
    mmcv names. Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
        )
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class MLP(nn.Module):
    """Per-token linear projection of a feature map (``mlp`` embedding of SegFormer/DAFormer heads).

    ``e[b, :, y, x] = W f[b, :, y, x] + bias``, computed by flattening the map to tokens,
    applying ``proj`` (an ``nn.Linear`` named as in mmseg) and reshaping back. No norm and no
    activation.

    Shapes: ``(B, C_in, H, W) -> (B, C_embed, H, W)``.
    """

    def __init__(self, input_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))  # (B, HW, E)
        return tokens.transpose(1, 2).reshape(b, -1, h, w)


def init_transformer_weights(module: nn.Module) -> None:
    """SegFormer init for one module; use as ``model.apply(init_transformer_weights)``.

    Linear: ``trunc_normal(std=0.02)`` (truncated at +-2), bias 0. LayerNorm: weight 1, bias 0.
    Conv2d: ``N(0, sqrt(2 / fan_out))``, ``fan_out = k_h * k_w * C_out / groups``, bias 0.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        fan_out = k_h * k_w * module.out_channels // module.groups
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with ``align_corners=False`` (the convention everywhere in the spec)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` if the 4-D ``x`` is stored channels-last (and not also plain
    contiguous, as 1x1 maps or a single channel are), else ``torch.contiguous_format``."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
