"""The generic `folder` loader: glob patterns with {split}, pairing by suffix or stem, train-ID /
raw-ID / colour label encodings (inline or from a file), `udaseg prepare folder`, and a short
`udaseg fit` on SynthNight read through it (configs/examples/folder_synthnight.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from udaseg.data.datasets.folder import FolderDataset
from udaseg.errors import ConfigError, DataError

from ..conftest import random_label, write_png
from ..test_bad_inputs import run_cli

REPO = Path(__file__).resolve().parents[2]

CS = dict(
    image_glob="leftImg8bit/{split}/**/*_leftImg8bit.png",
    label_glob="gtFine/{split}/**/*_gtFine_labelTrainIds.png",
    image_suffix="_leftImg8bit.png",
    label_suffix="_gtFine_labelTrainIds.png",
)

# a hand-made 4x4 raw-ID label (Cityscapes labelIds) and its train IDs under CS_IDS
RAW = np.array([[7, 7, 8, 0], [26, 26, 11, 1], [24, 33, 7, 3], [255, 23, 21, 6]], np.uint8)
CS_IDS = {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}
TRAIN = np.array([[0, 0, 1, 255], [13, 13, 2, 255], [11, 18, 0, 255], [255, 10, 8, 255]], np.uint8)
# the same label as colours (Cityscapes palette); an unlisted colour -> 255
PALETTE = {0: (128, 64, 128), 1: (244, 35, 232), 2: (70, 70, 70), 8: (107, 142, 35),
           10: (70, 130, 180), 11: (220, 20, 60), 13: (0, 0, 142), 18: (119, 11, 32)}
COLOURS = np.array([[PALETTE.get(int(t), (1, 2, 3)) for t in row] for row in TRAIN], np.uint8)


def cityscapes_like(root: Path) -> Path:
    """2 train images in two city folders + 1 val, with train-ID labels and stray labelIds."""
    rng = np.random.default_rng(0)
    for split, stems in (("train", ("a/a_000000", "b/b_000001")), ("val", ("a/a_000002",))):
        for stem in stems:
            write_png(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png",
                      rng.integers(0, 255, (8, 16, 3), dtype=np.uint8))
            gt = root / "gtFine" / split
            write_png(gt / f"{stem}_gtFine_labelTrainIds.png", random_label(rng, 8, 16))
            write_png(gt / f"{stem}_gtFine_labelIds.png", np.full((8, 16), 7, np.uint8))
    return root


def one_label(root: Path, label: np.ndarray, ext: str = "png") -> Path:
    """images/train/x.png + labels/train/x.<ext> (the loader's default globs)."""
    write_png(root / "images/train/x.png", np.zeros((*label.shape[:2], 3), np.uint8))
    write_png(root / f"labels/train/x.{ext}", label)
    return root


def test_pairs_by_suffixed_path_with_split_substituted(tmp_path):
    root = cityscapes_like(tmp_path / "cs")
    train = FolderDataset(root, "train", **CS)
    assert [r.name for r in train.records] == ["a_000000", "b_000001"]
    assert train.records[1].label == root / "gtFine/train/b/b_000001_gtFine_labelTrainIds.png"
    sample = train[1]
    assert sample["image"].shape == (3, 8, 16) and sample["label"].shape == (8, 16)
    val = FolderDataset(root, "val", **CS)
    assert [r.image for r in val.records] == [root / "leftImg8bit/val/a/a_000002_leftImg8bit.png"]
    assert len(FolderDataset(root, "train", labels=False, **CS)) == 2


def test_missing_label_names_the_image_and_the_label_looked_for(tmp_path):
    root = cityscapes_like(tmp_path / "cs")
    (root / "gtFine/train/b/b_000001_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DataError, match=r"(?s)1 folder train images have no label.*"
                       r"b_000001_leftImg8bit.png -> "
                       r".*gtFine/train/b/b_000001_gtFine_labelTrainIds.png.*label_suffix"):
        FolderDataset(root, "train", **CS)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/test.*image_glob"):
        FolderDataset(root, "test", **CS)


def test_pair_by_stem_and_default_suffix_is_the_extension(tmp_path):
    root = tmp_path / "flat"
    for i in range(2):
        write_png(root / f"img/train/seq{i}/f{i}.jpg", np.zeros((4, 4, 3), np.uint8))
        write_png(root / f"ann/f{i}.png", np.full((4, 4), i, np.uint8))
    ds = FolderDataset(root, image_glob="img/{split}/*/*.jpg", label_glob="ann/*.png",
                       pair_by="stem")
    assert [(r.name, r.label.name) for r in ds.records] == [("f0", "f0.png"), ("f1", "f1.png")]
    write_png(root / "ann/sub/f0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="share a pairing key"):
        FolderDataset(root, image_glob="img/{split}/*/*.jpg", label_glob="ann/**/*.png",
                      pair_by="stem")


@pytest.mark.parametrize("where", ["config", "json", "yaml"])
def test_id_map_gives_train_ids(tmp_path, where):
    root = one_label(tmp_path / "d", RAW)
    if where == "config":
        opts = {"id_map": CS_IDS}
    else:  # JSON keys are strings; a relative path is found in the root
        dump = json.dumps if where == "json" else yaml.safe_dump
        text = dump({"id_map": CS_IDS})
        (root / f"map.{where}").write_text(text)
        opts = {"label_map_file": f"map.{where}"}
    ds = FolderDataset(root, **opts)
    assert ds.label_decoder.encoding == "ids"
    np.testing.assert_array_equal(ds[0]["label"].numpy(), TRAIN)


@pytest.mark.parametrize("form", ["mapping", "list", "file"])
def test_color_map_gives_train_ids(tmp_path, form):
    root = one_label(tmp_path / "d", COLOURS)
    if form == "mapping":
        opts = {"color_map": {",".join(map(str, c)): t for t, c in PALETTE.items()}}
    elif form == "list":
        opts = {"color_map": [[*c, t] for t, c in PALETTE.items()]}
    else:
        hexed = {"#" + "".join(f"{v:02x}" for v in c): t for t, c in PALETTE.items()}
        (tmp_path / "colours.json").write_text(json.dumps({"color_map": hexed}))
        opts = {"label_map_file": str(tmp_path / "colours.json")}
    np.testing.assert_array_equal(FolderDataset(root, **opts)[0]["label"].numpy(), TRAIN)
    palette = FolderDataset(root, color_map="cityscapes")  # the Cityscapes palette by name
    np.testing.assert_array_equal(palette[0]["label"].numpy(), TRAIN)


def test_label_settings_errors_name_the_key_or_file(tmp_path):
    root = one_label(tmp_path / "d", COLOURS)
    with pytest.raises(ConfigError, match=r"id_map\[7\]: 19 is not a train ID"):
        FolderDataset(root, id_map={7: 19})
    with pytest.raises(ConfigError, match="id_map or color_map, not both"):
        FolderDataset(root, id_map={7: 0}, color_map={"1,2,3": 0})
    with pytest.raises(ConfigError, match="label_encoding 'colors' needs a color_map"):
        FolderDataset(root, label_encoding="colors", id_map={7: 0})
    with pytest.raises(ConfigError, match="unknown label set"):
        FolderDataset(root, label_set="cityscapes20")
    with pytest.raises(DataError, match=r"labels/train/x.png has image mode 'RGB'.*color_map"):
        FolderDataset(root, id_map={7: 0})[0]
    with pytest.raises(DataError, match=r"labels/train/x.png has image mode 'RGB'.*prepare"):
        FolderDataset(root)[0]  # train IDs expected: read_label's own message


def raw_id_tree(root: Path) -> Path:
    """images/{train,val}/ with Cityscapes raw-ID labels (RAW, 4x4)."""
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            write_png(root / f"images/{split}/x{i}.png", np.zeros((4, 4, 3), np.uint8))
            write_png(root / f"labels/{split}/x{i}.png", RAW)
    return root


def test_prepare_folder_checks_and_writes_rcs_statistics(tmp_path):
    root = raw_id_tree(tmp_path / "d")
    settings = tmp_path / "folder.yaml"
    settings.write_text(yaml.safe_dump({"id_map": {**CS_IDS, 27: 14}, "label_set": "synthia16"}))
    rc, out, err = run_cli(["prepare", "folder", str(root), "--config", str(settings), "--quiet",
                            "--workers", "1"])
    assert rc == 0, out + err
    assert "RCS statistics of 2 train labels" in out and "OK" in out
    stats = json.loads((root / "sample_class_stats.json").read_text())
    assert stats[0] == {"0": 3, "1": 1, "2": 1, "8": 1, "10": 1, "11": 1, "13": 2, "18": 1,
                        "file": "labels/train/x0.png"}
    meta = json.loads((root / "rcs_stats_meta.json").read_text())
    assert json.loads(meta["labels"])[0] == "ids"  # another map recomputes the statistics
    # every problem listed: an image without label, an unreadable label, a label of another size;
    # notes: a label with no mapped value, a class outside the label set (truck, 14)
    write_png(root / "images/train/x9.png", np.zeros((4, 4, 3), np.uint8))
    (root / "labels/val/x0.png").write_bytes(b"not a png")
    write_png(root / "labels/train/x1.png", np.zeros((2, 2), np.uint8))
    write_png(root / "images/train/x2.png", np.zeros((4, 4, 3), np.uint8))
    write_png(root / "labels/train/x2.png", np.zeros((4, 4), np.uint8))
    write_png(root / "labels/train/x0.png", np.where(RAW == 0, 27, RAW).astype(np.uint8))
    rc, out, err = run_cli(["prepare", "folder", str(root), "--config", str(settings), "--check",
                            "--quiet"])
    assert rc == 1
    assert "x9.png ->" in out and "cannot read label" in out and "has size 2x2" in out
    assert "3 problem(s) found" in out
    assert "x2.png: no pixel maps to a train ID (raw values [0])" in out
    assert "x0.png holds classes [14] outside label_set synthia16" in out
    rc, _, err = run_cli(["prepare", "folder", str(root), "--quiet"])
    assert rc == 1 and "--config" in err


def test_fit_on_synthnight_through_the_folder_example(tmp_path):
    from udaseg.data.synthnight import SynthNightConfig, generate

    sn = generate(tmp_path / "sn", SynthNightConfig(
        seed=3, width=64, height=32, n_day_train=3, n_day_val=2, n_night_train=0, n_night_val=0,
        with_events=False, with_depth=False, with_refs=False), workers=0, progress=False)
    cfg = yaml.safe_load((REPO / "configs/examples/folder_synthnight.yaml").read_text())
    for spec in (cfg["data"]["source"], *cfg["data"]["val"].values()):
        assert spec["name"] == "folder" and spec["root"] == "data/synthnight/cityscapes"
        spec["root"] = str(sn / "cityscapes")
    example = tmp_path / "folder_synthnight.yaml"
    example.write_text(yaml.safe_dump(cfg))

    rc, out, err = run_cli(["prepare", "folder", str(sn / "cityscapes"), "--config", str(example),
                            "--quiet", "--workers", "1"])
    assert rc == 0, out + err
    assert (sn / "cityscapes/sample_class_stats.json").is_file()
    rows = [line.split()[:3] for line in out.splitlines() if line.startswith(("  train", "  val"))]
    assert rows == [["train", "3", "3"], ["val", "2", "2"]]

    tiny = ["--config", str(REPO / "configs/synthnight/source_only.yaml"), "--config", str(example),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]", "--trainer.enable_model_summary", "false",
            "--data.synthnight", "null", "--data.num_workers", "0", "--data.batch_size", "2",
            "--data.val_batch_size", "2", "--data.rcs.min_pixels", "20",
            "--data.source_pipeline", "{scale: [64, 32], crop_size: [32, 32]}",
            "--model.head_channels", "16"]
    rc, out, err = run_cli(["fit", *tiny, "--trainer.max_steps", "2",
                            "--trainer.default_root_dir", str(tmp_path / "run")])
    assert rc == 0, err[-3000:]
    ckpt = next((tmp_path / "run/checkpoints").glob("*.ckpt"))
    rc, out, err = run_cli(["validate", *tiny, "--ckpt_path", str(ckpt),
                            "--trainer.default_root_dir", str(tmp_path / "val")])
    assert rc == 0, err[-3000:]
    assert "val/day_val/mIoU" in out
