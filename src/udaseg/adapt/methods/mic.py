"""Masked Image Consistency (MIC), an auxiliary target loss on top of DAFormer/HRDA.

Paper: "MIC: Masked Image Consistency for Context-Enhanced Domain Adaptation", Hoyer, Dai, Wang
and Van Gool, CVPR 2023, arXiv 2212.01322.

The student must predict the teacher's pseudo-labels of the *clean* target image from a randomly
block-masked copy, so it has to use context. With blocks of b x b pixels, Eq.::

    M_{mb+1:(m+1)b, nb+1:(n+1)b} = [v > r],   v ~ U(0, 1) per block, mask ratio r
    x^M = M ⊙ x_T
    L_M = sum_j q_T^(j) CE(ŷ^(j), p_T^(j)),  ŷ = f_theta(x^M)

p_T and q_T are the DACS teacher's **unmixed** pseudo-labels and weights (``ctx.pseudo``),
computed on the unmasked, un-augmented target image; no extra teacher is built (MIC's 'same'
alpha/threshold). The CE is the loop's own loss ``ctx.seg_loss`` (its ``ce_reduction`` and HRDA
detail weight; mmseg mean over all pixels by default; for HRDA students
``(1 - lambda_d) CE_fused + lambda_d CE_detail``) and L_M enters the target stage with weight
lambda_M. Under HRDA the reference scales only the fused term (``masked_loss['decode.loss_seg']
*= mask_lambda``), i.e. ``lambda_M (1 - lambda_d) CE_fused + lambda_d CE_detail``; so does
``weight_scope: fused`` (default). Without HRDA both scopes are lambda_M * CE. Masking is done after the colour augmentation,
on the normalised image, so masked pixels are 0 there (the dataset-mean colour).

Defaults: block size b = 64, mask ratio r = 0.7, lambda_M = 1 (``mask_block_size``,
``mask_ratio``, ``mask_lambda``). Modes (``mask_mode``), spec 8.1:

=========================  ====================  =========================  ====================
benchmark                  mode                  batch                      block size
=========================  ====================  =========================  ====================
MIC(HRDA) GTA/Synthia->CS  ``separatetrgaug``    target batch, colour-aug   64
MIC(HRDA) CS->ACDC / DZ    ``separate``          [x_s[0], x_t[0]], no aug   64
MIC(DAFormer) GTA->CS      ``separatetrgaug``    target batch, colour-aug   32 (half resolution)
=========================  ====================  =========================  ====================

In ``separate`` the labels are ``[y_s[0], ŷ_t[0]]`` and the weights ``[1, q_T[0]]``.

Reference: lhoyer/MIC ``seg/mmseg/models/uda/masking_consistency_module.py``,
``seg/mmseg/models/utils/masking_transforms.py`` and ``seg/mmseg/models/uda/dacs.py`` (license
not re-checked here); re-implemented from ``shared/spec/daformer_hrda_mic_spec.md`` sections 8 and
11 (no code copied).

Differences from the reference:
- The grid has at least one cell per side (a bare ``round(H / b)`` is 0, an empty grid, for
  images smaller than b/2).
- The colour augmentation is :func:`udaseg.adapt.mixing.strong_augment` (DACS jitter + blur,
  both gates drawn once per call, per-sample jitter factors, one op order and one blur sigma for
  the batch), with that module's default (ImageNet) normalisation.
- L_M is returned to the loop, which sums it with the mixed loss into one backward (the reference
  calls a separate ``backward()``; the gradients are the same).
- ``weight_scope: all`` (not the reference) multiplies the whole HRDA loss, detail term
  included, by lambda_M.
- The ablation-only modes (``separatesrc``, ``separatesrcaug``, ``separatetrg``, ``separateaug``)
  and a separate MIC teacher (alpha/threshold other than 'same') are not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hooks import Stage, StepContext
from ..losses import Reduction, segmentation_loss

__all__ = ["MICConfig", "MaskedBatch", "MaskedImageConsistency", "block_mask"]

MaskMode = Literal["separate", "separatetrgaug"]


def block_mask(
    shape: Sequence[int],
    block_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random block mask M (Eq. M = [v > r] per block): 1 = keep, 0 = masked.

    Per image a grid of ``round(H / b) x round(W / b)`` cells (Python rounding, at least 1) is
    drawn from U(0, 1); a cell is kept where ``u > ratio`` (so about ``1 - ratio`` of the cells
    survive). The grid is upsampled to ``H x W`` with nearest interpolation, so for sizes that
    are not multiples of b the blocks are about ``H / round(H / b)`` pixels tall.

    Args:
        shape: ``(B, H, W)`` or ``(B, C, H, W)`` (only B, H and W are used).
        block_size: b in pixels (>= 1).
        ratio: r in [0, 1], the expected masked fraction.
        generator: optional torch generator (the draw happens on its device).
        device: device of the returned mask (default: the generator's device, else CPU).

    Returns:
        ``(B, 1, H, W)`` float mask.
    """
    if len(shape) not in (3, 4):
        raise ValueError(f"block_mask: shape must be (B, H, W) or (B, C, H, W), got {tuple(shape)}")
    if block_size < 1:
        raise ValueError(f"block_mask: block_size must be >= 1, got {block_size}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"block_mask: ratio must be in [0, 1], got {ratio}")
    b, h, w = int(shape[0]), int(shape[-2]), int(shape[-1])
    grid = (b, 1, max(1, round(h / block_size)), max(1, round(w / block_size)))
    draw_device = generator.device if generator is not None else device
    u = torch.rand(grid, generator=generator, device=draw_device)
    keep = (u > ratio).float()
    if device is not None:
        keep = keep.to(device)
    return F.interpolate(keep, size=(h, w), mode="nearest")


@dataclass(frozen=True)
class MICConfig:
    """MIC settings (MIC(HRDA) GTA->CS values)."""

    block_size: int = 64
    """Mask block size b in pixels (``mask_block_size``; MIC(DAFormer) uses 32)."""
    mask_ratio: float = 0.7
    """Expected masked fraction r (``mask_ratio``)."""
    weight: float = 1.0
    """lambda_M (``mask_lambda``)."""
    mode: MaskMode = "separatetrgaug"
    """``mask_mode``: "separatetrgaug" (GTA/Synthia->CS) or "separate" (CS->ACDC / Dark Zurich)."""
    color_jitter_strength: float = 0.2
    """Colour-jitter strength s of the ``*aug`` mode (DACS value)."""
    color_jitter_probability: float = 0.2
    """Jitter is applied when u > this value (probability 0.8)."""
    blur: bool = True
    """Gaussian blur (probability 0.5) in the ``*aug`` mode."""
    weight_scope: Literal["fused", "all"] = "fused"
    """What lambda_M scales under HRDA: the fused term only (reference) or the whole loss."""


@dataclass
class MaskedBatch:
    """The masked student input of MIC and its supervision.

    Attributes:
        image: ``(N, 3, H, W)`` normalised, augmented (per mode) and masked images.
        label: ``(N, H, W)`` int64 labels.
        weight: ``(N, H, W)`` float pixel weights.
        mask: ``(N, 1, H, W)`` float block mask (1 = kept).
    """

    image: Tensor
    label: Tensor
    weight: Tensor
    mask: Tensor


class MaskedImageConsistency:
    """MIC as an :class:`~udaseg.adapt.hooks.AuxLoss` (stage "target", log name "mic").

    Args:
        cfg: MIC settings; None uses :class:`MICConfig` defaults.
        reduction: CE reduction used only when the step context carries no ``seg_loss`` (the
            loop always provides its own; this is for standalone use).
        generator: optional torch generator for the block masks and the colour augmentation
            (default: the global torch RNG, as the reference).
    """

    name: str = "mic"
    stage: Stage = "target"

    def __init__(
        self,
        cfg: MICConfig | None = None,
        reduction: Reduction = "all_pixels",
        generator: torch.Generator | None = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else MICConfig()
        if self.cfg.mode not in ("separate", "separatetrgaug"):
            raise ValueError(
                f"MICConfig.mode: got {self.cfg.mode!r}; "
                "supported modes: 'separate', 'separatetrgaug'"
            )
        if self.cfg.weight_scope not in ("fused", "all"):
            raise ValueError(
                f"MICConfig.weight_scope: got {self.cfg.weight_scope!r}; use 'fused' or 'all'"
            )
        self.reduction = reduction
        self.generator = generator

    def masked_batch(self, ctx: StepContext) -> MaskedBatch:
        """Build x^M with its labels and weights according to ``cfg.mode``."""
        if ctx.pseudo is None:
            raise ValueError("MaskedImageConsistency runs at stage 'target': ctx.pseudo is not set")
        cfg = self.cfg
        x_t = ctx.target["image"]
        y_t = ctx.pseudo.label
        w_t = ctx.pseudo.weight.to(x_t.dtype).expand_as(y_t)
        if cfg.mode == "separatetrgaug":
            from udaseg.adapt.mixing import StrongAugConfig, strong_augment

            aug = StrongAugConfig(
                color_jitter_strength=cfg.color_jitter_strength,
                color_jitter_probability=cfg.color_jitter_probability,
                blur=cfg.blur,
                sigma_per_image=False,  # MIC: one blur sigma for the whole batch (spec 8.2)
            )
            image = strong_augment(x_t, aug, generator=self.generator)
            label, weight = y_t, w_t
        else:  # "separate"
            x_s, y_s = ctx.source["image"], ctx.source["label"]
            if x_s.shape[1:] != x_t.shape[1:] or y_s.shape[1:] != y_t.shape[1:]:
                raise ValueError(
                    "MIC mode 'separate' stacks a source and a target image: sizes differ "
                    f"(source {tuple(x_s.shape[1:])}, target {tuple(x_t.shape[1:])}); "
                    "use equal crop sizes or mode 'separatetrgaug'"
                )
            image = torch.stack((x_s[0], x_t[0]))
            label = torch.stack((y_s[0].long(), y_t[0]))
            weight = torch.stack((torch.ones_like(w_t[0]), w_t[0]))
        mask = block_mask(
            image.shape, cfg.block_size, cfg.mask_ratio, self.generator, device=image.device
        ).to(image.dtype)
        return MaskedBatch(image=image * mask, label=label, weight=weight, mask=mask)

    def __call__(self, ctx: StepContext) -> Tensor:
        """lambda_M * L_M for the current step."""
        batch = self.masked_batch(ctx)
        out = ctx.student(batch.image)
        if ctx.seg_loss is not None:
            seg_loss = ctx.seg_loss
        else:  # standalone use: mmseg's CE with this hook's reduction
            def seg_loss(o, y, w, fused_scale=1.0):
                return segmentation_loss(o, y, w, reduction=self.reduction,
                                         fused_scale=fused_scale)
        if self.cfg.weight_scope == "fused":
            return seg_loss(out, batch.label, batch.weight, fused_scale=self.cfg.weight)
        return self.cfg.weight * seg_loss(out, batch.label, batch.weight)


def build(settings: dict, student) -> list:
    """The method-catalog builder (``model.methods.mic``)."""
    from ...configparse import config_from_dict

    return [MaskedImageConsistency(config_from_dict(MICConfig, settings, "model.methods.mic"))]
