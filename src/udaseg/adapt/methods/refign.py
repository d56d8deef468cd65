"""Refign: align a day reference to the target and refine the teacher's pseudo-labels with it.

Paper: "Refign: Align and Refine for Adaptation of Semantic Segmentation to Adverse Conditions",
Bruggemann, Sakaridis, Truong and Van Gool, WACV 2023, arXiv 2207.06825. Reference:
brdav/refign ``models/segmentation_model.py`` (MIT), re-implemented from
``shared/spec/refign_dsrnss_icda_spec.md`` sections 1.3, 2.5-2.7 (no code copied).

Per iteration, for a target image x_T with its day reference x_R (the ``"ref"`` view):

1. teacher on [x_T; x_R] in one pass (``teacher_views = ("ref",)``), logits upsampled to the crop;
2. alignment (any :class:`~udaseg.models.alignment.DenseAligner`): flow F (target -> reference),
   certainty P, validity V; the reference **logits** are warped (bilinear, ``align_corners``,
   zero padding, fp32) and only then turned into p_R = softmax(warp(z_R));
3. refinement with p_T = softmax(z_T), yhat_T = argmax p_T, yhat_R = argmax p_R::

       s            = ( mean_x H(p_T(x)) / log C )^gamma                 per image (trust score)
       M[c, x]      = [c in S] [yhat_T(x) in S] [yhat_R(x) in S]         S = large static classes
       eps[c, x]    = s * max(P(x), M[c, x]),   eps = 0 where V(x) = 0
       ptilde[c, x] = (1 - eps[c, x]) p_T[c, x] + eps[c, x] p_R[c, x]    (not renormalised)

   with S = {road, sidewalk, building, wall, fence, vegetation, terrain, sky} = {0,1,2,3,4,8,9,10};
   the pseudo-label is argmax ptilde and the DACS confidence is max ptilde (against 0.968);
4. ``adapt_to_ref``: with probability 0.5 (Python ``random``, as the reference) the reference
   replaces the target for the whole step (teacher, mixing) and no refinement is done
   (:class:`ReferenceAsTarget`, a TargetTransform).

Ablations (spec 2.6): ``use_align: false`` (unaligned reference, P = 0.5, no validity mask),
``disable_P`` (P = 0.5), ``disable_M`` (M = 0), ``gamma: 0`` (s = 1). The incremental ACDC rows
1-6 are ``configs/benchmarks/cs2acdc/refign_ablation_row{1..6}.yaml``.

Defaults (Refign configs): gamma 0.25, adapt_to_ref True, use_align True, UAWarpC aligner,
static classes as above. Refign's other settings are loop/optimiser settings, set by the configs:
``self_training.teacher_stochastic: true`` (the teacher keeps Dropout/DropPath active: Refign's
``train()`` override is a no-op), AdamW 6e-4, backbone lr x0.1, no weight decay on 1-D
parameters, warm-up 1500, poly 1.0. ClassMix draws its classes from the whole source batch in
Refign as in DAFormer (our :class:`~udaseg.adapt.mixing.ClassMix` default) and the strong
augmentation is called per mixed image with shared gates, as DACS (Refign's ``get_dacs_mix``).

Aligners (``aligner``): ``uawarpc`` (the paper's; needs ``weights`` = ``uawarpc_megadepth.ckpt``
and ``vgg`` = ``vgg16-397923af.pth``), ``similarity`` (weight-free global scale + translation,
:mod:`udaseg.models.alignment.similarity`, for GPS-matched pairs such as SynthNight) and
``identity`` (zero flow, P = 0.5: ablation row 1's unaligned reference with validity everywhere).

Differences from the reference:
- The trust score, mask and mixture are computed for any number of classes; the static-class
  set is a setting (``static_classes``; the reference asserts 19 Cityscapes classes).
- ``identity`` differs from ``use_align: false`` only in the validity of border pixels (the
  shared warp marks the image border invalid, spec 2.5): use ``use_align: false`` for row 1.
- A reference of another size than its target is resized bilinearly to the target size (the
  reference crops both identically, so this only happens with user data).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ..hooks import PseudoLabels, StepContext

__all__ = [
    "STATIC_LARGE_CLASSES",
    "RefignConfig",
    "RefignRefiner",
    "ReferenceAsTarget",
    "build",
    "build_aligner",
    "normalized_entropy",
    "refine_probabilities",
]

STATIC_LARGE_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 8, 9, 10)
"""road, sidewalk, building, wall, fence, vegetation, terrain, sky (Cityscapes train IDs)."""

REFERENCE_HINT = (
    "Refign needs the day reference of every target image: add `views: [ref]` to data.target "
    "(datasets with references: dark_zurich, acdc, and SynthNight's dark_zurich copy)"
)


@dataclass
class RefignConfig:
    """Refign settings (``model.methods.refign``); defaults are the paper configs'."""

    aligner: Literal["uawarpc", "similarity", "identity"] = "uawarpc"
    weights: str | None = None
    """UAWarpC checkpoint (``uawarpc_megadepth.ckpt`` or a ``udaseg convert`` output)."""
    vgg: str | None = None
    """torchvision VGG16 ImageNet file (``vgg16-397923af.pth``) for UAWarpC's feature extractor."""
    gamma: float = 0.25
    use_align: bool = True
    disable_P: bool = False  # noqa: N815 (the reference's name)
    disable_M: bool = False  # noqa: N815
    adapt_to_ref: bool = True
    adapt_to_ref_probability: float = 0.5
    static_classes: tuple[int, ...] = STATIC_LARGE_CLASSES
    reference_view: str = "ref"
    aligner_options: dict = field(default_factory=dict)
    """Extra keyword arguments of the aligner's constructor (e.g. the similarity search range)."""

    def __post_init__(self) -> None:
        if self.aligner not in ("uawarpc", "similarity", "identity"):
            raise ConfigError(
                f"model.methods.refign.aligner: {self.aligner!r}; use uawarpc, similarity or identity"
            )
        if self.gamma < 0:
            raise ConfigError(f"model.methods.refign.gamma must be >= 0, got {self.gamma}")
        if not 0.0 <= self.adapt_to_ref_probability <= 1.0:
            raise ConfigError("model.methods.refign.adapt_to_ref_probability must be in [0, 1]")
        self.static_classes = tuple(int(c) for c in self.static_classes)


def normalized_entropy(prob: Tensor, log_prob: Tensor | None = None) -> Tensor:
    """H(p) / log C per pixel: (B, C, H, W) probabilities -> (B, H, W) in [0, 1]."""
    if log_prob is None:
        log_prob = torch.log(prob.clamp_min(torch.finfo(prob.dtype).tiny))
    return -(prob * log_prob).sum(dim=1) / math.log(prob.shape[1])


def refine_probabilities(
    p_trg: Tensor,
    p_ref: Tensor,
    certainty: Tensor | None,
    valid: Tensor | None,
    gamma: float = 0.25,
    static_classes: Sequence[int] = STATIC_LARGE_CLASSES,
    use_mask: bool = True,
    log_p_trg: Tensor | None = None,
) -> Tensor:
    """Refign's adaptive label correction (module docstring, step 3).

    Args:
        p_trg: (B, C, H, W) target softmax p_T.
        p_ref: (B, C, H, W) softmax of the warped reference logits p_R.
        certainty: (B, 1, H, W) P, or None for P = 0.5 (``disable_P`` / no alignment).
        valid: (B, H, W) bool, or None (no alignment: every pixel may take the reference).
        gamma: exponent of the trust score (0: s = 1).
        static_classes: the large static classes S.
        use_mask: False = ``disable_M`` (M = 0).
        log_p_trg: optional log-softmax of the target logits (exact entropy).

    Returns:
        (B, C, H, W) unnormalised mixture ptilde.
    """
    b, c = p_trg.shape[:2]
    s = normalized_entropy(p_trg, log_p_trg).mean(dim=(1, 2)) ** gamma  # (B,)
    if certainty is None:
        eps = torch.full_like(p_trg, 0.5)
    else:
        eps = certainty.to(p_trg.dtype).expand_as(p_trg).clone()
    if use_mask:
        static = torch.zeros(c, dtype=torch.bool, device=p_trg.device)
        static[[k for k in static_classes if k < c]] = True
        both = static[p_trg.argmax(1)] & static[p_ref.argmax(1)]  # (B, H, W)
        mask = both[:, None] & static.view(1, c, 1, 1)  # (B, C, H, W)
        eps = torch.maximum(eps, mask.to(eps.dtype))
    eps = s.view(b, 1, 1, 1) * eps
    if valid is not None:
        eps = eps * valid[:, None].to(eps.dtype)
    return (1.0 - eps) * p_trg + eps * p_ref


def build_aligner(cfg: RefignConfig) -> nn.Module:
    """The aligner named by ``cfg.aligner`` (frozen, eval mode)."""
    if cfg.aligner == "identity":
        from ...models.alignment import IdentityAligner

        aligner = IdentityAligner(**cfg.aligner_options)
    elif cfg.aligner == "similarity":
        from ...models.alignment.similarity import SimilarityAligner

        aligner = SimilarityAligner(**cfg.aligner_options)
    else:
        if not cfg.weights:
            raise ConfigError(
                "model.methods.refign: aligner uawarpc needs `weights` (Refign's "
                "uawarpc_megadepth.ckpt or a `udaseg convert` output) and `vgg` "
                "(torchvision's vgg16-397923af.pth); without them use `aligner: similarity` "
                "(weight-free, GPS-matched pairs) or `identity`"
            )
        from ...models.alignment.uawarpc import UAWarpCAligner

        aligner = UAWarpCAligner.from_files(cfg.weights, vgg=cfg.vgg, **cfg.aligner_options)
    aligner.eval()
    for p in aligner.parameters():
        p.requires_grad_(False)
    return aligner


class ReferenceAsTarget:
    """``adapt_to_ref``: with probability p the day reference replaces the target batch for this
    step (teacher, mixing); the refiner then leaves the pseudo-labels alone. Draws from Python's
    ``random`` as the reference (its state is in every udaseg checkpoint)."""

    hook_kind = "target_transform"

    def __init__(self, probability: float = 0.5, view: str = "ref") -> None:
        self.probability = float(probability)
        self.view = view

    def __call__(self, ctx: StepContext, target: dict) -> dict:
        if self.view not in target:
            raise ConfigError(f"Refign adapt_to_ref: batch['target'] has no {self.view!r} view; "
                              + REFERENCE_HINT)
        if random.random() >= self.probability:
            return target
        swapped = {k: v for k, v in target.items() if k != self.view}
        swapped["image"] = target[self.view]
        swapped["adapted_to_ref"] = True
        return swapped


class RefignRefiner(nn.Module):
    """Refign's LabelRefiner: align the reference prediction, mix it into the target's.

    The aligner is a frozen sub-module (its weights are part of the checkpoint, so a resumed run
    needs no weight files; they are not trained).
    """

    hook_kind = "refiner"

    def __init__(self, cfg: RefignConfig | None = None, aligner: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else RefignConfig()
        self.teacher_views = (self.cfg.reference_view,)
        self._resize_noted = False
        self.aligner = aligner if aligner is not None else (
            build_aligner(self.cfg) if self.cfg.use_align else None)

    def train(self, mode: bool = True):  # the aligner is always in eval mode
        super().train(mode)
        if self.aligner is not None:
            self.aligner.eval()
        return self

    def forward(self, ctx: StepContext, pseudo: PseudoLabels) -> PseudoLabels:
        if ctx.target.get("adapted_to_ref"):
            return pseudo
        view = self.cfg.reference_view
        if view not in ctx.target or view not in ctx.teacher_logits:
            raise ConfigError(f"Refign: batch['target'] has no {view!r} view; " + REFERENCE_HINT)
        if ctx.pseudo_from_probs is None:
            raise ValueError("RefignRefiner needs ctx.pseudo_from_probs (set by the DACS loop)")
        target, reference = ctx.target["image"], ctx.target[view]
        size = tuple(pseudo.label.shape[-2:])
        if reference.shape[-2:] != target.shape[-2:]:
            if not self._resize_noted:
                import warnings

                warnings.warn(
                    f"Refign: the reference images ({tuple(reference.shape[-2:])}) differ in size "
                    f"from their targets ({tuple(target.shape[-2:])}); resizing them bilinearly "
                    "(load both at the same size to avoid this)", stacklevel=2)
                self._resize_noted = True
            reference = F.interpolate(reference, size=target.shape[-2:], mode="bilinear",
                                      align_corners=False)
        with torch.no_grad():
            z_ref = F.interpolate(ctx.teacher_logits[view].float(), size=size, mode="bilinear",
                                  align_corners=False)
            certainty = valid = None
            if self.cfg.use_align:
                from ...models.alignment import warp

                al = self.aligner(target, reference)
                flow, certainty, valid = al.flow, al.certainty, al.valid
                if tuple(flow.shape[-2:]) != size:  # labels at another size than the input
                    sy, sx = size[0] / flow.shape[-2], size[1] / flow.shape[-1]
                    flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
                    flow = flow * torch.tensor([sx, sy], device=flow.device).view(1, 2, 1, 1)
                    certainty = F.interpolate(certainty, size=size, mode="bilinear",
                                              align_corners=False)
                    valid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0
                z_ref, warp_valid = warp(z_ref, flow)
                valid = valid & warp_valid
                if self.cfg.disable_P:
                    certainty = None
            p_trg = pseudo.prob
            if p_trg is None:
                raise ValueError("RefignRefiner needs the teacher's softmax (pseudo.prob)")
            refined = refine_probabilities(
                p_trg.float(), torch.softmax(z_ref, dim=1), certainty, valid,
                gamma=self.cfg.gamma, static_classes=self.cfg.static_classes,
                use_mask=not self.cfg.disable_M,
            )
        return ctx.pseudo_from_probs(refined, valid=pseudo.valid)


def build(settings: dict, student) -> list:
    """The method-catalog builder (``model.methods.refign``): the refiner and, with
    ``adapt_to_ref``, the target transform that runs before it."""
    from ...configparse import config_from_dict

    cfg = config_from_dict(RefignConfig, settings, "model.methods.refign")
    hooks: list = []
    if cfg.adapt_to_ref:
        hooks.append(ReferenceAsTarget(cfg.adapt_to_ref_probability, cfg.reference_view))
    hooks.append(RefignRefiner(cfg))
    return hooks
