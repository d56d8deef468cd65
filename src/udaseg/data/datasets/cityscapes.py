"""Cityscapes (Cordts et al., CVPR 2016) in its official on-disk layout.

::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png

The ``*_labelTrainIds.png`` files are made from the official ``*_gtFine_labelIds.png`` by
``udaseg prepare cityscapes`` (cityscapesscripts' trainIds convention: 19 classes, 255 ignore).
SynthNight writes its day domain in exactly this layout.

Optional view ``"ic"`` (CMDA's Image Motion-Extractor output, made offline from consecutive
``leftImg8bit_sequence`` frames; ``ciss_cmda_spec.md`` 2.5), same file name, 8-bit grey::

    <root>/leftImg8bit_IC1/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png

It is loaded as (H, W, 1) uint8 and follows the image's geometry; the CMDA method maps it to
[-1, 1].

Optional view ``"depth"`` (CDDA; Depth Anything V2, 8-bit, larger = nearer; the image name with
``leftImg8bit`` replaced by ``depth``), with the load-time ``depth_transform``
(:mod:`udaseg.data.depth`)::

    <root>/depth_any/<split>/<city>/<city>_<seq>_<frame>_depth.png
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..io import read_grey
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
VIEW_CHOICES = ("ic", "depth")
DEPTH_SUFFIX = "_depth.png"


class Cityscapes(SegmentationDataset):
    """Cityscapes train/val/test split; ``labels=False`` lists images only (e.g. as a UDA target)."""

    dataset_name = "cityscapes"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        labels: bool = True,
        views: Sequence[str] = (),
        transform: Callable[[Sample], Sample] | None = None,
        depth_transform: str = "cdda",
    ):
        from ..depth import DEPTH_DIR, check_depth_transform

        self.root = Path(root)
        self.split = split
        self.depth_transform = check_depth_transform(depth_transform)
        unknown = [v for v in views if v not in VIEW_CHOICES]
        if unknown:
            raise ConfigError(f"cityscapes: unknown views {unknown}; choose from {VIEW_CHOICES}")
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
            extra = {}
            if "ic" in views:
                extra["ic"] = self.root / "leftImg8bit_IC1" / split / img.parent.name / img.name
                if not extra["ic"].is_file():
                    missing.append(f"{img} -> {extra['ic']}")
            if "depth" in views:
                extra["depth"] = (self.root / DEPTH_DIR / split / img.parent.name
                                  / f"{stem}{DEPTH_SUFFIX}")
                if not extra["depth"].is_file():
                    missing.append(f"{img} -> {extra['depth']}")
            records.append(Record(name=stem, image=img, label=label, views=extra))
        report_missing(
            missing,
            f"cityscapes {split} images have no train-ID label (or no IC image or depth map)",
            "Extract gtFine_trainvaltest.zip and run `udaseg prepare cityscapes <root>` to write "
            "the *_gtFine_labelTrainIds.png files (IC images: put CMDA's leftImg8bit_IC1 folder "
            "into the root, or drop the view; depth maps: `udaseg depth`).",
        )
        super().__init__(records, transform)

    def load_view(self, key: str, path: Path) -> np.ndarray:
        if key == "ic":
            return read_grey(path, "IC image")
        if key == "depth":
            from ..depth import read_depth_view

            return read_depth_view(path, self.depth_transform)
        return super().load_view(key, path)
