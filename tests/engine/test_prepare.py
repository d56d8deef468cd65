"""`udaseg prepare`: conversion + RCS statistics + index, idempotent, and a check that lists
every problem of a broken copy instead of stopping at the first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from udaseg.engine.prepare import prepare_dataset
from udaseg.engine.cli import main

from ..conftest import write_png
from ..data.test_convert import write_palette_png
from ..data.test_dsec import make_sequence


def raw_cityscapes(root: Path) -> Path:
    """2 train + 1 val images with raw labelIds (7 road, 26 car, 0 unlabelled)."""
    ids = np.zeros((16, 32), np.uint8)
    ids[:8] = 7
    ids[8:, :16] = 26
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            stem = f"aachen_{i:06d}_000019"
            write_png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                      np.full((16, 32, 3), 100, np.uint8))
            write_png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", ids)
    return root


def quiet(**kw):
    return dict(progress=False, workers=1, log=lambda line: None, **kw)


def test_cityscapes_prepare_converts_writes_stats_and_is_idempotent(tmp_path):
    root = raw_cityscapes(tmp_path / "cityscapes")
    res = prepare_dataset("cityscapes", root, **quiet())
    assert res.check.ok, res.check.format()
    counts = {s.split: (s.images, s.labels) for s in res.check.splits}
    assert counts == {"train": (2, 2), "val": (1, 1), "test": (0, 0)}
    # the server-scored test split was not downloaded: a note, not a problem
    assert "not present (optional)" in res.check.splits[2].notes[0]
    from PIL import Image

    lab = np.array(Image.open(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"))
    assert (lab[:8] == 0).all() and (lab[8:, :16] == 13).all() and (lab[8:, 16:] == 255).all()
    stats = json.loads((root / "sample_class_stats.json").read_text())
    assert stats[0] == {"0": 256, "13": 128, "file": "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"}

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = prepare_dataset("cityscapes", root, **quiet())
    assert any("0 written, 3 already done" in line for line in again.lines)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes


def test_check_only_writes_nothing_and_reports_missing_labels(tmp_path):
    root = raw_cityscapes(tmp_path / "cityscapes")
    before = sorted(root.rglob("*"))
    res = prepare_dataset("cityscapes", root, check_only=True, **quiet())
    assert sorted(root.rglob("*")) == before
    assert not res.check.ok
    assert "have no train-ID label" in res.check.format() and "udaseg prepare" in res.check.format()
    assert {s.split: s.images for s in res.check.splits} == {"train": 2, "val": 1, "test": 0}


def test_check_lists_every_problem_of_a_broken_copy(tmp_path):
    root = raw_cityscapes(tmp_path / "cityscapes")
    prepare_dataset("cityscapes", root, **quiet())
    train = root / "gtFine/train/aachen"
    # 1) truncated label, 2) wrong-size label in val, 3) an image without its label
    lab0 = train / "aachen_000000_000019_gtFine_labelTrainIds.png"
    lab0.write_bytes(lab0.read_bytes()[:40])
    write_png(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
              np.zeros((8, 8), np.uint8))
    write_png(root / "leftImg8bit/train/aachen/aachen_000009_000019_leftImg8bit.png",
              np.zeros((16, 32, 3), np.uint8))
    res = prepare_dataset("cityscapes", root, check_only=True, **quiet())
    text = "\n".join(res.check.problems)
    assert "aachen_000009_000019" in text  # missing partner
    assert "cannot read label" in text and str(lab0) in text  # truncated
    assert "has size 8x8" in text  # wrong size, in the other split: the check did not stop
    assert len(res.check.problems) == 3


def test_cli_prepare_exit_codes_and_summary(tmp_path, capsys):
    root = raw_cityscapes(tmp_path / "cityscapes")
    assert main(["prepare", "cityscapes", str(root), "--check", "--quiet"]) == 1
    assert main(["prepare", "cityscapes", str(root), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "OK" in out
    assert main(["prepare", "cityscapes", str(tmp_path / "nope"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_gta_prepare_notes_resized_labels(tmp_path):
    root = tmp_path / "gta"
    ids = np.full((16, 32), 7, np.uint8)
    for i, (h, w) in enumerate([(16, 32), (18, 36)]):  # the second label is larger, same aspect
        write_png(root / "images" / f"{i:05d}.png", np.zeros((16, 32, 3), np.uint8))
        write_palette_png(root / "labels" / f"{i:05d}.png", np.resize(ids, (h, w)))
    res = prepare_dataset("gta", root, **quiet())
    assert res.check.ok, res.check.format()
    notes = res.check.splits[0].notes
    assert len(notes) == 1 and "00001_labelTrainIds.png is 18x36" in notes[0]
    assert (root / "sample_class_stats.json").is_file()


def test_dsec_prepare_builds_index_and_lists(tmp_path):
    root = tmp_path / "DSEC_Night"
    make_sequence(root, "zurich_city_99_a", 20, list(range(10)), [5, 19], seed=2)
    res = prepare_dataset("dsec_night", root, **quiet())
    assert (root / "zurich_city_99_a/images/images_to_events_index.txt").is_file()
    assert (root / "night_dataset_warp.txt").is_file() and res.check.ok, res.check.format()
    assert {s.split: (s.images, s.labels) for s in res.check.splits} == {"train": (3, 0), "test": (2, 2)}
    again = prepare_dataset("dsec_night", root, **quiet())
    assert all(line.startswith("up to date") for line in again.lines)


def test_unknown_dataset_is_a_config_error(tmp_path):
    from udaseg.errors import ConfigError

    with pytest.raises(ConfigError, match="choose from cityscapes"):
        prepare_dataset("kitti", tmp_path, **quiet())
