"""ACDC, the Adverse Conditions Dataset with Correspondences (Sakaridis et al., ICCV 2021).

Read in its official on-disk layout (the archives ``rgb_anon_trainvaltest.zip`` and
``gt_trainval.zip`` extracted into one root; no rsync flattening into ``<split>/``)::

    <root>/rgb_anon/<cond>/<split>/<rec>/<name>_rgb_anon.png
    <root>/rgb_anon/<cond>/<split>_ref/<rec>/<name>_rgb_ref_anon.png     (day reference)
    <root>/gt/<cond>/<split>/<rec>/<name>_gt_labelTrainIds.png             (train/val only)
    <root>/gt/<cond>/<split>/<rec>/<name>_gt_invGray.png                   (invalid-region mask)

``<cond>`` is one of ``fog``, ``night``, ``rain``, ``snow``; ``<rec>`` a recording such as
``GOPR0475`` and ``<name>`` e.g. ``GOPR0475_frame_000041``. Images are 1080x1920 (HxW). Per
condition there are 400 train, 100 val (night: 106) and 500 test images, i.e. 1600 / 406 / 2000
over all four conditions. Labels are Cityscapes train IDs (0..18, 255 = ignore); the test labels
are withheld (scored on the ACDC server), so the test split is image-only.

Paths are built structurally from condition, split, recording and frame name, never by string
replacement on the whole path (a data root containing "val" or "night" must not break anything).
Records are ordered by condition (alphabetically), then by path; :attr:`ACDC.condition_of` gives
the condition of each record for per-condition metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..io import DataError
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir
from .dark_zurich import read_invalid_mask

IMG_SUFFIX = "_rgb_anon.png"
REF_SUFFIX = "_rgb_ref_anon.png"
LABEL_SUFFIX = "_gt_labelTrainIds.png"
INVALID_SUFFIX = "_gt_invGray.png"

CONDITIONS = ("fog", "night", "rain", "snow")
SPLITS = ("train", "val", "test")
VIEW_CHOICES = ("ref", "invalid")


class ACDC(SegmentationDataset):
    """ACDC images of one split for one or more adverse conditions.

    Args:
        root: the dataset root (holding ``rgb_anon/`` and, for train/val labels, ``gt/``).
        split: ``train``, ``val`` or ``test``.
        labels: load the ``*_gt_labelTrainIds.png`` labels; must be False for ``test``.
        conditions: which of ``fog``, ``night``, ``rain``, ``snow`` to include (a single name is
            accepted too); all four by default (Refign's setting; DSRNSS uses ``["night"]``).
        views: extra views: ``"ref"`` (the day reference image of the same place) and
            ``"invalid"`` (the ``*_gt_invGray.png`` mask of regions whose semantics cannot be
            told, 255 = invalid, as (H, W, 1) uint8; train/val only).
        transform: joint transform applied to each sample dict.
    """

    dataset_name = "acdc"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        labels: bool = True,
        conditions: Sequence[str] | str = CONDITIONS,
        views: Sequence[str] = (),
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        if split not in SPLITS:
            raise ConfigError(f"acdc: unknown split {split!r}; choose from {SPLITS}")
        if isinstance(conditions, str):
            conditions = (conditions,)
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown or not conditions:
            raise ConfigError(
                f"acdc: unknown conditions {unknown or list(conditions)}; choose one or more of "
                f"{CONDITIONS}"
            )
        self.conditions = tuple(sorted(set(conditions)))
        unknown = [v for v in views if v not in VIEW_CHOICES]
        if unknown:
            raise ConfigError(f"acdc: unknown views {unknown}; choose from {VIEW_CHOICES}")
        if split == "test" and (labels or "invalid" in views):
            raise ConfigError(
                "acdc: the test split has no public ground truth (it is scored on the ACDC "
                "server); pass labels=False and drop the 'invalid' view, or use split='val'."
            )

        records: list[Record] = []
        self.condition_of: list[str] = []
        """The condition of each record (parallel to :attr:`records`)."""
        missing: list[str] = []
        for cond in self.conditions:
            img_dir = require_dir(
                self.root / "rgb_anon" / cond / split,
                f"acdc root {self.root}, condition {cond!r}",
                "Expected <root>/rgb_anon/<cond>/{train,val,test}/<rec>/*_rgb_anon.png (and "
                "<root>/gt/<cond>/{train,val}/<rec>/*_gt_labelTrainIds.png); extract "
                "rgb_anon_trainvaltest.zip and gt_trainval.zip into the root, or restrict "
                "`conditions` to the ones you have.",
            )
            for img in sorted(img_dir.glob(f"*/*{IMG_SUFFIX}")):
                rec, stem = img.parent.name, img.name[: -len(IMG_SUFFIX)]
                label = None
                if labels:
                    label = self.root / "gt" / cond / split / rec / f"{stem}{LABEL_SUFFIX}"
                    if not label.is_file():
                        missing.append(f"{img} -> {label}")
                extra: dict[str, Path] = {}
                if "ref" in views:
                    ref_dir = self.root / "rgb_anon" / cond / f"{split}_ref" / rec
                    extra["ref"] = ref_dir / f"{stem}{REF_SUFFIX}"
                if "invalid" in views:
                    gt_dir = self.root / "gt" / cond / split / rec
                    extra["invalid"] = gt_dir / f"{stem}{INVALID_SUFFIX}"
                missing += [f"{img} -> {p}" for p in extra.values() if not p.is_file()]
                records.append(Record(name=stem, image=img, label=label, views=extra))
                self.condition_of.append(cond)
        report_missing(
            missing,
            f"acdc {split} images lack a partner file (label, day reference or invalid mask)",
            "Extract gt_trainval.zip (labels, *_gt_invGray.png) and rgb_anon_trainvaltest.zip "
            "(images and <split>_ref day references) into the root without renaming folders, "
            "or drop the view from the config.",
        )
        dupes = sorted(n for n, c in Counter(r.name for r in records).items() if c > 1)
        if dupes:
            raise DataError(
                f"acdc {split}: {len(dupes)} image names occur in more than one condition or "
                f"recording (e.g. {dupes[:3]}); predictions are saved by name and would overwrite "
                "each other. Remove the duplicated copies from the root."
            )
        super().__init__(records, transform)

    def load_view(self, key: str, path: Path) -> np.ndarray:
        if key == "invalid":
            return read_invalid_mask(path)
        return super().load_view(key, path)
