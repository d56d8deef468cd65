"""DSEC Night-Semantic (CMDA, Xia et al., ICCV 2023) in its on-disk layout (spec section 2.2).

::

    <root>/night_dataset_warp.txt, night_test_dataset_warp.txt      (udaseg prepare dsec_night <root>)
    <root>/zurich_city_09_x/events/left/events.h5                    (DSEC events, distorted)
    <root>/zurich_city_09_x/events/left/rectify_map.h5               (distorted -> rectified)
    <root>/zurich_city_09_x/images/timestamps.txt                    (µs, one per frame)
    <root>/zurich_city_09_x/images/images_to_events_index.txt        (udaseg prepare dsec_night <root>)
    <root>/zurich_city_09_x/warp_images/NNNNNN.png                   (RGB in the event frame)
    <root>/zurich_city_09_x/labels/zurich_city_09_x_NNNNNN_grey_gtFine_labelTrainIds.png

The sample's ``image`` is the warp image (the RGB frame warped into the rectified event camera
frame, 640x480 in DSEC), the ``events`` view is the CMDA event tensor
(:func:`udaseg.data.events.event_tensor`) of the events with index in
``[idx(frame - 1), idx(frame)]`` (both ends included; about 50 ms at DSEC's 20 Hz), as a float
(C, H, W) tensor in [-1, 1] (C = 3 replicated channels for ``events_bins = 1``, else B).
The event grid size is the rectify map's size and must equal the warp image's size.

Labels are Cityscapes train IDs with 18 classes (no *truck*); score them with the ``dsec18``
label set (:data:`udaseg.data.classes.LABEL_SETS`). The test split keeps the first
``crop_rows`` (440) rows of the image, the events and the label, as CMDA does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ...errors import ConfigError
from ..dsec_index import (
    EVENTS_FILE,
    INDEX_FILE,
    PREPARE_FIX,
    RECTIFY_FILE,
    TEST_LIST,
    TRAIN_LIST,
    find_sequences,
    label_path,
    read_index,
    warp_path,
)
from ..events import CLIP_SCALE, EventFile, event_tensor, read_rectify_map
from ..io import DataError
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing

VIEW_CHOICES = ("events",)
SPLIT_LISTS = {"train": TRAIN_LIST, "test": TEST_LIST}
TEST_CROP_ROWS = 440


def parse_list_line(line: str, list_path: Path) -> tuple[str, int, int]:
    """``<path>/<seq>/images/left/rectified/NNNNNN.png <event index>`` -> (seq, frame, index).

    The path may be relative (udaseg) or absolute (CMDA's own lists); only its last five
    components are used.
    """
    parts = line.split()
    try:
        p = PurePosixPath(parts[0].replace("\\", "/"))
        if len(parts) != 2 or len(p.parts) < 5 or p.parts[-4:-1] != ("images", "left", "rectified"):
            raise ValueError
        return p.parts[-5], int(p.stem), int(parts[1])
    except (ValueError, IndexError):
        raise DataError(
            f"list {list_path}: cannot parse line {line!r}; expected "
            "'<seq>/images/left/rectified/NNNNNN.png <event index>'. "
            + PREPARE_FIX.format(root=list_path.parent)
        ) from None


class DSECNightSemantic(SegmentationDataset):
    """DSEC Night-Semantic frames of one split with their event tensors.

    Args:
        root: the dataset root holding ``zurich_city_09_*`` and the split lists.
        split: ``train`` (unlabelled target frames, 1,692 in the release) or ``test`` (150
            labelled frames).
        labels: load the label of each frame (only test frames have one).
        views: extra views; ``"events"`` adds the event tensor. ``()`` gives images only.
        events_bins: time bins B of the voxel grid (CMDA: 1).
        crop_rows: the test split keeps the first ``crop_rows`` rows (CMDA: 440); None keeps all.
            The train split is never cropped here (its random crop is in the pipeline).
        clip_scale: adaptive clip per event of the normalisation (CMDA: 1.5 / 500000).
        transform: the joint transform.
    """

    dataset_name = "dsec_night"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        labels: bool = True,
        views: Sequence[str] = ("events",),
        events_bins: int = 1,
        crop_rows: int | None = TEST_CROP_ROWS,
        clip_scale: float = CLIP_SCALE,
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        if split not in SPLIT_LISTS:
            raise ConfigError(
                f"dsec_night: unknown split {split!r}; choose from {sorted(SPLIT_LISTS)}"
            )
        unknown = [v for v in views if v not in VIEW_CHOICES]
        if unknown:
            raise ConfigError(f"dsec_night: unknown views {unknown}; choose from {VIEW_CHOICES}")
        if events_bins < 1:
            raise ConfigError(f"dsec_night: events_bins must be >= 1, got {events_bins}")
        self.split = split
        self.with_events = "events" in views
        self.events_bins = events_bins
        self.clip_scale = clip_scale
        self.crop_rows = crop_rows if split == "test" else None

        known = {p.name for p in find_sequences(self.root)}
        list_path = self.root / SPLIT_LISTS[split]
        if not list_path.is_file():
            raise FileNotFoundError(
                f"dsec_night {split} list not found: {list_path}. "
                + PREPARE_FIX.format(root=self.root)
            )
        entries = [
            parse_list_line(line, list_path)
            for line in list_path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        absent = sorted({seq for seq, _, _ in entries} - known)
        if absent:
            raise FileNotFoundError(
                f"dsec_night: {list_path} names sequence folder(s) {absent} that do not exist "
                f"under {self.root}. Download them, or rebuild the lists: "
                + PREPARE_FIX.format(root=self.root)
            )
        seqs = sorted({seq for seq, _, _ in entries})
        self._index = {s: read_index(self.root / s / INDEX_FILE, self.root) for s in seqs}

        records: list[Record] = []
        windows: list[tuple[str, int, int]] = []
        missing: list[str] = []
        for seq, frame, ev_idx in entries:
            seq_dir = self.root / seq
            index = self._index[seq]
            if frame >= len(index) or int(index[frame]) != ev_idx:
                raise DataError(
                    f"dsec_night: {list_path} gives event index {ev_idx} for {seq} frame {frame} "
                    f"but {seq_dir / INDEX_FILE} disagrees; the list is stale. "
                    + PREPARE_FIX.format(root=self.root)
                )
            image = warp_path(seq_dir, frame)
            if not image.is_file():
                missing.append(f"{seq} frame {frame} -> {image}")
            label = None
            if labels:
                label = label_path(seq_dir, frame)
                if not label.is_file():
                    missing.append(f"{seq} frame {frame} -> {label}")
            prev = int(index[frame - 1]) if frame >= 1 else 0
            windows.append((seq, max(prev, 0), ev_idx))
            records.append(Record(name=f"{seq}_{frame:06d}", image=image, label=label))
        report_missing(
            missing,
            f"dsec_night {split} frames lack their warp image or label",
            "Download CMDA's warp_images and labels into each sequence folder; the train split "
            "has no labels (use labels: false).",
        )

        self._events: dict[str, EventFile] = {}
        self._rmaps: dict[str, np.ndarray] = {}
        if self.with_events:
            files = []
            for seq in seqs:
                files += [self.root / seq / EVENTS_FILE, self.root / seq / RECTIFY_FILE]
            report_missing(
                [str(p) for p in files if not p.is_file()],
                "DSEC event files are missing",
                "Download zurich_city_09_x_events_left.zip (events.h5 and rectify_map.h5) from "
                "DSEC and extract it to <root>/<sequence>/events/left/, or drop the events view.",
            )
            for seq in seqs:  # validate the layout now; handles reopen lazily in each worker
                ev = EventFile(self.root / seq / EVENTS_FILE)
                ev.close()
                self._events[seq] = ev
        self._windows = windows
        super().__init__(records, transform)

    def rectify_map(self, seq: str) -> np.ndarray:
        """The sequence's (H, W, 2) rectify map (read once)."""
        if seq not in self._rmaps:
            self._rmaps[seq] = read_rectify_map(self.root / seq / RECTIFY_FILE)
        return self._rmaps[seq]

    def event_window(self, index: int) -> tuple[str, int, int]:
        """(sequence, first, last) event indices of sample ``index`` (both included; last < 0:
        the frame has no events before it and the tensor is all zeros)."""
        return self._windows[index]

    def events(self, index: int) -> np.ndarray:
        """The (H, W, C) float32 event tensor of sample ``index`` (uncropped)."""
        seq, first, last = self._windows[index]
        rmap = self.rectify_map(seq)
        ev = self._events[seq]
        stop = last + 1 if last >= 0 else first
        channels = 3 if self.events_bins == 1 else None
        return event_tensor(
            ev,
            first,
            stop,
            rectify_map=rmap,
            bins=self.events_bins,
            channels=channels,
            clip_scale=self.clip_scale,
        )

    def load(self, index: int) -> Sample:
        sample = super().load(index)
        if self.with_events:
            ev = self.events(index)
            if ev.shape[:2] != tuple(sample["image"].shape[-2:]):
                rec = self.records[index]
                h, w = ev.shape[:2]
                raise DataError(
                    f"dsec_night: warp image {rec.image} is {sample['image'].shape[-1]}x"
                    f"{sample['image'].shape[-2]} (WxH) but the rectified event frame of its "
                    f"sequence is {w}x{h}; warp images must be in the rectified event camera "
                    "frame (640x480 for DSEC)."
                )
            sample["events"] = torch.from_numpy(ev).permute(2, 0, 1).contiguous()
        if self.crop_rows is not None:
            rows = self.crop_rows
            for key in ("image", "label", "events"):
                if key in sample:
                    sample[key] = sample[key][..., :rows, :].contiguous()
            sample["ori_size"] = torch.tensor(sample["image"].shape[-2:])
        return sample
