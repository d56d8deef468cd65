"""Cityscapes (Cordts et al., CVPR 2016) in its official on-disk layout.

::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png

The ``*_labelTrainIds.png`` files are made from the official ``labelIds``/polygons by
``udaseg prepare cityscapes`` (cityscapesscripts' trainIds convention: 19 classes, 255 ignore).
SynthNight writes its day domain in exactly this layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


class Cityscapes(SegmentationDataset):
    """Cityscapes train/val/test split; ``labels=False`` lists images only (e.g. as a UDA target)."""

    dataset_name = "cityscapes"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        labels: bool = True,
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        img_dir = require_dir(
            self.root / "leftImg8bit" / split,
            f"cityscapes root {self.root}",
            "Expected <root>/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png; extract "
            "leftImg8bit_trainvaltest.zip into the root (or point data roots at a SynthNight copy).",
        )
        records, missing = [], []
        for img in sorted(img_dir.glob(f"*/*{IMG_SUFFIX}")):
            stem = img.name[: -len(IMG_SUFFIX)]
            label = None
            if labels:
                label = self.root / "gtFine" / split / img.parent.name / f"{stem}{LABEL_SUFFIX}"
                if not label.is_file():
                    missing.append(f"{img} -> {label}")
            records.append(Record(name=stem, image=img, label=label))
        report_missing(
            missing,
            f"cityscapes {split} images have no train-ID label",
            "Extract gtFine_trainvaltest.zip and run `udaseg prepare cityscapes <root>` to write "
            "the *_gtFine_labelTrainIds.png files.",
        )
        super().__init__(records, transform)
