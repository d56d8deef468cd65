"""Dataset-level intersection-over-union for semantic segmentation.

Metric (spec section 9.1, mmseg ``IoUMetric`` / ``mean_iou`` semantics):

* Predictions are the argmax of the logits at the label resolution; pixels whose ground truth
  is ``ignore_index`` (255) are excluded from everything.
* One ``K x K`` confusion matrix ``C`` (rows = ground truth, columns = prediction) is summed over
  **all** images of a split. For each class c::

      TP_c = C[c, c]
      FP_c = sum_g C[g, c] - TP_c         (predicted c, ground truth something else)
      FN_c = sum_p C[c, p] - TP_c         (ground truth c, predicted something else)
      IoU_c = TP_c / (TP_c + FP_c + FN_c) = I_c / U_c

  with I_c = |pred = c and gt = c| and U_c = |pred = c| + |gt = c| - I_c. This is a dataset-level
  ratio of sums, not a mean of per-image IoUs (which would weight small images and rare
  appearances differently and give a different, usually lower, number).
* ``IoU_c`` is NaN when ``U_c = 0`` (class neither present in the ground truth nor predicted
  anywhere in the split); ``mIoU`` is the mean of ``IoU_c`` over the classes of the evaluation
  protocol whose union is non-empty (``nanmean``).

Protocols (:mod:`udaseg.data.classes`): ``cityscapes19`` averages over all 19 classes,
``synthia16`` / ``synthia13`` / ``dsec18`` over a subset, computed here **directly** from
``I_c / U_c`` of the subset classes.

Why the seeds' ``mIoU16 = mIoU19 * 19/16`` shortcut is inexact: the shortcut assumes every
missing class contributes exactly 0 to the 19-class sum, so that
``mIoU19 = (sum over the 16 classes) / 19``. That holds when each missing class has
``U_c > 0`` and ``I_c = 0``: it occurs in the ground truth (Cityscapes GT does contain terrain,
truck and train) or is predicted somewhere, but is never predicted correctly. It fails when

* a missing class has ``U_c = 0`` (absent from the ground truth of the evaluated split and never
  predicted, e.g. truck on a small DSEC subset): its IoU is NaN, ``nanmean`` already divides by
  18 (or 16) and multiplying by 19/n inflates the result; or
* a missing class is predicted correctly somewhere (``I_c > 0``, possible after fine-tuning or
  with a model not trained on Synthia labels only): its non-zero IoU leaks into the shortcut.

:meth:`IoUResult.scaled_miou19` reproduces the shortcut for comparison with published numbers;
:meth:`IoUResult.miou` is the exact subset mean and is what udaseg reports.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from udaseg.data.classes import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    NUM_CLASSES,
    LabelSet,
    label_set as _get_label_set,
)

__all__ = ["IoUResult", "SegmentationMetric", "confusion_matrix", "resolve_label_set"]

LabelSetLike = str | LabelSet | None


def confusion_matrix(
    pred: Tensor,
    target: Tensor,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Confusion matrix of integer predictions against ground truth.

    Args:
        pred: integer class predictions, any shape (e.g. ``(B, H, W)`` or ``(H, W)``), values in
            ``[0, num_classes)``. Pixels whose target is ``ignore_index`` may hold any value.
        target: integer ground truth of the same shape; ``ignore_index`` marks unlabelled pixels.
        num_classes: K.
        ignore_index: target value excluded from the matrix.

    Returns:
        ``(K, K)`` int64 tensor on ``pred``'s device; ``C[g, p]`` counts pixels with ground truth
        ``g`` predicted as ``p`` (rows = ground truth, columns = prediction).

    Raises:
        ValueError: shapes differ, a prediction (at a non-ignored pixel) is outside
            ``[0, K)``, or a target is outside ``[0, K)`` and is not ``ignore_index``.
        TypeError: ``pred`` or ``target`` is floating point (argmax logits first).
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device)
    if pred.shape != target.shape:
        raise ValueError(
            f"confusion_matrix: pred shape {tuple(pred.shape)} != target shape "
            f"{tuple(target.shape)}; resize logits to the label size before the argmax"
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(
                f"confusion_matrix: {name} must be an integer tensor, got dtype {t.dtype}; "
                "pass class indices (logits.argmax(1)), not logits or probabilities"
            )
    if num_classes <= 0:
        raise ValueError(f"confusion_matrix: num_classes must be positive, got {num_classes}")

    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred = pred[keep]
    target = target[keep]
    if pred.numel() > 0:
        bad = (pred < 0) | (pred >= num_classes)
        if bool(bad.any()):
            values = torch.unique(pred[bad])[:10].tolist()
            raise ValueError(
                f"confusion_matrix: predictions {values} outside [0, {num_classes}); "
                f"check num_classes={num_classes} against the model's output channels"
            )
        bad = (target < 0) | (target >= num_classes)
        if bool(bad.any()):
            values = torch.unique(target[bad])[:10].tolist()
            raise ValueError(
                f"confusion_matrix: ground-truth values {values} are neither in "
                f"[0, {num_classes}) nor ignore_index={ignore_index}; were the labels converted "
                "to train IDs?"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def resolve_label_set(label_set: LabelSetLike, num_classes: int) -> tuple[tuple[int, ...], str]:
    """Class ids and protocol name for ``label_set`` (a name, a :class:`LabelSet`, or ``None``).

    ``None`` means every class of the confusion matrix (protocol name ``"all{K}"``).
    """
    if label_set is None:
        return tuple(range(num_classes)), f"all{num_classes}"
    ls = _get_label_set(label_set) if isinstance(label_set, str) else label_set
    if not isinstance(ls, LabelSet):
        raise TypeError(
            f"label_set must be a name, a LabelSet or None, got {type(label_set).__name__}"
        )
    if ls.class_ids and max(ls.class_ids) >= num_classes:
        raise ValueError(
            f"label set {ls.name!r} uses class id {max(ls.class_ids)} but the confusion matrix "
            f"has only {num_classes} classes; pass label_set=None to average over all classes"
        )
    return ls.class_ids, ls.name


def _class_name(class_id: int, num_classes: int) -> str:
    if num_classes == NUM_CLASSES:
        return CITYSCAPES_CLASSES[class_id]
    return f"class_{class_id}"


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass(frozen=True, eq=False)
class IoUResult:
    """Per-class IoU of one split, built from its accumulated confusion matrix.

    Attributes:
        confmat: ``(K, K)`` int64 numpy array, rows = ground truth, columns = prediction
            (read-only). Every other quantity is derived from it.

    All ratios are fractions in ``[0, 1]``; only :meth:`to_dict` converts to percent.
    """

    confmat: np.ndarray

    def __post_init__(self) -> None:
        cm = self.confmat
        if isinstance(cm, Tensor):
            cm = cm.detach().cpu().numpy()
        cm = np.array(cm, dtype=np.int64, copy=True)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"IoUResult: confusion matrix must be square (K, K), got {cm.shape}")
        if (cm < 0).any():
            raise ValueError("IoUResult: confusion matrix has negative counts")
        cm.setflags(write=False)
        object.__setattr__(self, "confmat", cm)

    @classmethod
    def from_confusion(cls, confmat: Tensor | np.ndarray) -> IoUResult:
        """Build from a ``(K, K)`` confusion matrix (tensor or array, rows = ground truth)."""
        return cls(confmat)  # type: ignore[arg-type]

    @classmethod
    def from_predictions(
        cls,
        pred: Tensor,
        target: Tensor,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
    ) -> IoUResult:
        """Shortcut for ``IoUResult(confusion_matrix(pred, target, ...))``."""
        return cls(confusion_matrix(pred, target, num_classes, ignore_index))  # type: ignore[arg-type]

    # ----------------------------------------------------------------- per-class counts
    @property
    def num_classes(self) -> int:
        return int(self.confmat.shape[0])

    @property
    def intersection(self) -> np.ndarray:
        """``(K,)`` int64: I_c = TP_c."""
        return np.diag(self.confmat).copy()

    @property
    def gt_pixels(self) -> np.ndarray:
        """``(K,)`` int64: |gt = c| (row sums)."""
        return self.confmat.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        """``(K,)`` int64: |pred = c| over non-ignored pixels (column sums)."""
        return self.confmat.sum(axis=0)

    @property
    def union(self) -> np.ndarray:
        """``(K,)`` int64: U_c = |pred = c| + |gt = c| - I_c = TP_c + FP_c + FN_c."""
        return self.gt_pixels + self.pred_pixels - self.intersection

    @property
    def iou(self) -> np.ndarray:
        """``(K,)`` float64: I_c / U_c, NaN where U_c = 0."""
        inter = self.intersection.astype(np.float64)
        union = self.union.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)

    @property
    def class_accuracy(self) -> np.ndarray:
        """``(K,)`` float64: per-class recall TP_c / |gt = c|, NaN where the class is absent."""
        gt = self.gt_pixels.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gt > 0, self.intersection / np.where(gt > 0, gt, 1.0), np.nan)

    @property
    def total_pixels(self) -> int:
        """Number of non-ignored pixels counted."""
        return int(self.confmat.sum())

    @property
    def pixel_accuracy(self) -> float:
        """Overall accuracy (mmseg ``aAcc``) over all non-ignored pixels; NaN if there are none."""
        total = self.total_pixels
        return float(np.trace(self.confmat)) / total if total else math.nan

    # ----------------------------------------------------------------- protocol means
    def miou(self, label_set: LabelSetLike = "cityscapes19") -> float:
        """Exact mIoU of a protocol: nanmean of IoU_c over its classes, in ``[0, 1]``.

        ``label_set`` is a protocol name (``"cityscapes19"``, ``"synthia16"``, ``"synthia13"``,
        ``"dsec18"``), a :class:`LabelSet`, or ``None`` for all K classes. Classes with
        U_c = 0 are left out of the mean; NaN if every class of the protocol has U_c = 0.
        """
        ids, _ = resolve_label_set(label_set, self.num_classes)
        return _nanmean(self.iou[list(ids)])

    def scaled_miou19(self, n: int | str | LabelSet) -> float:
        """The seeds' shortcut ``mIoU19 * 19 / n`` (e.g. n = 16 for Synthia, 18 for DSEC).

        Only for comparison with published numbers; see the module docstring for when it differs
        from :meth:`miou` on the subset. ``n`` may also be a protocol name or :class:`LabelSet`.
        """
        if isinstance(n, str | LabelSet):
            n = len(resolve_label_set(n, self.num_classes)[0])
        if n <= 0:
            raise ValueError(f"scaled_miou19: n must be positive, got {n}")
        return self.miou("cityscapes19") * NUM_CLASSES / n

    def per_class(self, label_set: LabelSetLike = "cityscapes19") -> dict[str, float]:
        """Class name -> IoU (fraction, NaN where U_c = 0) for the classes of ``label_set``."""
        ids, _ = resolve_label_set(label_set, self.num_classes)
        iou = self.iou
        return {_class_name(i, self.num_classes): float(iou[i]) for i in ids}

    def to_dict(self, label_set: LabelSetLike = "cityscapes19", percent: bool = True) -> dict[str, Any]:
        """JSON-safe summary of one protocol.

        Returns:
            ``{"mIoU": float | None, "IoU": {class name: float | None}, "aAcc": float | None,
            "protocol": name, "num_classes": n}`` where ``n`` is the number of classes in the
            protocol; values are in percent when ``percent`` (fractions otherwise) and NaN
            becomes ``None`` (JSON ``null``). ``aAcc`` is over all non-ignored pixels.
        """
        ids, name = resolve_label_set(label_set, self.num_classes)
        scale = 100.0 if percent else 1.0

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x) * scale

        return {
            "mIoU": clean(self.miou(label_set)),
            "IoU": {k: clean(v) for k, v in self.per_class(label_set).items()},
            "aAcc": clean(self.pixel_accuracy),
            "protocol": name,
            "num_classes": len(ids),
        }

    def __add__(self, other: IoUResult) -> IoUResult:
        """Combine two splits' counts (e.g. shards evaluated separately)."""
        if not isinstance(other, IoUResult):
            return NotImplemented
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot add IoUResults with {self.num_classes} and {other.num_classes} classes"
            )
        return IoUResult(self.confmat + other.confmat)

    def __repr__(self) -> str:
        return (
            f"IoUResult(num_classes={self.num_classes}, mIoU(all)={self.miou(None):.4f}, "
            f"aAcc={self.pixel_accuracy:.4f}, pixels={self.total_pixels})"
        )


class SegmentationMetric(Metric):
    """torchmetrics wrapper accumulating one confusion matrix over a split.

    The state ``confmat`` is a ``(K, K)`` int64 tensor with ``dist_reduce_fx="sum"``, so DDP
    synchronisation sums the per-rank matrices and every rank computes the same dataset-level IoU.

    ``compute()`` returns an :class:`IoUResult` (not a tensor): call ``result.miou(...)`` to get a
    loggable float. Usage::

        metric = SegmentationMetric(num_classes=19)
        for images, labels in loader:
            metric.update(whole_inference(model, images, out_size=labels.shape[-2:]), labels)
        result = metric.compute()
        result.miou("synthia16")
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(
        self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX, **kwargs: Any
    ) -> None:
        if num_classes <= 0:
            raise ValueError(f"SegmentationMetric: num_classes must be positive, got {num_classes}")
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            preds: ``(B, H, W)`` integer class predictions, or ``(B, K, H, W)`` logits /
                probabilities (argmax over dim 1). Logits must already be at the label
                resolution (see :func:`udaseg.eval.inference.whole_inference` ``out_size``).
            target: ``(B, H, W)`` (or ``(B, 1, H, W)``) integer ground truth with
                ``ignore_index`` for unlabelled pixels.
        """
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if preds.ndim == target.ndim + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"SegmentationMetric.update: logits have {preds.shape[1]} channels but "
                    f"num_classes={self.num_classes}"
                )
            if preds.shape[2:] != target.shape[1:]:
                raise ValueError(
                    f"SegmentationMetric.update: logits spatial size {tuple(preds.shape[2:])} != "
                    f"label size {tuple(target.shape[1:])}; resize the logits first "
                    "(whole_inference(..., out_size=label.shape[-2:]))"
                )
            preds = preds.argmax(dim=1)
        elif preds.is_floating_point():
            raise TypeError(
                f"SegmentationMetric.update: floating-point preds of shape {tuple(preds.shape)} "
                f"with target shape {tuple(target.shape)}; pass (B, K, H, W) logits or "
                "(B, H, W) integer predictions"
            )
        cm = confusion_matrix(preds, target, self.num_classes, self.ignore_index)
        self.confmat += cm.to(self.confmat.device)

    def compute(self) -> IoUResult:
        """:class:`IoUResult` of everything accumulated since the last ``reset()``."""
        return IoUResult(self.confmat)

    def _synced_confmat(self) -> Tensor:
        return self.confmat

    def _wrap_compute(self, compute: Callable) -> Callable:
        # torchmetrics' wrapper (DDP sync, caching) runs ``apply_to_collection`` on the result,
        # which refuses frozen dataclasses. Let it sync/cache the raw confusion matrix and build
        # the IoUResult outside of it.
        synced = super()._wrap_compute(self._synced_confmat)

        @functools.wraps(compute)
        def wrapped() -> IoUResult:
            return IoUResult(synced())

        return wrapped
