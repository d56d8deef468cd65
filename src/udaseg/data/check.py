"""Dataset check: count images and labels per split and list every problem, without stopping.

``udaseg prepare NAME ROOT --check`` calls :func:`check_dataset`. Unlike the loaders (which stop
at the first inconsistency with one clear error), the check goes through every split and every
file and collects:

* a split folder that is missing or empty (the loader's error message, which names the folder
  and the expected layout);
* images without a partner (label, reference, ...), as reported by the loader (collected with
  :func:`udaseg.data.datasets.base.collect_missing` instead of raised);
* unreadable images or labels (truncated PNG, not an image);
* labels whose size differs from the image, colour labels and values outside the train IDs.

Files are read in parallel (threads: decoding releases the GIL) with a progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .classes import NUM_CLASSES
from .datasets.base import collect_missing
from .io import read_image, read_label


@dataclass
class SplitReport:
    """Counts and problems of one split."""

    split: str
    images: int = 0
    labels: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`."""

    dataset: str
    root: Path
    splits: list[SplitReport] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"{s.split}: {p}" for s in self.splits for p in s.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_per_split: int = 10) -> str:
        """A readable table plus the first problems of each split."""
        lines = [f"{self.dataset} at {self.root}", f"  {'split':<10}{'images':>8}{'labels':>8}  problems"]
        for s in self.splits:
            lines.append(f"  {s.split:<10}{s.images:>8}{s.labels:>8}  {len(s.problems)}")
        for s in self.splits:
            for p in s.problems[:max_per_split]:
                lines.append(f"  [{s.split}] {p}")
            if len(s.problems) > max_per_split:
                lines.append(f"  [{s.split}] ... and {len(s.problems) - max_per_split} more")
            for n in s.notes[:max_per_split]:
                lines.append(f"  [{s.split}] note: {n}")
        lines.append("  OK" if self.ok else f"  {len(self.problems)} problem(s) found")
        return "\n".join(lines)


def _check_record(rec, label_check: Callable | None) -> tuple[bool, list[str], list[str]]:
    """(label read, problems, notes) for one record."""
    problems: list[str] = []
    notes: list[str] = []
    try:
        size = read_image(rec.image).shape[:2]  # a full decode: truncated files must show up
    except FileNotFoundError:
        return False, [f"image file not found: {rec.image}"], notes
    except Exception as exc:  # noqa: BLE001 - every unreadable file is one reported problem
        return False, [f"cannot read image {rec.image}: {exc}"], notes
    # missing labels and views were reported by the loader (collect_missing), once per split
    if rec.label is None or not Path(rec.label).is_file():
        return False, problems, notes
    try:
        if label_check is not None:
            note = label_check(rec.label, size)
            if note:
                notes.append(note)
        else:
            read_label(rec.label, expected_size=size, num_classes=NUM_CLASSES)
    except DataError as exc:
        problems.append(str(exc))
    except Exception as exc:  # noqa: BLE001
        problems.append(f"cannot read label {rec.label}: {exc}")
    return True, problems, notes


def check_split(
    build: Callable[..., object],
    split: str,
    labelled: bool,
    *,
    workers: int = 8,
    progress: bool = True,
    label_check: Callable | None = None,
    optional: bool = False,
) -> SplitReport:
    """Check one split; ``build(split=..., labels=...)`` constructs the dataset.

    An ``optional`` split whose folder does not exist (e.g. a test split not downloaded) is a
    note, not a problem.
    """
    report = SplitReport(split)
    try:
        with collect_missing() as missing:
            ds = build(split=split, labels=labelled)
    except FileNotFoundError as exc:
        (report.notes if optional else report.problems).append(
            f"not present (optional): {exc}" if optional else str(exc)
        )
        return report
    except (DataError, ValueError) as exc:
        report.problems.append(str(exc))
        return report
    report.problems += missing
    # a loader that decodes its own label format (the folder loader's id/colour maps) checks it
    label_check = label_check or getattr(ds, "check_label", None)
    records = list(getattr(ds, "records", []))
    report.images = len(records)
    it = _track(records, f"checking {split}", progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for has_label, problems, notes in pool.map(lambda r: _check_record(r, label_check), it):
            report.labels += int(has_label)
            report.problems += problems
            report.notes += notes
    return report


def check_dataset(
    name: str,
    root: str | Path,
    splits: dict[str, bool],
    build: Callable[..., object],
    *,
    workers: int = 8,
    progress: bool = True,
    label_check: Callable | None = None,
    optional: Sequence[str] = (),
) -> CheckReport:
    """Check every split of a dataset.

    Args:
        name: the dataset's catalogue name (for the report).
        root: the dataset root.
        splits: split name -> whether it has labels.
        build: ``build(split=..., labels=...)`` returns the dataset of one split.
        label_check: optional ``f(label_path, image_hw) -> note | None`` replacing the default
            :func:`udaseg.data.io.read_label` validation (e.g. GTA's tolerated size mismatches);
            it raises DataError for a problem.
        optional: splits that may be absent (reported as a note then).
    """
    report = CheckReport(name, Path(root))
    for split, labelled in splits.items():
        report.splits.append(
            check_split(build, split, labelled, workers=workers, progress=progress,
                        label_check=label_check, optional=split in optional)
        )
    return report


def _track(items: Sequence, desc: str, progress: bool):
    if not progress or not items:
        return items
    from rich.progress import track

    return track(items, description=desc, transient=True)
