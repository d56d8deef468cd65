"""Converting raw label IDs to the 19 Cityscapes train IDs (``udaseg prepare``).

Every source dataset stores its labels with its own class IDs; training and evaluation read
single-channel 8-bit ``*_labelTrainIds.png`` files next to them (spec 4.1). This module holds
the mapping tables, a lookup-table converter for 8- and 16-bit IDs, the per-dataset lists of
``(source, destination)`` jobs and one parallel, restartable runner:

* **Cityscapes**: ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` (8-bit, Cityscapes label IDs)
  -> sibling ``*_gtFine_labelTrainIds.png`` (:data:`CITYSCAPES_ID_TO_TRAINID`, the
  cityscapesscripts ``trainId`` column; evaluated-out classes and ``license plate`` -> 255).
* **GTA5**: ``labels/<nnnnn>.png`` (palette PNG whose *indices* are Cityscapes label IDs; the
  palette itself is ignored) -> ``labels/<nnnnn>_labelTrainIds.png`` (:data:`GTA_ID_TO_TRAINID`).
* **SYNTHIA-RAND-CITYSCAPES**: ``GT/LABELS/<nnnnnnn>.png`` (16-bit RGB, class ID in R, an
  instance ID in G, B unused) -> ``GT/LABELS/<nnnnnnn>_labelTrainIds.png``
  (:data:`SYNTHIA_ID_TO_TRAINID`, from the SYNTHIA README; Synthia has no terrain, truck or train
  class, so those train IDs never occur: protocol ``synthia16``).

Guarantees of :func:`convert_labels`:

* an original is never written: a job whose destination is its source, or whose name does not
  end with ``_labelTrainIds.png``, is refused before anything runs;
* a destination appears only complete: it is written to a hidden temporary file in the same
  folder (``.<name>.<random>.tmp``, a name no job list or dataset glob matches), flushed to disk
  and then moved into place with :func:`os.replace`. A run that is interrupted leaves at most
  such a temporary file, which is never taken for a finished label;
* it is restartable: a destination that exists is skipped, so a second run only converts what
  the first did not;
* a broken source file does not stop the run: it is recorded in
  :attr:`ConvertSummary.failed` with its message and the caller reports all of them at once
  (:meth:`ConvertSummary.raise_for_failures`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from ..fileio import atomic_write
from .classes import CITYSCAPES_ID_TO_TRAINID, IGNORE_INDEX, NUM_CLASSES
from .io import DataError
from .png16 import read_png16

#: every converted label ends with this suffix (Cityscapes: ``_gtFine_labelTrainIds.png``)
TRAIN_ID_SUFFIX = "_labelTrainIds.png"

#: GTA5 labels use the Cityscapes label IDs (spec 9.3)
GTA_ID_TO_TRAINID: dict[int, int] = dict(CITYSCAPES_ID_TO_TRAINID)

#: SYNTHIA-RAND-CITYSCAPES class IDs (R channel of GT/LABELS) -> train IDs (spec 9.3)
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0,    # road
    4: 1,    # sidewalk
    2: 2,    # building
    21: 3,   # wall
    5: 4,    # fence
    7: 5,    # pole
    15: 6,   # traffic light
    9: 7,    # traffic sign
    6: 8,    # vegetation
    16: 9,   # terrain (never occurs in SYNTHIA-RAND-CITYSCAPES)
    1: 10,   # sky
    10: 11,  # person
    17: 12,  # rider
    8: 13,   # car
    18: 14,  # truck (never occurs)
    19: 15,  # bus
    20: 16,  # train (never occurs)
    12: 17,  # motorcycle
    11: 18,  # bicycle
}  # fmt: skip

CITYSCAPES_RAW_SUFFIX = "_gtFine_labelIds.png"
CITYSCAPES_TRAIN_SUFFIX = "_gtFine_labelTrainIds.png"


# --------------------------------------------------------------------------------------------
# lookup tables


class LUT:
    """Lookup table raw ID -> train ID; IDs not in the mapping become 255 (ignore).

    ``LUT(mapping)(raw)`` converts an integer array of any shape: uint8 input goes through a
    256-entry table, every other integer type through a 65536-entry one (16-bit IDs); values
    outside 0..65535 become 255.
    """

    def __init__(self, mapping: Mapping[int, int]):
        items = {int(k): int(v) for k, v in mapping.items()}
        bad_keys = [k for k in items if not 0 <= k <= 0xFFFF]
        bad_vals = [v for v in items.values() if not (0 <= v < NUM_CLASSES or v == IGNORE_INDEX)]
        if bad_keys or bad_vals:
            raise ValueError(
                f"label mapping: raw IDs must be 0..65535 (bad: {bad_keys[:5]}) and train IDs "
                f"0..{NUM_CLASSES - 1} or {IGNORE_INDEX} (bad: {bad_vals[:5]})"
            )
        self.mapping: dict[int, int] = dict(sorted(items.items()))

    def __repr__(self) -> str:
        return f"LUT({self.mapping})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LUT) and other.mapping == self.mapping

    def __hash__(self) -> int:
        return hash(tuple(self.mapping.items()))

    def __getstate__(self) -> dict:
        return {"mapping": self.mapping}  # the tables are rebuilt where they are used

    def __setstate__(self, state: dict) -> None:
        self.mapping = state["mapping"]

    def _table(self, size: int) -> np.ndarray:
        table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
        for k, v in self.mapping.items():
            if k < size:
                table[k] = v
        return table

    @cached_property
    def table8(self) -> np.ndarray:
        """(256,) uint8 table for 8-bit IDs."""
        return self._table(1 << 8)

    @cached_property
    def table16(self) -> np.ndarray:
        """(65536,) uint8 table for 16-bit IDs."""
        return self._table(1 << 16)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Train IDs (uint8, same shape) of the integer array ``raw``."""
        raw = np.asarray(raw)
        if raw.dtype == np.uint8:
            return self.table8[raw]
        if raw.dtype == np.uint16:
            return self.table16[raw]
        if not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"label IDs must be integers, got dtype {raw.dtype}")
        inside = (raw >= 0) & (raw <= 0xFFFF)
        out = self.table16[np.where(inside, raw, 0)]
        out[~inside] = IGNORE_INDEX
        return out


# --------------------------------------------------------------------------------------------
# readers (module-level functions: they are sent to worker processes)


def read_label_ids(path: Path) -> np.ndarray:
    """Raw IDs of a single-channel label PNG (Cityscapes ``labelIds``, GTA5 palette labels).

    A palette (``P``) image gives its palette indices, which are GTA5's class IDs; 16-bit grey
    gives 16-bit IDs. Colour images are refused (a ``*_color.png`` is not a label-ID file).
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "P", "I", "I;16", "I;16B"):
            raise DataError(
                f"label {path} has image mode {im.mode!r}; expected single-channel label IDs "
                "(mode 'L', 'P' or 16-bit grey). Is it a colour visualisation?"
            )
        return np.array(im)


def read_synthia_ids(path: Path) -> np.ndarray:
    """SYNTHIA class IDs: the first (R) channel of a 16-bit ``GT/LABELS`` PNG."""
    arr = read_png16(path)
    return arr[..., 0] if arr.ndim == 3 else arr


# --------------------------------------------------------------------------------------------
# the runner


@dataclass
class ConvertSummary:
    """Outcome of :func:`convert_labels`."""

    converted: int = 0
    """destinations written by this run"""
    skipped: int = 0
    """destinations that already existed (done by an earlier run)"""
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """(source, message) of every job that failed, in job order"""

    @property
    def total(self) -> int:
        return self.converted + self.skipped + len(self.failed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def failure_report(self, fix: str = "", limit: int = 20) -> str:
        """A message naming the failed files (at most ``limit``), their errors and ``fix``."""
        lines = [f"  {p}: {msg}" for p, msg in self.failed[:limit]]
        if len(self.failed) > limit:
            lines.append(f"  ... and {len(self.failed) - limit} more")
        head = f"{len(self.failed)} of {self.total} label files could not be converted:"
        default_fix = (
            "Re-extract these files from the dataset archive and run the same command again; "
            "the labels already converted are kept."
        )
        return "\n".join([head, *lines, fix or default_fix])

    def raise_for_failures(self, fix: str = "") -> None:
        """Raise a :class:`DataError` listing the failures (see :meth:`failure_report`)."""
        if self.failed:
            raise DataError(self.failure_report(fix))


def _check_job(src: Path, dst: Path) -> str | None:
    if not dst.name.endswith(TRAIN_ID_SUFFIX):
        return f"destination {dst} does not end with {TRAIN_ID_SUFFIX}"
    if src.name.endswith(TRAIN_ID_SUFFIX):
        return f"source {src} is already a train-ID file"
    if os.path.abspath(src) == os.path.abspath(dst):
        return f"destination {dst} is the source itself"
    return None


def write_label_atomic(path: Path, label: np.ndarray) -> None:
    """Write a (H, W) uint8 label PNG so that ``path`` only ever exists complete.

    The PNG goes to ``.<name>.<random>.tmp`` in the same folder, is flushed to disk, then
    replaces ``path`` in one step (:func:`os.replace`). The temporary file is removed on error.
    """
    from PIL import Image

    atomic_write(
        path,
        lambda f: Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(f, format="PNG"),
    )


def _convert_one(
    job: tuple[Path, Path], lut: LUT, reader: Callable[[Path], np.ndarray]
) -> tuple[str, str]:
    """Convert one file; returns ("converted" | "skipped" | "failed", message)."""
    src, dst = Path(job[0]), Path(job[1])
    refused = _check_job(src, dst)
    if refused:
        return "failed", f"refused: {refused}"
    if dst.exists():
        return "skipped", ""
    try:
        raw = reader(src)
        if raw.ndim != 2:
            raise DataError(f"label {src} has shape {raw.shape}; expected (H, W) IDs")
        write_label_atomic(dst, lut(raw))
    except FileNotFoundError:
        return "failed", "file not found"
    except Exception as exc:  # noqa: BLE001 - every file is tried; the caller reports all failures
        return "failed", f"{type(exc).__name__}: {exc}"
    return "converted", ""


def default_workers(n_jobs: int) -> int:
    """Worker processes used when ``workers=None``: the CPU count, at most 8 and n_jobs."""
    return max(1, min(os.cpu_count() or 1, 8, n_jobs))


def convert_labels(
    jobs: Sequence[tuple[Path, Path]],
    mapping: Mapping[int, int] | LUT,
    *,
    reader: Callable[[Path], np.ndarray] = read_label_ids,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "converting labels",
) -> ConvertSummary:
    """Write the train-ID label of every ``(source, destination)`` job.

    Args:
        jobs: pairs of raw label file and ``*_labelTrainIds.png`` destination (e.g. from
            :func:`cityscapes_jobs`, :func:`gta_jobs`, :func:`synthia_jobs`).
        mapping: raw ID -> train ID (others become 255), or a :class:`LUT`.
        reader: reads the raw IDs of a source file as a (H, W) integer array; a module-level
            function, because it is sent to the worker processes.
        workers: processes; ``1`` runs in this process, ``None`` picks :func:`default_workers`.
        progress: show a rich progress bar.
        desc: the progress bar's label.

    Returns:
        The counts and the failures; the call itself raises only for refused jobs (a job that
        would overwrite its source or whose destination lacks the train-ID suffix: ValueError).
    """
    jobs = [(Path(s), Path(d)) for s, d in jobs]
    refused = [r for r in (_check_job(s, d) for s, d in jobs) if r]
    if refused:
        shown = "\n  ".join(refused[:5])
        raise ValueError(
            f"convert_labels refuses {len(refused)} job(s) that could overwrite an original:\n"
            f"  {shown}\nDestinations must be new files ending with {TRAIN_ID_SUFFIX}."
        )
    lut = mapping if isinstance(mapping, LUT) else LUT(mapping)
    work = partial(_convert_one, lut=lut, reader=reader)
    n = len(jobs)
    workers = default_workers(n) if workers is None else max(1, min(int(workers), max(n, 1)))

    def tracked(results: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
        if not progress or n == 0:
            return results
        from rich.progress import track

        return track(results, total=n, description=desc)

    if workers == 1:
        results = list(tracked(map(work, jobs)))
    else:
        from concurrent.futures import ProcessPoolExecutor

        chunk = max(1, min(64, n // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tracked(pool.map(work, jobs, chunksize=chunk)))

    summary = ConvertSummary()
    for (src, _), (status, message) in zip(jobs, results):
        if status == "converted":
            summary.converted += 1
        elif status == "skipped":
            summary.skipped += 1
        else:
            summary.failed.append((src, message))
    return summary


# --------------------------------------------------------------------------------------------
# job lists of the datasets


def _visible(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if not p.name.startswith("."))


def _no_labels(what: str, folder: Path, pattern: str, fix: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}: no {pattern} files under {folder}. {fix}")


def cityscapes_jobs(
    root: str | Path, splits: Sequence[str] = ("train", "val", "test")
) -> list[tuple[Path, Path]]:
    """``gtFine/<split>/<city>/*_gtFine_labelIds.png`` -> sibling ``*_gtFine_labelTrainIds.png``.

    Split folders that are absent are skipped, as long as at least one requested split exists.
    A copy that only holds train-ID files already (e.g. SynthNight) gives an empty list.
    """
    root = Path(root)
    gt = root / "gtFine"
    fix = (
        "Expected <root>/gtFine/{train,val,test}/<city>/*_gtFine_labelIds.png; extract "
        "gtFine_trainvaltest.zip into the Cityscapes root."
    )
    if not gt.is_dir():
        raise FileNotFoundError(f"cityscapes root {root}: folder {gt} does not exist. {fix}")
    split_dirs = [gt / s for s in splits if (gt / s).is_dir()]
    if not split_dirs:
        raise FileNotFoundError(
            f"cityscapes root {root}: none of the split folders {list(splits)} exists under "
            f"{gt}. {fix}"
        )
    jobs, have_train_ids = [], False
    for d in split_dirs:
        for src in _visible(d.glob(f"*/*{CITYSCAPES_RAW_SUFFIX}")):
            stem = src.name[: -len(CITYSCAPES_RAW_SUFFIX)]
            jobs.append((src, src.with_name(stem + CITYSCAPES_TRAIN_SUFFIX)))
        have_train_ids = have_train_ids or any(d.glob(f"*/*{CITYSCAPES_TRAIN_SUFFIX}"))
    if not jobs and not have_train_ids:
        raise _no_labels(f"cityscapes root {root}", gt, f"*{CITYSCAPES_RAW_SUFFIX}", fix)
    return jobs


def _flat_jobs(label_dir: Path, what: str, fix: str) -> list[tuple[Path, Path]]:
    if not label_dir.is_dir():
        raise FileNotFoundError(f"{what}: folder {label_dir} does not exist. {fix}")
    jobs = [
        (src, src.with_name(src.stem + TRAIN_ID_SUFFIX))
        for src in _visible(label_dir.glob("*.png"))
        if not src.name.endswith(TRAIN_ID_SUFFIX)
    ]
    if not jobs and not any(label_dir.glob(f"*{TRAIN_ID_SUFFIX}")):
        raise _no_labels(what, label_dir, "*.png", fix)
    return jobs


def gta_jobs(root: str | Path) -> list[tuple[Path, Path]]:
    """``labels/<nnnnn>.png`` -> ``labels/<nnnnn>_labelTrainIds.png`` for every GTA5 label."""
    root = Path(root)
    return _flat_jobs(
        root / "labels",
        f"gta root {root}",
        "Expected <root>/images/<nnnnn>.png and <root>/labels/<nnnnn>.png; extract the "
        "GTA5 (Playing for Data) 01..10_images.zip and 01..10_labels.zip archives into the root.",
    )


def synthia_jobs(root: str | Path) -> list[tuple[Path, Path]]:
    """``GT/LABELS/<n>.png`` -> ``GT/LABELS/<n>_labelTrainIds.png`` for every SYNTHIA label."""
    root = Path(root)
    return _flat_jobs(
        root / "GT" / "LABELS",
        f"synthia root {root}",
        "Expected <root>/RGB/<nnnnnnn>.png and <root>/GT/LABELS/<nnnnnnn>.png; extract "
        "SYNTHIA_RAND_CITYSCAPES.rar so that its RGB/ and GT/ folders are in the root.",
    )


# --------------------------------------------------------------------------------------------
# one entry point per dataset for `udaseg prepare`


@dataclass(frozen=True)
class Conversion:
    """How one dataset's raw labels become train IDs."""

    jobs: Callable[[Path], list[tuple[Path, Path]]]
    mapping: Mapping[int, int]
    reader: Callable[[Path], np.ndarray]


CONVERSIONS: dict[str, Conversion] = {
    "cityscapes": Conversion(cityscapes_jobs, CITYSCAPES_ID_TO_TRAINID, read_label_ids),
    "gta": Conversion(gta_jobs, GTA_ID_TO_TRAINID, read_label_ids),
    "synthia": Conversion(synthia_jobs, SYNTHIA_ID_TO_TRAINID, read_synthia_ids),
}


def convert_dataset(
    name: str, root: str | Path, *, workers: int | None = None, progress: bool = True
) -> ConvertSummary:
    """Convert the raw labels of dataset ``name`` (a key of :data:`CONVERSIONS`) under ``root``.

    Raises FileNotFoundError when the label folder is missing; failures of single files are in
    the returned summary (call :meth:`ConvertSummary.raise_for_failures`).
    """
    try:
        conv = CONVERSIONS[name]
    except KeyError:
        raise ValueError(
            f"no label conversion for dataset {name!r}; known: {', '.join(sorted(CONVERSIONS))}"
        ) from None
    return convert_labels(
        conv.jobs(Path(root)),
        conv.mapping,
        reader=conv.reader,
        workers=workers,
        progress=progress,
        desc=f"{name}: labels -> train IDs",
    )
