"""The night subset of BDD100K semantic segmentation (Yu et al., CVPR 2020) as an evaluation set.

BDD100K's 10k semantic-segmentation images in their official on-disk layout::

    <root>/images/10k/<split>/<id>.jpg                 (split: train, val)
    <root>/labels/sem_seg/masks/<split>/<id>.png        (train IDs 0..18, 255 = ignore)

plus a list file naming the night images, one per line, as in the Refign list
``images_trainval_night_correct_filenames.txt``::

    seg/images/train/<id>.jpg
    seg/images/val/<id>.jpg

The list has 87 entries (74 from train, 13 from val); images are 720x1280 (HxW). udaseg ships
it (``udaseg/resources/bdd100k_night_list.txt``, a copy of
``data_modules/datasets/lists/images_trainval_night_correct_filenames.txt`` of brdav/refign at
fd9c5f5), so a plain BDD100K download works as is; ``list_file`` names another list instead
(a list file in the root is not picked up by itself). Split ``test`` means every
listed image (how the benchmark uses it); ``train`` / ``val`` keep the entries of that BDD split
only. Only the ``images/<split>/<id>.jpg`` tail of each line is used, so lines with or without
the leading ``seg/`` both work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ConfigError
from ..io import DataError
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

BDD_SPLITS = ("train", "val")
SPLITS = ("test",) + BDD_SPLITS
SHIPPED_LIST = "bdd100k_night_list.txt"
"""The 87-image night list packaged in :mod:`udaseg.resources` (the default ``list_file``)."""

LIST_FIX = (
    "The list file names the night images of BDD100K's 10k segmentation set, one per line, "
    "like 'seg/images/train/<id>.jpg' or 'seg/images/val/<id>.jpg' (the 87-line list "
    "images_trainval_night_correct_filenames.txt from the Refign repository). Pass its path as "
    "`list_file`, or leave `list_file` unset to use the list shipped with udaseg."
)


def shipped_night_list() -> Traversable:
    """The packaged 87-line night list (74 train + 13 val images)."""
    return files("udaseg.resources").joinpath(SHIPPED_LIST)


class BDD100kNight(SegmentationDataset):
    """BDD100K night images named by a list (the shipped 87-image list by default), with masks.

    Args:
        root: the BDD100K root (holding ``images/10k/`` and ``labels/sem_seg/masks/``).
        split: ``test`` (every listed image), or ``train`` / ``val`` (the listed images of that
            BDD split).
        labels: load the train-ID masks.
        list_file: another night list; default: the shipped list (:func:`shipped_night_list`).
        views: no extra views exist; accepted so that every loader takes the same arguments.
        transform: joint transform applied to each sample dict.
    """

    dataset_name = "bdd100k_night"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        labels: bool = True,
        list_file: str | Path | None = None,
        views: Sequence[str] = (),
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        if split not in SPLITS:
            raise ConfigError(f"bdd100k_night: unknown split {split!r}; choose from {SPLITS}")
        if views:
            raise ConfigError(f"bdd100k_night: has no extra views (got {list(views)})")
        require_dir(
            self.root / "images" / "10k",
            f"bdd100k_night root {self.root}",
            "Expected <root>/images/10k/{train,val}/<id>.jpg and "
            "<root>/labels/sem_seg/masks/{train,val}/<id>.png; extract the BDD100K 10K images "
            "(bdd100k_images_10k.zip) and the semantic segmentation labels "
            "(bdd100k_sem_seg_labels_trainval.zip) into the root.",
        )
        self.list_file = Path(list_file) if list_file is not None else shipped_night_list()
        entries = read_night_list(self.list_file)
        wanted = BDD_SPLITS if split == "test" else (split,)
        records, missing = [], []
        for bdd_split, image_id in entries:
            if bdd_split not in wanted:
                continue
            img = self.root / "images" / "10k" / bdd_split / f"{image_id}.jpg"
            if not img.is_file():
                missing.append(f"{img} (image)")
                continue
            label = None
            if labels:
                label = self.root / "labels" / "sem_seg" / "masks" / bdd_split / f"{image_id}.png"
                if not label.is_file():
                    missing.append(f"{img} -> {label}")
            records.append(Record(name=image_id, image=img, label=label))
        report_missing(
            missing,
            f"bdd100k_night entries of {self.list_file} lack their image or train-ID mask",
            "Extract bdd100k_images_10k.zip and bdd100k_sem_seg_labels_trainval.zip into the "
            "root without renaming folders (the night images are in the 10k set, not the 100k "
            "one), and check that a custom `list_file` belongs to the 10k set.",
        )
        super().__init__(records, transform)


def read_night_list(path: Path | Traversable) -> list[tuple[str, str]]:
    """Parse the night list into sorted, de-duplicated ``(bdd split, image id)`` pairs."""
    if not path.is_file():
        raise FileNotFoundError(f"bdd100k_night list file {path} does not exist. {LIST_FIX}")
    entries: set[tuple[str, str]] = set()
    bad: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("/")
        if (
            len(parts) < 3
            or parts[-3] != "images"
            or parts[-2] not in BDD_SPLITS
            or not parts[-1].endswith(".jpg")
            or parts[-1] == ".jpg"
        ):
            bad.append(f"line {lineno}: {line!r}")
            continue
        entries.add((parts[-2], parts[-1][: -len(".jpg")]))
    report_missing(bad, f"malformed lines in the bdd100k_night list file {path}", LIST_FIX)
    if not entries:
        raise DataError(f"bdd100k_night list file {path} lists no images. {LIST_FIX}")
    return sorted(entries)
