"""DAFormer decode head: per-level MLP embeddings + context-aware fusion (separable ASPP).

Paper: L. Hoyer, D. Dai, L. Van Gool, "DAFormer: Improving Network Architectures and Training
Strategies for Domain-Adaptive Semantic Segmentation", CVPR 2022, https://arxiv.org/abs/2111.14887.

Reference: lhoyer/DAFormer ``mmseg/models/decode_heads/daformer_head.py`` with the final config
``daformer_sepaspp_mitb5`` (Apache-2.0), written from the udaseg spec (section 2.2), not copied.
Module names follow the mmseg ones, so ``decode_head.*`` checkpoint keys map 1:1.

Context-aware feature fusion (the DAFormer decoder). For backbone levels ``F_i``, i = 1..4
(``F_i`` at stride ``2^{i+1}``, width ``C_i``):

    e_i = Upsample_{H/4 x W/4}( Linear_{C_i -> C_e}(F_i) ),
    F_fused = Fuse( concat[e_1, e_2, e_3, e_4] ),   Fuse = bottleneck_3x3 o concat_d ASPP_d,

where the ASPP branches (no image pooling) are a 1x1 ConvBNReLU for dilation 1 and, for
d = 6, 12, 18, a depthwise-separable 3x3 dilated ConvBNReLU pair, each giving ``channels``
maps; the ``len(dilations) * channels`` concatenation goes through a 3x3 ConvBNReLU bottleneck.
Then ``logits = conv_seg(Dropout2d_{0.1}(F_fused))`` at stride 4.

With C_e = channels = 256 on MiT-B5 the head has 3,712,275 parameters.

Differences from the reference: only the ``sepaspp`` fusion with ``mlp`` embeddings (the
configuration used by DAFormer/HRDA/MIC) is implemented; the decoder-study variants of Tab. 7
are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from udaseg.data.classes import NUM_CLASSES
from udaseg.models.layers import MLP, ConvBNReLU, DepthwiseSeparableConvModule, normal_init, resize

__all__ = ["DAFormerHead", "SeparableASPP"]


class SeparableASPP(nn.Module):
    """ASPP without image pooling, separable 3x3 branches, followed by a 3x3 bottleneck.

    ``y = bottleneck(concat_d B_d(x))`` with ``B_1`` = 1x1 ConvBNReLU and, for ``d > 1``,
    ``B_d`` = depthwise 3x3 (dilation d, padding d) ConvBNReLU -> pointwise 1x1 ConvBNReLU.
    Module names ``aspp_modules.{k}`` and ``bottleneck`` match mmseg.

    Shapes: ``(B, C_in, H, W) -> (B, channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = []
        for d in dilations:
            if d == 1:
                branches.append(ConvBNReLU(in_channels, channels, 1))
            else:
                branches.append(
                    DepthwiseSeparableConvModule(in_channels, channels, 3, padding=d, dilation=d)
                )
        self.aspp_modules = nn.ModuleList(branches)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """DAFormer decode head (Hoyer et al., CVPR 2022), ``sepaspp`` fusion.

    Args:
        in_channels: widths ``C_1..C_L`` of the backbone levels (``backbone.out_channels``).
        num_classes: K, the number of output classes.
        channels: width of the ASPP branches, the bottleneck and the classifier input.
        embed_dim: C_e, width of the per-level MLP embeddings.
        dilations: ASPP dilations; 1 gives a 1x1 branch, others separable 3x3 branches.
        dropout_ratio: Dropout2d probability before ``conv_seg``.

    ``forward([F_1..F_L]) -> logits (B, K, H_1, W_1)`` at the resolution of the first level
    (stride 4 for MiT).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = NUM_CLASSES,
        channels: int = 256,
        embed_dim: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("DAFormerHead: in_channels must list at least one backbone level")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = num_classes
        self.channels = channels
        self.embed_dim = embed_dim
        self.dilations = tuple(dilations)
        self.embed_layers = nn.ModuleDict(
            {str(i): MLP(c, embed_dim) for i, c in enumerate(self.in_channels)}
        )
        self.fuse_layer = SeparableASPP(len(self.in_channels) * embed_dim, channels, self.dilations)
        self.dropout: nn.Module = (
            nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        )
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        normal_init(self.conv_seg, std=0.01)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[F_i (B, C_i, H_i, W_i)]`` -> logits ``(B, K, H_1, W_1)``."""
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"DAFormerHead expects {len(self.in_channels)} feature levels with channels "
                f"{self.in_channels}, got {len(features)}"
            )
        size = features[0].shape[-2:]
        embedded = []
        for i, f in enumerate(features):
            if f.shape[1] != self.in_channels[i]:
                raise ValueError(
                    f"DAFormerHead: level {i} has {f.shape[1]} channels, expected "
                    f"{self.in_channels[i]} (in_channels={self.in_channels})"
                )
            embedded.append(resize(self.embed_layers[str(i)](f), size))
        fused = self.fuse_layer(torch.cat(embedded, dim=1))
        return self.conv_seg(self.dropout(fused))
