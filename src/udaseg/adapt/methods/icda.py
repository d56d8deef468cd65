"""ICDA: illumination-coupled domain adaptation (CEM source pairs, the DAR module, PCA).

Paper: "ICDA: Illumination-Coupled Domain Adaptation Framework for Unsupervised Nighttime
Semantic Segmentation", Chenghao Dong, Xuejing Kang and Anlong Ming, IJCAI 2023, pp. 672-680
(proceedings https://www.ijcai.org/proceedings/2023/75; no arXiv version is known). It builds on
Refign (arXiv 2207.06825): its skeleton, day references and ``adapt_to_ref``, not its aligner.
Reference: chenghaoDong666/ICDA ``models/segmentation_model.py``, ``models/DAT/*``,
``models/prototype/*`` (no licence file: read for semantics only, nothing copied),
re-implemented from ``shared/spec/refign_dsrnss_icda_spec.md`` sections 1.3, 2.5 and 4.

Pairs: the source pair (x_s day, x_e its enhanced and CompositeFlow-warped copy with label y_e,
:mod:`udaseg.data.enhance`) imitates the target pair (x_t night, x_r its day reference). With the
student backbone B, head H, DAR D (:mod:`udaseg.models.dar`, attached to the student as
the training-only module ``student.train_only["dar"]`` so that the optimiser, the EMA teacher and checkpoints include it) one step is::

    L_src = CE(H(B(x_s)), y_s)   (+ FD 0.005)                          loop, source stage
    L_enh = CE(H(B(x_e)), y_e)                                          hook "icda_enh"
    z_e   = up(H(D(sg B(x_e), sg B(x_s))))    head frozen: grads -> D  hook "icda_ref"
    L_ref = CE(z_e, y_e)
    Proto[c] <- m * mean{z_e(p) : y_e(p) = c} + (1 - m) * Proto[c]      m = 0.9 (NEW mean weighted)
    L_sp  = PCL(Proto, z_e, argmax z_e)
    z_t   = up(H(D(sg B(x_t), sg B(x_r))))    head frozen: grads -> D  hook "icda_tp"
    L_tp  = PCL(Proto, z_t, argmax z_t)
    PCL(P, z, l) = CE( <z/|z|, P_c/|P_c|> / tau ,  l )                  mean over pixels, l != 255
    teacher: with p = 0.5 x_r replaces x_t (plain teacher pseudo-labels), otherwise
             ptilde = softmax(up(H'(D'(B'(x_t), B'(x_r)))))             EMA B', H', D'
    L_mix = DACS ClassMix CE with ptilde, threshold 0.968, top/bottom 15 rows weight 0
    every term has weight 1 (FD 0.005); lr: backbone x0.1, head x1, DAR x0.1

All source-stage terms are summed into the loop's first backward. The head is frozen
(:func:`frozen_parameters`, restored in ``finally``) while the DAR logits are *built*, so its
parameters are not in those graphs; the release instead freezes it before its DAR backward calls
(``AccumulateGrad`` then skips them). Both give the head no gradient from L_ref, L_sp, L_tp and
the DAR exactly those gradients.

Defaults (release ``ICDA_daformer.yaml``): prototype momentum 0.9 with the release convention
(the new batch mean gets 0.9), 19 logit-space prototypes starting at 0, ``pcl_tau`` preset
``icda_release`` (= 50: logits divided by 50), adapt_to_ref with p = 0.5, teacher through the
EMA DAR, pseudo-weight rows 15/15, loss weights 1. ``pcl_tau: 0.02`` is the alternative: with
tau = 50 the logits lie in +-0.02, the loss stays ~log 19 and its gradient is ~1/2500 of the
tau = 0.02 one. We could not read the paper's PCA equation (the PDF text is not available to us);
the InfoNCE form it names conventionally uses a small temperature dividing the similarity, which
supports tau = 0.02 [inferred, spec 4.4], while the release divides by 50 (parity preset).

Learning rates: the DAR's parameters are not under ``decode_head``, so with the Refign
optimiser (lr 6e-5, head_lr_mult 10, i.e. head 6e-4 and backbone x0.1) they get 6e-5 = 0.1 x the
head lr: the release's ``dar_lr_factor 0.1``. Other factors are not expressible (see the report).

Differences from the reference (release defects avoided, spec 4.7):
- No hard-coded data path or device: prototypes are a registered buffer (``proto``) of the
  hook module, on the model's device and in every checkpoint (the release keeps a plain tensor
  pinned to ``cuda:1``, lost on resume). No ``pdb`` call anywhere.
- Nearest warping of CEM lives in :func:`udaseg.data.enhance.warp_nearest`; Refign's bilinear
  ``warp`` is untouched (the release changed the global one).
- The head freeze is a context manager restoring ``requires_grad`` even on errors (the release
  toggles flags inline, which breaks if an optimiser is built while frozen).
- The DAR's source-pair inputs reuse the detached features of the supervised passes instead of
  two extra no-grad backbone passes (same values up to the backbone's drop-path draw).
- The teacher's DAR pass reuses the backbone features of the loop's teacher pass on
  [target; reference] when the ICDA target transform ran (a forward hook captures them once),
  else it runs the teacher backbone itself.
- The DAR implementation differences are listed in :mod:`udaseg.models.dar`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.classes import IGNORE_INDEX, NUM_CLASSES
from ...errors import ConfigError
from ...models.segmentor import SegOutput
from ..hooks import PseudoLabels, StepContext
from .refign import REFERENCE_HINT, ReferenceAsTarget

__all__ = [
    "PCL_TAU_PRESETS",
    "ClassPrototypes",
    "DARPseudoLabels",
    "EnhancedSourceLoss",
    "ICDAConfig",
    "ICDAReferenceAsTarget",
    "SourcePairDARLoss",
    "TargetPairDARLoss",
    "attach_dar",
    "build",
    "frozen_parameters",
    "pcl_loss",
]

PCL_TAU_PRESETS: dict[str, float] = {"icda_release": 50.0}
"""Named PCL temperatures: the release divides the cosine logits by 50."""


@dataclass
class ICDAConfig:
    """ICDA settings (``model.methods.icda``); defaults are the release's."""

    reference_view: str = "ref"
    enhanced_view: str = "enhanced"
    enhanced_label: str = "enhanced_label"
    adapt_to_ref: bool = True
    adapt_to_ref_probability: float = 0.5
    teacher_dar: bool = True
    """Pseudo-labels through the EMA DAR on (target, reference) (False: plain teacher)."""
    teacher_stochastic: bool = True
    """Dropout/DropPath active in the teacher's DAR pass (the release's teacher runs in train
    mode; keep equal to ``self_training.teacher_stochastic``)."""
    pseudo_weight_ignore_top: int = 15
    pseudo_weight_ignore_bottom: int = 15
    """Rows of the DAR pseudo-label weight set to 0 (keep equal to ``self_training``'s, which
    act on the reference-as-target branch)."""
    prototype_momentum: float = 0.9
    momentum_convention: str = "new"
    """"new": Proto <- m * batch mean + (1 - m) * Proto (release); "old": m weights the old value."""
    pcl_tau: float | str = "icda_release"
    """PCL temperature: a number (e.g. 0.02) or a preset of :data:`PCL_TAU_PRESETS`."""
    enh_weight: float = 1.0
    ref_weight: float = 1.0
    sp_weight: float = 1.0
    tp_weight: float = 1.0
    dar: dict = field(default_factory=dict)
    """:class:`~udaseg.models.dar.DARConfig` fields (heads, groups, offset_kernels, ...)."""

    def __post_init__(self) -> None:
        if isinstance(self.pcl_tau, str):
            if self.pcl_tau not in PCL_TAU_PRESETS:
                raise ConfigError(f"model.methods.icda.pcl_tau: {self.pcl_tau!r}; a number or one "
                                  f"of {sorted(PCL_TAU_PRESETS)}")
        elif float(self.pcl_tau) <= 0:
            raise ConfigError(f"model.methods.icda.pcl_tau must be > 0, got {self.pcl_tau}")
        if self.momentum_convention not in ("new", "old"):
            raise ConfigError("model.methods.icda.momentum_convention: 'new' or 'old'")
        if not 0.0 <= self.prototype_momentum <= 1.0:
            raise ConfigError("model.methods.icda.prototype_momentum must be in [0, 1]")
        if not 0.0 <= self.adapt_to_ref_probability <= 1.0:
            raise ConfigError("model.methods.icda.adapt_to_ref_probability must be in [0, 1]")

    @property
    def tau(self) -> float:
        return PCL_TAU_PRESETS[self.pcl_tau] if isinstance(self.pcl_tau, str) else float(self.pcl_tau)


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad_(False)`` on every parameter of ``module`` for the block; each flag is
    restored on exit, also when the block raises."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def pcl_loss(proto: Tensor, feats: Tensor, labels: Tensor, tau: float,
             ignore_index: int = IGNORE_INDEX) -> Tensor:
    """PCL = mean_i CE(cos(z_i, P) / tau, l_i) over pixels with l_i != ignore.

    Args:
        proto: (K, D) prototypes (not differentiated).
        feats: (N, D) pixel features (here logits).
        labels: (N,) int64.
    """
    keep = labels != ignore_index
    z = F.normalize(feats[keep], p=2, dim=1)
    p = F.normalize(proto.detach().to(z.dtype), p=2, dim=1)
    logits = z @ p.T / tau
    if logits.shape[0] == 0:
        return feats.sum() * 0.0
    return F.cross_entropy(logits, labels[keep])


def _flat(z: Tensor) -> Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


class ClassPrototypes(nn.Module):
    """Per-class prototypes ``proto`` (K, D), a registered buffer (checkpointed, follows
    ``.to()``); zero until a class is first seen.

    ``update(feats, labels)``: for every class c present (ignore excluded),
    ``proto[c] <- w * mean(feats[labels == c]) + (1 - w) * proto[c]`` with ``w = momentum``
    (convention "new", the release) or ``w = 1 - momentum`` ("old").
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dim: int = NUM_CLASSES,
                 momentum: float = 0.9, convention: str = "new") -> None:
        super().__init__()
        self.num_classes, self.momentum, self.convention = num_classes, float(momentum), convention
        self.register_buffer("proto", torch.zeros(num_classes, dim))

    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor) -> None:
        k = self.num_classes
        keep = (labels >= 0) & (labels < k)
        lab = torch.where(keep, labels, torch.full_like(labels, k))  # k = a dump row
        sums = feats.new_zeros(k + 1, feats.shape[1]).index_add_(0, lab, feats.float())
        counts = torch.bincount(lab, minlength=k + 1)[:k].to(sums.dtype)
        mean = sums[:k] / counts.clamp_min(1).unsqueeze(1)
        w = self.momentum if self.convention == "new" else 1.0 - self.momentum
        new = w * mean + (1.0 - w) * self.proto
        self.proto.copy_(torch.where((counts > 0).unsqueeze(1), new, self.proto))


def attach_dar(student: nn.Module, dar_settings: dict | None = None) -> nn.Module:
    """Give ``student`` (an :class:`~udaseg.models.segmentor.EncoderDecoder`) a DAR as the
    training-only module ``student.train_only["dar"]`` (kept if it already has one; see
    :func:`~udaseg.models.segmentor.attach_training_module`); returns it. The segmentor's forward
    never calls it (inference is backbone + head only) and exports drop it."""
    from ...configparse import config_from_dict
    from ...models.dar import DAR, DARConfig
    from ...models.segmentor import attach_training_module, training_module

    if not (hasattr(student, "backbone") and hasattr(student, "decode_head")):
        raise ConfigError("ICDA needs a plain backbone + decode-head segmentor (DAFormer); "
                          f"got {type(student).__name__} (HRDA is not supported)")
    existing = training_module(student, "dar")
    if isinstance(existing, DAR):
        return existing
    cfg = config_from_dict(DARConfig, dict(dar_settings or {}), "model.methods.icda.dar")
    return attach_training_module(student, "dar", DAR(student.backbone.out_channels, cfg))


def _dar(model: nn.Module) -> nn.Module | None:
    from ...models.segmentor import training_module

    return training_module(model, "dar")


def _dar_logits(model: nn.Module, feats_q: list[Tensor], feats_r: list[Tensor],
                size: tuple[int, int]) -> Tensor:
    """up(H(D(F_q, F_r))) with the head frozen while the graph is built."""
    coupled = _dar(model)(feats_q, feats_r)
    with frozen_parameters(model.decode_head):
        z = model.decode_head(coupled)
    return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


class _FeatureCapture:
    """One-shot forward hook on the teacher backbone: keeps the features of the loop's teacher
    pass on [target; reference] so the DAR pseudo-labels need no second backbone pass."""

    def __init__(self) -> None:
        self.handle = None
        self.features: list[Tensor] | None = None

    def arm(self, teacher: nn.Module | None) -> None:
        self.disarm()
        self.features = None
        if teacher is None or not hasattr(teacher, "backbone"):
            return

        def hook(_module, _inputs, output):
            self.features = [f.detach() for f in output]
            self.disarm()

        self.handle = teacher.backbone.register_forward_hook(hook)

    def disarm(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def take(self) -> list[Tensor] | None:
        feats, self.features = self.features, None
        self.disarm()
        return feats


class ICDAReferenceAsTarget(ReferenceAsTarget):
    """Refign's ``adapt_to_ref`` (p = 0.5, Python ``random``) and, when the target is kept,
    arming the capture of the teacher's backbone features for :class:`DARPseudoLabels`."""

    def __init__(self, probability: float, view: str, capture: _FeatureCapture | None) -> None:
        super().__init__(probability, view)
        self.capture = capture

    def __call__(self, ctx: StepContext, target: dict) -> dict:
        if self.view not in target:
            raise ConfigError(f"ICDA: batch['target'] has no {self.view!r} view; " + REFERENCE_HINT)
        out = target
        if self.probability > 0 and random.random() < self.probability:
            out = {k: v for k, v in target.items() if k != self.view}
            out["image"] = target[self.view]
            out["adapted_to_ref"] = True
        elif self.capture is not None:
            self.capture.arm(ctx.teacher)
        return out


class DARPseudoLabels:
    """LabelRefiner: replace the teacher's pseudo-labels by those of the EMA DAR on
    (target, reference); untouched when the reference stands in for the target."""

    hook_kind = "refiner"

    def __init__(self, cfg: ICDAConfig, capture: _FeatureCapture | None = None) -> None:
        self.cfg = cfg
        self.capture = capture
        self.teacher_views = (cfg.reference_view,)

    def __call__(self, ctx: StepContext, pseudo: PseudoLabels) -> PseudoLabels:
        feats = self.capture.take() if self.capture is not None else None
        if ctx.target.get("adapted_to_ref"):
            return pseudo
        view = self.cfg.reference_view
        if view not in ctx.target:
            raise ConfigError(f"ICDA: batch['target'] has no {view!r} view; " + REFERENCE_HINT)
        teacher = ctx.teacher
        if teacher is None or _dar(teacher) is None:
            raise ValueError("ICDA: the EMA teacher has no DAR (build the methods before the "
                             "self-training loop copies the student)")
        if ctx.pseudo_from_probs is None:
            raise ValueError("DARPseudoLabels needs ctx.pseudo_from_probs (set by the DACS loop)")
        from ..teacher import teacher_forward_mode

        x_t, x_r = ctx.target["image"], ctx.target[view]
        b = x_t.shape[0]
        size = tuple(pseudo.label.shape[-2:])
        with torch.no_grad(), teacher_forward_mode(teacher, bn_train=True,
                                                   stochastic=self.cfg.teacher_stochastic):
            if feats is None or feats[0].shape[0] != 2 * b:
                feats = teacher.extract_features(torch.cat([x_t, x_r]))
            f_t = [f[:b] for f in feats]
            f_r = [f[b:] for f in feats]
            z = _dar_logits(teacher, f_t, f_r, size)
            prob = torch.softmax(z.float(), dim=1)
        return ctx.pseudo_from_probs(
            prob, valid=pseudo.valid, ignore_top=self.cfg.pseudo_weight_ignore_top,
            ignore_bottom=self.cfg.pseudo_weight_ignore_bottom)


def _require(batch: dict, key: str, what: str) -> Tensor:
    if key not in batch:
        raise ConfigError(
            f"ICDA: batch['{what}'] has no {key!r} view; " + (
                "use the source dataset `cityscapes_cem` (CEM: enhanced view and label)"
                if what == "source" else REFERENCE_HINT))
    return batch[key]


class EnhancedSourceLoss:
    """AuxLoss (source stage) ``icda_enh``: L_enh = CE(student(x_e), y_e) (the loop's CE)."""

    hook_kind = "aux_loss"
    stage = "source"
    name = "icda_enh"

    def __init__(self, cfg: ICDAConfig) -> None:
        self.cfg = cfg

    def __call__(self, ctx: StepContext) -> Tensor:
        x_e = _require(ctx.source, self.cfg.enhanced_view, "source")
        y_e = _require(ctx.source, self.cfg.enhanced_label, "source")
        out = ctx.student_forward("source/enhanced", x_e)
        return self.cfg.enh_weight * ctx.seg_loss(out, y_e)


class SourcePairDARLoss(nn.Module):
    """AuxLoss (source stage) ``icda_ref``: L_ref + L_sp on the source pair, prototype update.
    Holds the prototypes (registered buffer ``prototypes.proto``)."""

    hook_kind = "aux_loss"
    stage = "source"
    name = "icda_ref"

    def __init__(self, cfg: ICDAConfig, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cfg = cfg
        self.prototypes = ClassPrototypes(num_classes, num_classes, cfg.prototype_momentum,
                                          cfg.momentum_convention)

    def forward(self, ctx: StepContext) -> Tensor:
        cfg = self.cfg
        x_e = _require(ctx.source, cfg.enhanced_view, "source")
        y_e = _require(ctx.source, cfg.enhanced_label, "source")
        student = ctx.student
        f_s = [f.detach() for f in ctx.student_forward("source/image", ctx.source["image"]).features]
        f_e = [f.detach() for f in ctx.student_forward("source/enhanced", x_e).features]
        z = _dar_logits(student, f_e, f_s, tuple(y_e.shape[-2:]))
        l_ref = ctx.seg_loss(SegOutput(logits=z, features=[]), y_e)
        flat = _flat(z)
        self.prototypes.update(flat.detach(), y_e.reshape(-1))
        l_sp = pcl_loss(self.prototypes.proto, flat, z.detach().argmax(1).reshape(-1), cfg.tau)
        ctx.losses["icda_ref_ce"] = l_ref.detach()
        ctx.losses["icda_sp"] = l_sp.detach()
        return cfg.ref_weight * l_ref + cfg.sp_weight * l_sp


class TargetPairDARLoss:
    """AuxLoss (source stage, after ``icda_ref``) ``icda_tp``: L_tp = PCL on the target pair
    (x_t, x_r) with the freshly updated prototypes; gradients reach the DAR only."""

    hook_kind = "aux_loss"
    stage = "source"
    name = "icda_tp"

    def __init__(self, cfg: ICDAConfig, prototypes: ClassPrototypes) -> None:
        self.cfg = cfg
        self._protos = [prototypes]  # not a submodule: the buffer belongs to icda_ref

    def __call__(self, ctx: StepContext) -> Tensor:
        x_t = ctx.target.get("image")
        if x_t is None:
            return ctx.source["image"].new_zeros(())
        x_r = _require(ctx.target, self.cfg.reference_view, "target")
        b = x_t.shape[0]
        student = ctx.student
        with torch.no_grad():
            feats = student.extract_features(torch.cat([x_t, x_r]))
        z = _dar_logits(student, [f[:b] for f in feats], [f[b:] for f in feats],
                        tuple(x_t.shape[-2:]))
        flat = _flat(z)
        loss = pcl_loss(self._protos[0].proto, flat, z.detach().argmax(1).reshape(-1), self.cfg.tau)
        return self.cfg.tp_weight * loss


def build(settings: dict, student) -> list:
    """The method-catalog builder (``model.methods.icda``): attaches the DAR and returns
    [target transform, DAR refiner, icda_enh, icda_ref, icda_tp] (aux losses in this order)."""
    from ...configparse import config_from_dict

    cfg = config_from_dict(ICDAConfig, settings, "model.methods.icda")
    attach_dar(student, cfg.dar)
    num_classes = int(getattr(student, "num_classes", NUM_CLASSES))
    capture = _FeatureCapture() if cfg.teacher_dar else None
    hooks: list = []
    p = cfg.adapt_to_ref_probability if cfg.adapt_to_ref else 0.0
    if cfg.adapt_to_ref or cfg.teacher_dar:
        hooks.append(ICDAReferenceAsTarget(p, cfg.reference_view, capture))
    if cfg.teacher_dar:
        hooks.append(DARPseudoLabels(cfg, capture))
    ref = SourcePairDARLoss(cfg, num_classes)
    hooks += [EnhancedSourceLoss(cfg), ref, TargetPairDARLoss(cfg, ref.prototypes)]
    return hooks
