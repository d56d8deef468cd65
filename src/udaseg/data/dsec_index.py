"""Image-to-event index and split lists of DSEC Night-Semantic (spec section 2.3).

``udaseg prepare dsec_night <root>`` runs :func:`prepare_dsec`, which writes per sequence
``<seq>/images/images_to_events_index.txt`` (one event index per line of ``images/timestamps.txt``)
and at the root the lists ``night_dataset_warp.txt`` (train) and ``night_test_dataset_warp.txt``
(test), each line ``<seq>/images/left/rectified/NNNNNN.png <event index>`` with the path relative
to the root (the rectified frame itself need not exist: the dataset reads ``warp_images/``).

Every file is written to a temporary file and moved into place (``os.replace``), and nothing is
rewritten when it is up to date, so running the command twice is cheap and leaves the files
(and their modification times) untouched.

Train frames (CMDA's ``create_dsec_dataset_txt.py``): a warp image exists, frame index >= 2, the
event index is valid (> 0), and the frame index is **above** the sequence's cut-off
(:data:`TRAIN_CUTOFFS`), which keeps the training frames off the labelled test segment. For a
sequence not in the table the cut-off is ``N - 13`` where ``N`` is the highest labelled frame
index of that sequence (the five published cut-offs are exactly 810/162/594/756/378 - 13); a
sequence without labels has no cut-off. Test frames: every frame with a label file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write_text
from .events import EventFile

INDEX_FILE = "images/images_to_events_index.txt"
TIMESTAMPS_FILE = "images/timestamps.txt"
EVENTS_FILE = "events/left/events.h5"
RECTIFY_FILE = "events/left/rectify_map.h5"
RECTIFIED_DIR = "images/left/rectified"
WARP_DIR = "warp_images"
LABEL_DIR = "labels"
LABEL_SUFFIX = "_grey_gtFine_labelTrainIds.png"
TRAIN_LIST = "night_dataset_warp.txt"
TEST_LIST = "night_test_dataset_warp.txt"
SEQUENCE_GLOB = "zurich_city_*"

TRAIN_CUTOFFS: dict[str, int] = {
    "zurich_city_09_a": 797,
    "zurich_city_09_b": 149,
    "zurich_city_09_c": 581,
    "zurich_city_09_d": 743,
    "zurich_city_09_e": 365,
}
"""Train frames must have a frame index strictly above these (CMDA's published values)."""

CUTOFF_MARGIN = 13
"""Default cut-off for sequences not in :data:`TRAIN_CUTOFFS`: last labelled frame - 13."""

PREPARE_FIX = "Run `udaseg prepare dsec_night {root}` to build the index files and split lists."

_FRAME_RE = re.compile(r"^(\d+)\.png$")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    atomic_write_text(path, text)


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless ``path`` already holds exactly it; True if written."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    _atomic_write_text(path, text)
    return True


# -- image -> event index -----------------------------------------------------------------------


def images_to_events_index(
    timestamps_us: Sequence[int] | np.ndarray,
    t_offset: int,
    event_t: Any,
    ms_to_idx: np.ndarray,
) -> np.ndarray:
    """Index of the last event at or before each frame (spec 2.3); -1 where there is none.

    For frame ``i``: ``τ = timestamps_us[i] - t_offset``; -1 if ``τ <= 0`` or ``τ`` is after the
    last event. Otherwise ``m = max(floor(τ / 1000) - 1, 0)``, the search window is
    ``[ms_to_idx[m], min(ms_to_idx[m + 2], N - 1)]`` (``N - 1`` when ``m + 2`` is past the end of
    ``ms_to_idx``), and the result is the index of the last event with ``t <= τ`` (a right-side
    binary search in the window, minus one).

    Args:
        timestamps_us: absolute frame times (µs), DSEC's ``images/timestamps.txt``.
        t_offset: the events file's ``t_offset`` (µs).
        event_t: the event timestamps relative to ``t_offset``: an array or the h5py dataset
            (only the windows are read).
        ms_to_idx: the events file's millisecond index.
    """
    ts = np.asarray(timestamps_us, dtype=np.int64)
    ms = np.asarray(ms_to_idx, dtype=np.int64)
    n = len(event_t)
    out = np.full(len(ts), -1, dtype=np.int64)
    if n == 0:
        return out
    t_last = int(event_t[n - 1])
    for i, stamp in enumerate(ts):
        tau = int(stamp) - int(t_offset)
        if tau <= 0 or tau > t_last:
            continue
        m = max(tau // 1000 - 1, 0)
        lo = int(ms[m]) if m < len(ms) else n - 1
        hi = min(int(ms[m + 2]), n - 1) if m + 2 < len(ms) else n - 1
        lo = min(lo, hi)
        window = np.asarray(event_t[lo : hi + 1], dtype=np.int64)
        out[i] = lo + int(np.searchsorted(window, tau, side="right")) - 1
    return out


def read_timestamps(path: Path) -> np.ndarray:
    """DSEC's ``timestamps.txt``: one absolute time in µs per line."""
    if not path.is_file():
        raise FileNotFoundError(
            f"frame timestamps not found: {path}. Download the sequence's image timestamps from "
            "DSEC (zurich_city_09_x_image_timestamps.txt) and save them there."
        )
    try:
        return np.loadtxt(path, dtype=np.int64, ndmin=1, comments="#")
    except ValueError as exc:
        raise DataError(f"cannot parse frame timestamps {path}: {exc}") from None


def read_index(path: Path, root: Path | None = None) -> np.ndarray:
    """Read ``images_to_events_index.txt`` (one int per frame)."""
    if not path.is_file():
        fix = PREPARE_FIX.format(root=root if root is not None else "<root>")
        raise FileNotFoundError(f"image-to-event index not found: {path}. {fix}")
    try:
        return np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as exc:
        fix = PREPARE_FIX.format(root=root if root is not None else "<root>")
        raise DataError(f"cannot parse {path}: {exc}. {fix} with --force") from None


def _is_fresh(out: Path, inputs: Sequence[Path]) -> bool:
    if not out.is_file():
        return False
    t_out = out.stat().st_mtime_ns
    return all(p.stat().st_mtime_ns <= t_out for p in inputs)


def build_sequence_index(seq_dir: str | Path, force: bool = False) -> tuple[Path, bool]:
    """Write ``<seq_dir>/images/images_to_events_index.txt``; returns (path, whether written).

    Skipped when the file exists and is newer than ``images/timestamps.txt`` and
    ``events/left/events.h5`` (unless ``force``).
    """
    seq_dir = Path(seq_dir)
    out = seq_dir / INDEX_FILE
    ts_path, ev_path = seq_dir / TIMESTAMPS_FILE, seq_dir / EVENTS_FILE
    timestamps = read_timestamps(ts_path)
    if not ev_path.is_file():
        raise FileNotFoundError(
            f"events file not found: {ev_path}. Download zurich_city_09_x_events_left.zip from "
            "DSEC and extract it into the sequence folder."
        )
    if not force and _is_fresh(out, [ts_path, ev_path]):
        return out, False
    with EventFile(ev_path) as ev:
        index = images_to_events_index(timestamps, ev.t_offset, ev.t_dataset, ev.ms_to_idx)
    _atomic_write_text(out, "".join(f"{int(i)}\n" for i in index))
    return out, True


# -- split lists --------------------------------------------------------------------------------


def label_path(seq_dir: Path, frame: int) -> Path:
    """``<seq>/labels/<seq>_NNNNNN_grey_gtFine_labelTrainIds.png``."""
    return seq_dir / LABEL_DIR / f"{seq_dir.name}_{frame:06d}{LABEL_SUFFIX}"


def warp_path(seq_dir: Path, frame: int) -> Path:
    """``<seq>/warp_images/NNNNNN.png``: the RGB frame warped into the rectified event frame."""
    return seq_dir / WARP_DIR / f"{frame:06d}.png"


def rectified_relpath(seq: str, frame: int) -> str:
    """The list-file path of a frame, relative to the root (POSIX separators)."""
    return f"{seq}/{RECTIFIED_DIR}/{frame:06d}.png"


def _frames_in(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _FRAME_RE.match(p.name)))


def labelled_frames(seq_dir: Path) -> list[int]:
    """Frame indices that have a label file."""
    folder = seq_dir / LABEL_DIR
    if not folder.is_dir():
        return []
    pat = re.compile(rf"^{re.escape(seq_dir.name)}_(\d+){re.escape(LABEL_SUFFIX)}$")
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := pat.match(p.name)))


def train_cutoff(seq_dir: Path) -> int:
    """The frame index train frames must exceed (see :data:`TRAIN_CUTOFFS` and the module doc)."""
    if seq_dir.name in TRAIN_CUTOFFS:
        return TRAIN_CUTOFFS[seq_dir.name]
    labelled = labelled_frames(seq_dir)
    return labelled[-1] - CUTOFF_MARGIN if labelled else -1


def find_sequences(root: str | Path) -> list[Path]:
    """The sequence folders ``<root>/zurich_city_*``; an error naming the root when none exist."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dsec_night root {root} does not exist. Expected <root>/zurich_city_09_[a-e]/ "
            "with events/, images/, warp_images/ and labels/ (DSEC Night-Semantic layout)."
        )
    seqs = sorted(p for p in root.glob(SEQUENCE_GLOB) if p.is_dir())
    if not seqs:
        raise FileNotFoundError(
            f"dsec_night root {root} holds no sequence folder zurich_city_*. Expected "
            "<root>/zurich_city_09_[a-e]/ with events/, images/, warp_images/ and labels/; "
            "download DSEC's events and images for these sequences and CMDA's warp images and "
            "labels into it."
        )
    return seqs


def split_entries(seq_dir: Path, root: Path) -> tuple[list[str], list[str]]:
    """(train lines, test lines) of one sequence, from its index file and folders."""
    index = read_index(seq_dir / INDEX_FILE, root)
    seq, cutoff = seq_dir.name, train_cutoff(seq_dir)

    def idx(frame: int) -> int:
        return int(index[frame]) if frame < len(index) else -1

    train = [
        f"{rectified_relpath(seq, f)} {idx(f)}"
        for f in _frames_in(seq_dir / WARP_DIR)
        if f >= 2 and f > cutoff and idx(f) > 0
    ]
    test = [f"{rectified_relpath(seq, f)} {idx(f)}" for f in labelled_frames(seq_dir)]
    return train, test


def build_lists(root: str | Path) -> dict[str, tuple[Path, bool, int]]:
    """Write ``night_dataset_warp.txt`` and ``night_test_dataset_warp.txt`` under ``root``.

    Needs the per-sequence index files (:func:`build_sequence_index`). A list is rewritten only
    when its content changes. Returns ``{"train"|"test": (path, written, number of lines)}``.
    """
    root = Path(root)
    train: list[str] = []
    test: list[str] = []
    for seq_dir in find_sequences(root):
        tr, te = split_entries(seq_dir, root)
        train += tr
        test += te
    result = {}
    for split, name, lines in (("train", TRAIN_LIST, train), ("test", TEST_LIST, test)):
        path = root / name
        written = _write_if_changed(path, "".join(f"{line}\n" for line in lines))
        result[split] = (path, written, len(lines))
    return result


@dataclass(frozen=True)
class PrepareReport:
    """What :func:`prepare_dsec` did."""

    index_files: list[tuple[Path, bool]]
    lists: dict[str, tuple[Path, bool, int]]

    def lines(self) -> list[str]:
        out = [f"{'wrote' if w else 'up to date'}: {p}" for p, w in self.index_files]
        out += [
            f"{'wrote' if w else 'up to date'}: {p} ({n} {split} frames)"
            for split, (p, w, n) in self.lists.items()
        ]
        return out


def prepare_dsec(
    root: str | Path, force: bool = False, log: Callable[[str], None] | None = None
) -> PrepareReport:
    """Build every sequence's index file, then both split lists (``udaseg prepare dsec_night``).

    Args:
        root: the DSEC Night-Semantic root holding ``zurich_city_09_*``.
        force: rebuild the index files even when they look up to date.
        log: called with one line per file (e.g. ``print``).
    """
    root = Path(root)
    index_files = []
    for seq_dir in find_sequences(root):
        index_files.append(build_sequence_index(seq_dir, force=force))
        if log is not None:
            path, written = index_files[-1]
            log(f"{'wrote' if written else 'up to date'}: {path}")
    lists = build_lists(root)
    report = PrepareReport(index_files, lists)
    if log is not None:
        for line in report.lines()[len(index_files) :]:
            log(line)
    return report
