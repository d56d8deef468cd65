"""Segmentation losses shared by every training mode.

Pixel-weighted cross-entropy as used by mmseg-0.16 / DAFormer (spec section 3.7)::

    ce(p)   = -log softmax(z(p))_{y(p)}          (0 where y(p) = 255)
    L       = sum_p w(p) * ce(p) / |P|            reduction "all_pixels"   (mmseg, default)
    L       = sum_p w(p) * ce(p) / |{p: y != 255}| reduction "valid_pixels" (PyTorch's mean)

mmseg divides by **all** B*H*W pixels, ignored ones included, so crops with many ignored pixels
get a smaller effective loss. The published DAFormer/HRDA/MIC numbers were trained with it, so it
is the default; ``valid_pixels`` is the named switch for the usual PyTorch behaviour. Logits are
bilinearly upsampled (align_corners=False) to the label size first, as mmseg does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..data.classes import IGNORE_INDEX
from ..models.segmentor import SegOutput

Reduction = Literal["all_pixels", "valid_pixels"]


def upsample_like(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) logits to ``size`` (H, W)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "all_pixels",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel-weighted CE of (B, K, h, w) logits against (B, H, W) labels.

    Args:
        logits: raw scores at any stride; upsampled to the label size.
        target: int64 labels, ``ignore_index`` excluded.
        weight: optional (B, H, W) or scalar pixel weights (pseudo-label confidence).
        reduction: ``all_pixels`` (mmseg, divide by B*H*W) or ``valid_pixels``.
    """
    logits = upsample_like(logits, target.shape[-2:])
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if weight is not None:
        ce = ce * weight
    if reduction == "all_pixels":
        return ce.sum() / ce.numel()
    if reduction == "valid_pixels":
        return ce.sum() / (target != ignore_index).sum().clamp_min(1)
    raise ValueError(f"reduction must be 'all_pixels' or 'valid_pixels', got {reduction!r}")


def segmentation_loss(
    out: SegOutput,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "all_pixels",
    detail_weight: float = 0.1,
    fused_scale: float = 1.0,
) -> torch.Tensor:
    """CE of a segmentor output; for multi-resolution outputs (HRDA, spec 7.3)::

        L = s * (1 - lambda_d) * CE(y_fused, y) + lambda_d * CE(y_detail, crop(y, b))

    with ``lambda_d = detail_weight`` (0.1) and the detail crop box b in input pixels (training
    labels are at input resolution). Pixel weights are cropped the same way. ``s =
    fused_scale`` (1) scales the fused (for single-resolution outputs: the only) term alone, as
    mmseg's ``losses['decode.loss_seg'] *= lambda`` does (MIC's weight under HRDA).
    """
    loss = seg_cross_entropy(out.logits, target, weight, reduction)
    if fused_scale != 1.0:
        loss = fused_scale * loss
    if out.detail_logits is None or out.crop_box is None:
        return loss
    y1, y2, x1, x2 = out.crop_box
    t = target[..., y1:y2, x1:x2]
    w = weight[..., y1:y2, x1:x2] if isinstance(weight, torch.Tensor) and weight.ndim >= 2 else weight
    detail = seg_cross_entropy(out.detail_logits, t, w, reduction)
    return (1.0 - detail_weight) * loss + detail_weight * detail
