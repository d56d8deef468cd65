"""SegFormer all-MLP decode head.

Paper: E. Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021, https://arxiv.org/abs/2105.15203 (Sec. 3.2, Eq. (4)).

Reference: NVlabs/SegFormer ``mmseg/models/decode_heads/segformer_head.py`` and the lhoyer/DAFormer
copy used for its ``segformer_b5`` baseline; written from the udaseg spec (section 2.3), not copied.

Eq. (4), for levels i = 1..4:

    F^_i = Linear_{C_i -> C}(F_i),          F^_i = Upsample_{H/4 x W/4}(F^_i),
    F    = Linear_{4C -> C}(Concat(F^_i)),  M = Linear_{C -> K}(F),

where the fusion "Linear" is ``linear_fuse`` = 1x1 ConvBNReLU and the last one ``linear_pred``
(a 1x1 conv) after Dropout2d(0.1).

Concatenation order (the one thing that differs between the codebases): the DAFormer repository
concatenates ``[c1, c2, c3, c4]`` (``concat_order="daformer"``, the default here) whereas NVlabs
and HuggingFace concatenate ``[c4, c3, c2, c1]`` (``concat_order="nvlabs"``). ``linear_fuse``
weights from one layout only fit the other after permuting their input channels.

Differences from the reference: level modules are ``linear_c.{0..3}`` (the DAFormer-repo names;
NVlabs uses ``linear_c{1..4}``); no unused ``conv_seg`` is built; ``linear_pred`` keeps PyTorch's
default init, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from udaseg.data.classes import NUM_CLASSES
from udaseg.models.layers import MLP, ConvBNReLU, resize

__all__ = ["SegFormerHead"]

ConcatOrder = Literal["daformer", "nvlabs"]


class SegFormerHead(nn.Module):
    """SegFormer all-MLP decode head.

    Args:
        in_channels: widths ``C_1..C_L`` of the backbone levels.
        num_classes: K, the number of output classes.
        embed_dim: C, width of the per-level projections and of the fused map (768 in the paper).
        dropout_ratio: Dropout2d probability before ``linear_pred``.
        concat_order: ``"daformer"`` concatenates ``[c1..cL]`` (DAFormer repo, default);
            ``"nvlabs"`` concatenates ``[cL..c1]`` (NVlabs / HuggingFace).

    ``forward([F_1..F_L]) -> logits (B, K, H_1, W_1)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = NUM_CLASSES,
        embed_dim: int = 768,
        dropout_ratio: float = 0.1,
        concat_order: ConcatOrder = "daformer",
    ) -> None:
        super().__init__()
        if concat_order not in ("daformer", "nvlabs"):
            raise ValueError(
                f"SegFormerHead: concat_order must be 'daformer' or 'nvlabs', got {concat_order!r}"
            )
        if len(in_channels) == 0:
            raise ValueError("SegFormerHead: in_channels must list at least one backbone level")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.concat_order: ConcatOrder = concat_order
        self.linear_c = nn.ModuleList(MLP(c, embed_dim) for c in self.in_channels)
        self.linear_fuse = ConvBNReLU(len(self.in_channels) * embed_dim, embed_dim, 1)
        self.dropout: nn.Module = (
            nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        )
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[F_i (B, C_i, H_i, W_i)]`` -> logits ``(B, K, H_1, W_1)``."""
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"SegFormerHead expects {len(self.in_channels)} feature levels with channels "
                f"{self.in_channels}, got {len(features)}"
            )
        size = features[0].shape[-2:]
        projected = []
        for i, f in enumerate(features):
            if f.shape[1] != self.in_channels[i]:
                raise ValueError(
                    f"SegFormerHead: level {i} has {f.shape[1]} channels, expected "
                    f"{self.in_channels[i]} (in_channels={self.in_channels})"
                )
            projected.append(resize(self.linear_c[i](f), size))
        if self.concat_order == "nvlabs":
            projected = projected[::-1]
        fused = self.linear_fuse(torch.cat(projected, dim=1))
        return self.linear_pred(self.dropout(fused))
