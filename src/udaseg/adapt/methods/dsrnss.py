"""DSRNSS: dynamic and small object refinement and feature prototype alignment, on Refign.

Paper: "Towards Dynamic and Small Objects Refinement for Unsupervised Domain Adaptative Nighttime
Semantic Segmentation", Pan, Li, Chen, Zhu and Wang, arXiv 2310.04747 (v2, 2024). Reference:
Rorisis/DSRNSS_codes (no licence file; read for its semantics only) ``models/segmentation_model.py``
and ``helpers/dacs_transforms.py``; re-implemented from ``shared/spec/refign_dsrnss_icda_spec.md``
section 3. No code copied.

DSRNSS is Refign (``model.methods.refign``, its own method module) plus three hooks of the
self-training loop, each switchable, configured under ``model.methods.dsrnss``:

1. **Relation-aware ClassMix** (:class:`RelationAwareClassMix`, the Mixer). Per source image i::

       K_i  = unique values of y_s[i]        (THIS image's labels; 255 included, as upstream)
       A_i  = ceil(|K_i| / 2) values of K_i, uniformly without replacement
       for (T, D) in closures (in order):  if A_i & T != {}:  A_i <- A_i | (D & K_i)
       M_i  = [y_s[i] in A_i];  x_m, y_m, w_m as DACS (M x_s + (1 - M) x_t, ...)

   with the closures (``data.classes.CLASS_CLOSURES["dsrnss"]``): {traffic light, traffic sign}
   -> pole; pole -> {traffic light, traffic sign}; rider -> {motorcycle, bicycle}. This fixes
   DACS's batch-wide class draw (Refign keeps it). Objects keep their source position.

2. **Long-tail bank** (:class:`LongTailBank`, a MixedTransform). Every iteration t, with
   m = [y_s in T], T = {rider, truck, bus, motorcycle, bicycle}, the bank records
   (y_s * m, m, x_s * m) of the raw normalised source batch and keeps the last 3 iterations
   (t included). At every 5th iteration (t mod 5 = 0) each entry, oldest -> newest, is pasted
   onto the strongly augmented mixed batch at the same positions, bank sample j onto mixed
   sample j::

       x_m <- m x_bank + (1 - m) x_m,    y_m <- m y_bank + (1 - m) y_m,    w_m unchanged

   The pasted pixels are not augmented. The bank is a buffer of the hook (saved in every
   checkpoint: a resumed run pastes exactly what an uninterrupted one would).

3. **Feature prototype alignment** (:class:`FeaturePrototypeAlignment`, an AuxLoss at the target
   stage that back-propagates through the source pass: ``retain_source_graph``). Features f of
   the last backbone stage (HRDA: the context branch, which ``SegOutput.features`` are): source
   f_s (the supervised pass, with gradients), target f_t (the student's backbone on the target
   batch under ``no_grad``), mixed f_m (the mixed pass, with gradients); labels y_s, the target
   yhat_t = argmax of the (Refign-refined) teacher probabilities, y_m. For one image pair (a, b)::

       ya, yb    = nearest-resize(y_a, y_b) to the feature grids
       P_a[c]    = mean of f_a over {x: ya(x) = c}       (0 when c is absent)
       S_ab[c,x] = cos(P_a[c], f_b(x)), -1 where exactly 0 (absent prototypes)
       Z_ab      = nearest-upsample(S_ab) to y_b's size / tau      (tau = 0.1: x10)
       w_c       = [c in ya] [c in yb]                             (overlap class weights)
       L_1       = CE_w(Z_ab, y_b)     PyTorch weighted mean, ignore 255
       L_2       = CE(Z_ba, y_a)       the symmetric term with P_b on f_a, unweighted
       l(a, b)   = 0.1 L_1 + 0.1 L_2

       L_metric = mean_i l(s_i, t_i),  L_align = mean_i l(s_i, m_i)
       L_FPA    = L_metric + L_align / 100 (HRDA) or / 10 (single scale),  from ``fpa_start_step``

4. The 0.8 factor on the mixed loss of DSRNSS-HRDA is the loop's
   ``self_training.target_loss_weight: 0.8`` (set by the HRDA configs), not part of this module.

Total (HRDA*): L_src + L_FD + 1[t >= start] L_FPA + 0.8 L_mix.

Defaults (the released code): tail classes ``dsrnss_tail``, closures ``dsrnss``, bank length 3,
paste period 5, FPA from step 9664 (= epoch 8 x 1208 iterations on Cityscapes -> Dark Zurich;
Cityscapes -> ACDC-night: 8 x 200 = 1600, set by its config), tau 0.1, inner weights 0.1 + 0.1,
L_align factor 1/100 for HRDA students and 1/10 otherwise. The Refign part uses
``adapt_to_ref: false`` on Dark Zurich (HRDA*, DAFormer) and ``true`` on ACDC-night.

Differences from the reference:
- The FPA start is a step (``fpa_start_step``) instead of ``current_epoch >= 8``, whose length
  depended on the dataset sizes; the configs state both.
- The paste period counts the global step (``ctx.step``); the reference counts Lightning's
  per-epoch ``batch_idx``, which restarts every epoch (1208 iterations on Dark Zurich, not a
  multiple of 5). ``paste_epoch_length: 1208`` reproduces the reference's phase exactly.
- FPA averages over every image of the batch; the reference hard-codes images 0 and 1 (its
  batch is 2 per domain, so the numbers agree there).
- A CE term whose weights sum to 0 (no class shared by the two images of a pair, or only
  ignored pixels) is 0 here; PyTorch's weighted mean gives NaN there (a bug upstream).
- The bank lives per hook instance and in the checkpoint (upstream: mutable default list
  arguments of the model's ``__init__``, shared by instances and lost on resume). A batch of
  another shape than the banked ones (e.g. a last, smaller batch) restarts the bank.
- Pasted pixels also count as source pixels in ``MixedBatch.mask`` and are pasted onto
  ``MixedBatch.unaugmented`` too (for other target-stage hooks; the DSRNSS numbers do not use
  either).
- ``fpa_class_weights`` (off by default): optional per-class weights multiplied into both CE
  terms, the abstract's "re-weighting of dynamic and small categories" (the released code has
  only the binary overlap weights).
- The dead code of the reference (an unused confidence fill-in of the ignored target pixels in
  the prototype loss; the unused target probabilities of the mask function) is not ported.
- The class draw uses torch's RNG (a seedable ``generator`` or the global one) instead of
  numpy's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.classes import CLASS_CLOSURES, CLASS_GROUPS, IGNORE_INDEX
from ...errors import ConfigError
from ..hooks import MixedBatch, PseudoLabels, StepContext
from ..mixing import mix

__all__ = [
    "DSRNSSConfig",
    "RelationAwareClassMix",
    "LongTailBank",
    "FeaturePrototypeAlignment",
    "relation_mix_choices",
    "relation_mix_masks",
    "class_prototypes",
    "prototype_logits",
    "prototype_pair_loss",
    "build",
]

_SLOTS = 256  # label values are 0..255 (255 = ignore)

Closures = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


@dataclass
class DSRNSSConfig:
    """DSRNSS settings (``model.methods.dsrnss``); defaults are the released code's."""

    relation_mix: bool = True
    """Replace ClassMix by the relation-aware, per-image ClassMix (piece 1)."""
    closures: str | list | None = "dsrnss"
    """A :data:`~udaseg.data.classes.CLASS_CLOSURES` name or explicit ordered rules
    ``[[triggers], [added]]``; None or [] for none."""
    mix_include_ignore: bool = True
    """Keep 255 among an image's candidate classes (upstream)."""

    bank: bool = True
    """The long-tail bank (piece 2)."""
    tail_classes: str | list[int] = "dsrnss_tail"
    """A :data:`~udaseg.data.classes.CLASS_GROUPS` name or explicit class ids."""
    bank_length: int = 3
    """Iterations kept (upstream ``step_save=2``: the last 3, the current one included)."""
    paste_period: int = 5
    """Paste when ``step mod paste_period == 0``."""
    paste_epoch_length: int | None = None
    """Count the paste period within epochs of this many iterations (the reference's
    ``batch_idx``: 1208 on Dark Zurich, 200 on ACDC-night); None counts the global step."""

    fpa: bool = True
    """Feature prototype alignment (piece 3)."""
    fpa_start_step: int = 9664
    """First step with L_FPA (the reference's epoch 8: 9664 on Dark Zurich, 1600 on ACDC-night)."""
    fpa_weight: float = 1.0
    """Factor on L_FPA."""
    fpa_temperature: float = 0.1
    """tau of the cosine logits (x10)."""
    fpa_term_weights: tuple[float, float] = (0.1, 0.1)
    """Weights of L_1 (prototypes of a on b) and L_2 (prototypes of b on a)."""
    fpa_align_factor: float | None = None
    """Factor on L_align; None: 1/100 for HRDA students, 1/10 otherwise (upstream's two paths)."""
    fpa_feature_level: int = -1
    """Backbone level of the prototypes (the last stage)."""
    fpa_class_weights: list[float] | None = None
    """Optional per-class CE weights (K values) for both terms; off upstream."""

    def __post_init__(self) -> None:
        # method blocks are plain dicts: a command-line override arrives as a string
        for name in ("bank_length", "paste_period", "fpa_start_step", "fpa_feature_level"):
            setattr(self, name, int(getattr(self, name)))
        for name in ("fpa_weight", "fpa_temperature"):
            setattr(self, name, float(getattr(self, name)))
        if self.paste_epoch_length is not None:
            self.paste_epoch_length = int(self.paste_epoch_length)
        if self.fpa_align_factor is not None:
            self.fpa_align_factor = float(self.fpa_align_factor)
        if self.bank_length < 1 or self.paste_period < 1:
            raise ConfigError("model.methods.dsrnss: bank_length and paste_period must be >= 1")
        if self.paste_epoch_length is not None and self.paste_epoch_length < 1:
            raise ConfigError("model.methods.dsrnss.paste_epoch_length must be >= 1 or null")
        if self.fpa_temperature <= 0:
            raise ConfigError("model.methods.dsrnss.fpa_temperature must be > 0")
        if len(tuple(self.fpa_term_weights)) != 2:
            raise ConfigError("model.methods.dsrnss.fpa_term_weights: give two weights")
        self.fpa_term_weights = tuple(float(w) for w in self.fpa_term_weights)


def resolve_tail_classes(classes: str | Sequence[int]) -> tuple[int, ...]:
    """A class-group name or explicit ids -> class ids."""
    if isinstance(classes, str):
        try:
            return tuple(CLASS_GROUPS[classes])
        except KeyError:
            known = ", ".join(sorted(CLASS_GROUPS))
            raise ConfigError(
                f"model.methods.dsrnss.tail_classes: unknown class group {classes!r}; known: "
                f"{known}, or give a list of class ids") from None
    return tuple(int(c) for c in classes)


def resolve_closures(closures: str | Sequence | None) -> Closures:
    """A closure-table name or explicit ``[[triggers], [added]]`` rules -> rules."""
    if closures is None:
        return ()
    if isinstance(closures, str):
        try:
            return CLASS_CLOSURES[closures]
        except KeyError:
            known = ", ".join(sorted(CLASS_CLOSURES))
            raise ConfigError(
                f"model.methods.dsrnss.closures: unknown closure table {closures!r}; known: "
                f"{known}, or give rules [[trigger ids], [added ids]]") from None
    rules = []
    for rule in closures:
        if len(rule) != 2:
            raise ConfigError(
                "model.methods.dsrnss.closures: a rule is [[trigger ids], [added ids]], "
                f"got {rule!r}")
        rules.append((tuple(int(c) for c in rule[0]), tuple(int(c) for c in rule[1])))
    return tuple(rules)


# ----------------------------------------------------------------------------------------------
# 1. relation-aware ClassMix


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _as_bhw(labels: Tensor) -> Tensor:
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3:
        raise ValueError(f"DSRNSS: expected (B, H, W) labels, got {tuple(labels.shape)}")
    return labels.long()


def relation_mix_choices(
    labels: Tensor,
    closures: Closures = CLASS_CLOSURES["dsrnss"],
    generator: torch.Generator | None = None,
    include_ignore: bool = True,
) -> Tensor:
    """The classes each image pastes: (B, 256) bool over label values 0..255.

    Per image: the values K present in ITS label map (255 included when ``include_ignore``),
    ceil(|K|/2) of them uniformly without replacement (the smallest i.i.d. U(0, 1) keys), then
    each closure rule in order: if a trigger class was chosen, its ``added`` classes present in
    K join. On-device, no host synchronisation.
    """
    y = _as_bhw(labels)
    b = y.shape[0]
    present = torch.zeros(b, _SLOTS, dtype=torch.bool, device=y.device)
    present.scatter_(1, y.reshape(b, -1), True)
    if not include_ignore:
        present[:, IGNORE_INDEX] = False
    n = present.sum(dim=1, keepdim=True)
    k = (n + n % 2) // 2
    keys = _rand((b, _SLOTS), generator, y.device)
    keys = torch.where(present, keys, torch.full_like(keys, 2.0))  # absent values sort last
    chosen = keys.argsort(dim=1).argsort(dim=1) < k
    for triggers, added in closures:
        fire = chosen[:, list(triggers)].any(dim=1, keepdim=True)
        idx = list(added)
        chosen[:, idx] = chosen[:, idx] | (fire & present[:, idx])
    return chosen


def relation_mix_masks(
    labels: Tensor,
    closures: Closures = CLASS_CLOSURES["dsrnss"],
    generator: torch.Generator | None = None,
    include_ignore: bool = True,
) -> Tensor:
    """Masks (B, 1, H, W) float: ``M_i = [y_s[i] in A_i]`` (:func:`relation_mix_choices`)."""
    y = _as_bhw(labels)
    chosen = relation_mix_choices(y, closures, generator, include_ignore).float()
    b = y.shape[0]
    return torch.gather(chosen, 1, y.reshape(b, -1)).reshape(b, 1, *y.shape[-2:])


class RelationAwareClassMix:
    """DSRNSS's :class:`~udaseg.adapt.hooks.Mixer`: per-image class draw with the closures,
    then the DACS mix (as :class:`~udaseg.adapt.mixing.ClassMix`)."""

    hook_kind = "mixer"

    def __init__(self, closures: Closures = CLASS_CLOSURES["dsrnss"], include_ignore: bool = True,
                 generator: torch.Generator | None = None) -> None:
        self.closures = closures
        self.include_ignore = include_ignore
        self.generator = generator

    def __call__(self, ctx: StepContext, pseudo: PseudoLabels) -> MixedBatch:
        src_img, tgt_img = ctx.source["image"], ctx.target["image"]
        src_lbl = _as_bhw(ctx.source["label"])
        mask = relation_mix_masks(src_lbl, self.closures, self.generator, self.include_ignore)
        image = mix(mask, src_img, tgt_img)
        label = mix(mask, src_lbl, pseudo.label.long())
        weight = mix(mask, torch.ones_like(pseudo.weight), pseudo.weight)
        return MixedBatch(image=image, label=label, weight=weight, mask=mask)


# ----------------------------------------------------------------------------------------------
# 2. long-tail bank


class LongTailBank(nn.Module):
    """DSRNSS's :class:`~udaseg.adapt.hooks.MixedTransform`: bank the tail-class pixels of the
    last ``length`` source batches and paste them onto the mixed batch every ``period`` steps.

    The bank is three persistent buffers, oldest entry first: ``bank_image`` (n, B, 3, H, W)
    (the masked normalised source images), ``bank_label`` (n, B, H, W) uint8 (labels times the
    mask) and ``bank_mask`` (n, B, H, W) bool. They are empty until the first step and take
    their shapes from a checkpoint when one is loaded.
    """

    hook_kind = "mixed_transform"
    _BANK = ("bank_image", "bank_label", "bank_mask")

    def __init__(self, tail_classes: Sequence[int] = CLASS_GROUPS["dsrnss_tail"], length: int = 3,
                 period: int = 5, epoch_length: int | None = None) -> None:
        super().__init__()
        self.tail_classes = tuple(int(c) for c in tail_classes)
        self.length = int(length)
        self.period = int(period)
        self.epoch_length = epoch_length
        self.register_buffer("tail", torch.tensor(self.tail_classes, dtype=torch.long),
                             persistent=False)
        self.register_buffer("bank_image", torch.zeros(0))
        self.register_buffer("bank_label", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("bank_mask", torch.zeros(0, dtype=torch.bool))

    def __len__(self) -> int:
        return int(self.bank_mask.shape[0]) if self.bank_mask.ndim == 4 else 0

    def paste_due(self, step: int) -> bool:
        s = step if self.epoch_length is None else step % self.epoch_length
        return s % self.period == 0

    @torch.no_grad()
    def record(self, image: Tensor, label: Tensor) -> None:
        """Append (x m, y m, m) of a source batch, m = [y in tail]; keep the last ``length``."""
        y = _as_bhw(label)
        m = torch.isin(y, self.tail.to(y.device))
        entry = {
            "bank_image": (image * m[:, None].to(image.dtype))[None],
            "bank_label": (y * m).to(torch.uint8)[None],
            "bank_mask": m[None],
        }
        if len(self) == 0 or self.bank_image.shape[1:] != entry["bank_image"].shape[1:]:
            for name, value in entry.items():
                setattr(self, name, value)
            return
        for name, value in entry.items():
            old = getattr(self, name)
            setattr(self, name, torch.cat((old.to(value.device), value))[-self.length:])

    @torch.no_grad()
    def paste(self, mixed: MixedBatch) -> MixedBatch:
        """Paste every entry, oldest -> newest, at the same positions (sample j onto j)."""
        image, label, mask, unaug = mixed.image, mixed.label, mixed.mask, mixed.unaugmented
        n_mix, n_bank = image.shape[0], self.bank_mask.shape[1]
        for i in range(len(self)):
            m = self.bank_mask[i].to(image.device)
            src = self.bank_image[i].to(image.device, image.dtype)
            lbl = self.bank_label[i].to(label.device, label.dtype)
            if n_bank > n_mix:  # bank sample j goes onto mixed sample j
                m, src, lbl = m[:n_mix], src[:n_mix], lbl[:n_mix]
            elif n_bank < n_mix:
                pad = n_mix - n_bank
                m = torch.cat((m, m.new_zeros((pad, *m.shape[1:]))))
                src = torch.cat((src, src.new_zeros((pad, *src.shape[1:]))))
                lbl = torch.cat((lbl, lbl.new_zeros((pad, *lbl.shape[1:]))))
            image = torch.where(m[:, None], src, image)
            label = torch.where(m, lbl, label)
            mask = torch.where(m[:, None], torch.ones_like(mask), mask)
            if unaug is not None:
                unaug = torch.where(m[:, None], src.to(unaug.dtype), unaug)
        return dataclasses.replace(mixed, image=image, label=label, mask=mask, unaugmented=unaug)

    def forward(self, ctx: StepContext, mixed: MixedBatch) -> MixedBatch:
        self.record(ctx.source["image"], ctx.source["label"])
        if self.paste_due(ctx.step):
            mixed = self.paste(mixed)
        return mixed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the bank's shape is only known from the checkpoint: adopt it before the copy
        for name in self._BANK:
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(value.shape, dtype=value.dtype,
                                                device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# 3. feature prototype alignment


def _resize_label(label: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) labels -> (h, w) by nearest interpolation (F.interpolate's legacy 'nearest')."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label.long()
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def class_prototypes(feat: Tensor, label: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean features of one image.

    Args:
        feat: (C, h, w) features.
        label: (h, w) labels at the feature size (values outside 0..K-1 are ignored).
        num_classes: K.

    Returns:
        ``(P (K, C), present (K,) bool)``; absent classes get a zero prototype.
    """
    c = feat.shape[0]
    y = label.reshape(-1)
    valid = (y >= 0) & (y < num_classes)
    onehot = torch.zeros(num_classes, y.numel(), dtype=feat.dtype, device=feat.device)
    onehot.scatter_(0, torch.where(valid, y, 0)[None], valid[None].to(feat.dtype))
    counts = onehot.sum(dim=1)
    protos = (onehot @ feat.reshape(c, -1).t()) / counts.clamp_min(1.0)[:, None]
    return protos, counts > 0


def prototype_logits(protos: Tensor, feat: Tensor, out_size: tuple[int, int],
                     temperature: float = 0.1) -> Tensor:
    """Cosine logits (1, K, H, W): cos(P[c], f(x)), -1 where exactly 0 (absent prototypes),
    nearest-upsampled to ``out_size``, divided by ``temperature``."""
    c, h, w = feat.shape
    cs = F.normalize(protos, dim=1) @ F.normalize(feat.reshape(c, -1), dim=0)  # (K, h w)
    cs = torch.where(cs == 0, torch.full_like(cs, -1.0), cs)
    cs = cs.reshape(1, -1, h, w)
    if (h, w) != tuple(out_size):
        cs = F.interpolate(cs, size=tuple(out_size), mode="nearest")
    return cs * (1.0 / temperature)  # x10 exactly as upstream for tau = 0.1


def _weighted_ce(logits: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """PyTorch's weighted-mean CE with ignore 255, 0 (not NaN) when the weights sum to 0."""
    k = logits.shape[1]
    t = torch.where((target >= 0) & (target < k), target, torch.full_like(target, IGNORE_INDEX))
    total = F.cross_entropy(logits, t, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = t != IGNORE_INDEX
    if weight is None:
        den = valid.sum().to(total.dtype)
    else:
        den = (weight[torch.where(valid, t, 0)] * valid).sum()
    return total / den.clamp_min(1e-12)


def prototype_pair_loss(
    feat_a: Tensor,
    label_a: Tensor,
    feat_b: Tensor,
    label_b: Tensor,
    num_classes: int,
    temperature: float = 0.1,
    term_weights: tuple[float, float] = (0.1, 0.1),
    class_weights: Tensor | None = None,
) -> Tensor:
    """The reference's ``metric_loss`` for one image pair (module docstring, piece 3).

    Args:
        feat_a, feat_b: (C, h, w) features (any grid sizes).
        label_a, label_b: (H, W) labels of each image (255 = ignore).
        num_classes: K.
        temperature: tau (logits = cos / tau).
        term_weights: weights of L_1 (prototypes of a scored on b, overlap-weighted) and L_2
            (prototypes of b scored on a, unweighted).
        class_weights: optional (K,) weights multiplied into both terms (``fpa_class_weights``).
    """
    feat_a, feat_b = feat_a.float(), feat_b.float()
    ya = _resize_label(label_a, tuple(feat_a.shape[-2:]))
    yb = _resize_label(label_b, tuple(feat_b.shape[-2:]))
    p_a, present_a = class_prototypes(feat_a, ya, num_classes)
    p_b, present_b = class_prototypes(feat_b, yb, num_classes)
    overlap = (present_a & present_b).float()
    w1 = overlap if class_weights is None else overlap * class_weights
    z_ab = prototype_logits(p_a, feat_b, tuple(label_b.shape[-2:]), temperature)
    z_ba = prototype_logits(p_b, feat_a, tuple(label_a.shape[-2:]), temperature)
    l1 = _weighted_ce(z_ab, label_b[None].long(), w1)
    l2 = _weighted_ce(z_ba, label_a[None].long(), class_weights)
    return term_weights[0] * l1 + term_weights[1] * l2


class FeaturePrototypeAlignment:
    """DSRNSS's FPA as an :class:`~udaseg.adapt.hooks.AuxLoss` (stage "target", log name
    "fpa"; its two parts are logged as ``fpa_metric`` and ``fpa_align``, unweighted).

    It back-propagates through the source pass (the source prototypes), so it asks the loop to
    keep the source graph (``retain_source_graph``); this works with FD on or off.
    """

    hook_kind = "aux_loss"
    name = "fpa"
    stage = "target"
    retain_source_graph = True

    def __init__(self, cfg: DSRNSSConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else DSRNSSConfig()
        cw = self.cfg.fpa_class_weights
        self.class_weights = None if cw is None else torch.tensor([float(v) for v in cw])

    def align_factor(self, ctx: StepContext) -> float:
        if self.cfg.fpa_align_factor is not None:
            return float(self.cfg.fpa_align_factor)
        hrda = ctx.source_out is not None and ctx.source_out.detail_logits is not None
        return 0.01 if hrda else 0.1

    @staticmethod
    def target_features(ctx: StepContext, level: int) -> Tensor:
        """The student's backbone features of the target batch, no gradient (HRDA: context)."""
        image = ctx.target["image"]
        with torch.no_grad():
            extract = getattr(ctx.student, "extract_features", None)
            feats = extract(image) if extract is not None else ctx.student(image).features
        return feats[level].detach()

    def __call__(self, ctx: StepContext) -> Tensor:
        if ctx.step < self.cfg.fpa_start_step:
            return torch.zeros((), device=ctx.device)
        if ctx.source_out is None or ctx.mixed_out is None or ctx.pseudo is None:
            raise ValueError("FeaturePrototypeAlignment runs at stage 'target' of the DACS loop")
        level = self.cfg.fpa_feature_level
        k = ctx.source_out.logits.shape[1]
        cw = self.class_weights
        if cw is not None:
            if cw.numel() != k:
                raise ConfigError(
                    f"model.methods.dsrnss.fpa_class_weights: {cw.numel()} values for {k} classes")
            cw = cw.to(ctx.device)
        f_s = ctx.source_out.features[level]
        f_t = self.target_features(ctx, level)
        f_m = ctx.mixed_out.features[level]
        y_s = _as_bhw(ctx.source["label"])
        prob = ctx.pseudo.prob
        y_t = prob.argmax(dim=1) if prob is not None else ctx.pseudo.label
        y_m = ctx.mixed.label
        args = (k, self.cfg.fpa_temperature, self.cfg.fpa_term_weights, cw)
        b = min(f_s.shape[0], f_t.shape[0], f_m.shape[0])
        metric = torch.stack([prototype_pair_loss(f_s[i], y_s[i], f_t[i], y_t[i], *args)
                              for i in range(b)]).mean()
        align = torch.stack([prototype_pair_loss(f_s[i], y_s[i], f_m[i], y_m[i], *args)
                             for i in range(b)]).mean()
        ctx.losses["fpa_metric"] = metric.detach()
        ctx.losses["fpa_align"] = align.detach()
        return self.cfg.fpa_weight * (metric + self.align_factor(ctx) * align)


def build(settings: dict, student) -> list:
    """The method-catalog builder (``model.methods.dsrnss``): the mixer, the bank and the FPA
    loss, each when switched on. Stack it after ``refign`` for the paper's method."""
    from ...configparse import config_from_dict

    cfg = config_from_dict(DSRNSSConfig, settings, "model.methods.dsrnss")
    hooks: list = []
    if cfg.relation_mix:
        hooks.append(RelationAwareClassMix(resolve_closures(cfg.closures), cfg.mix_include_ignore))
    if cfg.bank:
        hooks.append(LongTailBank(resolve_tail_classes(cfg.tail_classes), cfg.bank_length,
                                  cfg.paste_period, cfg.paste_epoch_length))
    if cfg.fpa:
        hooks.append(FeaturePrototypeAlignment(cfg))
    return hooks
