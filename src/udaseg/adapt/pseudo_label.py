"""Teacher pseudo-labels with the DACS quality weight and DAFormer/HRDA pseudo-label crops.

References: DACS (Tranheden et al., WACV 2021, arXiv 2007.08702) and DAFormer (Hoyer et al.,
CVPR 2022, arXiv 2111.14887); HRDA/MIC for PL crop v2. Spec sections 3.3 step (3), 3.4, 7.7 and
11 (item 2). Written from the spec.

With teacher logits z (B, K, h, w) on the clean target crop, resized to the label size (H, W)
bilinearly (align_corners=False)::

    P        = softmax_k(resize(z))                      (B, K, H, W)
    conf, y  = max_k P, argmax_k P                       (B, H, W)
    q        = |{(b, p): conf(b, p) >= tau}| / (B * H * W)      tau = 0.968
    W(b, p)  = q                                         "batch_scalar" (faithful)
    W(b, p)  = [conf(b, p) >= tau]                        "pixel" (documented alternative)

The faithful weight is ONE scalar for the whole batch (not per image, not per pixel);
low-confidence pixels keep their argmax label and the scalar weight (they are not ignored).

Pseudo-label crops (mutually exclusive in the original code; both may be given here and then
multiply):

* v1 (DAFormer): ``W = 0`` on the first ``ignore_top`` and last ``ignore_bottom`` rows of the crop
  (DAFormer final config 15 / 120 on 512x512 Cityscapes crops; base DACS 0 / 0).
* v2 (HRDA, MIC on Cityscapes targets): a full-image ``valid`` mask, 0 on the top 30, bottom 240,
  left 30 and right 30 image rows/columns (:func:`pl_crop_v2_mask`), carried through the data
  pipeline like a label and multiplied in: ``W <- W * valid``.

Everything stays on the logits' device; no ``.item()``/host synchronisation.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.transforms import pl_crop_v2_mask
from .hooks import PseudoLabels

__all__ = ["pseudo_labels_from_logits", "pseudo_labels_from_probs", "pl_crop_v2_mask", "WeightMode"]

WeightMode = Literal["batch_scalar", "pixel"]


@torch.no_grad()
def pseudo_labels_from_logits(
    logits: Tensor,
    out_size: tuple[int, int],
    threshold: float = 0.968,
    weight_mode: WeightMode = "batch_scalar",
    valid: Tensor | None = None,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
) -> PseudoLabels:
    """Teacher logits -> :class:`PseudoLabels` (label, weight, prob, valid).

    Args:
        logits: (B, K, h, w) teacher scores (detached here).
        out_size: (H, W) label size; logits are resized bilinearly (align_corners=False) to it.
        threshold: confidence threshold tau (0.968).
        weight_mode: ``"batch_scalar"`` (DACS quality q, faithful) or ``"pixel"`` ([conf >= tau]).
        valid: optional (B, H, W) PL-crop-v2 mask multiplied into the weight.
        ignore_top, ignore_bottom: PL crop v1 row counts whose weight is set to 0.

    Returns:
        ``PseudoLabels(label (B,H,W) int64, weight (B,H,W) float32, prob (B,K,H,W) float32,
        valid)`` where ``valid`` is the combined crop mask (v1 rows x v2 mask) or None when no
        crop is active.
    """
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"ignore_top/ignore_bottom must be >= 0, got {ignore_top}/{ignore_bottom}")
    if weight_mode not in ("batch_scalar", "pixel"):
        raise ValueError(f"weight_mode must be 'batch_scalar' or 'pixel', got {weight_mode!r}")
    z = logits.detach().float()
    size = (int(out_size[0]), int(out_size[1]))
    if tuple(z.shape[-2:]) != size:
        z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    prob = torch.softmax(z, dim=1)
    return pseudo_labels_from_probs(prob, threshold, weight_mode, valid, ignore_top, ignore_bottom)


def pseudo_labels_from_probs(
    prob: Tensor,
    threshold: float = 0.968,
    weight_mode: WeightMode = "batch_scalar",
    valid: Tensor | None = None,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
) -> PseudoLabels:
    """(B, K, H, W) class scores -> :class:`PseudoLabels`: label = argmax, confidence = max.

    The scores need not sum to 1 (Refign's refined mixture does not; its confidence is the max
    of the unnormalised mixture, spec 2.6). Weight and crop as :func:`pseudo_labels_from_logits`.
    """
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"ignore_top/ignore_bottom must be >= 0, got {ignore_top}/{ignore_bottom}")
    if weight_mode not in ("batch_scalar", "pixel"):
        raise ValueError(f"weight_mode must be 'batch_scalar' or 'pixel', got {weight_mode!r}")
    conf, label = prob.max(dim=1)
    confident = (conf >= threshold).float()
    if weight_mode == "batch_scalar":
        weight = torch.ones_like(conf) * confident.mean()  # 0-dim tensor: no host sync
    else:
        weight = confident

    crop: Tensor | None = None
    if ignore_top > 0 or ignore_bottom > 0:
        crop = torch.ones_like(conf)
        if ignore_top > 0:
            crop[:, :ignore_top] = 0
        if ignore_bottom > 0:
            crop[:, -ignore_bottom:] = 0
    if valid is not None:
        v = valid.to(device=conf.device, dtype=conf.dtype)
        if v.ndim == 4 and v.shape[1] == 1:
            v = v[:, 0]
        if v.ndim == 2:
            v = v.expand_as(conf)
        crop = v if crop is None else crop * v
    if crop is not None:
        weight = weight * crop
    return PseudoLabels(label=label, weight=weight, prob=prob, valid=crop)
