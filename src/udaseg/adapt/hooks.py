"""Typed extension points of the self-training loop (the only contract between loop and methods).

The base loop (:mod:`udaseg.adapt.self_training`) calls, in a fixed order::

    1. EMA teacher update
    2. student(source)          -> L_src  + every AuxLoss with stage "source"   -> backward
    3. every TargetTransform    : target batch -> target batch   (Refign's adapt_to_ref)
       teacher([target; views]) -> PseudoLabels (+ ctx.teacher_logits of the extra views that
                                   the refiners ask for in ``teacher_views``, in ONE pass)
    4. every LabelRefiner       : PseudoLabels -> PseudoLabels   (Refign, CDDA, DSRNSS)
    5. the Mixer                : (source, target, PseudoLabels) -> MixedBatch (ClassMix by default)
    6. strong augmentation of the mixed image; every MixedTransform (DSRNSS's long-tail paste,
       not augmented); student(mixed) -> L_mix
       + every AuxLoss with stage "target" (MIC, CISS, prototypes, ...)                -> backward
    7. (the engine) one optimiser step

Data-side extras (a stylised copy, a day reference, events, depth) ride in the batch dicts as
extra views, produced by the data pipeline; methods read them from ``ctx.source`` /
``ctx.target`` by key. A method is one module implementing one or more of these protocols plus
a config block; methods stack by listing them. The loop never names a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..models.segmentor import SegOutput

Stage = Literal["source", "target"]


@dataclass
class PseudoLabels:
    """Teacher output on the clean target batch.

    Attributes:
        label: (B, H, W) int64 argmax labels.
        weight: (B, H, W) float pixel weights (DACS: one quality scalar per batch, 0 in PL-crop margins).
        prob: (B, K, H, W) teacher softmax (what refiners may re-weight), or None.
        valid: (B, H, W) float mask of pixels that may carry a pseudo-label (PL crop), or None.
    """

    label: Tensor
    weight: Tensor
    prob: Tensor | None = None
    valid: Tensor | None = None


@dataclass
class MixedBatch:
    """The image the student sees in the target pass and its supervision.

    Contract: a Mixer returns ``image`` as the plain mix (normalised, **not** augmented). The loop
    then applies the strong augmentation: it moves the Mixer's image to ``unaugmented``, stores
    the augmented one in ``image`` (what the student sees) and records the decisions in
    ``aug_gates``. Target-stage hooks (``ctx.mixed``) therefore see ``image`` augmented and
    ``unaugmented`` as mixed.

    Attributes:
        image: (B, 3, H, W) normalised image: the plain mix when returned by a Mixer, the
            strongly augmented student input once the loop has set ``aug_gates``.
        label: (B, H, W) int64 labels (source labels where ``mask`` is 1, pseudo-labels elsewhere).
        weight: (B, H, W) float pixel weights.
        mask: (B, 1, H, W) float, 1 where the pixel comes from the source image.
        aug_gates: the (colour jitter, blur) decisions of the strong augmentation applied to
            ``image`` by the loop (set after augmentation), for views mixed the same way (CISS).
        unaugmented: the Mixer's image before strong augmentation (set by the loop).
    """

    image: Tensor
    label: Tensor
    weight: Tensor
    mask: Tensor
    aug_gates: tuple[bool, bool] | None = None
    unaugmented: Tensor | None = None


@dataclass
class StepContext:
    """Everything a hook may read in one iteration; filled in as the step proceeds.

    ``losses`` collects the detached value of every term under its log name. ``outputs`` caches
    extra student passes by name (:meth:`student_forward`), so that two hooks needing the same
    view (e.g. CISS invariance and FD on the stylised source) share one forward pass.
    """

    step: int
    source: dict
    target: dict
    student: nn.Module
    teacher: nn.Module | None
    source_out: SegOutput | None = None
    pseudo: PseudoLabels | None = None
    mixed: MixedBatch | None = None
    mixed_out: SegOutput | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, SegOutput] = field(default_factory=dict)
    teacher_logits: dict[str, Tensor] = field(default_factory=dict)
    """Raw teacher logits (B, K, h, w) of the extra target views that refiners request through
    ``teacher_views`` (e.g. ``"ref"``), from the same teacher pass as the target's."""
    pseudo_from_probs: Callable[..., PseudoLabels] | None = None
    """The loop's ``(prob, valid) -> PseudoLabels`` (its threshold and weight mode), for refiners
    that change the class scores (label = argmax, confidence = max of the scores)."""
    seg_loss: Callable[..., Tensor] | None = None
    """The loop's segmentation loss ``(output, label, weight=None, fused_scale=1.0) -> loss`` (its
    CE reduction and HRDA detail weight), for hooks that add CE terms on other views;
    ``fused_scale`` multiplies the fused term alone (mmseg's per-key loss scaling under HRDA)."""
    strong_aug: Any = None
    """The loop's :class:`~udaseg.adapt.mixing.StrongAugConfig` (for views augmented alike)."""
    pseudo_threshold: float | None = None
    """The loop's pseudo-label confidence threshold tau (a pixel is confident when its max class
    score is >= tau), for refiners that treat confident pixels apart (CDDA)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Per-iteration values that one method's hooks hand to each other (e.g. CDDA's refiner to
    its mixer and guidance loss), keyed by method name; empty at the start of every step."""

    @property
    def device(self) -> torch.device:
        return self.source["image"].device

    def student_forward(self, name: str, image: Tensor) -> SegOutput:
        """The student's output on ``image``, computed once per stage under ``name``
        (e.g. ``"source/stylized"``); ``"source/image"`` is the supervised pass itself. The cache
        is cleared after the source-stage backward (the graphs are freed there)."""
        if name == "source/image" and self.source_out is not None:
            return self.source_out
        if name not in self.outputs:
            self.outputs[name] = self.student(image)
        return self.outputs[name]


@runtime_checkable
class TargetTransform(Protocol):
    """Replace or edit the target batch before the teacher sees it (Refign's ``adapt_to_ref``:
    the day reference stands in for the target). Returns the batch dict to use this step."""

    hook_kind: str  # "target_transform"

    def __call__(self, ctx: StepContext, target: dict) -> dict: ...


@runtime_checkable
class MixedTransform(Protocol):
    """Edit the mixed batch after the strong augmentation, before the student sees it (DSRNSS
    pastes banked source objects there, un-augmented). Runs every iteration; returns the batch."""

    hook_kind: str  # "mixed_transform"

    def __call__(self, ctx: StepContext, mixed: MixedBatch) -> MixedBatch: ...


@runtime_checkable
class LabelRefiner(Protocol):
    """Refine teacher pseudo-labels and/or their weights (Refign, CDDA, DSRNSS).

    A refiner may declare ``teacher_views: tuple[str, ...]``: target-batch keys (images) that the
    loop passes through the teacher together with the target image, in one batch (BatchNorm sees
    them together, as Refign's ``teacher([target; reference])``); their logits are in
    ``ctx.teacher_logits``. Views missing from the batch are skipped (the refiner decides whether
    that is an error).
    """

    def __call__(self, ctx: StepContext, pseudo: PseudoLabels) -> PseudoLabels: ...


@runtime_checkable
class Mixer(Protocol):
    """Decide which pixels of the source are pasted onto the target (ClassMix, DSRNSS, CDDA)."""

    def __call__(self, ctx: StepContext, pseudo: PseudoLabels) -> MixedBatch: ...


@runtime_checkable
class AuxLoss(Protocol):
    """An extra loss with its own weight and log name (FD, MIC, CISS, CMDA, prototypes).

    ``stage`` says when it runs: ``"source"`` right after the supervised source pass (``ctx.source_out``
    is set), ``"target"`` after the mixed pass (``ctx.pseudo``, ``ctx.mixed`` and
    ``ctx.mixed_out`` are set). The returned value is already multiplied by the loss weight.

    A target-stage hook that back-propagates through the source pass (``ctx.source_out`` with its
    graph, e.g. DSRNSS's source prototypes) sets ``retain_source_graph = True``: the loop then
    keeps the source graph through the source-stage backward (``retain_graph=True``).
    """

    name: str
    stage: Stage

    def __call__(self, ctx: StepContext) -> Tensor: ...
