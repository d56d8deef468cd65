"""Evaluation: dataset-level mIoU, whole/slide inference, tables, overlays and plots.

``metrics`` and ``inference`` are re-exported eagerly (torch only); the ``report`` helpers
(rich, PIL, matplotlib) are loaded on first access.
"""

from __future__ import annotations

from typing import Any

from udaseg.eval.inference import predict, slide_inference, slide_windows, whole_inference
from udaseg.eval.metrics import IoUResult, SegmentationMetric, confusion_matrix

_REPORT_NAMES = (
    "colorize",
    "format_iou_table",
    "plot_loss_curves",
    "print_iou_table",
    "save_overlays",
    "write_iou_tables",
    "write_metrics_json",
)

__all__ = [
    "IoUResult",
    "SegmentationMetric",
    "confusion_matrix",
    "predict",
    "slide_inference",
    "slide_windows",
    "whole_inference",
    *_REPORT_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _REPORT_NAMES:
        from udaseg.eval import report

        return getattr(report, name)
    raise AttributeError(f"module 'udaseg.eval' has no attribute {name!r}")
