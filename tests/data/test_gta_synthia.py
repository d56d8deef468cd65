"""GTA5 and SYNTHIA datasets on miniature copies of their real layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from udaseg.data.convert import convert_dataset
from udaseg.data.datasets.gta import GTA5
from udaseg.data.datasets.synthia import Synthia
from udaseg.data.io import DataError
from udaseg.data.png16 import write_png16
from udaseg.data.rcs import compute_class_stats
from udaseg.errors import ConfigError

from ..conftest import write_png
from .test_convert import CS_RAW, CS_TRAIN, SY_RAW, SY_TRAIN, synthia_label, tile, write_palette_png


def rgb(rng: np.random.Generator, h: int = 16, w: int = 32) -> np.ndarray:
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def tiny_gta(tmp_path: Path) -> Path:
    """3 GTA5 frames (16x32); 00003's label is half size (a GTA5 size mismatch)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "gta"
    for i in (1, 2):
        write_png(root / "images" / f"{i:05d}.png", rgb(rng))
        write_palette_png(root / "labels" / f"{i:05d}.png", tile(CS_RAW))
    write_png(root / "images" / "00003.png", rgb(rng))
    write_palette_png(root / "labels" / "00003.png", np.tile(CS_RAW, (4, 4)))  # 8x16
    assert convert_dataset("gta", root, workers=1, progress=False).converted == 3
    return root


@pytest.fixture
def tiny_synthia(tmp_path: Path) -> Path:
    """2 SYNTHIA-RAND-CITYSCAPES images (16x32) with 16-bit labels."""
    rng = np.random.default_rng(1)
    root = tmp_path / "synthia"
    for i in range(2):
        write_png(root / "RGB" / f"{i:07d}.png", rgb(rng))
        write_png16(root / "GT" / "LABELS" / f"{i:07d}.png", synthia_label(tile(SY_RAW), i), 4)
    assert convert_dataset("synthia", root, workers=1, progress=False).converted == 2
    return root


def test_gta_lists_and_loads(tiny_gta):
    ds = GTA5(tiny_gta)
    assert len(ds) == 3 and [r.name for r in ds.records] == ["00001", "00002", "00003"]
    assert ds.records[0].label == tiny_gta / "labels" / "00001_labelTrainIds.png"
    s = ds[0]
    assert s["image"].shape == (3, 16, 32) and s["label"].dtype == torch.int64
    assert torch.equal(s["label"], torch.from_numpy(tile(CS_TRAIN).astype(np.int64)))
    assert s["name"] == "00001" and s["ori_size"].tolist() == [16, 32]
    assert len(GTA5(tiny_gta, split="all")) == 3
    assert GTA5(tiny_gta, labels=False).records[0].label is None


def test_gta_size_mismatch_label_is_resized(tiny_gta):
    s = GTA5(tiny_gta)[2]
    half = np.tile(CS_TRAIN, (4, 4))
    expected = np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)  # nearest, 8x16 -> 16x32
    assert s["label"].shape == (16, 32)
    assert torch.equal(s["label"], torch.from_numpy(expected.astype(np.int64)))


def test_gta_aspect_mismatch_is_an_error(tiny_gta):
    write_png(tiny_gta / "labels" / "00002_labelTrainIds.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match=r"(?s)00002_labelTrainIds.png.*images/00002.png.*aspect"):
        GTA5(tiny_gta)[1]


def test_gta_missing_train_ids_names_file_and_prepare(tiny_gta):
    (tiny_gta / "labels" / "00002_labelTrainIds.png").unlink()
    with pytest.raises(
        DataError,
        match=r"(?s)1 gta images.*00002_labelTrainIds.png.*udaseg "
        r"prepare gta",
    ):
        GTA5(tiny_gta)


def test_gta_bad_root_and_split(tmp_path, tiny_gta):
    with pytest.raises(FileNotFoundError, match=r"images does not exist.*Expected <root>/images"):
        GTA5(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        GTA5(tiny_gta, split="val")


def test_gta_rcs_stats_relative_paths(tiny_gta):
    stats = compute_class_stats(GTA5(tiny_gta))
    assert stats[0]["file"] == "labels/00001_labelTrainIds.png"
    assert stats[0][0] == 8 * 8 and 255 not in stats[0]  # road: one pixel per 2x4 block


def test_synthia_lists_and_loads(tiny_synthia):
    ds = Synthia(tiny_synthia)
    assert len(ds) == 2 and [r.name for r in ds.records] == ["0000000", "0000001"]
    s = ds[1]
    assert s["image"].shape == (3, 16, 32)
    assert torch.equal(s["label"], torch.from_numpy(tile(SY_TRAIN).astype(np.int64)))
    assert not set(s["label"].unique().tolist()) & {9, 14, 16}  # no terrain/truck/train
    assert len(Synthia(tiny_synthia, labels=False)) == 2


def test_synthia_missing_train_ids_names_file_and_prepare(tiny_synthia):
    (tiny_synthia / "GT" / "LABELS" / "0000000_labelTrainIds.png").unlink()
    with pytest.raises(DataError, match=r"(?s)0000000_labelTrainIds.png.*udaseg prepare synthia"):
        Synthia(tiny_synthia)


def test_synthia_bad_root_and_split(tmp_path, tiny_synthia):
    with pytest.raises(FileNotFoundError, match=r"RGB does not exist.*SYNTHIA_RAND_CITYSCAPES"):
        Synthia(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown split"):
        Synthia(tiny_synthia, split="val")
