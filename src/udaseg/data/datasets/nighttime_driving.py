"""Nighttime Driving test set (Dai & Van Gool, ITSC 2018) in its official on-disk layout.

::

    <root>/leftImg8bit/test/night/<name>_leftImg8bit.png
    <root>/gtCoarse_daytime_trainvaltest/test/night/<name>_gtCoarse_labelTrainIds.png

50 night images of Zurich, 1080x1920 (HxW), with *coarse* Cityscapes train-ID labels (0..18,
255 = ignore; unlabelled regions are ignore). Only the ``test`` split exists; it is used as an
extra evaluation set for models adapted to Dark Zurich. Paths are built from the frame name, as
in the other loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ...errors import ConfigError
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtCoarse_labelTrainIds.png"
LABEL_DIR = "gtCoarse_daytime_trainvaltest"
SPLITS = ("test",)


class NighttimeDriving(SegmentationDataset):
    """The 50 labelled Nighttime Driving test images.

    Args:
        root: the dataset root (holding ``leftImg8bit/`` and ``gtCoarse_daytime_trainvaltest/``).
        split: ``test`` (the only split).
        labels: load the coarse train-ID labels (False lists images only, e.g. to predict).
        views: no extra views exist; accepted so that every loader takes the same arguments.
        transform: joint transform applied to each sample dict.
    """

    dataset_name = "nighttime_driving"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        labels: bool = True,
        views: Sequence[str] = (),
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        if split not in SPLITS:
            raise ConfigError(
                f"nighttime_driving: unknown split {split!r}; the dataset only has {SPLITS}"
            )
        if views:
            raise ConfigError(f"nighttime_driving: has no extra views (got {list(views)})")
        img_dir = require_dir(
            self.root / "leftImg8bit" / split / "night",
            f"nighttime_driving root {self.root}",
            "Expected <root>/leftImg8bit/test/night/*_leftImg8bit.png and "
            f"<root>/{LABEL_DIR}/test/night/*{LABEL_SUFFIX}; extract the Nighttime Driving "
            "test archive (NighttimeDrivingTest) into the root.",
        )
        records, missing = [], []
        for img in sorted(img_dir.glob(f"*{IMG_SUFFIX}")):
            stem = img.name[: -len(IMG_SUFFIX)]
            label = None
            if labels:
                label = self.root / LABEL_DIR / split / "night" / f"{stem}{LABEL_SUFFIX}"
                if not label.is_file():
                    missing.append(f"{img} -> {label}")
            records.append(Record(name=stem, image=img, label=label))
        report_missing(
            missing,
            f"nighttime_driving {split} images have no coarse train-ID label",
            f"Extract the label folder {LABEL_DIR}/ of the same archive into the root; if only "
            "*_gtCoarse_labelIds.png files are there, convert them to train IDs with the "
            "Cityscapes table (udaseg.data.classes.CITYSCAPES_ID_TO_TRAINID), or pass "
            "labels=False to predict without scoring.",
        )
        super().__init__(records, transform)
