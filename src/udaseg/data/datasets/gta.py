"""GTA5 / "Playing for Data" (Richter et al., ECCV 2016) in its official on-disk layout.

::

    <root>/images/<nnnnn>.png                    1914x1052 RGB frames 00001..24966
    <root>/labels/<nnnnn>.png                    palette PNG, palette index = Cityscapes label ID
    <root>/labels/<nnnnn>_labelTrainIds.png      8-bit train IDs, written by `udaseg prepare gta`
    <root>/depth_any/<nnnnn>.png                 optional ``depth`` view (CDDA, :mod:`udaseg.data.depth`)

The raw labels are palette images whose *indices* are the Cityscapes ``labelIds`` (the palette
only colours them); ``udaseg prepare gta <root>`` maps them with
:data:`udaseg.data.convert.GTA_ID_TO_TRAINID` (the Cityscapes table, spec 9.3: 7->0 road, ...,
33->18 bicycle, every other ID -> 255) and writes the ``*_labelTrainIds.png`` files next to them.

UDA uses all 24,966 frames as the labelled source (split ``"train"``, also called ``"all"``);
the paper's own train/val/test partition is not used by DAFormer/HRDA/MIC.

A few GTA5 frames have a label whose size differs slightly from the image's. :meth:`GTA5.load`
resizes such a label to the image size with nearest-neighbour interpolation instead of failing;
a label whose aspect ratio differs from the image's by more than 5% cannot belong to it and is
an error naming both files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..classes import NUM_CLASSES
from ..io import DataError, read_label
from ..transforms import Sample
from ..depth import add_flat_depth_views
from .base import Record, SegmentationDataset, flat_records

LABEL_SUFFIX = "_labelTrainIds.png"
SPLITS = ("train", "all")
#: largest relative aspect-ratio difference between a label and its image that is resized
MAX_ASPECT_DIFF = 0.05


def fit_label_to_image(
    label: np.ndarray, image_size: tuple[int, int], label_path: Path, image_path: Path
) -> np.ndarray:
    """Resize ``label`` to ``image_size`` (H, W) with nearest neighbour if their sizes differ.

    Raises DataError when the aspect ratios differ by more than :data:`MAX_ASPECT_DIFF`.
    """
    h, w = image_size
    lh, lw = label.shape[:2]
    if (lh, lw) == (h, w):
        return label
    ratio = (lw / lh) / (w / h)
    if abs(ratio - 1.0) > MAX_ASPECT_DIFF:
        raise DataError(
            f"label {label_path} is {lh}x{lw} (HxW) but its image {image_path} is {h}x{w}: the "
            "aspect ratios differ by more than 5%, so the label does not belong to this image. "
            "Restore both files from the GTA5 archives and run `udaseg prepare gta <root>`."
        )
    from PIL import Image

    return np.array(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))


class GTA5(SegmentationDataset):
    """All GTA5 frames with their train-ID labels (the synthetic UDA source).

    Args:
        root: the dataset root (holding ``images/`` and ``labels/``).
        split: ``"train"`` or ``"all"`` (the same: every frame).
        labels: load the ``*_labelTrainIds.png`` labels; ``False`` lists images only.
        transform: joint transform applied to each sample.
        views: ``["depth"]`` adds the ``<root>/depth_any/<name>.png`` map (CDDA,
            :mod:`udaseg.data.depth`).
        depth_transform: ``"cdda"`` (load-time transform, default) or ``"none"``.
    """

    dataset_name = "gta"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        labels: bool = True,
        transform: Callable[[Sample], Sample] | None = None,
        views: Sequence[str] = (),
        depth_transform: str = "cdda",
    ):
        if split not in SPLITS:
            raise ConfigError(
                f"gta: unknown split {split!r}; GTA5 is used whole as the UDA source, choose "
                f"from {SPLITS}"
            )
        self.root = Path(root)
        self.split = split
        layout = (
            "Expected <root>/images/<nnnnn>.png and <root>/labels/<nnnnn>.png; extract the GTA5 "
            "01..10_images.zip and 01..10_labels.zip archives into the root."
        )
        records = flat_records(
            "gta", self.root, self.root / "images", self.root / "labels", labels, layout, LABEL_SUFFIX,
            "Run `udaseg prepare gta <root>` to write the labels/*_labelTrainIds.png files from "
            "the raw labels/<nnnnn>.png (extract 01..10_labels.zip first if those are missing too).",
        )
        self.depth_transform = depth_transform
        records = add_flat_depth_views("gta", self.root, records, views, depth_transform)
        super().__init__(records, transform)

    def load_label(self, rec: Record, image_size: tuple[int, int]) -> np.ndarray:
        """A label of a slightly different size is resized to the image (module docstring)."""
        label = read_label(rec.label, num_classes=NUM_CLASSES)
        return fit_label_to_image(label, image_size, rec.label, rec.image)

    def load_view(self, key: str, path: Path) -> np.ndarray:
        if key == "depth":
            from ..depth import read_depth_view

            return read_depth_view(path, self.depth_transform)
        return super().load_view(key, path)
