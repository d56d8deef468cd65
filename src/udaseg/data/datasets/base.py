"""Shared dataset machinery: a list of records, one loader, one transform.

A concrete dataset only lists its files (:meth:`SegmentationDataset.records` is built by the
subclass from the real on-disk layout); reading, validation and the joint transform live here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..classes import NUM_CLASSES
from ..io import DataError, read_image, read_label
from ..transforms import Sample, to_tensor_sample


@dataclass(frozen=True)
class Record:
    """Files of one sample: the image, its label (None for unlabelled splits) and extra views."""

    name: str
    image: Path
    label: Path | None = None
    views: dict[str, Path] = field(default_factory=dict)


def require_dir(path: Path, what: str, fix: str) -> Path:
    """Raise FileNotFoundError naming the missing folder, what should be there and the fix."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {path} does not exist. {fix}")
    return path


def report_missing(missing: list[str], what: str, fix: str) -> None:
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} {what}:\n  {shown}{more}\n{fix}")


class SegmentationDataset(Dataset):
    """Base class: ``records`` plus an optional joint ``transform``.

    ``__getitem__`` returns a sample dict with ``image`` (3, H, W) float, ``label`` (H, W) int64
    when the split is labelled, extra views by name, ``name`` and ``ori_size`` (H, W).
    """

    #: short name used in logs and reports
    dataset_name: str = "dataset"

    def __init__(self, records: list[Record], transform: Callable[[Sample], Sample] | None = None):
        if not records:
            raise DataError(
                f"{self.dataset_name}: the split is empty (no image files found). Check the "
                "root folder and the split name."
            )
        self.records = records
        self.transform = transform
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.records)

    def load_view(self, key: str, path: Path) -> np.ndarray:
        """Read an extra view; image-like by default. Subclasses override for depth/events."""
        return read_image(path)

    def load(self, index: int) -> Sample:
        rec = self.records[index]
        image = read_image(rec.image)
        label = None
        if rec.label is not None:
            label = read_label(rec.label, expected_size=image.shape[:2], num_classes=NUM_CLASSES)
        views = {k: self.load_view(k, p) for k, p in rec.views.items()}
        sample = to_tensor_sample(image, label, **views)
        sample["name"] = rec.name
        sample["ori_size"] = torch.tensor(image.shape[:2])
        return sample

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample
