"""Shared dataset machinery: a list of records, one loader, one transform.

A concrete dataset only lists its files (:meth:`SegmentationDataset.records` is built by the
subclass from the real on-disk layout); reading, validation and the joint transform live here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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


_COLLECTED: ContextVar[list[str] | None] = ContextVar("udaseg_collected_missing", default=None)


@contextmanager
def collect_missing() -> Iterator[list[str]]:
    """Within this block :func:`report_missing` appends its message to the yielded list instead
    of raising, so a dataset with missing partner files can still be listed (``prepare --check``
    reports everything that is wrong, not only the first problem)."""
    sink: list[str] = []
    token = _COLLECTED.set(sink)
    try:
        yield sink
    finally:
        _COLLECTED.reset(token)


def report_missing(missing: list[str], what: str, fix: str) -> None:
    """Raise one DataError listing (the first five of) ``missing`` files, ``what`` they are
    and the ``fix``; inside :func:`collect_missing` the message is collected instead."""
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        message = f"{len(missing)} {what}:\n  {shown}{more}\n{fix}"
        sink = _COLLECTED.get()
        if sink is None:
            raise DataError(message)
        sink.append(message)


def flat_records(
    name: str, root: Path, img_dir: Path, label_dir: Path, labels: bool, layout: str,
    label_suffix: str, fix: str,
) -> list[Record]:
    """Records of a flat ``img_dir/<stem>.png`` + ``label_dir/<stem><label_suffix>`` layout
    (GTA5, SYNTHIA); missing folders and labels are reported with ``layout`` and ``fix``."""
    require_dir(img_dir, f"{name} root {root}", layout)
    if labels:
        require_dir(label_dir, f"{name} root {root}", layout)
    records, missing = [], []
    for img in sorted(img_dir.glob("*.png")):
        if img.name.startswith("."):
            continue
        label = None
        if labels:
            label = label_dir / f"{img.stem}{label_suffix}"
            if not label.is_file():
                missing.append(f"{img} -> {label}")
        records.append(Record(name=img.stem, image=img, label=label))
    report_missing(missing, f"{name} images have no train-ID label", fix)
    return records


class SegmentationDataset(Dataset):
    """Base class: ``records`` plus an optional joint ``transform``.

    ``__getitem__`` returns a sample dict with ``image`` (3, H, W) float, ``label`` (H, W) int64
    when the split is labelled, extra views by name, ``name`` and ``ori_size`` (H, W).
    """

    #: short name used in logs and reports
    dataset_name: str = "dataset"

    def __init__(self, records: list[Record], transform: Callable[[Sample], Sample] | None = None):
        if not records:
            # the loaders set root and split before calling this: name the folder in the error
            root, split = getattr(self, "root", None), getattr(self, "split", None)
            where = f"the {split!r} split" if split else "the split"
            where += f" under {root}" if root is not None else ""
            raise DataError(
                f"{self.dataset_name}: {where} is empty (no image files found). "
                "Check the root folder and the split name: the root must hold the dataset's "
                "official layout (see the loader's docstring), with the image files in it."
            )
        self.records = records
        self.transform = transform
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.records)

    def load_view(self, key: str, path: Path) -> np.ndarray:
        """Read an extra view; image-like by default. Subclasses override for depth/events."""
        return read_image(path)

    def load_label(self, rec: Record, image_size: tuple[int, int]) -> np.ndarray:
        """Read and validate the label of ``rec``; subclasses may adapt it (e.g. GTA sizes)."""
        return read_label(rec.label, expected_size=image_size, num_classes=NUM_CLASSES)

    def load(self, index: int) -> Sample:
        rec = self.records[index]
        image = read_image(rec.image)
        label = None
        if rec.label is not None:
            label = self.load_label(rec, image.shape[:2])
        views = {k: self.load_view(k, p) for k, p in rec.views.items()}
        sample = to_tensor_sample(image, label, **views)
        sample["name"] = rec.name
        sample["ori_size"] = torch.tensor(image.shape[:2])
        return sample

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample
