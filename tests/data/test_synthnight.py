"""Tests of the SynthNight generator (udaseg.data.synthnight): small sizes, a handful of images."""

from __future__ import annotations

import io
import json
from dataclasses import fields, replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from udaseg.data.classes import IGNORE_INDEX, NUM_CLASSES
from udaseg.data.synthnight import (
    GENERATOR_VERSION,
    NightParams,
    NightStyle,
    SynthNightConfig,
    generate,
    make_sample,
    read_events_h5,
    render,
    sample_paths,
    scene,
)
from udaseg.data.synthnight.writer import META_NAME, _rng, png_bytes

TINY = SynthNightConfig(
    seed=3, width=64, height=32, n_day_train=3, n_day_val=2, n_night_train=3, n_night_val=2
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("sn") / "copy", TINY, workers=0, progress=False)


def _luma(img: np.ndarray) -> float:
    return render.image_luminance(img)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(tiny_copy, tmp_path):
    again = generate(
        tmp_path / "again", TINY, workers=2, progress=False
    )  # also: pool == in-process
    a, b = _files(tiny_copy), _files(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_different_seed_gives_different_images(tiny_copy, tmp_path):
    other = generate(tmp_path / "other", replace(TINY, seed=4), workers=0, progress=False)
    a, b = _files(tiny_copy), _files(other)
    assert a.keys() == b.keys()
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_splits_draw_from_independent_streams():
    more_day = replace(TINY, n_day_train=10, n_night_val=5)
    for split, i in (("night_train", 1), ("night_val", 0), ("day_val", 1), ("day_train", 2)):
        a, b = make_sample(TINY, split, i), make_sample(more_day, split, i)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    # Day and night scenes are different scenes (unpaired domains).
    assert not np.array_equal(
        make_sample(TINY, "day_train", 0).label, make_sample(TINY, "night_train", 0).label
    )


# ----------------------------------------------------------------------------- layout


def test_layout_paths_and_names(tiny_copy):
    root = tiny_copy
    assert (
        root / "cityscapes/leftImg8bit/train/synthburg/synthburg_000000_000019_leftImg8bit.png"
    ).is_file()
    assert (
        root / "cityscapes/gtFine/train/synthburg/synthburg_000000_000019_gtFine_labelTrainIds.png"
    ).is_file()
    assert (
        root / "cityscapes/leftImg8bit/val/voxelhaven/voxelhaven_000000_000019_leftImg8bit.png"
    ).is_file()
    dz = root / "dark_zurich"
    assert (dz / "rgb_anon/train/night/GOPR0001/GOPR0001_frame_000000_rgb_anon.png").is_file()
    assert (
        dz / "rgb_anon/train_ref/day/GOPR0001_ref/GOPR0001_frame_000000_ref_rgb_anon.png"
    ).is_file()
    assert (dz / "rgb_anon/val/night/GOPR0005/GOPR0005_frame_000001_rgb_anon.png").is_file()
    assert (
        dz / "rgb_anon/val_ref/day/GOPR0005_ref/GOPR0005_frame_000001_ref_rgb_anon.png"
    ).is_file()
    assert (dz / "gt/val/night/GOPR0005/GOPR0005_frame_000000_gt_labelTrainIds.png").is_file()
    assert (dz / "depth_any/train/night/GOPR0003/GOPR0003_frame_000000_depth.png").is_file()
    assert (dz / "events/val/night/GOPR0005/GOPR0005_frame_000001_events.h5").is_file()
    assert not (dz / "gt/train").exists()  # Dark Zurich has no train labels
    # Every listed file exists and the counts match the config.
    for split in ("day_train", "day_val", "night_train", "night_val"):
        for i in range(TINY.count(split)):
            for key, rel in sample_paths(split, i).items():
                expected = not (key == "label" and split == "night_train")
                assert (root / rel).is_file() == expected, rel
    assert len(list((root / "cityscapes/leftImg8bit/train").rglob("*.png"))) == TINY.n_day_train
    assert len(list((dz / "rgb_anon/val/night").rglob("*.png"))) == TINY.n_night_val
    meta = json.loads((root / META_NAME).read_text())
    assert meta["generator"] == "synthnight" and meta["version"] == GENERATOR_VERSION
    assert meta["seed"] == TINY.seed and meta["size"] == [TINY.width, TINY.height]
    assert meta["counts"] == {"day_train": 3, "day_val": 2, "night_train": 3, "night_val": 2}
    assert set(meta["night_style"]) == {f.name for f in fields(NightStyle)}


def test_png_modes_and_sizes(tiny_copy):
    img = Image.open(next((tiny_copy / "cityscapes/leftImg8bit").rglob("*.png")))
    lab = Image.open(next((tiny_copy / "cityscapes/gtFine").rglob("*.png")))
    dep = Image.open(next((tiny_copy / "dark_zurich/depth_any").rglob("*.png")))
    assert (img.mode, img.size) == ("RGB", (64, 32))
    assert (lab.mode, lab.size) == ("L", (64, 32))
    assert (dep.mode, dep.size) == ("L", (64, 32))


def test_png_encoder_round_trips():
    rng = np.random.default_rng(0)
    for a in (
        rng.integers(0, 256, (7, 11, 3), dtype=np.uint8),
        rng.integers(0, 256, (5, 9), dtype=np.uint8),
    ):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(a, 1)))), a)


# ----------------------------------------------------------------------------- labels


def test_labels_are_train_ids_and_cover_many_classes():
    cfg = replace(TINY, width=128, height=64, with_events=False, with_refs=False)
    seen: set[int] = set()
    for i in range(12):
        label = make_sample(cfg, "day_train", i).label
        values = set(np.unique(label).tolist())
        assert values <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
        seen |= values
    assert len(seen - {IGNORE_INDEX}) >= 15, sorted(seen)


def test_label_files_hold_train_ids(tiny_copy):
    for p in (tiny_copy / "dark_zurich/gt").rglob("*.png"):
        values = set(np.unique(np.asarray(Image.open(p))).tolist())
        assert values <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}


# ----------------------------------------------------------------------------- rendering


def _scene(index: int = 0, width: int = 128, height: int = 64):
    cfg = replace(TINY, width=width, height=height)
    layout = scene.sample_layout(
        _rng(cfg, "night_val", index, 0), _rng(cfg, "night_val", index, 1), width, height
    )
    return cfg, layout, scene.rasterize(layout)


def test_night_is_darker_than_day_and_keeps_the_labels():
    for i in range(4):
        cfg, layout, raster = _scene(i)
        day = render.render_day(raster, np.random.default_rng(0))
        sample = make_sample(cfg, "night_val", i)
        assert np.array_equal(sample.label, raster.label)
        assert _luma(sample.image) < 0.6 * _luma(day)
        assert _luma(sample.image) > 5.0  # dark, not black
        # Structure survives: the night image still separates the classes it shows.
        img = sample.image.astype(np.float32).mean(axis=2)
        means = [
            img[raster.label == k].mean()
            for k in np.unique(raster.label)
            if (raster.label == k).sum() > 20
        ]
        assert np.std(means) > 2.0


def test_night_style_sampling_stays_in_range():
    style = NightStyle()
    assert [f.name for f in fields(NightParams)] == [f.name for f in fields(NightStyle)]
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = style.sample(rng)
        for f in fields(style):
            lo, hi = getattr(style, f.name)
            assert lo <= getattr(p, f.name) <= hi


def test_night_defaults_are_documented():
    for f in fields(NightStyle):
        assert f"``{f.name}`` {getattr(NightStyle(), f.name)}" in render.__doc__, f.name


def test_reference_is_misaligned_but_correlated():
    for i in range(3):
        cfg, layout, raster = _scene(i)
        day_same_view = (
            render.render_day(raster, np.random.default_rng(0)).astype(np.float32).mean(axis=2)
        )
        other = (
            render.render_day(_scene(i + 10)[2], np.random.default_rng(0))
            .astype(np.float32)
            .mean(axis=2)
        )
        ref = make_sample(cfg, "night_val", i).reference.astype(np.float32).mean(axis=2)
        assert ref.shape == day_same_view.shape
        corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]  # noqa: E731
        assert np.abs(ref - day_same_view).mean() > 1.0  # not the same view
        assert corr(ref, day_same_view) > corr(ref, other)
        assert corr(ref, day_same_view) > 0.3


def test_depth_png_is_disparity_like():
    cfg, layout, raster = _scene(0)
    depth = make_sample(cfg, "night_val", 0).depth
    assert depth.dtype == np.uint8 and depth.max() == 255
    horizon = int(layout.camera.cy) + 1
    col = int(layout.camera.cx)
    assert raster.label[-1, col] == scene.ROAD
    assert depth[-1, col] > depth[horizon + 1, col]  # the bottom road row is nearer
    assert (depth[raster.label == scene.SKY] == 0).all()  # sky is farthest


# ----------------------------------------------------------------------------- events


def test_events_h5_layout_and_index(tiny_copy):
    path = next((tiny_copy / "dark_zurich/events").rglob("*_events.h5"))
    with h5py.File(path, "r") as f:
        assert f["events/x"].dtype == np.uint16 and f["events/y"].dtype == np.uint16
        assert f["events/t"].dtype == np.uint32 and f["events/p"].dtype == np.uint8
        assert f["ms_to_idx"].dtype == np.uint64 and f["t_offset"].dtype == np.int64
        assert f["t_offset"].shape == ()
    ev = read_events_h5(path)
    t, idx = ev["t"].astype(np.int64), ev["ms_to_idx"].astype(np.int64)
    assert len(t) > 0 and np.all(np.diff(t) >= 0)
    assert t[-1] <= 50_000 and len(idx) == 51
    assert set(np.unique(ev["p"]).tolist()) <= {0, 1}
    assert ev["x"].max() < TINY.width and ev["y"].max() < TINY.height
    for k, i in enumerate(idx):
        if i < len(t):
            assert t[i] >= 1000 * k
        if 0 < i <= len(t):
            assert t[i - 1] < 1000 * k


def test_events_appear_mostly_on_edges():
    cfg, layout, raster = _scene(1, 256, 128)
    sample = make_sample(cfg, "night_val", 1)
    ev = sample.events
    count = np.zeros(raster.label.shape)
    np.add.at(count, (ev.y.astype(int), ev.x.astype(int)), 1)
    # Edges of the scene: label or depth boundaries, dilated by the motion of a few pixels.
    lab = raster.label.astype(int)
    edge = np.zeros(lab.shape, bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:] |= lab[1:] != lab[:-1]
    win = raster.window >= 0
    edge[:, 1:] |= win[:, 1:] != win[:, :-1]
    edge[1:] |= win[1:] != win[:-1]
    for _ in range(3):
        edge[:, 1:] |= edge[:, :-1].copy()
        edge[:, :-1] |= edge[:, 1:].copy()
        edge[1:] |= edge[:-1].copy()
        edge[:-1] |= edge[1:].copy()
    assert count[edge].mean() > 4 * count[~edge].mean()
    assert count[edge].sum() > 0.5 * count.sum()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(width=8), "width and height"),
        (dict(n_night_val=-1), "n_night_val"),
        (dict(seed=-2), "seed"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SynthNightConfig(**bad)


# ----------------------------------------------------------------------------- folder handling


def test_skips_an_identical_complete_copy(tiny_copy):
    before = {p: p.stat().st_mtime_ns for p in tiny_copy.rglob("*") if p.is_file()}
    assert generate(tiny_copy, TINY, workers=0, progress=False) == tiny_copy
    after = {p: p.stat().st_mtime_ns for p in tiny_copy.rglob("*") if p.is_file()}
    assert before == after


def test_refuses_a_folder_that_holds_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tmp_path, TINY, workers=0, progress=False)
    generate(tmp_path, TINY, workers=0, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / META_NAME).is_file()


def test_refuses_a_copy_with_other_parameters(tiny_copy, tmp_path):
    root = generate(tmp_path / "c", TINY, workers=0, progress=False)
    other = replace(TINY, seed=9, n_day_train=1)
    with pytest.raises(FileExistsError, match="other parameters"):
        generate(root, other, workers=0, progress=False)
    generate(root, other, workers=0, progress=False, overwrite=True)
    assert json.loads((root / META_NAME).read_text())["seed"] == 9
    # Stale files of the larger copy are gone.
    assert len(list((root / "cityscapes/leftImg8bit/train").rglob("*.png"))) == 1


def test_an_interrupted_run_is_detected_and_redone(tiny_copy, tmp_path):
    root = generate(tmp_path / "c", TINY, workers=0, progress=False)
    (root / META_NAME).unlink()  # as if killed before the end ...
    (root / ".synthnight.partial").write_text("{}")  # ... of a run that had started
    victim = next((root / "cityscapes/leftImg8bit").rglob("*.png"))
    victim.write_bytes(b"truncated")
    generate(root, TINY, workers=0, progress=False)
    assert _files(root) == _files(tiny_copy)
