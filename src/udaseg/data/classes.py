"""Label sets: class names, train IDs, palettes and named class groups.

Dataset facts live here and nowhere else (house style G8): methods and metrics receive a
:class:`LabelSet` or a group name, never literal class-id lists.

The 19 Cityscapes train-ID classes, their names and RGB palette follow the official
``cityscapesscripts.helpers.labels`` table. The evaluation protocols that average over a
subset of them are:

* ``cityscapes19``: all 19 classes (Cityscapes, ACDC, Dark Zurich, SynthNight).
* ``synthia16``: Synthia has no terrain (9), truck (14) or train (16).
* ``synthia13``: synthia16 without wall (3), fence (4) and pole (5).
* ``dsec18``: DSEC Night-Semantic has no truck (14).

A subset protocol averages the per-class IoU over the classes it contains; the seeds'
``mIoU19 * 19/16`` shortcut assumes the missing classes have IoU 0, which is only exact
when they were predicted somewhere (see :mod:`udaseg.eval.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

# Cityscapes labelIds (also GTA5's label values) -> train IDs; everything else -> 255.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# Named class groups over the 19 train IDs.
CLASS_GROUPS: dict[str, tuple[int, ...]] = {
    # ImageNet feature distance (DAFormer) regularises these.
    "things": (6, 7, 11, 12, 13, 14, 15, 16, 17, 18),
    "stuff": (0, 1, 2, 3, 4, 5, 8, 9, 10),
    # DSRNSS (arXiv 2310.04747): the long-tail classes its memory bank re-pastes
    # (rider, truck, bus, motorcycle, bicycle).
    "dsrnss_tail": (12, 14, 15, 17, 18),
}

# Class closures of a class-mixing method: ordered rules ``(triggers, added)``. When a mask
# chose any trigger class, every ``added`` class present in the same source label joins it;
# the rules are applied once each, in order (a later rule sees what an earlier one added).
CLASS_CLOSURES: dict[str, tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]] = {
    # DSRNSS's relation-aware ClassMix (spec 3.2a): "object" meta-group, a traffic light or
    # sign takes its pole along and a pole its lights and signs; "human-vehicle" meta-group, a
    # rider takes the motorcycles and bicycles along (person -> rider is not linked).
    "dsrnss": (
        ((6, 7), (5,)),
        ((5,), (6, 7)),
        ((12,), (17, 18)),
    ),
}


@dataclass(frozen=True)
class LabelSet:
    """A set of classes in the 19 train-ID space that an evaluation protocol averages over."""

    name: str
    class_ids: tuple[int, ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(CITYSCAPES_CLASSES[i] for i in self.class_ids)

    def __len__(self) -> int:
        return len(self.class_ids)


LABEL_SETS: dict[str, LabelSet] = {
    "cityscapes19": LabelSet("cityscapes19", tuple(range(19))),
    "synthia16": LabelSet("synthia16", tuple(i for i in range(19) if i not in (9, 14, 16))),
    "synthia13": LabelSet(
        "synthia13", tuple(i for i in range(19) if i not in (3, 4, 5, 9, 14, 16))
    ),
    "dsec18": LabelSet("dsec18", tuple(i for i in range(19) if i != 14)),
}

NUM_CLASSES = len(CITYSCAPES_CLASSES)


def label_set(name: str) -> LabelSet:
    """Return the label set called ``name`` or raise a ValueError listing the known ones."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        known = ", ".join(sorted(LABEL_SETS))
        from ..errors import ConfigError

        raise ConfigError(f"unknown label set {name!r}; known label sets: {known}") from None


def palette_array():
    """The Cityscapes palette as a (256, 3) uint8 array; index 255 (ignore) is black."""
    import numpy as np

    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(CITYSCAPES_PALETTE)] = np.asarray(CITYSCAPES_PALETTE, dtype=np.uint8)
    return pal
