"""Submission writers, zips and checker for the Dark Zurich / ACDC test servers."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udaseg.eval.export import (
    DARK_ZURICH_FOLDERS,
    check_submission,
    check_submission_main,
    expected_names_from_images,
    submission_file_name,
    write_prediction,
    zip_submission,
)
from udaseg.eval.report import colorize

H, W = 12, 20
NAMES = ["GOPR0356_frame_000001", "GOPR0356_frame_000002", "GOPR0364_frame_000010"]
FILES = [f"{n}_rgb_anon.png" for n in NAMES]


def crafted(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 19, (H, W)).astype(np.uint8)
    pred[0, :3] = 255
    conf = rng.random((H, W)).astype(np.float32)
    conf[0, 0], conf[0, 1], conf[1, 0] = 0.0, 1.0, 0.5
    return pred, conf


def read_png(path: Path | bytes) -> tuple[str, np.ndarray]:
    src = io.BytesIO(path) if isinstance(path, bytes) else path
    with Image.open(src) as im:
        im.load()
        return im.mode, np.array(im)


def write_dz(out: Path, threshold: float | None = 0.3, color: bool = True) -> dict[str, tuple]:
    data = {}
    for i, name in enumerate(NAMES):
        pred, conf = crafted(i)
        write_prediction(
            out, "dark_zurich", name, pred, conf, invalid_threshold=threshold, color=color
        )
        data[name] = (pred, conf)
    return data


def problems_of(path, **kw) -> list[str]:
    return check_submission(path, kw.pop("fmt", "dark_zurich"), **{"expected_size": (H, W), **kw})


# --------------------------------------------------------------------------- names
def test_file_names_keep_the_input_basename():
    assert (
        submission_file_name("GOPR0356_frame_000001", "dark_zurich")
        == "GOPR0356_frame_000001_rgb_anon.png"
    )
    assert (
        submission_file_name("GOPR0356_frame_000001_rgb_anon", "acdc")
        == "GOPR0356_frame_000001_rgb_anon.png"
    )
    assert submission_file_name("x_rgb_anon.png", "dark_zurich") == "x_rgb_anon.png"
    assert submission_file_name("aachen_000000_000019", "trainids") == "aachen_000000_000019.png"
    for bad in ("", "a/b", "..", "a\\b"):
        with pytest.raises(ValueError, match="plain file name"):
            submission_file_name(bad, "acdc")
    with pytest.raises(ValueError, match="unknown submission format"):
        submission_file_name("a", "cityscapes")


# --------------------------------------------------------------------------- writing
def test_dark_zurich_roundtrip_exact(tmp_path):
    out = tmp_path / "sub"
    data = write_dz(out, threshold=0.3)
    assert sorted(p.name for p in out.iterdir()) == sorted([*DARK_ZURICH_FOLDERS, "color"])
    for name, (pred, conf) in data.items():
        fn = f"{name}_rgb_anon.png"
        mode, labels = read_png(out / "labelTrainIds" / fn)
        assert mode == "L" and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, pred)
        mode, invalid = read_png(out / "labelTrainIds_invalid" / fn)
        assert mode == "L"
        expected_invalid = pred.copy()
        expected_invalid[conf < 0.3] = 255
        np.testing.assert_array_equal(invalid, expected_invalid)
        assert (invalid == 255).sum() > (pred == 255).sum()  # the threshold marked some pixels
        mode, c16 = read_png(out / "confidence" / fn)
        assert mode.startswith("I;16") and c16.dtype == np.uint16
        np.testing.assert_array_equal(
            c16, np.rint(conf.astype(np.float64) * 65535).astype(np.uint16)
        )
        assert c16[0, 0] == 0 and c16[0, 1] == 65535 and c16[1, 0] == 32768  # round(0.5 * 65535)
        mode, rgb = read_png(out / "color" / fn)
        assert mode == "RGB"
        np.testing.assert_array_equal(rgb, colorize(pred))
    assert problems_of(out, expected_names=NAMES) == []
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))  # atomic writes left nothing


def test_dark_zurich_without_threshold_or_confidence(tmp_path):
    pred, conf = crafted(0)
    write_prediction(tmp_path, "dark_zurich", "a", pred, conf)
    np.testing.assert_array_equal(
        read_png(tmp_path / "labelTrainIds_invalid/a_rgb_anon.png")[1], pred
    )
    write_prediction(tmp_path, "dark_zurich", "b", pred, None)
    c16 = read_png(tmp_path / "confidence/b_rgb_anon.png")[1]
    assert c16.dtype == np.uint16 and (c16 == 65535).all()
    assert not (tmp_path / "color").exists()
    with pytest.raises(ValueError, match="needs a confidence"):
        write_prediction(tmp_path, "dark_zurich", "c", pred, None, invalid_threshold=0.5)


@pytest.mark.parametrize("fmt", ["acdc", "trainids"])
def test_flat_formats_roundtrip(tmp_path, fmt):
    pred, conf = crafted(3)
    paths = write_prediction(tmp_path, fmt, "GOPR0475_frame_000041", pred, conf, color=True)
    fn = submission_file_name("GOPR0475_frame_000041", fmt)
    assert paths["trainIds"] == tmp_path / fn and paths["color"] == tmp_path / "color" / fn
    mode, labels = read_png(tmp_path / fn)
    assert mode == "L" and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, pred)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fn, "color"])
    assert check_submission(tmp_path, fmt, ["GOPR0475_frame_000041"], expected_size=(H, W)) == []
    with pytest.raises(ValueError, match="dark_zurich"):
        write_prediction(tmp_path, fmt, "x", pred, conf, invalid_threshold=0.5)


def test_write_rejects_bad_inputs(tmp_path):
    pred, conf = crafted(0)
    with pytest.raises(TypeError, match="argmax"):
        write_prediction(tmp_path, "acdc", "a", conf, None)
    with pytest.raises(ValueError, match=r"\[19\]"):
        write_prediction(tmp_path, "acdc", "a", np.full((2, 2), 19), None)
    with pytest.raises(ValueError, match="shape"):
        write_prediction(tmp_path, "dark_zurich", "a", pred, conf[:-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_prediction(tmp_path, "dark_zurich", "a", pred, conf * 2)
    with pytest.raises(ValueError, match="NaN"):
        write_prediction(tmp_path, "dark_zurich", "a", pred, np.full(pred.shape, np.nan))
    assert not any(tmp_path.rglob("*.png"))


# --------------------------------------------------------------------------- zipping
def test_zip_has_exactly_the_three_folders(tmp_path):
    out = tmp_path / "sub"
    write_dz(out)
    (out / "notes.txt").write_text("not for the server")
    z = zip_submission(out, tmp_path / "sub.zip")
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names} == set(DARK_ZURICH_FOLDERS)
        for folder in DARK_ZURICH_FOLDERS:
            assert (
                sorted(
                    n.split("/", 1)[1]
                    for n in names
                    if n.startswith(folder + "/") and not n.endswith("/")
                )
                == FILES
            )
        # the zipped bytes are the written files, and the zip is reproducible
        assert zf.read(f"confidence/{FILES[0]}") == (out / "confidence" / FILES[0]).read_bytes()
    first = z.read_bytes()
    assert zip_submission(out, tmp_path / "again.zip").read_bytes() == first
    assert problems_of(z, expected_names=FILES) == []
    assert not list(tmp_path.glob(".*.tmp"))


def test_zip_flat_acdc(tmp_path):
    for i, name in enumerate(NAMES):
        write_prediction(tmp_path / "acdc", "acdc", name, crafted(i)[0], color=True)
    z = zip_submission(tmp_path / "acdc", tmp_path / "acdc.zip", "acdc")
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == FILES
    assert check_submission(z, "acdc", NAMES, expected_size=(H, W)) == []


def test_zip_of_an_empty_folder_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to zip"):
        zip_submission(tmp_path / "empty", tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


# --------------------------------------------------------------------------- checking
def test_check_reports_every_planted_problem(tmp_path):
    out = tmp_path / "sub"
    write_dz(out)
    missing = FILES[0]
    (out / "labelTrainIds" / missing).unlink()  # missing file
    extra = "GOPR9999_frame_000000_rgb_anon.png"
    shutil.copy(out / "confidence" / FILES[1], out / "confidence" / extra)  # extra file
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(
        out / "labelTrainIds" / FILES[1]
    )  # wrong size
    Image.fromarray(np.full((H, W), 200, np.uint8)).save(
        out / "confidence" / FILES[2]
    )  # uint8 confidence
    Image.fromarray(colorize(crafted(2)[0])).save(
        out / "labelTrainIds_invalid" / FILES[2]
    )  # colour PNG
    Image.fromarray(np.full((H, W), 26, np.uint8)).save(
        out / "labelTrainIds" / FILES[2]
    )  # labelIds

    problems = problems_of(out, expected_names=NAMES)
    text = "\n".join(problems)

    def one(*needles: str) -> str:
        hits = [p for p in problems if all(n in p for n in needles)]
        assert len(hits) == 1, f"{needles} -> {hits}\n{text}"
        return hits[0]

    one(f"labelTrainIds/{missing}", "missing")
    one(f"confidence/{extra}", "extra")
    one(f"labelTrainIds/{FILES[1]}", "size 20x13", "expected 20x12")
    one(f"confidence/{FILES[2]}", "8-bit", "uint16")
    one(f"labelTrainIds_invalid/{FILES[2]}", "colour PNG")
    one(f"labelTrainIds/{FILES[2]}", "[26]", "labelIds")
    one(FILES[1], "differ in size")
    # nothing else: the remaining files are fine
    assert len(problems) == 7, text

    # the same problems survive zipping (the zip is read the same way)
    z = zip_submission(out, tmp_path / "bad.zip")
    assert problems_of(z, expected_names=NAMES) == problems


def test_check_structure_problems_in_zips(tmp_path):
    out = tmp_path / "sub"
    write_dz(out, color=True)
    # the whole folder zipped with its parent (a wrapping folder) and a macOS junk folder
    wrapped = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(wrapped, "w") as zf:
        for p in sorted(out.rglob("*.png")):
            zf.write(p, f"sub/{p.relative_to(out).as_posix()}")
        zf.writestr("__MACOSX/._x", b"")
    problems = problems_of(wrapped)
    assert any(p.startswith("sub/:") and "top level" in p for p in problems), problems
    assert any(p.startswith("__MACOSX") for p in problems), problems

    # a zip of the folder contents including the colour previews and with a folder missing
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        for p in sorted(out.rglob("*.png")):
            rel = p.relative_to(out).as_posix()
            if not rel.startswith("confidence/"):
                zf.write(p, rel)
    problems = problems_of(flat)
    assert any(p.startswith("color:") and "unexpected top-level" in p for p in problems), problems
    assert "confidence/: folder missing" in problems
    # in the output folder itself, color/ is expected and ignored
    assert problems_of(out) == []


def test_check_without_expected_names_compares_folders(tmp_path):
    out = tmp_path / "sub"
    write_dz(out)
    (out / "labelTrainIds_invalid" / FILES[2]).unlink()
    problems = problems_of(out)
    assert problems == [
        f"labelTrainIds_invalid/{FILES[2]}: missing (no prediction for this test image)"
    ]


def test_check_invalid_map_must_match_labels(tmp_path):
    out = tmp_path / "sub"
    write_dz(out, threshold=None)
    inv = read_png(out / "labelTrainIds_invalid" / FILES[0])[1]
    inv[5, 5] = (inv[5, 5] + 1) % 19
    Image.fromarray(inv).save(out / "labelTrainIds_invalid" / FILES[0])
    problems = problems_of(out)
    assert len(problems) == 1 and "differs from labelTrainIds at 1 pixels" in problems[0]


def test_check_default_size_is_the_servers(tmp_path):
    for fmt in ("dark_zurich", "acdc"):
        out = tmp_path / fmt
        write_prediction(out, fmt, NAMES[0], crafted(0)[0], crafted(0)[1])
        problems = check_submission(out, fmt)
        assert problems and all("expected 1920x1080" in p for p in problems), problems
        assert check_submission(out, fmt, expected_size="any") == []
    write_prediction(tmp_path / "t", "trainids", "a", crafted(0)[0])
    assert check_submission(tmp_path / "t", "trainids") == []


def test_check_flat_problems(tmp_path):
    out = tmp_path / "acdc"
    for i, name in enumerate(NAMES):
        write_prediction(out, "acdc", name, crafted(i)[0])
    Image.fromarray(np.zeros((H, W), np.uint16)).save(out / FILES[0])  # 16-bit labels
    Image.fromarray(crafted(0)[0]).convert("P").save(out / FILES[1])  # palette PNG
    (out / "sub").mkdir()
    Image.fromarray(crafted(0)[0]).save(out / "sub" / "x.png")  # nested
    problems = check_submission(out, "acdc", NAMES, expected_size=(H, W))
    assert any(p.startswith(FILES[0]) and "16-bit" in p for p in problems), problems
    assert any(p.startswith(FILES[1]) and "palette" in p for p in problems), problems
    assert any(p.startswith("sub/x.png") and "flat" in p for p in problems), problems
    assert len(problems) == 3


def test_check_unreadable_inputs(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    assert "not a readable zip" in check_submission(bad, "dark_zurich")[0]
    with pytest.raises(FileNotFoundError):
        check_submission(tmp_path / "nope", "acdc")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(b"garbage")
    assert check_submission(tmp_path / "f", "trainids") == ["a.png: not a PNG file"]


def test_check_submission_main(tmp_path, capsys):
    images = tmp_path / "dz/rgb_anon/test/night"
    for name in NAMES:
        rec = name.split("_")[0]
        (images / rec).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / rec / f"{name}_rgb_anon.png")
    assert expected_names_from_images(images) == FILES
    out = tmp_path / "sub"
    write_dz(out)
    z = zip_submission(out, tmp_path / "sub.zip")
    args = [str(z), "--format", "dark_zurich", "--images", str(images), "--size", str(H), str(W)]
    assert check_submission_main(args) == 0
    assert capsys.readouterr().out.startswith("OK:")
    (out / "confidence" / FILES[0]).unlink()
    assert check_submission_main([str(out), *args[1:]]) == 1
    printed = capsys.readouterr().out
    assert f"confidence/{FILES[0]}: missing" in printed and "1 problem(s)" in printed
