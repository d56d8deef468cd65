"""SYNTHIA-RAND-CITYSCAPES (Ros et al., CVPR 2016) in its official on-disk layout.

::

    <root>/RGB/<nnnnnnn>.png                        1280x760 RGB images 0000000..0009399
    <root>/GT/LABELS/<nnnnnnn>.png                  16-bit RGB PNG: R = class ID, G = instance ID
    <root>/GT/LABELS/<nnnnnnn>_labelTrainIds.png    8-bit train IDs, written by `udaseg prepare synthia`
    <root>/depth_any/<nnnnnnn>.png                  optional ``depth`` view (CDDA, :mod:`udaseg.data.depth`)

(``GT/COLOR`` and ``Depth`` are not used.) The raw labels are 16 bits per channel; Pillow keeps
only the high byte of such files, which is 0 for every class ID, so they are read with
:func:`udaseg.data.png16.read_png16` (OpenCV or the built-in decoder). ``udaseg prepare synthia
<root>`` maps the R channel with :data:`udaseg.data.convert.SYNTHIA_ID_TO_TRAINID` (spec 9.3:
3->0 road, 4->1 sidewalk, 2->2 building, 21->3 wall, 5->4 fence, 7->5 pole, 15->6 traffic light,
9->7 traffic sign, 6->8 vegetation, 1->10 sky, 10->11 person, 17->12 rider, 8->13 car, 19->15
bus, 12->17 motorcycle, 11->18 bicycle; every other ID -> 255).

SYNTHIA has no terrain (9), truck (14) or train (16) pixels, so its labels use 16 of the 19
train IDs; Synthia -> Cityscapes is evaluated with the ``synthia16`` (and ``synthia13``)
protocols of :data:`udaseg.data.classes.LABEL_SETS`. All 9,400 images form the labelled source
(split ``"train"``, also called ``"all"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ...errors import ConfigError
from ..transforms import Sample
from ..depth import add_flat_depth_views
from .base import SegmentationDataset, flat_records

LABEL_SUFFIX = "_labelTrainIds.png"
SPLITS = ("train", "all")


class Synthia(SegmentationDataset):
    """All SYNTHIA-RAND-CITYSCAPES images with their train-ID labels (a synthetic UDA source).

    Args:
        root: the dataset root (holding ``RGB/`` and ``GT/LABELS/``).
        split: ``"train"`` or ``"all"`` (the same: every image).
        labels: load the ``*_labelTrainIds.png`` labels; ``False`` lists images only.
        transform: joint transform applied to each sample.
        views: ``["depth"]`` adds the ``<root>/depth_any/<name>.png`` map (CDDA,
            :mod:`udaseg.data.depth`).
        depth_transform: ``"cdda"`` (load-time transform, default) or ``"none"``.
    """

    dataset_name = "synthia"

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
                f"synthia: unknown split {split!r}; SYNTHIA is used whole as the UDA source, "
                f"choose from {SPLITS}"
            )
        self.root = Path(root)
        self.split = split
        layout = (
            "Expected <root>/RGB/<nnnnnnn>.png and <root>/GT/LABELS/<nnnnnnn>.png; extract "
            "SYNTHIA_RAND_CITYSCAPES.rar so that its RGB/ and GT/ folders are in the root."
        )
        records = flat_records(
            "synthia", self.root, self.root / "RGB", self.root / "GT" / "LABELS", labels, layout, LABEL_SUFFIX,
            "Run `udaseg prepare synthia <root>` to write the GT/LABELS/*_labelTrainIds.png files "
            "from the raw 16-bit GT/LABELS/<nnnnnnn>.png.",
        )
        self.depth_transform = depth_transform
        records = add_flat_depth_views("synthia", self.root, records, views, depth_transform)
        super().__init__(records, transform)

    def load_view(self, key: str, path: Path):
        if key == "depth":
            from ..depth import read_depth_view

            return read_depth_view(path, self.depth_transform)
        return super().load_view(key, path)
