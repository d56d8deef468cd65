"""Dark Zurich (Sakaridis et al., ICCV 2019) in its official on-disk layout.

::

    <root>/rgb_anon/<split>/night/<rec>/<rec>_frame_<n>_rgb_anon.png
    <root>/rgb_anon/<split>_ref/day/<rec>_ref/<rec>_frame_<n>_ref_rgb_anon.png   (day reference)
    <root>/gt/<split>/night/<rec>/<rec>_frame_<n>_gt_labelTrainIds.png             (val only)
    <root>/gt/<split>/night/<rec>/<rec>_frame_<n>_gt_invGray.png                   (val only)

Images are 1080x1920 (HxW). The train split of the real dataset (2416 night images) ships no
labels (it is the unlabelled UDA target); val has 50 labelled images, test has 151 images and is
scored on the benchmark server. Paths are built structurally from the recording and frame
names, never by string replacement on the whole path (a data root containing "val" or "night"
must not break anything).

Day references (the ``"ref"`` view):

* val (and SynthNight's train split): ``<split>_ref/day/<rec>_ref/<name>_ref_rgb_anon.png``;
* test: the reference file names carry more than the night frame name, so the reference is the
  first file (sorted) in ``test_ref/day/<rec>_ref/`` whose name starts with ``<name>_`` (the
  exact val-style name wins when it exists). This fallback is used for every split;
* the real train split: the day partner of each night frame comes from the correspondence list
  ``zurich_dn_pair_train.csv`` (``pairs_file``; 2416 lines
  ``train/night/GOPRxxxx/GOPRxxxx_frame_NNNNNN,train/day/GOPRyyyy/GOPRyyyy_frame_MMMMMM``, paths
  relative to ``rgb_anon/`` without the ``_rgb_anon.png`` suffix; 1426 distinct day frames), so
  the reference is ``rgb_anon/train/day/<rec>/<day name>_rgb_anon.png``.

Optional extra views, written by SynthNight and (for depth) by Depth Anything users:
``depth_any/<split>/night/<rec>/<name>_depth.png`` and
``events/<split>/night/<rec>/<name>_events.h5``. The ``"invalid"`` view is the val ground
truth's invalid-region mask (255 = semantics cannot be told; used for the uncertainty-aware
UIoU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..io import DataError, read_grey
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir

IMG_SUFFIX = "_rgb_anon.png"
REF_SUFFIX = "_ref_rgb_anon.png"
LABEL_SUFFIX = "_gt_labelTrainIds.png"
INVALID_SUFFIX = "_gt_invGray.png"
DEPTH_SUFFIX = "_depth.png"

VIEW_CHOICES = ("ref", "depth", "invalid")

PAIRS_FIX = (
    "The pairs file is a CSV with one line per train night frame, e.g. "
    "'train/night/GOPR0351/GOPR0351_frame_000001,train/day/GOPR0354/GOPR0354_frame_000123' "
    "(paths relative to <root>/rgb_anon/, without the _rgb_anon.png suffix); Refign ships it as "
    "data_modules/datasets/lists/zurich_dn_pair_train.csv. Pass its path as `pairs_file`, or "
    "leave `pairs_file` unset to read references from rgb_anon/<split>_ref/day/<rec>_ref/."
)


class DarkZurich(SegmentationDataset):
    """Dark Zurich night images of one split.

    Args:
        root: the dataset root (holding ``rgb_anon/``).
        split: ``train``, ``val`` or ``test``.
        labels: load ``gt/<split>`` labels (only val has them).
        views: extra views to load: ``"ref"`` (the day reference image of the same place),
            ``"depth"`` (an 8-bit Depth-Anything-style map) and ``"invalid"`` (the val ground
            truth's ``*_gt_invGray.png`` invalid-region mask as (H, W, 1) uint8, 255 = invalid).
        condition: the condition folder, ``night`` for the benchmark.
        pairs_file: optional night/day correspondence CSV (see the module docstring); its day
            frame becomes the ``"ref"`` view. Lines for other splits are ignored.
        drop_unpaired: with ``pairs_file``, skip night images the file does not list instead of
            raising an error.
        depth_transform: ``"cdda"`` (CDDA's load-time transform, :mod:`udaseg.data.depth`) or
            ``"none"`` (the raw 8-bit map) for the ``"depth"`` view.
        transform: joint transform applied to each sample dict.
    """

    dataset_name = "dark_zurich"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        labels: bool = True,
        views: Sequence[str] = (),
        condition: str = "night",
        pairs_file: str | Path | None = None,
        drop_unpaired: bool = False,
        transform: Callable[[Sample], Sample] | None = None,
        depth_transform: str = "cdda",
    ):
        from ..depth import check_depth_transform

        self.root = Path(root)
        self.split = split
        self.depth_transform = check_depth_transform(depth_transform)
        unknown = [v for v in views if v not in VIEW_CHOICES]
        if unknown:
            raise ConfigError(f"dark_zurich: unknown views {unknown}; choose from {VIEW_CHOICES}")
        img_dir = require_dir(
            self.root / "rgb_anon" / split / condition,
            f"dark_zurich root {self.root}",
            "Expected <root>/rgb_anon/{train,val,test}/night/<rec>/*_rgb_anon.png; extract "
            "Dark_Zurich_train_anon.zip / Dark_Zurich_val_anon.zip into the root.",
        )
        pairs = None
        if pairs_file is not None:
            pairs = read_pairs_file(Path(pairs_file), self.root, split, condition)
        ref_dir = self.root / "rgb_anon" / f"{split}_ref" / "day"
        ref_listing: dict[str, list[str]] = {}
        records, missing, unpaired = [], [], []
        for img in sorted(img_dir.glob(f"*/*{IMG_SUFFIX}")):
            rec, stem = img.parent.name, img.name[: -len(IMG_SUFFIX)]
            partner = None
            if pairs is not None:
                partner = pairs.get((rec, stem))
                if partner is None:
                    unpaired.append(str(img))
                    continue
            label = None
            if labels:
                label = self.root / "gt" / split / condition / rec / f"{stem}{LABEL_SUFFIX}"
                if not label.is_file():
                    missing.append(f"{img} -> {label}")
            extra = {}
            if "ref" in views:
                if partner is not None:
                    extra["ref"] = partner
                else:
                    extra["ref"] = find_reference(ref_dir / f"{rec}_ref", stem, ref_listing)
            if "depth" in views:
                depth_dir = self.root / "depth_any" / split / condition / rec
                extra["depth"] = depth_dir / f"{stem}{DEPTH_SUFFIX}"
            if "invalid" in views:
                gt_dir = self.root / "gt" / split / condition / rec
                extra["invalid"] = gt_dir / f"{stem}{INVALID_SUFFIX}"
            missing += [f"{img} -> {p}" for p in extra.values() if not p.is_file()]
            records.append(Record(name=stem, image=img, label=label, views=extra))
        if not drop_unpaired:
            report_missing(
                unpaired,
                f"dark_zurich {split} night images are not listed in the pairs file {pairs_file}",
                "Use the correspondence list that belongs to this copy of the dataset, or pass "
                "drop_unpaired=True to skip these images. " + PAIRS_FIX,
            )
        report_missing(
            missing,
            f"dark_zurich {split} images lack a partner file "
            "(label, reference, depth or invalid mask)",
            "Extract the matching archive (gt for val, the *_ref day images or the train/day "
            "frames named by the pairs file, depth maps) into the root, or drop the view from "
            "the config.",
        )
        super().__init__(records, transform)

    def load_view(self, key: str, path: Path) -> np.ndarray:
        if key == "depth":
            from ..depth import read_depth_view

            return read_depth_view(path, self.depth_transform)
        if key == "invalid":
            return read_invalid_mask(path)
        return super().load_view(key, path)


def find_reference(ref_rec_dir: Path, stem: str, listing: dict[str, list[str]]) -> Path:
    """The day reference of night frame ``stem`` inside ``<split>_ref/day/<rec>_ref/``.

    The exact name ``<stem>_ref_rgb_anon.png`` wins; otherwise the first file (sorted) whose name
    starts with ``<stem>_`` (how the test references are named). When nothing matches, the exact
    name is returned so that the caller reports it as missing. ``listing`` caches each folder's
    sorted file names.
    """
    exact = ref_rec_dir / f"{stem}{REF_SUFFIX}"
    if exact.is_file():
        return exact
    key = str(ref_rec_dir)
    if key not in listing:
        listing[key] = (
            sorted(p.name for p in ref_rec_dir.iterdir() if p.suffix == ".png")
            if ref_rec_dir.is_dir()
            else []
        )
    prefix = f"{stem}_"
    for name in listing[key]:
        if name.startswith(prefix):
            return ref_rec_dir / name
    return exact


def _parse_pair_path(field: str) -> tuple[str, str, str, str] | None:
    """``<split>/<cond>/<rec>/<name>`` -> its four parts, or None if malformed."""
    field = field.strip()
    field = field.removesuffix(IMG_SUFFIX)
    parts = field.split("/")
    if len(parts) != 4 or any(p in ("", ".", "..") for p in parts):
        return None
    return parts[0], parts[1], parts[2], parts[3]


def read_pairs_file(
    path: Path, root: Path, split: str, condition: str
) -> dict[tuple[str, str], Path]:
    """Read the night/day correspondence CSV.

    Returns ``{(rec, night name): day image path}`` for the lines whose night side lies in
    ``<split>/<condition>/``; other lines are ignored.
    """
    if not path.is_file():
        raise FileNotFoundError(f"dark_zurich pairs file {path} does not exist. {PAIRS_FIX}")
    pairs: dict[tuple[str, str], Path] = {}
    bad: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split(",")
            night = _parse_pair_path(fields[0]) if len(fields) == 2 else None
            day = _parse_pair_path(fields[1]) if len(fields) == 2 else None
            if night is None or day is None:
                bad.append(f"line {lineno}: {line!r}")
                continue
            if night[:2] != (split, condition):
                continue
            key = (night[2], night[3])
            day_path = root / "rgb_anon" / day[0] / day[1] / day[2] / f"{day[3]}{IMG_SUFFIX}"
            if pairs.get(key, day_path) != day_path:
                bad.append(f"line {lineno}: {line!r} (second, different partner of {night[3]})")
                continue
            pairs[key] = day_path
    report_missing(bad, f"malformed lines in the dark_zurich pairs file {path}", PAIRS_FIX)
    if not pairs:
        raise DataError(
            f"dark_zurich pairs file {path} has no line for {split}/{condition}/ night images. "
            + PAIRS_FIX
        )
    return pairs


DEPTH_FIX = (
    "Regenerate it as an 8-bit grey PNG (values 0..255, larger = nearer), e.g. Depth Anything's "
    "--grayscale output; rescale 16-bit, 32-bit or float maps to 0..255 first."
)


def read_depth(path: Path) -> np.ndarray:
    """An 8-bit single-channel depth PNG as (H, W, 1) uint8 (larger = nearer).

    16-bit, 32-bit and float maps are an error (converting them to 8 bits would clip every
    value above 255 to 255 without a word)."""
    return read_grey(path, "depth map", modes=("L", "RGB"), fix=DEPTH_FIX)


def read_invalid_mask(path: Path) -> np.ndarray:
    """An invalid-region mask (``*_gt_invGray.png``) as (H, W, 1) uint8, 255 = invalid."""
    return read_grey(
        path, "invalid mask", modes=("1", "L", "P"),
        fix="Use the *_gt_invGray.png file from the ground-truth archive.",
    )
