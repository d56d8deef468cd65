"""DeepLabV2 decode head: the ASPP classifier whose dilated branches are summed.

Paper: L.-C. Chen, G. Papandreou, I. Kokkinos, K. Murphy, A. L. Yuille, "DeepLab: Semantic Image
Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs", TPAMI
2018, https://arxiv.org/abs/1606.00915 (ASPP-L: r = 6, 12, 18, 24).

References: lhoyer/DAFormer ``mmseg/models/decode_heads/dlv2_head.py`` (``DLV2Head``) and
brdav/refign ``models/heads/deeplabv2.py`` (``DeepLabV2Head``), written from the udaseg spec
(``refign_dsrnss_icda_spec.md`` 1.3), not copied. On the last backbone level ``F_L`` (2048
channels for ResNet-101):

    logits = sum_{d in dilations} Conv3x3_{d, padding d}(F_L),   each conv C_L -> K with bias,

initialised ``N(0, 0.01)``, bias 0; no BN, no dropout, no ``conv_seg``. The logits keep the
resolution of ``F_L`` (stride 8 on the dilated ResNet).

Dilations: (6, 12, 18, 24) in Refign / DSRNSS and the DeepLab paper; DAFormer's DeepLabV2 baseline
rows (``dlv2red``) use only (6, 12), as AdaptSegNet/DACS code did through an early ``return``
inside its branch loop (head name ``deeplabv2_red`` in :func:`udaseg.models.build_segmentor`).

Module names: ``aspp_modules.{k}.conv`` as mmseg's ``ASPPModule`` of ``ConvModule`` s, so DAFormer's
``decode_head.aspp_modules.*`` keys map 1:1 (Refign's ``head.conv2d_list.{k}`` rename to them).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from udaseg.data.classes import NUM_CLASSES
from udaseg.models.layers import normal_init

__all__ = ["DeepLabV2Head", "DLV2_DILATIONS", "DLV2_RED_DILATIONS"]

DLV2_DILATIONS: tuple[int, ...] = (6, 12, 18, 24)
DLV2_RED_DILATIONS: tuple[int, ...] = (6, 12)


class _DilatedConv(nn.Module):
    """One ASPP branch ``Conv3x3_{d}`` (the extra nesting gives mmseg's ``.conv`` key)."""

    def __init__(self, in_channels: int, num_classes: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, num_classes, 3, padding=dilation, dilation=dilation, bias=True
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class DeepLabV2Head(nn.Module):
    """DeepLabV2 ASPP classifier on the last backbone level.

    Args:
        in_channels: widths of the backbone levels (``backbone.out_channels``), or one int; only
            the last is used.
        num_classes: K.
        dilations: the branch dilations (padding = dilation).

    ``forward([F_1..F_L]) -> logits (B, K, H_L, W_L)``; a single tensor is accepted as ``F_L``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] | int,
        num_classes: int = NUM_CLASSES,
        dilations: Sequence[int] = DLV2_DILATIONS,
    ) -> None:
        super().__init__()
        if isinstance(in_channels, int):
            in_channels = (in_channels,)
        chans = tuple(int(c) for c in in_channels)
        if not chans:
            raise ValueError("DeepLabV2Head: in_channels must list at least one backbone level")
        if not dilations:
            raise ValueError("DeepLabV2Head: dilations must not be empty")
        self.in_channels = chans
        self.num_classes = num_classes
        self.dilations = tuple(int(d) for d in dilations)
        self.aspp_modules = nn.ModuleList(
            _DilatedConv(chans[-1], num_classes, d) for d in self.dilations
        )
        for branch in self.aspp_modules:
            normal_init(branch.conv, std=0.01)

    def forward(self, features: Sequence[Tensor] | Tensor) -> Tensor:
        """``[F_i]`` (or ``F_L``) -> ``sum_d Conv_d(F_L)``, ``(B, K, H_L, W_L)``."""
        x = features if isinstance(features, Tensor) else features[-1]
        if x.shape[1] != self.in_channels[-1]:
            raise ValueError(
                f"DeepLabV2Head: the last level has {x.shape[1]} channels, expected "
                f"{self.in_channels[-1]} (in_channels={self.in_channels})"
            )
        out = self.aspp_modules[0](x)
        for branch in self.aspp_modules[1:]:
            out = out + branch(x)
        return out
