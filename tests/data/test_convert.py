"""Label-ID conversion (udaseg.data.convert) and the 16-bit PNG reader (udaseg.data.png16)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udaseg.data.classes import CITYSCAPES_ID_TO_TRAINID
from udaseg.data.convert import (
    GTA_ID_TO_TRAINID,
    LUT,
    SYNTHIA_ID_TO_TRAINID,
    ConvertSummary,
    cityscapes_jobs,
    convert_dataset,
    convert_labels,
    gta_jobs,
    read_label_ids,
    read_synthia_ids,
    synthia_jobs,
)
from udaseg.data.io import DataError, read_label
from udaseg.data.png16 import decode_png, encode_png, read_png16, write_png16

from ..conftest import write_png

# A 2x4 block of raw IDs and the train IDs it must become, tiled to 16x32.
CS_RAW = np.array([[7, 8, 11, 0], [26, 33, 34, 255]], np.uint8)
CS_TRAIN = np.array([[0, 1, 2, 255], [13, 18, 255, 255]], np.uint8)
# SYNTHIA: R channel IDs (300 exercises the 16-bit table) and their train IDs.
SY_RAW = np.array([[3, 4, 2, 21], [1, 8, 0, 300]], np.uint16)
SY_TRAIN = np.array([[0, 1, 2, 3], [10, 13, 255, 255]], np.uint8)


def tile(block: np.ndarray) -> np.ndarray:
    return np.tile(block, (8, 8))  # 16x32


def write_palette_png(path: Path, ids: np.ndarray) -> Path:
    """A GTA5-style label: palette PNG whose indices are the IDs (palette is irrelevant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette(np.random.default_rng(0).integers(0, 255, 768, dtype=np.uint8).tolist())
    im.save(path)
    return path


def synthia_label(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """16-bit RGB with the IDs in R and junk (e.g. instance IDs) in G and B."""
    rng = np.random.default_rng(seed)
    junk = rng.integers(0, 65535, ids.shape + (2,), dtype=np.uint16)
    return np.concatenate([ids[..., None].astype(np.uint16), junk], axis=2)


@pytest.fixture
def cs_root(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for split, city in (("train", "aachen"), ("val", "frankfurt"), ("test", "berlin")):
        d = root / "gtFine" / split / city
        write_png(d / f"{city}_000000_000019_gtFine_labelIds.png", tile(CS_RAW))
        # other gtFine files must not be picked up
        write_png(d / f"{city}_000000_000019_gtFine_instanceIds.png", tile(CS_RAW))
        write_png(d / f"{city}_000000_000019_gtFine_color.png", np.zeros((16, 32, 3), np.uint8))
    return root


@pytest.fixture
def gta_labels(tmp_path: Path) -> Path:
    root = tmp_path / "gta"
    for i in range(1, 4):
        write_palette_png(root / "labels" / f"{i:05d}.png", tile(CS_RAW))
    return root


@pytest.fixture
def synthia_labels(tmp_path: Path) -> Path:
    root = tmp_path / "synthia"
    for i in range(3):
        write_png16(root / "GT" / "LABELS" / f"{i:07d}.png", synthia_label(tile(SY_RAW), i), i + 2)
    return root


# --------------------------------------------------------------------------------------------
# tables and LUT


def test_mapping_tables():
    assert GTA_ID_TO_TRAINID == CITYSCAPES_ID_TO_TRAINID
    assert sorted(SYNTHIA_ID_TO_TRAINID.values()) == list(range(19))
    assert SYNTHIA_ID_TO_TRAINID[3] == 0 and SYNTHIA_ID_TO_TRAINID[21] == 3
    assert SYNTHIA_ID_TO_TRAINID[11] == 18 and SYNTHIA_ID_TO_TRAINID[12] == 17


def test_lut_8_16_bit_and_out_of_range():
    lut = LUT({7: 0, 300: 5})
    assert lut(np.array([7, 8, 255], np.uint8)).tolist() == [0, 255, 255]
    assert lut(np.array([7, 300, 301], np.uint16)).tolist() == [0, 5, 255]
    assert lut(np.array([-1, 300, 70000], np.int32)).tolist() == [255, 5, 255]
    assert lut(np.zeros((2, 3), np.uint8)).dtype == np.uint8
    with pytest.raises(ValueError, match="train IDs"):
        LUT({1: 19})
    with pytest.raises(ValueError, match="raw IDs"):
        LUT({70000: 1})


# --------------------------------------------------------------------------------------------
# conversion of each dataset


def test_cityscapes_conversion_exact(cs_root):
    jobs = cityscapes_jobs(cs_root)
    assert [s.name for s, _ in jobs] == [
        "aachen_000000_000019_gtFine_labelIds.png",  # train, val, test order
        "frankfurt_000000_000019_gtFine_labelIds.png",
        "berlin_000000_000019_gtFine_labelIds.png",
    ]
    assert all(
        d.name.endswith("_gtFine_labelTrainIds.png") and d.parent == s.parent for s, d in jobs
    )
    summary = convert_labels(jobs, CITYSCAPES_ID_TO_TRAINID, workers=1, progress=False)
    assert (summary.converted, summary.skipped, summary.failed) == (3, 0, [])
    for _, dst in jobs:
        np.testing.assert_array_equal(read_label(dst), tile(CS_TRAIN))
    assert len(cityscapes_jobs(cs_root, splits=("val",))) == 1


def test_cityscapes_missing_gtfine(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gtFine does not exist.*gtFine_trainvaltest"):
        cityscapes_jobs(tmp_path / "cs")


def test_gta_palette_conversion_exact(gta_labels):
    jobs = gta_jobs(gta_labels)
    assert (jobs[0][0].name, jobs[0][1].name) == ("00001.png", "00001_labelTrainIds.png")
    assert read_label_ids(jobs[0][0]).tolist() == tile(CS_RAW).tolist()  # indices, not colours
    summary = convert_dataset("gta", gta_labels, workers=1, progress=False)
    assert (summary.converted, summary.failed) == (3, [])
    for _, dst in jobs:
        np.testing.assert_array_equal(read_label(dst), tile(CS_TRAIN))
    assert gta_jobs(gta_labels) == jobs  # the train-ID files are not taken as sources


def test_synthia_16bit_conversion_exact(synthia_labels):
    jobs = synthia_jobs(synthia_labels)
    assert len(jobs) == 3
    np.testing.assert_array_equal(read_synthia_ids(jobs[0][0]), tile(SY_RAW))
    summary = convert_dataset("synthia", synthia_labels, workers=1, progress=False)
    assert (summary.converted, summary.failed) == (3, [])
    for _, dst in jobs:
        np.testing.assert_array_equal(read_label(dst), tile(SY_TRAIN))


def test_missing_label_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"labels does not exist.*labels.zip"):
        gta_jobs(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"LABELS does not exist.*SYNTHIA_RAND"):
        synthia_jobs(tmp_path)
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*.png files"):
        gta_jobs(tmp_path)


# --------------------------------------------------------------------------------------------
# runner guarantees


def test_idempotent_second_run_skips_everything(gta_labels):
    first = convert_dataset("gta", gta_labels, workers=1, progress=False)
    assert (first.converted, first.skipped) == (3, 0)
    dsts = [d for _, d in gta_jobs(gta_labels)]
    mtimes = [d.stat().st_mtime_ns for d in dsts]
    second = convert_dataset("gta", gta_labels, workers=1, progress=False)
    assert (second.converted, second.skipped, second.failed) == (0, 3, [])
    assert [d.stat().st_mtime_ns for d in dsts] == mtimes


def test_original_never_overwritten(gta_labels):
    src = gta_labels / "labels" / "00001.png"
    before = src.read_bytes()
    for dst in (src, gta_labels / "labels" / "00001_other.png"):
        with pytest.raises(ValueError, match="overwrite an original"):
            convert_labels([(src, dst)], GTA_ID_TO_TRAINID, workers=1, progress=False)
    train = gta_labels / "labels" / "00002_labelTrainIds.png"
    with pytest.raises(ValueError, match="already a train-ID file"):
        convert_labels([(train, train)], GTA_ID_TO_TRAINID, workers=1, progress=False)
    convert_dataset("gta", gta_labels, workers=1, progress=False)
    assert src.read_bytes() == before
    assert not list((gta_labels / "labels").glob(".*"))  # no temporary file left behind


def test_leftover_temp_file_is_not_trusted(gta_labels):
    labels = gta_labels / "labels"
    # what an interrupted run leaves: a partial PNG under the temporary name
    partial = labels / ".00002_labelTrainIds.png.k3j9x_1.tmp"
    partial.write_bytes((labels / "00002.png").read_bytes()[:40])
    jobs = gta_jobs(gta_labels)
    assert all(not s.name.startswith(".") for s, _ in jobs)
    summary = convert_labels(jobs, GTA_ID_TO_TRAINID, workers=1, progress=False)
    assert (summary.converted, summary.skipped, summary.failed) == (3, 0, [])
    np.testing.assert_array_equal(read_label(labels / "00002_labelTrainIds.png"), tile(CS_TRAIN))


def test_truncated_label_reported_others_converted(gta_labels, synthia_labels):
    bad = gta_labels / "labels" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:60])
    summary = convert_dataset("gta", gta_labels, workers=1, progress=False)
    assert summary.converted == 2 and [p for p, _ in summary.failed] == [bad]
    assert not (gta_labels / "labels" / "00002_labelTrainIds.png").exists()
    with pytest.raises(DataError, match=r"(?s)1 of 3 label files.*00002.png.*Re-extract"):
        summary.raise_for_failures()

    bad16 = synthia_labels / "GT" / "LABELS" / "0000001.png"
    bad16.write_bytes(bad16.read_bytes()[:-100])
    summary = convert_dataset("synthia", synthia_labels, workers=1, progress=False)
    assert summary.converted == 2 and [p for p, _ in summary.failed] == [bad16]
    assert "truncated" in summary.failed[0][1]


def test_two_workers_same_as_one(tmp_path, gta_labels):
    bad = gta_labels / "labels" / "00003.png"
    bad.write_bytes(b"not a png")
    other = tmp_path / "gta_copy"
    for f in (gta_labels / "labels").iterdir():
        (other / "labels").mkdir(parents=True, exist_ok=True)
        (other / "labels" / f.name).write_bytes(f.read_bytes())
    one = convert_dataset("gta", gta_labels, workers=1, progress=False)
    two = convert_dataset("gta", other, workers=2, progress=False)
    assert (one.converted, one.skipped) == (two.converted, two.skipped) == (2, 0)
    assert [p.name for p, _ in one.failed] == [p.name for p, _ in two.failed] == ["00003.png"]
    for name in ("00001_labelTrainIds.png", "00002_labelTrainIds.png"):
        a = read_label(gta_labels / "labels" / name)
        np.testing.assert_array_equal(a, read_label(other / "labels" / name))


def test_progress_bar_and_empty_jobs(gta_labels):
    summary = convert_dataset("gta", gta_labels, workers=1, progress=True)
    assert summary.converted == 3 and summary.ok
    assert convert_labels([], GTA_ID_TO_TRAINID, progress=True) == ConvertSummary()


# --------------------------------------------------------------------------------------------
# 16-bit PNG decoder


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(16, 32), (16, 32, 3), (16, 32, 4)])
def test_png16_decoder_every_filter(tmp_path, filter_type, shape):
    arr = np.random.default_rng(filter_type).integers(0, 65536, shape, dtype=np.uint16)
    path = write_png16(tmp_path / "x.png", arr, filter_type)
    out = read_png16(path, backend="numpy")
    assert out.dtype == np.uint16 and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(
        decode_png(encode_png(arr.astype(np.uint8), filter_type)), arr.astype(np.uint8)
    )


def test_png16_mixed_row_filters():
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 65536, (23, 17, 3), dtype=np.uint16)
    for filters in (rng.integers(0, 5, 23), [1, 2] * 11 + [0], [0, 1, 2] * 7 + [2, 2]):
        np.testing.assert_array_equal(decode_png(encode_png(arr, filters)), arr)


def test_png16_matches_pillow_encoded_files():
    # Pillow writes 16-bit grey losslessly and picks filters adaptively for 8-bit RGB.
    rng = np.random.default_rng(6)
    grey = rng.integers(0, 65536, (9, 13), dtype=np.uint16)
    yy, xx = np.mgrid[0:40, 0:50]
    rgb = np.stack([xx * 5, yy * 6, xx + yy], -1).astype(np.uint8)
    rgb[::5] = rng.integers(0, 256, rgb[::5].shape)
    for arr in (grey, rgb):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        np.testing.assert_array_equal(decode_png(buf.getvalue()), arr)


def _patch_ihdr(data: bytes, **fields: int) -> bytes:
    """Rewrite IHDR fields (depth, ctype, interlace) and its CRC."""
    body = bytearray(data[16:29])
    for name, offset in (("depth", 8), ("ctype", 9), ("interlace", 12)):
        if name in fields:
            body[offset] = fields[name]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)))
    return data[:16] + bytes(body) + crc + data[33:]


def test_png16_clear_errors(tmp_path):
    data = encode_png(np.zeros((4, 4, 3), np.uint16))
    cases = {
        "interlaced.png": (_patch_ihdr(data, interlace=1), "interlaced"),
        "palette.png": (_patch_ihdr(data, ctype=3, depth=8), "unsupported PNG kind"),
        "truncated.png": (data[:-20], "truncated"),
        "crc.png": (data[:45] + bytes([data[45] ^ 1]) + data[46:], "bad CRC"),
        "text.png": (b"hello", "not a PNG"),
    }
    for name, (payload, why) in cases.items():
        p = tmp_path / name
        p.write_bytes(payload)
        with pytest.raises(DataError, match=rf"{name}: .*{why}"):
            read_png16(p, backend="numpy")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_png16(tmp_path / "nope.png")


def test_png16_cv2_backend_or_clear_import_error(tmp_path):
    arr = synthia_label(tile(SY_RAW))
    path = write_png16(tmp_path / "0000000.png", arr, 4)
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="opencv"):
            read_png16(path, backend="cv2")
    else:
        np.testing.assert_array_equal(read_png16(path, backend="cv2"), arr)
    np.testing.assert_array_equal(read_png16(path), arr)  # "auto"
