"""The DACS self-training loop as used by DAFormer, HRDA and MIC, with typed extension points.

Papers: DACS (Tranheden et al., WACV 2021, arXiv 2007.08702); DAFormer (Hoyer et al., CVPR 2022,
arXiv 2111.14887). Reference: lhoyer/DAFormer ``mmseg/models/uda/dacs.py``, re-implemented from
``shared/spec/daformer_hrda_mic_spec.md`` section 3.

One iteration t (student f_theta, EMA teacher f_phi)::

    phi      <- alpha_t phi + (1 - alpha_t) theta,   alpha_t = min(1 - 1/(t+1), alpha)   (t = 0: copy)
    L_src     = CE(f_theta(x_s), y_s)                                  + source-stage AuxLosses
    P         = softmax(f_phi(x_t));  yhat = argmax_c P;  q = |{p : max_c P(p) >= tau}| / (B H W)
    (yhat, w) = refiners(yhat, q)                                      (identity in DACS)
    M         = mixer(...)          ClassMix: half of the classes of the source batch
    x_m       = aug(M x_s + (1 - M) x_t);  y_m = M y_s + (1 - M) yhat;  w_m = M + (1 - M) w
    L_mix     = sum_p w_m(p) CE(f_theta(x_m), y_m)(p) / |P|               + target-stage AuxLosses
    one optimiser step on grad(L_src) + grad(L_mix)

Defaults (DAFormer final config): alpha 0.999, tau 0.968, colour jitter strength 0.2 applied with
probability 0.8, Gaussian blur with probability 0.5, CE averaged over all pixels (mmseg).

Differences from the reference, each a named switch here:
- ``pseudo_weight_mode``: "batch_scalar" (reference: one quality scalar per batch) or "pixel".
- ``teacher_bn_train``: the reference keeps the teacher's BatchNorm in train mode (True, default).
- ``ce_reduction``: "all_pixels" (reference) or "valid_pixels".
- ``teacher_stochastic``: Refign leaves the teacher's Dropout and DropPath active (its ``train()``
  override is a no-op, spec refign 1.3); DAFormer switches them off (False, default).
- ``aug_per_image``: DACS augments each mixed image separately (op order and blur sigma per image,
  True, default); Refign draws them once per batch (False).
- Losses of a stage are summed and back-propagated once (the reference calls backward per term;
  the gradients are identical, the maintainer suggests this to save memory, DAFormer#42).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .hooks import AuxLoss, LabelRefiner, Mixer, MixedTransform, StepContext, TargetTransform
from .losses import segmentation_loss


@dataclass
class DACSConfig:
    """Self-training settings (DAFormer's ``dacs_a999_fd_things_rcs0.01_cpl`` without FD/RCS)."""

    alpha: float = 0.999
    """EMA teacher momentum (base DACS config: 0.99)."""
    pseudo_threshold: float = 0.968
    """Confidence threshold tau of the pseudo-label quality weight."""
    pseudo_weight_mode: Literal["batch_scalar", "pixel"] = "batch_scalar"
    pseudo_weight_ignore_top: int = 0
    """PL crop v1: rows at the top of the target crop with weight 0 (DAFormer: 15)."""
    pseudo_weight_ignore_bottom: int = 0
    """PL crop v1: rows at the bottom of the target crop with weight 0 (DAFormer: 120)."""
    teacher_bn_train: bool = True
    color_jitter_strength: float = 0.2
    color_jitter_probability: float = 0.2
    """Jitter is applied when u > this value, i.e. with probability 0.8."""
    blur: bool = True
    ema_buffers: bool = False
    """Also average BN buffers into the teacher (reference: parameters only)."""
    teacher_stochastic: bool = False
    """Keep the teacher's Dropout/DropPath active in its pseudo-label pass (Refign: True)."""
    aug_per_image: bool = True
    """Jitter op order and blur sigma per mixed image (DACS) or once per batch (Refign: False)."""
    target_loss_weight: float = 1.0
    """Factor on the mixed (target) CE L_mix (DSRNSS-HRDA: 0.8); target-stage aux losses keep
    their own weights."""


class SelfTraining(nn.Module):
    """DACS around a student segmentor; methods plug in as refiners, a mixer and aux losses.

    Args:
        student: the segmentor being trained (its parameters are owned by the caller).
        cfg: DACS settings; None trains on the source only (no teacher, no target pass).
        refiners: LabelRefiner hooks, applied in order to the teacher's pseudo-labels.
        mixer: the Mixer (default ClassMix).
        aux_losses: AuxLoss hooks; modules among them are registered (their state is saved).
        target_transforms: TargetTransform hooks, applied in order to the target batch before
            the teacher pass.
        mixed_transforms: MixedTransform hooks, applied in order to the augmented mixed batch
            right before the student's mixed pass (DSRNSS's long-tail paste).
        ce_reduction: CE reduction of the source and mixed losses.
        detail_loss_weight: weight of the detail-crop CE for multi-resolution (HRDA) students.
    """

    def __init__(
        self,
        student: nn.Module,
        cfg: DACSConfig | None = None,
        refiners: Sequence[LabelRefiner] = (),
        mixer: Mixer | None = None,
        aux_losses: Sequence[AuxLoss] = (),
        ce_reduction: Literal["all_pixels", "valid_pixels"] = "all_pixels",
        detail_loss_weight: float = 0.1,
        target_transforms: Sequence[TargetTransform] = (),
        mixed_transforms: Sequence[MixedTransform] = (),
    ):
        super().__init__()
        self.target_transforms = list(target_transforms)
        self.mixed_transforms = list(mixed_transforms)
        self.detail_loss_weight = detail_loss_weight
        self.cfg = cfg
        self.ce_reduction = ce_reduction
        self.refiners = list(refiners)
        self.mixer = mixer
        self.aux_losses = list(aux_losses)
        self.teacher = None
        if cfg is not None:
            from .mixing import ClassMix, StrongAugConfig
            from .teacher import EMATeacher

            self.mixer = mixer if mixer is not None else ClassMix()
            self.teacher = EMATeacher(student, alpha=cfg.alpha, ema_buffers=cfg.ema_buffers)
            self.aug_cfg = StrongAugConfig(
                color_jitter_strength=cfg.color_jitter_strength,
                color_jitter_probability=cfg.color_jitter_probability,
                blur=cfg.blur,
                order_per_image=cfg.aug_per_image,  # DACS augments each mixed image separately
                sigma_per_image=cfg.aug_per_image,
            )
        # register module hooks so that their state (frozen models, banks) is checkpointed
        self.hook_modules = nn.ModuleList(
            [h for h in (*self.target_transforms, *self.refiners, self.mixer,
                         *self.mixed_transforms, *self.aux_losses) if isinstance(h, nn.Module)]
        )

    def seg_loss(self, out, label: Tensor, weight: Tensor | None = None,
                 fused_scale: float = 1.0) -> Tensor:
        """The loop's CE (its reduction and HRDA detail weight); ``fused_scale`` scales the fused
        term only (:func:`~udaseg.adapt.losses.segmentation_loss`)."""
        return segmentation_loss(
            out, label, weight, reduction=self.ce_reduction, detail_weight=self.detail_loss_weight,
            fused_scale=fused_scale,
        )

    def _aux(self, ctx: StepContext, stage: str) -> Tensor | None:
        total = None
        for hook in self.aux_losses:
            if hook.stage != stage:
                continue
            value = hook(ctx)
            ctx.losses[hook.name] = value.detach()
            total = value if total is None else total + value
        return total

    def step(
        self,
        student: nn.Module,
        source: dict,
        target: dict | None,
        step: int,
        backward: Callable[[Tensor], None],
    ) -> dict[str, Tensor]:
        """Run one iteration's forward/backward passes; the caller steps the optimiser.

        Returns the detached loss terms by log name (``src``, ``mix``, each aux loss name,
        ``pl_quality``): no host synchronisation happens here.
        """
        adapt = self.cfg is not None and target is not None
        if adapt:
            self.teacher.update(student, step)
        ctx = StepContext(
            step=step, source=source, target=target or {}, student=student,
            teacher=self.teacher.model if self.teacher is not None else None,
            seg_loss=self.seg_loss, strong_aug=getattr(self, "aug_cfg", None),
        )

        # (1) supervised source pass (+ source-stage aux losses, e.g. FD)
        ctx.source_out = student(source["image"])
        loss = self.seg_loss(ctx.source_out, source["label"])
        ctx.losses["src"] = loss.detach()
        aux = self._aux(ctx, "source")
        # hooks that reuse the source pass's graph at the target stage (DSRNSS's prototypes)
        retain = adapt and any(getattr(h, "retain_source_graph", False) for h in self.aux_losses)
        if retain:
            backward(loss if aux is None else loss + aux, retain_graph=True)
        else:
            backward(loss if aux is None else loss + aux)
            ctx.outputs.clear()  # their graphs are freed by the backward; do not keep the memory
        if not adapt:
            return ctx.losses

        # (2) pseudo-labels from the EMA teacher on the clean target batch
        from .mixing import strong_augment
        from .pseudo_label import pseudo_labels_from_logits, pseudo_labels_from_probs
        from .teacher import teacher_forward_mode

        cfg = self.cfg
        ctx.pseudo_threshold = cfg.pseudo_threshold
        for transform in self.target_transforms:
            target = transform(ctx, target)
        ctx.target = target
        views = [v for v in dict.fromkeys(
            v for r in self.refiners for v in getattr(r, "teacher_views", ())) if v in target]
        images = [target["image"], *(target[v] for v in views)]
        with torch.no_grad(), teacher_forward_mode(
            self.teacher.model, bn_train=cfg.teacher_bn_train, stochastic=cfg.teacher_stochastic
        ):
            t_logits = self.teacher.model(torch.cat(images) if views else images[0]).logits
        if views:
            chunks = t_logits.split(target["image"].shape[0])
            t_logits = chunks[0]
            ctx.teacher_logits = dict(zip(views, chunks[1:], strict=True))
        ctx.pseudo_from_probs = functools.partial(
            pseudo_labels_from_probs, threshold=cfg.pseudo_threshold,
            weight_mode=cfg.pseudo_weight_mode)
        pseudo = pseudo_labels_from_logits(
            t_logits, tuple(target["image"].shape[-2:]), threshold=cfg.pseudo_threshold,
            weight_mode=cfg.pseudo_weight_mode, valid=target.get("valid_pseudo"),
            ignore_top=cfg.pseudo_weight_ignore_top, ignore_bottom=cfg.pseudo_weight_ignore_bottom,
        )
        for refine in self.refiners:
            pseudo = refine(ctx, pseudo)
        ctx.pseudo = pseudo
        ctx.losses["pl_quality"] = pseudo.weight.detach().mean()

        # (3) mixing and strong augmentation, then the mixed pass (+ target-stage aux losses)
        mixed = self.mixer(ctx, pseudo)
        mixed.unaugmented = mixed.image
        mixed.image, mixed.aug_gates = strong_augment(mixed.image, self.aug_cfg, return_gates=True)
        for transform in self.mixed_transforms:
            mixed = transform(ctx, mixed)
        ctx.mixed = mixed
        ctx.mixed_out = student(mixed.image)
        loss = self.seg_loss(ctx.mixed_out, mixed.label, mixed.weight)
        ctx.losses["mix"] = loss.detach()
        if cfg.target_loss_weight != 1.0:
            loss = cfg.target_loss_weight * loss
        aux = self._aux(ctx, "target")
        backward(loss if aux is None else loss + aux)
        return ctx.losses
