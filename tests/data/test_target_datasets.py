"""Target / evaluation datasets in miniature copies of their real on-disk layouts.

ACDC, Nighttime Driving, BDD100K-night and the Dark Zurich extensions (test-split reference
lookup, train pairs CSV, invalid masks). Files are 16x32 with the real name patterns and label
encodings (train IDs 0..18 and 255; invalid masks 0/255).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from udaseg.data.datasets.acdc import ACDC
from udaseg.data.datasets.bdd100k_night import BDD100kNight, read_night_list, shipped_night_list
from udaseg.data.datasets.dark_zurich import DarkZurich
from udaseg.data.datasets.nighttime_driving import NighttimeDriving
from udaseg.data.io import DataError, read_image, read_label

from ..conftest import random_label, write_png

H, W = 16, 32

# ACDC: (condition, recording, frame indices) of the val split; night has two images.
ACDC_VAL = {
    "fog": ("GOPR0475", (41,)),
    "night": ("GOPR0355", (1, 7)),
    "rain": ("GOPR0402", (12,)),
    "snow": ("GP010122", (3,)),
}


def _rgb(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 255, (H, W, 3), dtype=np.uint8)


def _invalid(rng: np.random.Generator) -> np.ndarray:
    return np.where(rng.random((H, W)) < 0.3, 255, 0).astype(np.uint8)


def _label_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_label(path).astype(np.int64))


def _image_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_image(path)).permute(2, 0, 1).float()


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def tiny_acdc(tmp_path: Path) -> Path:
    """ACDC val for all four conditions (5 images) + night test (2 images), with refs and masks.

    The root path contains "night" and "val" to check structural path building.
    """
    rng = np.random.default_rng(10)
    root = tmp_path / "night_val_runs" / "acdc"
    for cond, (rec, frames) in ACDC_VAL.items():
        for f in frames:
            name = f"{rec}_frame_{f:06d}"
            write_png(root / "rgb_anon" / cond / "val" / rec / f"{name}_rgb_anon.png", _rgb(rng))
            write_png(root / "rgb_anon" / cond / "val_ref" / rec / f"{name}_rgb_ref_anon.png", _rgb(rng))
            write_png(root / "gt" / cond / "val" / rec / f"{name}_gt_labelTrainIds.png", random_label(rng, H, W))
            write_png(root / "gt" / cond / "val" / rec / f"{name}_gt_invGray.png", _invalid(rng))
    for f in (100, 101):
        rec, name = "GOPR0594", f"GOPR0594_frame_{f:06d}"
        write_png(root / "rgb_anon/night/test" / rec / f"{name}_rgb_anon.png", _rgb(rng))
        write_png(root / "rgb_anon/night/test_ref" / rec / f"{name}_rgb_ref_anon.png", _rgb(rng))
    return root


@pytest.fixture
def tiny_nighttime_driving(tmp_path: Path) -> Path:
    """3 test images with coarse train-ID labels in the Nighttime Driving layout."""
    rng = np.random.default_rng(11)
    root = tmp_path / "NighttimeDrivingTest"
    for i in (20, 45, 130):
        stem = f"0_frame_{i:04d}"
        write_png(root / "leftImg8bit/test/night" / f"{stem}_leftImg8bit.png", _rgb(rng))
        lab = random_label(rng, H, W)
        lab[: H // 2] = 255  # coarse labels leave large regions unlabelled
        write_png(root / "gtCoarse_daytime_trainvaltest/test/night" / f"{stem}_gtCoarse_labelTrainIds.png", lab)
    return root


BDD_TRAIN = ("0a0a0b1a-7c39d841", "0d3b6d46-26b7d7e1", "7a8f0fd2-00000000")
BDD_VAL = ("7d2f7975-e0c1c5a7", "9a0f3fa6-1e0d3bb3")


def write_bdd(root: Path, ids: dict[str, Sequence[str]], h: int = H, w: int = W) -> Path:
    """BDD100K's 10k layout: a JPG and a train-ID mask per ``ids[split]`` entry."""
    rng = np.random.default_rng(12)
    for split, split_ids in ids.items():
        for image_id in split_ids:
            img = root / "images/10k" / split / f"{image_id}.jpg"
            img.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img, quality=95)
            mask = root / "labels/sem_seg/masks" / split / f"{image_id}.png"
            write_png(mask, random_label(rng, h, w))
    return root


@pytest.fixture
def tiny_bdd(tmp_path: Path) -> Path:
    """BDD100K 10k: 3 train + 2 val JPGs with masks; ``night_list.txt`` (a custom list, passed
    as ``list_file``) names 2 train + 1 val."""
    root = write_bdd(tmp_path / "bdd100k", {"train": BDD_TRAIN, "val": BDD_VAL})
    (root / "night_list.txt").write_text(
        f"seg/images/train/{BDD_TRAIN[2]}.jpg\n"
        f"seg/images/val/{BDD_VAL[0]}.jpg\n"
        "\n"
        f"seg/images/train/{BDD_TRAIN[0]}.jpg\n"
    )
    return root


DZ_TEST_REC = "GOPR0364"


@pytest.fixture
def tiny_dark_zurich_test(tmp_path: Path) -> Path:
    """Dark Zurich test: 3 night frames whose day references carry extra name parts."""
    rng = np.random.default_rng(13)
    root = tmp_path / "dark_zurich"
    night = root / "rgb_anon/test/night" / DZ_TEST_REC
    refs = root / "rgb_anon/test_ref/day" / f"{DZ_TEST_REC}_ref"
    for f in (1, 2, 3):
        write_png(night / f"{DZ_TEST_REC}_frame_{f:06d}_rgb_anon.png", _rgb(rng))
    # frame 1: two candidates, the sorted first must win
    write_png(refs / f"{DZ_TEST_REC}_frame_000001_GOPR0357_frame_000410_ref_rgb_anon.png", _rgb(rng))
    write_png(refs / f"{DZ_TEST_REC}_frame_000001_GOPR0357_frame_000412_ref_rgb_anon.png", _rgb(rng))
    # frame 2: the exact val-style name exists next to a prefixed one and wins
    write_png(refs / f"{DZ_TEST_REC}_frame_000002_GOPR0357_frame_000100_ref_rgb_anon.png", _rgb(rng))
    write_png(refs / f"{DZ_TEST_REC}_frame_000002_ref_rgb_anon.png", _rgb(rng))
    # frame 3: only a prefixed name
    write_png(refs / f"{DZ_TEST_REC}_frame_000003_GOPR0358_frame_000007_ref_rgb_anon.png", _rgb(rng))
    return root


DZ_PAIRS = {
    ("GOPR0351", "GOPR0351_frame_000001"): ("GOPR0354", "GOPR0354_frame_000123"),
    ("GOPR0351", "GOPR0351_frame_000002"): ("GOPR0354", "GOPR0354_frame_000123"),
    ("GOPR0352", "GOPR0352_frame_000010"): ("GOPR0355", "GOPR0355_frame_000040"),
}


@pytest.fixture
def tiny_dark_zurich_train(tmp_path: Path) -> tuple[Path, Path]:
    """Dark Zurich train: 3 night frames, 2 day frames and the pairs CSV (outside the root)."""
    rng = np.random.default_rng(14)
    root = tmp_path / "dark_zurich"
    lines = []
    for (rec, name), (day_rec, day_name) in DZ_PAIRS.items():
        write_png(root / "rgb_anon/train/night" / rec / f"{name}_rgb_anon.png", _rgb(rng))
        day = root / "rgb_anon/train/day" / day_rec / f"{day_name}_rgb_anon.png"
        if not day.exists():
            write_png(day, _rgb(rng))
        lines.append(f"train/night/{rec}/{name},train/day/{day_rec}/{day_name}")
    pairs = tmp_path / "lists" / "zurich_dn_pair_train.csv"
    pairs.parent.mkdir()
    pairs.write_text("\n".join(lines) + "\n")
    return root, pairs


# ------------------------------------------------------------------------------------------- ACDC


def test_acdc_lists_all_conditions_in_order(tiny_acdc):
    ds = ACDC(tiny_acdc, "val")
    assert ds.conditions == ("fog", "night", "rain", "snow")
    assert len(ds) == 5
    assert ds.condition_of == ["fog", "night", "night", "rain", "snow"]
    assert [r.name for r in ds.records] == [
        "GOPR0475_frame_000041",
        "GOPR0355_frame_000001",
        "GOPR0355_frame_000007",
        "GOPR0402_frame_000012",
        "GP010122_frame_000003",
    ]
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, H, W) and s["label"].shape == (H, W)
        assert s["name"] == ds.records[i].name
        assert torch.equal(s["label"], _label_tensor(ds.records[i].label))
        assert torch.equal(s["image"], _image_tensor(ds.records[i].image))


def test_acdc_condition_selection(tiny_acdc):
    night = ACDC(tiny_acdc, "val", conditions=["night"])
    assert len(night) == 2 and set(night.condition_of) == {"night"}
    assert len(ACDC(tiny_acdc, "val", conditions="snow")) == 1
    # order and duplicates in the argument do not matter
    both = ACDC(tiny_acdc, "val", conditions=["snow", "fog", "snow"])
    assert both.conditions == ("fog", "snow") and both.condition_of == ["fog", "snow"]
    with pytest.raises(ValueError, match=r"unknown conditions \['dusk'\].*fog.*night.*rain.*snow"):
        ACDC(tiny_acdc, "val", conditions=["night", "dusk"])


def test_acdc_ref_and_invalid_views(tiny_acdc):
    ds = ACDC(tiny_acdc, "val", conditions=["night"], views=("ref", "invalid"))
    s = ds[1]
    rec = ds.records[1]
    assert rec.views["ref"].name == "GOPR0355_frame_000007_rgb_ref_anon.png"
    assert rec.views["ref"].parent.parent.name == "val_ref"
    assert s["ref"].shape == (3, H, W) and s["invalid"].shape == (1, H, W)
    assert torch.equal(s["ref"], _image_tensor(rec.views["ref"]))
    raw = np.array(Image.open(rec.views["invalid"]))
    assert torch.equal(s["invalid"][0], torch.from_numpy(raw).float())
    assert set(torch.unique(s["invalid"]).tolist()) <= {0.0, 255.0}


def test_acdc_test_split_is_image_only(tiny_acdc):
    ds = ACDC(tiny_acdc, "test", labels=False, conditions=["night"], views=("ref",))
    assert len(ds) == 2 and ds.records[0].label is None
    s = ds[0]
    assert "label" not in s and s["ref"].shape == (3, H, W)
    with pytest.raises(ValueError, match=r"test split has no public ground truth.*labels=False"):
        ACDC(tiny_acdc, "test", conditions=["night"])
    with pytest.raises(ValueError, match="unknown split 'testing'"):
        ACDC(tiny_acdc, "testing", labels=False)


def test_acdc_unknown_view(tiny_acdc):
    with pytest.raises(ValueError, match=r"unknown views \['depth'\]"):
        ACDC(tiny_acdc, "val", views=("depth",))


def test_acdc_missing_condition_folder_names_it_and_fix(tiny_acdc):
    shutil.rmtree(tiny_acdc / "rgb_anon" / "rain")
    with pytest.raises(FileNotFoundError, match=r"(?s)condition 'rain'.*rgb_anon/rain/val does not exist.*conditions"):
        ACDC(tiny_acdc, "val")
    assert len(ACDC(tiny_acdc, "val", conditions=["fog", "night", "snow"])) == 4


def test_acdc_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rgb_anon.*does not exist.*rgb_anon_trainvaltest.zip"):
        ACDC(tmp_path / "nowhere", "val")


def test_acdc_missing_partner_files(tiny_acdc):
    ref = tiny_acdc / "rgb_anon/night/val_ref/GOPR0355/GOPR0355_frame_000007_rgb_ref_anon.png"
    ref.unlink()
    lab = tiny_acdc / "gt/snow/val/GP010122/GP010122_frame_000003_gt_labelTrainIds.png"
    lab.unlink()
    with pytest.raises(DataError, match=r"(?s)2 acdc val images lack a partner file.*GOPR0355_frame_000007_rgb_ref_anon.png.*gt_trainval.zip"):
        ACDC(tiny_acdc, "val", views=("ref",))
    # labels only: the missing label is still reported, the missing ref is not looked for
    with pytest.raises(DataError, match=r"(?s)^1 acdc val images.*GP010122_frame_000003_gt_labelTrainIds.png"):
        ACDC(tiny_acdc, "val")


def test_acdc_duplicate_names_across_conditions(tiny_acdc):
    src = tiny_acdc / "rgb_anon/night/val/GOPR0355/GOPR0355_frame_000001_rgb_anon.png"
    dst = tiny_acdc / "rgb_anon/fog/val/GOPR0355/GOPR0355_frame_000001_rgb_anon.png"
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    with pytest.raises(DataError, match=r"GOPR0355_frame_000001.*overwrite"):
        ACDC(tiny_acdc, "val", labels=False)


# ------------------------------------------------------------------------------ Nighttime Driving


def test_nighttime_driving_lists_and_loads(tiny_nighttime_driving):
    ds = NighttimeDriving(tiny_nighttime_driving)
    assert ds.split == "test" and len(ds) == 3
    assert [r.name for r in ds.records] == ["0_frame_0020", "0_frame_0045", "0_frame_0130"]
    s = ds[2]
    assert s["image"].shape == (3, H, W)
    assert torch.equal(s["label"], _label_tensor(ds.records[2].label))
    assert (s["label"][: H // 2] == 255).all()
    assert "label" not in NighttimeDriving(tiny_nighttime_driving, labels=False)[0]


def test_nighttime_driving_only_test_split(tiny_nighttime_driving):
    with pytest.raises(ValueError, match=r"unknown split 'val'.*\('test',\)"):
        NighttimeDriving(tiny_nighttime_driving, "val")


def test_nighttime_driving_missing_label_and_root(tiny_nighttime_driving, tmp_path):
    lab = tiny_nighttime_driving / "gtCoarse_daytime_trainvaltest/test/night/0_frame_0045_gtCoarse_labelTrainIds.png"
    lab.unlink()
    with pytest.raises(DataError, match=r"(?s)1 nighttime_driving test images have no coarse.*0_frame_0045_gtCoarse_labelTrainIds.png.*labels=False"):
        NighttimeDriving(tiny_nighttime_driving)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/test/night does not exist.*NighttimeDrivingTest"):
        NighttimeDriving(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------ BDD100K night


def _listed(root: Path) -> dict:
    return {"list_file": root / "night_list.txt"}


def test_bdd_night_lists_listed_images(tiny_bdd):
    ds = BDD100kNight(tiny_bdd, **_listed(tiny_bdd))
    assert len(ds) == 3
    assert [r.name for r in ds.records] == [BDD_TRAIN[0], BDD_TRAIN[2], BDD_VAL[0]]
    for i in range(3):
        s = ds[i]
        assert s["image"].shape == (3, H, W) and s["name"] == ds.records[i].name
        assert torch.equal(s["label"], _label_tensor(ds.records[i].label))
        assert torch.equal(s["image"], _image_tensor(ds.records[i].image))


def test_bdd_night_split_filter_and_list_path(tiny_bdd, tmp_path):
    def names(split):
        return [r.name for r in BDD100kNight(tiny_bdd, split, **_listed(tiny_bdd)).records]

    assert names("train") == [BDD_TRAIN[0], BDD_TRAIN[2]]
    assert names("val") == [BDD_VAL[0]]
    other = tmp_path / "my_list.txt"
    other.write_text(f"images/val/{BDD_VAL[1]}.jpg\n")  # without the seg/ prefix
    assert [r.name for r in BDD100kNight(tiny_bdd, list_file=other).records] == [BDD_VAL[1]]
    with pytest.raises(ValueError, match="unknown split 'night'"):
        BDD100kNight(tiny_bdd, "night")


def test_bdd_night_explicit_missing_list_file_explains_content(tiny_bdd):
    fix = r"nope.txt does not exist.*seg/images/train/<id>.jpg.*list_file"
    with pytest.raises(FileNotFoundError, match=fix):
        BDD100kNight(tiny_bdd, list_file=tiny_bdd / "nope.txt")


def test_bdd_night_malformed_list_line(tiny_bdd):
    with (tiny_bdd / "night_list.txt").open("a") as fh:
        fh.write("seg/images/test/ac6d4f42-00000000.jpg\n")
    with pytest.raises(DataError, match=r"(?s)malformed lines.*line 5: 'seg/images/test/ac6d4f42-00000000.jpg'"):
        BDD100kNight(tiny_bdd, **_listed(tiny_bdd))


def test_bdd_night_missing_mask_image_and_root(tiny_bdd, tmp_path):
    (tiny_bdd / "labels/sem_seg/masks/train" / f"{BDD_TRAIN[2]}.png").unlink()
    (tiny_bdd / "images/10k/val" / f"{BDD_VAL[0]}.jpg").unlink()
    with pytest.raises(DataError, match=rf"(?s)2 bdd100k_night entries.*{BDD_TRAIN[2]}.png.*bdd100k_images_10k.zip"):
        BDD100kNight(tiny_bdd, **_listed(tiny_bdd))
    assert len(BDD100kNight(tiny_bdd, "train", labels=False, **_listed(tiny_bdd))) == 2
    with pytest.raises(FileNotFoundError, match=r"images/10k does not exist.*bdd100k_sem_seg_labels"):
        BDD100kNight(tmp_path / "nowhere")


def test_shipped_night_list_is_refigns_87_images():
    entries = read_night_list(shipped_night_list())
    assert len(entries) == len(set(entries)) == 87
    assert sum(s == "train" for s, _ in entries) == 74 and sum(s == "val" for s, _ in entries) == 13
    assert ("train", "00aad4a0-ee8135fe") in entries and ("val", "a5fa7888-00000000") in entries


@pytest.fixture(scope="module")
def plain_bdd(tmp_path_factory) -> Path:
    """A plain BDD100K download holding just the 87 shipped night ids (8x16) and no list file."""
    ids: dict[str, list[str]] = {"train": [], "val": []}
    for split, image_id in read_night_list(shipped_night_list()):
        ids[split].append(image_id)
    return write_bdd(tmp_path_factory.mktemp("plain") / "bdd100k", ids, h=8, w=16)


def test_bdd_night_uses_the_shipped_list_by_default(plain_bdd):
    assert not any(plain_bdd.glob("*.txt"))
    assert len(BDD100kNight(plain_bdd)) == 87
    assert len(BDD100kNight(plain_bdd, "train")) == 74
    assert len(BDD100kNight(plain_bdd, "val")) == 13


def test_prepare_bdd100k_night_on_a_plain_download(plain_bdd, capsys):
    from udaseg.engine.cli import main

    assert main(["prepare", "bdd100k_night", str(plain_bdd), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "87" in out


# --------------------------------------------------------------------------- Dark Zurich extensions


def test_dark_zurich_test_ref_prefix_lookup(tiny_dark_zurich_test):
    ds = DarkZurich(tiny_dark_zurich_test, "test", labels=False, views=("ref",))
    assert [r.name for r in ds.records] == [f"{DZ_TEST_REC}_frame_{f:06d}" for f in (1, 2, 3)]
    refs = [r.views["ref"].name for r in ds.records]
    assert refs == [
        f"{DZ_TEST_REC}_frame_000001_GOPR0357_frame_000410_ref_rgb_anon.png",
        f"{DZ_TEST_REC}_frame_000002_ref_rgb_anon.png",
        f"{DZ_TEST_REC}_frame_000003_GOPR0358_frame_000007_ref_rgb_anon.png",
    ]
    s = ds[0]
    assert s["ref"].shape == (3, H, W) and "label" not in s
    assert torch.equal(s["ref"], _image_tensor(ds.records[0].views["ref"]))


def test_dark_zurich_test_ref_missing_is_reported(tiny_dark_zurich_test):
    refs = tiny_dark_zurich_test / "rgb_anon/test_ref/day" / f"{DZ_TEST_REC}_ref"
    for p in refs.glob(f"{DZ_TEST_REC}_frame_000003_*"):
        p.unlink()
    with pytest.raises(DataError, match=r"(?s)1 dark_zurich test images lack a partner.*GOPR0364_frame_000003_ref_rgb_anon.png"):
        DarkZurich(tiny_dark_zurich_test, "test", labels=False, views=("ref",))


def test_dark_zurich_train_pairs_csv(tiny_dark_zurich_train):
    root, pairs = tiny_dark_zurich_train
    ds = DarkZurich(root, "train", labels=False, views=("ref",), pairs_file=pairs)
    assert len(ds) == 3
    for rec in ds.records:
        night_rec = rec.image.parent.name
        day_rec, day_name = DZ_PAIRS[(night_rec, rec.name)]
        assert rec.views["ref"] == root / "rgb_anon/train/day" / day_rec / f"{day_name}_rgb_anon.png"
    s = ds[1]
    assert torch.equal(s["ref"], _image_tensor(ds.records[1].views["ref"]))
    # two night frames share one day frame
    assert ds.records[0].views["ref"] == ds.records[1].views["ref"]


def test_dark_zurich_train_without_pairs_keeps_ref_layout(tiny_dark_zurich_train):
    root, _ = tiny_dark_zurich_train
    name = "GOPR0351_frame_000001"
    write_png(root / "rgb_anon/train_ref/day/GOPR0351_ref" / f"{name}_ref_rgb_anon.png",
              np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match=r"(?s)2 dark_zurich train images lack.*train_ref/day/GOPR0351_ref/GOPR0351_frame_000002_ref_rgb_anon.png"):
        DarkZurich(root, "train", labels=False, views=("ref",))
    assert len(DarkZurich(root, "train", labels=False)) == 3


def test_dark_zurich_unpaired_night_images(tiny_dark_zurich_train):
    root, pairs = tiny_dark_zurich_train
    extra = "GOPR0352_frame_000099"
    write_png(root / "rgb_anon/train/night/GOPR0352" / f"{extra}_rgb_anon.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match=rf"(?s)1 dark_zurich train night images are not listed in the pairs file.*{extra}_rgb_anon.png.*drop_unpaired=True"):
        DarkZurich(root, "train", labels=False, views=("ref",), pairs_file=pairs)
    ds = DarkZurich(root, "train", labels=False, views=("ref",), pairs_file=pairs, drop_unpaired=True)
    assert len(ds) == 3 and extra not in [r.name for r in ds.records]


def test_dark_zurich_pairs_missing_day_partner(tiny_dark_zurich_train):
    root, pairs = tiny_dark_zurich_train
    (root / "rgb_anon/train/day/GOPR0355/GOPR0355_frame_000040_rgb_anon.png").unlink()
    with pytest.raises(DataError, match=r"(?s)1 dark_zurich train images lack a partner.*GOPR0352_frame_000010_rgb_anon.png -> .*train/day/GOPR0355/GOPR0355_frame_000040_rgb_anon.png"):
        DarkZurich(root, "train", labels=False, views=("ref",), pairs_file=pairs)


def test_dark_zurich_pairs_file_missing_or_malformed(tiny_dark_zurich_train, tmp_path):
    root, pairs = tiny_dark_zurich_train
    with pytest.raises(FileNotFoundError, match=r"pairs file .*nope.csv does not exist.*train/night/GOPR0351.*zurich_dn_pair_train.csv"):
        DarkZurich(root, "train", labels=False, views=("ref",), pairs_file=tmp_path / "nope.csv")
    with pairs.open("a") as fh:
        fh.write("train/night/GOPR0351_frame_000003\n")
    with pytest.raises(DataError, match=r"(?s)malformed lines.*line 4: 'train/night/GOPR0351_frame_000003'"):
        DarkZurich(root, "train", labels=False, views=("ref",), pairs_file=pairs)
    val_only = tmp_path / "val_pairs.csv"
    val_only.write_text("val/night/GOPR0356/GOPR0356_frame_000001,val/day/GOPR0357/GOPR0357_frame_000001\n")
    with pytest.raises(DataError, match="no line for train/night/"):
        DarkZurich(root, "train", labels=False, pairs_file=val_only)


def test_dark_zurich_invalid_view(tiny_dark_zurich):
    rng = np.random.default_rng(15)
    for img in (tiny_dark_zurich / "rgb_anon/val/night/GOPR0356").glob("*_rgb_anon.png"):
        stem = img.name[: -len("_rgb_anon.png")]
        write_png(tiny_dark_zurich / "gt/val/night/GOPR0356" / f"{stem}_gt_invGray.png",
                  np.where(rng.random((32, 64)) < 0.3, 255, 0).astype(np.uint8))
    ds = DarkZurich(tiny_dark_zurich, "val", views=("ref", "invalid"))
    s = ds[0]
    raw = np.array(Image.open(ds.records[0].views["invalid"]))
    assert s["invalid"].shape == (1, 32, 64)
    assert torch.equal(s["invalid"][0], torch.from_numpy(raw).float())
    next((tiny_dark_zurich / "gt/val/night/GOPR0356").glob("*_gt_invGray.png")).unlink()
    with pytest.raises(DataError, match=r"(?s)1 dark_zurich val images lack.*_gt_invGray.png"):
        DarkZurich(tiny_dark_zurich, "val", views=("invalid",))


def test_dark_zurich_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"rgb_anon/val/night does not exist.*Dark_Zurich_val_anon.zip"):
        DarkZurich(tmp_path / "nowhere", "val")
