"""Benchmark-server submissions: write predictions in the servers' formats, zip and check them.

Formats (``fmt``)
-----------------

``"dark_zurich"``: the Dark Zurich CodaLab server (competition 3783). The upload is a zip whose
top level holds exactly three folders, each with one PNG per test image (151 for the test set)::

    labelTrainIds/<file>          uint8 greyscale, train IDs 0..18 (255 allowed), used for IoU
    labelTrainIds_invalid/<file>  the same map with 255 where the prediction is declared invalid
                                  (confidence < ``invalid_threshold``; a plain copy when no
                                  threshold is given), used for UIoU
    confidence/<file>             uint16 greyscale, round(confidence * 65535), used for avg. UIoU

``"acdc"``: the ACDC server (acdc.vision.ee.ethz.ch/submit): flat ``<file>`` uint8 train-ID
PNGs (road = 0) of the input size, 1920x1080; :func:`zip_submission` puts them at the top
level of the zip (the server's exact zip layout is inferred from Refign's flat submissions).

``"trainids"``: the same flat uint8 train-ID PNGs for any other dataset; no size is imposed.

Every format may also hold ``color/<file>``, a Cityscapes-palette RGB preview for people. It is
never zipped and :func:`check_submission` ignores it in a folder (but reports it in a zip).

File names
----------

The servers match predictions to their ground truth by the input image's name (Dark Zurich by
the ``<rec>_frame_<n>`` prefix), so every file keeps the input image's basename:
``GOPR0356_frame_000321_rgb_anon.png`` for Dark Zurich and ``<...>_rgb_anon.png`` for ACDC.
:func:`submission_file_name` derives it from a dataset sample name: the udaseg datasets name a
sample by the image file name without ``_rgb_anon.png``, which is appended again; a name that
already ends in ``_rgb_anon`` or ``.png`` is kept. The ``trainids`` format writes
``<name>.png``.

Writes are atomic (temporary file in the same folder, then ``os.replace``), so an interrupted
run never leaves a truncated PNG or zip behind. This module is plain numpy/PIL; the Lightning
callback that feeds it during ``udaseg predict`` is
:class:`udaseg.engine.callbacks.SubmissionWriter`.
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Literal

import numpy as np

from udaseg.data.classes import IGNORE_INDEX, NUM_CLASSES
from udaseg.eval.report import _atomic_write, colorize

__all__ = [
    "COLOR_DIR",
    "DARK_ZURICH_FOLDERS",
    "FORMATS",
    "SERVER_SIZE",
    "SubmissionFormat",
    "check_submission",
    "check_submission_main",
    "expected_names_from_images",
    "submission_file_name",
    "write_prediction",
    "zip_submission",
]

SubmissionFormat = Literal["dark_zurich", "acdc", "trainids"]
FORMATS: tuple[str, ...] = ("dark_zurich", "acdc", "trainids")
DARK_ZURICH_FOLDERS: tuple[str, str, str] = ("labelTrainIds", "labelTrainIds_invalid", "confidence")
COLOR_DIR = "color"
SERVER_SIZE: tuple[int, int] = (1080, 1920)
"""(H, W) of every Dark Zurich and ACDC image, hence of every prediction the servers accept."""
INPUT_SUFFIX = "_rgb_anon"
CONFIDENCE_SCALE = 65535

_DEFAULT_SIZE: dict[str, tuple[int, int] | None] = {
    "dark_zurich": SERVER_SIZE,
    "acdc": SERVER_SIZE,
    "trainids": None,
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {
    0: "greyscale",
    2: "RGB colour",
    3: "palette",
    4: "greyscale+alpha",
    6: "RGBA colour",
}

PathLike = str | os.PathLike[str]


def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown submission format {fmt!r}; choose from {list(FORMATS)}")
    return fmt


# --------------------------------------------------------------------------- names
def submission_file_name(name: str, fmt: SubmissionFormat) -> str:
    """The PNG file name the server expects for the sample called ``name``.

    ``dark_zurich`` / ``acdc``: the input image's basename, ``<stem>_rgb_anon.png`` (a ``name``
    already ending in ``_rgb_anon`` gets ``.png``, one ending in ``.png`` is kept). ``trainids``:
    ``<name>.png`` (or ``name`` when it already ends in ``.png``).

    Raises:
        ValueError: ``name`` is empty or holds a path separator (the formats are flat).
    """
    _check_fmt(fmt)
    if not name or "/" in name or "\\" in name or name.strip(".") == "":
        raise ValueError(
            f"submission name {name!r} is not a plain file name; the server formats are flat "
            "(pass the sample name without folders)"
        )
    if name.endswith(".png"):
        return name
    if fmt == "trainids" or name.endswith(INPUT_SUFFIX):
        return f"{name}.png"
    return f"{name}{INPUT_SUFFIX}.png"


def expected_names_from_images(
    image_dir: PathLike, pattern: str = f"*{INPUT_SUFFIX}.png"
) -> list[str]:
    """Sorted basenames of the input images under ``image_dir`` (recursive), for
    :func:`check_submission` (e.g. ``<dark_zurich>/rgb_anon/test/night`` -> 151 names).

    Raises:
        FileNotFoundError: ``image_dir`` is not a folder or holds no file matching ``pattern``.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    names = sorted({p.name for p in image_dir.rglob(pattern) if p.is_file()})
    if not names:
        raise FileNotFoundError(f"no files matching {pattern!r} under {image_dir}")
    return names


# --------------------------------------------------------------------------- writing
def _as_train_ids(pred: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(pred)
    if arr.ndim != 2:
        raise ValueError(
            f"prediction {name!r}: expected an (H, W) train-ID map, got shape {arr.shape}"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"prediction {name!r}: expected integer train IDs, got dtype {arr.dtype} "
            "(pass the argmax over classes, not logits or probabilities)"
        )
    bad = ((arr < 0) | (arr >= NUM_CLASSES)) & (arr != IGNORE_INDEX)
    if bad.any():
        values = np.unique(arr[bad])[:10].tolist()
        raise ValueError(
            f"prediction {name!r}: values {values} are not train IDs 0..{NUM_CLASSES - 1} or "
            f"{IGNORE_INDEX}"
        )
    return arr.astype(np.uint8)


def _as_confidence(conf: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(conf, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"confidence {name!r}: shape {arr.shape} != prediction shape {shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"confidence {name!r}: holds NaN or inf")
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"confidence {name!r}: values in [{lo}, {hi}], expected [0, 1]")
    return np.clip(arr, 0.0, 1.0)


def _write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    image = Image.fromarray(
        np.ascontiguousarray(array)
    )  # uint8 -> L, uint16 -> I;16, (H,W,3) -> RGB
    return _atomic_write(path, lambda f: image.save(f, format="PNG"))


def write_prediction(
    out_dir: PathLike,
    fmt: SubmissionFormat,
    name: str,
    pred: np.ndarray,
    confidence: np.ndarray | None = None,
    invalid_threshold: float | None = None,
    color: bool = False,
) -> dict[str, Path]:
    """Write one prediction in a server format (see the module docstring for the layouts).

    Args:
        out_dir: the submission folder (created).
        fmt: ``dark_zurich``, ``acdc`` or ``trainids``.
        name: the sample name (see :func:`submission_file_name`).
        pred: ``(H, W)`` integer train IDs 0..18 (255 allowed) at the input image's size; the
            caller resizes, :func:`check_submission` verifies the servers' 1920x1080.
        confidence: ``(H, W)`` floats in [0, 1] (max softmax). Dark Zurich only; without it the
            confidence map is constant 65535 (the usual workaround when UIoU is not wanted).
        invalid_threshold: Dark Zurich only: pixels with ``confidence < invalid_threshold`` are
            255 in ``labelTrainIds_invalid``; None copies ``labelTrainIds``.
        color: also write ``color/<file>``, a Cityscapes-palette RGB preview.

    Returns:
        ``{"labelTrainIds": path, ...}`` for Dark Zurich, ``{"trainIds": path}`` for the flat
        formats, plus ``{"color": path}`` when ``color`` is set.
    """
    _check_fmt(fmt)
    out_dir = Path(out_dir)
    file_name = submission_file_name(name, fmt)
    labels = _as_train_ids(pred, name)
    conf = None if confidence is None else _as_confidence(confidence, labels.shape, name)
    if invalid_threshold is not None:
        if fmt != "dark_zurich":
            raise ValueError(
                f"invalid_threshold applies to the dark_zurich format only, not {fmt!r}"
            )
        if not 0.0 <= invalid_threshold <= 1.0:
            raise ValueError(f"invalid_threshold must be in [0, 1], got {invalid_threshold}")
        if conf is None:
            raise ValueError(f"prediction {name!r}: invalid_threshold needs a confidence map")

    written: dict[str, Path] = {}
    if fmt == "dark_zurich":
        invalid = labels.copy()
        if invalid_threshold is not None and conf is not None:
            invalid[conf < invalid_threshold] = IGNORE_INDEX
        if conf is None:
            conf_u16 = np.full(labels.shape, CONFIDENCE_SCALE, dtype=np.uint16)
        else:
            conf_u16 = np.rint(conf * CONFIDENCE_SCALE).astype(np.uint16)
        for folder, array in zip(DARK_ZURICH_FOLDERS, (labels, invalid, conf_u16), strict=True):
            written[folder] = _write_png(out_dir / folder / file_name, array)
    else:
        written["trainIds"] = _write_png(out_dir / file_name, labels)
    if color:
        written["color"] = _write_png(out_dir / COLOR_DIR / file_name, colorize(labels))
    return written


# --------------------------------------------------------------------------- zipping
def _submission_files(out_dir: Path, fmt: str) -> list[tuple[str, Path]]:
    """(archive name, file) pairs of what goes into the zip, sorted."""
    if fmt == "dark_zurich":
        files = [
            (f"{folder}/{p.name}", p)
            for folder in DARK_ZURICH_FOLDERS
            for p in sorted((out_dir / folder).glob("*.png"))
            if p.is_file()
        ]
    else:
        files = [(p.name, p) for p in sorted(out_dir.glob("*.png")) if p.is_file()]
    return files


def zip_submission(
    out_dir: PathLike, zip_path: PathLike, fmt: SubmissionFormat = "dark_zurich"
) -> Path:
    """Zip a submission folder written by :func:`write_prediction` for upload.

    ``dark_zurich``: the zip's top level is exactly ``labelTrainIds/``, ``labelTrainIds_invalid/``
    and ``confidence/`` (with their PNGs). ``acdc`` / ``trainids``: the PNGs at the top level.
    The ``color/`` previews and any other file are left out. Entries are sorted and carry a fixed
    timestamp, so the same predictions give the same zip; the zip is written to a temporary file
    and moved into place.

    Raises:
        FileNotFoundError: ``out_dir`` does not exist or holds no prediction PNG.
    """
    _check_fmt(fmt)
    out_dir, zip_path = Path(out_dir), Path(zip_path)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"submission folder {out_dir} does not exist")
    files = _submission_files(out_dir, fmt)
    if not files:
        where = "labelTrainIds/ etc." if fmt == "dark_zurich" else "its top level"
        raise FileNotFoundError(f"no prediction PNGs in {out_dir} ({where}); nothing to zip")
    stamp = (1980, 1, 1, 0, 0, 0)

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            if fmt == "dark_zurich":
                for folder in DARK_ZURICH_FOLDERS:
                    info = zipfile.ZipInfo(f"{folder}/", date_time=stamp)
                    info.external_attr = (0o40755 << 16) | 0x10
                    zf.writestr(info, b"")
            for arcname, path in files:
                info = zipfile.ZipInfo(arcname, date_time=stamp)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())

    return _atomic_write(zip_path, write)


# --------------------------------------------------------------------------- checking
class _Tree:
    """The files of a submission folder or zip: relative POSIX path -> reader."""

    def __init__(self, files: dict[str, Callable[[], bytes]], dirs: set[str], is_zip: bool):
        self.files = files
        self.dirs = dirs
        self.is_zip = is_zip

    @classmethod
    def from_folder(cls, root: Path) -> _Tree:
        files: dict[str, Callable[[], bytes]] = {}
        dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            prefix = "" if rel == "." else f"{rel}/"
            dirs |= {f"{prefix}{d}" for d in dirnames}
            for fn in filenames:
                files[f"{prefix}{fn}"] = lambda p=Path(dirpath) / fn: p.read_bytes()
        return cls(files, dirs, is_zip=False)

    @classmethod
    def from_zip(cls, zf: zipfile.ZipFile) -> _Tree:
        files: dict[str, Callable[[], bytes]] = {}
        dirs: set[str] = set()
        for info in zf.infolist():
            name = info.filename
            parts = name.rstrip("/").split("/")
            dirs |= {"/".join(parts[:i]) for i in range(1, len(parts))}
            if info.is_dir():
                dirs.add(name.rstrip("/"))
            else:
                files[name] = lambda n=name: zf.read(n)
        return cls(files, dirs, is_zip=True)

    def top_level(self) -> set[str]:
        return {p.split("/")[0] for p in (*self.files, *self.dirs)}


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk; None if not a PNG."""
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data[24], data[25]


def _fmt_size(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _check_png(
    rel: str,
    data: bytes,
    kind: Literal["labels", "confidence"],
    expected_size: tuple[int, int] | None,
    problems: list[str],
) -> np.ndarray | None:
    """Append the problems of one PNG; return its pixels when it is a well-formed map."""
    header = _png_header(data)
    if header is None:
        problems.append(f"{rel}: not a PNG file")
        return None
    width, height, depth, ctype = header
    ok = True
    if kind == "labels":
        if ctype in (2, 6):
            problems.append(
                f"{rel}: colour PNG ({_COLOR_TYPES[ctype]}); the server needs single-channel "
                "train-ID PNGs (uint8, 0..18, 255), not the colour preview"
            )
            ok = False
        elif ctype != 0:
            problems.append(
                f"{rel}: {_COLOR_TYPES.get(ctype, f'colour type {ctype}')} PNG; write a plain "
                "8-bit greyscale train-ID PNG (uint8)"
            )
            ok = False
        elif depth != 8:
            problems.append(f"{rel}: {depth}-bit PNG, expected 8-bit (uint8) train IDs")
            ok = False
    else:
        if ctype != 0:
            problems.append(
                f"{rel}: {_COLOR_TYPES.get(ctype, f'colour type {ctype}')} PNG, expected a 16-bit "
                "greyscale (uint16) confidence map"
            )
            ok = False
        elif depth != 16:
            problems.append(
                f"{rel}: {depth}-bit (uint{depth}) PNG, expected 16-bit (uint16) confidence, "
                f"0..{CONFIDENCE_SCALE} for 0..1"
            )
            ok = False
    if expected_size is not None and (height, width) != tuple(expected_size):
        problems.append(
            f"{rel}: size {width}x{height} (WxH), expected {_fmt_size(expected_size)} "
            "(the input image size)"
        )
    if not ok:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            array = np.array(im)
    except (OSError, ValueError, SyntaxError) as exc:  # damaged PNG: report, do not stop
        problems.append(f"{rel}: cannot decode PNG ({exc})")
        return None
    if kind == "labels":
        bad = (array >= NUM_CLASSES) & (array != IGNORE_INDEX)
        if bad.any():
            values = np.unique(array[bad])
            hint = (
                "; it looks like Cityscapes labelIds, convert them to train IDs"
                if values.max() <= 33
                else ""
            )
            problems.append(
                f"{rel}: values {values[:10].tolist()} outside train IDs 0..{NUM_CLASSES - 1} "
                f"and {IGNORE_INDEX}{hint}"
            )
            return None
        return array.astype(np.uint8)
    return array.astype(np.uint16)


def _check_names(
    where: str, present: set[str], expected: set[str] | None, problems: list[str]
) -> None:
    if expected is None:
        return
    for fn in sorted(expected - present):
        problems.append(f"{where}{fn}: missing (no prediction for this test image)")
    for fn in sorted(present - expected):
        problems.append(f"{where}{fn}: extra file (not a test image name)")


def _check_dark_zurich(
    tree: _Tree, expected: set[str] | None, size: tuple[int, int] | None, problems: list[str]
) -> None:
    top = tree.top_level()
    allowed = set(DARK_ZURICH_FOLDERS) | (set() if tree.is_zip else {COLOR_DIR})
    if not top & set(DARK_ZURICH_FOLDERS):
        wrappers = [
            w for w in sorted(top) if all(f"{w}/{f}" in tree.dirs for f in DARK_ZURICH_FOLDERS)
        ]
        if wrappers:
            problems.append(
                f"{wrappers[0]}/: the three folders are inside {wrappers[0]!r}; they must be at "
                "the top level (zip the folders themselves, not their parent)"
            )
            top = top - {wrappers[0]}
            for entry in sorted(top - allowed):
                problems.append(f"{entry}: unexpected top-level entry")
            return
    for entry in sorted(top - allowed):
        what = "folder" if entry in tree.dirs else "file"
        problems.append(
            f"{entry}: unexpected top-level {what}; the top level must hold exactly "
            f"{', '.join(f + '/' for f in DARK_ZURICH_FOLDERS)}"
        )
    per_folder: dict[str, set[str]] = {}
    for folder in DARK_ZURICH_FOLDERS:
        if folder not in tree.dirs:
            problems.append(f"{folder}/: folder missing")
            per_folder[folder] = set()
            continue
        names: set[str] = set()
        for path in tree.files:
            if not path.startswith(f"{folder}/"):
                continue
            rest = path[len(folder) + 1 :]
            if "/" in rest:
                problems.append(f"{path}: nested path; PNGs must lie directly in {folder}/")
            elif not rest.endswith(".png"):
                problems.append(f"{path}: extra file (not a PNG)")
            else:
                names.add(rest)
        nested = sorted(d for d in tree.dirs if d.startswith(f"{folder}/"))
        for d in nested:
            if not any(p.startswith(f"{d}/") for p in tree.files):
                problems.append(f"{d}/: unexpected subfolder in {folder}/")
        per_folder[folder] = names
        if not names:
            problems.append(f"{folder}/: no prediction PNGs")

    everything = set().union(*per_folder.values())
    reference = expected if expected is not None else everything
    for folder in DARK_ZURICH_FOLDERS:
        if folder in tree.dirs:
            _check_names(f"{folder}/", per_folder[folder], reference, problems)

    for fn in sorted(everything):
        arrays: dict[str, np.ndarray | None] = {}
        for folder in DARK_ZURICH_FOLDERS:
            if fn not in per_folder[folder]:
                continue
            rel = f"{folder}/{fn}"
            kind: Literal["labels", "confidence"] = (
                "confidence" if folder == "confidence" else "labels"
            )
            arrays[folder] = _check_png(rel, tree.files[rel](), kind, size, problems)
        shapes = {f: a.shape for f, a in arrays.items() if a is not None}
        if len(set(shapes.values())) > 1:
            desc = ", ".join(f"{f}/ {_fmt_size(s)}" for f, s in shapes.items())
            problems.append(f"{fn}: the three maps differ in size ({desc})")
            continue
        labels, invalid = arrays.get("labelTrainIds"), arrays.get("labelTrainIds_invalid")
        if labels is not None and invalid is not None:
            differ = int(((invalid != labels) & (invalid != IGNORE_INDEX)).sum())
            if differ:
                problems.append(
                    f"labelTrainIds_invalid/{fn}: differs from labelTrainIds at {differ} pixels "
                    f"that are not {IGNORE_INDEX} (it must be the same map with {IGNORE_INDEX} "
                    "marking invalid pixels)"
                )


def _check_flat(
    tree: _Tree, expected: set[str] | None, size: tuple[int, int] | None, problems: list[str]
) -> None:
    names: set[str] = set()
    for path in sorted(tree.files):
        top = path.split("/")[0]
        if "/" in path:
            if not tree.is_zip and top == COLOR_DIR:
                continue
            problems.append(f"{path}: nested path; the format is flat (PNGs at the top level)")
        elif not path.endswith(".png"):
            problems.append(f"{path}: extra file (not a PNG)")
        else:
            names.add(path)
    if not names:
        problems.append("no prediction PNGs at the top level")
    _check_names("", names, expected, problems)
    for fn in sorted(names):
        _check_png(fn, tree.files[fn](), "labels", size, problems)


def check_submission(
    path: PathLike,
    fmt: SubmissionFormat,
    expected_names: Iterable[str] | None = None,
    expected_size: tuple[int, int] | Literal["any"] | None = None,
) -> list[str]:
    """Everything wrong with a submission folder or zip; an empty list means it is valid.

    Checks (all of them, it does not stop at the first problem):

    * structure: Dark Zurich's top level is exactly the three folders (a wrapping folder, a
      missing folder, ``__MACOSX/`` or a stray file is reported); ACDC / trainids are flat;
    * names: one file per expected name in every folder, no missing and no extra files (without
      ``expected_names`` the three Dark Zurich folders must at least hold the same names);
    * encoding: train-ID maps are 8-bit greyscale PNGs with values 0..18 or 255 (a colour or
      palette PNG, a 16-bit map or Cityscapes labelIds are reported); the Dark Zurich confidence
      is a 16-bit greyscale PNG;
    * size: every map has ``expected_size``, and Dark Zurich's three maps of one image agree;
      ``labelTrainIds_invalid`` equals ``labelTrainIds`` except where it is 255.

    Each problem is one line starting with the offending path (relative to the submission),
    e.g. ``"confidence/GOPR0356_frame_000321_rgb_anon.png: 8-bit (uint8) PNG, expected 16-bit"``.
    In a folder, the ``color/`` previews are ignored.

    Args:
        path: the submission folder or its ``.zip``.
        fmt: ``dark_zurich``, ``acdc`` or ``trainids``.
        expected_names: the test images, as sample names or input file names (both are mapped
            through :func:`submission_file_name`), e.g. from :func:`expected_names_from_images`.
        expected_size: (H, W) every map must have; None = the format's (1080x1920 for
            dark_zurich and acdc, none for trainids); ``"any"`` skips the size check.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    _check_fmt(fmt)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"submission {path} does not exist")
    expected = (
        None if expected_names is None else {submission_file_name(n, fmt) for n in expected_names}
    )
    if expected_size == "any":
        size = None
    elif expected_size is None:
        size = _DEFAULT_SIZE[fmt]
    else:
        size = (int(expected_size[0]), int(expected_size[1]))
    problems: list[str] = []
    if path.is_dir():
        tree = _Tree.from_folder(path)
        _run_checks(tree, fmt, expected, size, problems)
        return problems
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [f"{path.name}: not a readable zip file ({exc})"]
    with zf:
        _run_checks(_Tree.from_zip(zf), fmt, expected, size, problems)
    return problems


def _run_checks(
    tree: _Tree,
    fmt: str,
    expected: set[str] | None,
    size: tuple[int, int] | None,
    problems: list[str],
) -> None:
    if fmt == "dark_zurich":
        _check_dark_zurich(tree, expected, size, problems)
    else:
        _check_flat(tree, expected, size, problems)


# --------------------------------------------------------------------------- command line
def check_submission_main(
    argv: Sequence[str] | None = None, prog: str = "udaseg check-submission"
) -> int:
    """``udaseg check-submission PATH --format F [--images DIR] [--size H W | --any-size]``.

    Prints every problem (or one ``OK`` line) and returns 0 when the submission is valid, 1
    otherwise.
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description="Check a benchmark-server submission (folder or zip) before uploading it.",
    )
    p.add_argument("path", help="the submission folder or .zip")
    p.add_argument("--format", dest="fmt", choices=FORMATS, required=True, help="server format")
    p.add_argument(
        "--images",
        help="folder of the test input images (searched recursively for *_rgb_anon.png), e.g. "
        "<dark_zurich>/rgb_anon/test/night; checks that every image has exactly one prediction",
    )
    p.add_argument(
        "--pattern", default=f"*{INPUT_SUFFIX}.png", help="input file pattern for --images"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="expected map size")
    size.add_argument("--any-size", action="store_true", help="skip the size check")
    a = p.parse_args(None if argv is None else list(argv))
    names = expected_names_from_images(a.images, a.pattern) if a.images else None
    expected_size = "any" if a.any_size else (tuple(a.size) if a.size else None)
    problems = check_submission(a.path, a.fmt, names, expected_size)
    if not problems:
        count = f"{len(names)} images, " if names else ""
        print(f"OK: {a.path} is a valid {a.fmt} submission ({count}no problems found)")
        return 0
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {a.path}")
    return 1
