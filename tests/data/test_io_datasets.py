from pathlib import Path

import numpy as np
import pytest
import torch

from udaseg.data.datasets import Cityscapes, DarkZurich
from udaseg.data.io import DataError, read_image, read_label
from udaseg.data.transforms import PipelineConfig

from ..conftest import write_png


def test_cityscapes_lists_pairs_and_loads(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "train")
    assert len(ds) == 3
    s = ds[0]
    assert s["image"].shape == (3, 32, 64) and s["image"].dtype == torch.float32
    assert s["label"].shape == (32, 64) and s["label"].dtype == torch.int64
    assert s["name"] == "aachen_000000_000019"
    raw = read_label(ds.records[0].label)
    assert torch.equal(s["label"], torch.from_numpy(raw.astype(np.int64)))


def test_dark_zurich_views_and_labels(tiny_dark_zurich):
    ds = DarkZurich(tiny_dark_zurich, "val", views=("ref", "depth"))
    s = ds[1]
    assert s["ref"].shape == (3, 32, 64) and s["depth"].shape == (1, 32, 64)
    assert s["label"].shape == (32, 64)
    # views go through the same geometry as the image
    t = PipelineConfig(scale=(32, 16), crop_size=(8, 8), flip_prob=1.0).train()
    ds.transform = t
    torch.manual_seed(0)
    out = ds[1]
    assert out["image"].shape == out["ref"].shape == (3, 8, 8) and out["label"].shape == (8, 8)


def test_missing_root_names_folder_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.*does not exist.*Expected"):
        Cityscapes(tmp_path / "nowhere", "train")


def test_image_without_label_is_reported(tiny_cityscapes):
    lab = next((tiny_cityscapes / "gtFine/train/aachen").glob("*.png"))
    lab.unlink()
    with pytest.raises(DataError, match=r"(?s)1 cityscapes train images have no train-ID label.*udaseg prepare"):
        Cityscapes(tiny_cityscapes, "train")


def test_empty_split(tiny_cityscapes):
    (tiny_cityscapes / "leftImg8bit" / "test").mkdir()
    with pytest.raises(DataError, match="empty"):
        Cityscapes(tiny_cityscapes, "test", labels=False)


def test_label_values_outside_table(tmp_path):
    p = write_png(tmp_path / "l.png", np.full((4, 4), 33, np.uint8))
    with pytest.raises(DataError, match=r"l.png holds values \[33\].*udaseg prepare"):
        read_label(p)


def test_label_size_mismatch(tmp_path):
    p = write_png(tmp_path / "l.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"size 4x4.*5x4"):
        read_label(p, expected_size=(5, 4))


def test_truncated_png(tmp_path):
    p = write_png(tmp_path / "img.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*img.png"):
        read_image(p)


def test_colour_label_rejected(tmp_path):
    p = write_png(tmp_path / "c.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="mode 'RGB'"):
        read_label(p)


def test_paths_with_split_names_in_root(tmp_path):
    # a data root containing "val" and "night" must not confuse path construction
    from ..conftest import random_label

    root = tmp_path / "val_night_data" / "dark_zurich"
    rng = np.random.default_rng(0)
    stem = "GOPR0001_frame_000001"
    write_png(root / "rgb_anon/val/night/GOPR0001" / f"{stem}_rgb_anon.png", np.zeros((8, 8, 3), np.uint8))
    write_png(root / "gt/val/night/GOPR0001" / f"{stem}_gt_labelTrainIds.png", random_label(rng, 8, 8))
    assert len(DarkZurich(root, "val")) == 1
    assert isinstance(root, Path)


def test_cityscapes_ic_view_is_grey_and_named_like_the_image(tiny_cityscapes):
    rng = np.random.default_rng(3)
    ic = rng.integers(0, 255, (32, 64), dtype=np.uint8)
    for img in (tiny_cityscapes / "leftImg8bit/train/aachen").glob("*.png"):
        write_png(tiny_cityscapes / "leftImg8bit_IC1/train/aachen" / img.name, ic)
    s = Cityscapes(tiny_cityscapes, "train", views=("ic",))[0]
    assert s["ic"].shape == (1, 32, 64) and torch.equal(s["ic"][0], torch.from_numpy(ic).float())
    next((tiny_cityscapes / "leftImg8bit_IC1/train/aachen").glob("*.png")).unlink()
    with pytest.raises(DataError, match=r"(?s)leftImg8bit_IC1.*drop the view"):
        Cityscapes(tiny_cityscapes, "train", views=("ic",))
