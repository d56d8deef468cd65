"""Dark Zurich (Sakaridis et al., ICCV 2019) in its official on-disk layout.

::

    <root>/rgb_anon/<split>/night/<rec>/<rec>_frame_<n>_rgb_anon.png
    <root>/rgb_anon/<split>_ref/day/<rec>_ref/<rec>_frame_<n>_ref_rgb_anon.png   (day reference)
    <root>/gt/<split>/night/<rec>/<rec>_frame_<n>_gt_labelTrainIds.png             (val only)

The train split of the real dataset ships no labels (it is the unlabelled UDA target); val has
50 labelled images, test is scored on the benchmark server. Paths are built structurally from
the recording and frame names, never by string replacement on the whole path (a data root
containing "val" or "night" must not break anything).

Optional extra views, written by SynthNight and (for depth) by Depth Anything users:
``depth_any/<split>/night/<rec>/<name>_depth.png`` and
``events/<split>/night/<rec>/<name>_events.h5``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..io import DataError
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir

IMG_SUFFIX = "_rgb_anon.png"
REF_SUFFIX = "_ref_rgb_anon.png"
LABEL_SUFFIX = "_gt_labelTrainIds.png"
DEPTH_SUFFIX = "_depth.png"

VIEW_CHOICES = ("ref", "depth")


class DarkZurich(SegmentationDataset):
    """Dark Zurich night images of one split.

    Args:
        root: the dataset root (holding ``rgb_anon/``).
        split: ``train``, ``val`` or ``test``.
        labels: load ``gt/<split>`` labels (only val has them).
        views: extra views to load: ``"ref"`` (the day reference image of the same place) and
            ``"depth"`` (an 8-bit Depth-Anything-style map).
        condition: the condition folder, ``night`` for the benchmark.
    """

    dataset_name = "dark_zurich"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        labels: bool = True,
        views: Sequence[str] = (),
        condition: str = "night",
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        unknown = [v for v in views if v not in VIEW_CHOICES]
        if unknown:
            raise ValueError(f"dark_zurich: unknown views {unknown}; choose from {VIEW_CHOICES}")
        img_dir = require_dir(
            self.root / "rgb_anon" / split / condition,
            f"dark_zurich root {self.root}",
            "Expected <root>/rgb_anon/{train,val,test}/night/<rec>/*_rgb_anon.png; extract "
            "Dark_Zurich_train_anon.zip / Dark_Zurich_val_anon.zip into the root.",
        )
        records, missing = [], []
        for img in sorted(img_dir.glob(f"*/*{IMG_SUFFIX}")):
            rec, stem = img.parent.name, img.name[: -len(IMG_SUFFIX)]
            label = None
            if labels:
                label = self.root / "gt" / split / condition / rec / f"{stem}{LABEL_SUFFIX}"
                if not label.is_file():
                    missing.append(f"{img} -> {label}")
            extra = {}
            if "ref" in views:
                extra["ref"] = (
                    self.root / "rgb_anon" / f"{split}_ref" / "day" / f"{rec}_ref" / f"{stem}{REF_SUFFIX}"
                )
            if "depth" in views:
                extra["depth"] = self.root / "depth_any" / split / condition / rec / f"{stem}{DEPTH_SUFFIX}"
            missing += [f"{img} -> {p}" for p in extra.values() if not p.is_file()]
            records.append(Record(name=stem, image=img, label=label, views=extra))
        report_missing(
            missing,
            f"dark_zurich {split} images lack a partner file (label, reference or depth)",
            "Extract the matching archive (gt for val, the *_ref day images, depth maps) into the "
            "root, or drop the view from the config.",
        )
        super().__init__(records, transform)

    def load_view(self, key: str, path: Path) -> np.ndarray:
        if key == "depth":
            return read_depth(path)
        return super().load_view(key, path)


def read_depth(path: Path) -> np.ndarray:
    """An 8-bit single-channel depth PNG as (H, W, 1) uint8 (larger = nearer)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "RGB", "I;16", "I"):
            raise DataError(f"depth map {path} has mode {im.mode!r}; expected an 8-bit grey PNG")
        arr = np.array(im.convert("L"))
    return arr[..., None]
