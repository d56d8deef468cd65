"""Bad-input corpus (issue 7): every broken file, config or checkpoint ends in ONE clear error.

Each case breaks a copy of a tiny dataset (or writes a bad config or checkpoint), runs a loader
or the ``udaseg`` command, and checks the error type and that the message names the culprit (the
file or the key) AND says how to fix it. The command cases also check exit status 1, a single
``udaseg <cmd>: error:`` line, no traceback, and a message short enough to read. The last tests
check that a run failing on a broken input leaves the files already in its output folder as they
were and writes no checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udaseg.data.datasets.cityscapes import Cityscapes
from udaseg.data.datasets.dark_zurich import DarkZurich
from udaseg.engine.cli import main
from udaseg.errors import ConfigError, DataError

from .conftest import make_tiny_cityscapes, write_png

MAX_MESSAGE = 1500
"""An error longer than this (characters, from ``error:`` on) is a wall of text, not a message."""

CS_IMG = "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png"
CS_LAB = "gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png"
DZ_DEPTH = "depth_any/val/night/GOPR0356/GOPR0356_frame_000001_depth.png"
DSEC_SEQ = "zurich_city_99_a"
DSEC_EVENTS = f"{DSEC_SEQ}/events/left/events.h5"


# -- helpers ------------------------------------------------------------------------------------


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def load_all(ds) -> None:
    for i in range(len(ds)):
        ds[i]


def check_message(msg: str, culprit: str, fix: str) -> None:
    assert re.search(culprit, msg), f"the error does not name {culprit!r}:\n{msg}"
    assert re.search(fix, msg), f"the error gives no fix ({fix!r}):\n{msg}"


def check_cli_error(rc: int, err: str, cmd: str, culprit: str, fix: str) -> None:
    """Exit 1, one ``udaseg <cmd>: error:`` line, no traceback, culprit and fix, short."""
    assert rc == 1, f"exit status {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"udaseg {cmd}: error: ")]
    assert len(lines) == 1, err[-3000:]
    msg = err[err.index(lines[0]):]
    check_message(msg, culprit, fix)
    assert len(msg) <= MAX_MESSAGE, f"{len(msg)} characters:\n{msg[:3000]}"


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``main(args)`` with UDASEG_DEBUG unset; (exit status, stdout, stderr).

    A SystemExit (argparse/jsonargparse errors) counts as its exit status; any other exception
    propagates (it would be a traceback for the user).
    """
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("UDASEG_DEBUG", raising=False)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


# -- loader cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataCase:
    """Break a tiny dataset; load it; expect ``exc`` naming the culprits with the fix.

    ``breaker(root)`` breaks the copy and returns the regexes the message must match (the file
    and/or key); ``load(root)`` is the loader call; ``check``: whether ``udaseg prepare
    cityscapes --check`` must list the problem (None: not a Cityscapes case / not a problem for
    the check).
    """

    id: str
    dataset: str
    breaker: Callable[[Path], list[str]]
    load: Callable[[Path], object]
    exc: type[Exception]
    fix: str
    check: bool | str | None = None


def _esc(*paths: Path) -> list[str]:
    return [re.escape(str(p)) for p in paths]


def _truncated_image(root: Path) -> list[str]:
    return _esc(truncate(root / CS_IMG))


def _not_an_image(root: Path) -> list[str]:
    (root / CS_IMG).write_text("<html><body>403 Forbidden</body></html>\n")  # a failed download
    return _esc(root / CS_IMG)


def _truncated_label(root: Path) -> list[str]:
    return _esc(truncate(root / CS_LAB))


def _label_wrong_size(root: Path) -> list[str]:
    write_png(root / CS_LAB, np.zeros((16, 32), np.uint8))
    return [*_esc(root / CS_LAB), r"16x32", r"32x64"]


def _label_raw_ids(root: Path) -> list[str]:
    lab = np.full((32, 64), 7, np.uint8)
    lab[:, 32:] = 33  # raw Cityscapes labelId (bicycle), not a train ID
    write_png(root / CS_LAB, lab)
    return [*_esc(root / CS_LAB), r"\[33\]"]


def _label_16bit_raw(root: Path) -> list[str]:
    write_png(root / CS_LAB, np.full((32, 64), 1000, np.uint16))
    return [*_esc(root / CS_LAB), r"1000"]


def _label_colour(root: Path) -> list[str]:
    write_png(root / CS_LAB, np.full((32, 64, 3), (128, 64, 128), np.uint8))  # colour-coded road
    return [*_esc(root / CS_LAB), "RGB"]


def _missing_label(root: Path) -> list[str]:
    (root / CS_LAB).unlink()
    return _esc(root / CS_LAB)


def _empty_split(root: Path) -> list[str]:
    (root / "leftImg8bit/test/aachen").mkdir(parents=True)
    return [*_esc(root), "'test'"]


def _no_split_folder(root: Path) -> list[str]:
    return _esc(root / "leftImg8bit" / "test")


def _view_typo(root: Path) -> list[str]:
    return ["'icc'"]


def _dz_missing_depth(root: Path) -> list[str]:
    (root / DZ_DEPTH).unlink()
    return _esc(root / DZ_DEPTH)


def _dz_depth_16bit(root: Path) -> list[str]:
    write_png(root / DZ_DEPTH, np.full((32, 64), 40000, np.uint16))  # would clip to 255
    return [*_esc(root / DZ_DEPTH), "I;16"]


def _dz_depth_float(root: Path) -> list[str]:
    # a float32 map saved as TIFF under the expected .png name (Pillow reads by content)
    Image.fromarray(np.full((32, 64), 0.5, np.float32)).save(root / DZ_DEPTH, format="TIFF")
    return [*_esc(root / DZ_DEPTH), "'F'"]


def _dz_depth_truncated(root: Path) -> list[str]:
    return _esc(truncate(root / DZ_DEPTH))


DEPTH_FIX = r"Regenerate it as an 8-bit grey PNG.*rescale 16-bit, 32-bit or float maps to 0\.\.255"
IMAGE_FIX = r"re-extract it from the dataset archive"

DATA_CASES = [
    DataCase("truncated_image", "cityscapes", _truncated_image, lambda r: load_all(Cityscapes(r)),
             DataError, IMAGE_FIX, check=True),
    DataCase("not_an_image", "cityscapes", _not_an_image, lambda r: load_all(Cityscapes(r)),
             DataError, IMAGE_FIX, check=True),
    DataCase("truncated_label", "cityscapes", _truncated_label, lambda r: load_all(Cityscapes(r)),
             DataError, r"re-extract it from the\s+dataset archive or re-run `udaseg prepare`",
             check=True),
    DataCase("label_wrong_size", "cityscapes", _label_wrong_size,
             lambda r: load_all(Cityscapes(r)), DataError, "Restore it from the dataset archive",
             check=True),
    DataCase("label_raw_label_ids", "cityscapes", _label_raw_ids,
             lambda r: load_all(Cityscapes(r)), DataError,
             r"convert it to train IDs with `udaseg prepare`", check=True),
    DataCase("label_16bit_raw_ids", "cityscapes", _label_16bit_raw,
             lambda r: load_all(Cityscapes(r)), DataError,
             r"convert it to train IDs with `udaseg prepare`", check=True),
    DataCase("label_colour_coded", "cityscapes", _label_colour, lambda r: load_all(Cityscapes(r)),
             DataError, r"converted: run `udaseg prepare`", check=True),
    DataCase("missing_partner_label", "cityscapes", _missing_label, lambda r: Cityscapes(r),
             DataError, r"run `udaseg prepare cityscapes <root>`", check=True),
    DataCase("empty_split", "cityscapes", _empty_split, lambda r: Cityscapes(r, split="test"),
             DataError, r"Check the root folder and the split name", check=True),
    DataCase("missing_split_folder", "cityscapes", _no_split_folder,
             lambda r: Cityscapes(r, split="test"), FileNotFoundError,
             r"extract leftImg8bit_trainvaltest\.zip into the root"),
    DataCase("unknown_view", "cityscapes", _view_typo, lambda r: Cityscapes(r, views=["icc"]),
             ConfigError, r"choose from \('ic', 'depth'\)"),
    DataCase("dark_zurich_missing_depth", "dark_zurich", _dz_missing_depth,
             lambda r: DarkZurich(r, views=["depth"]), DataError, r"drop the view"),
    DataCase("dark_zurich_depth_16bit", "dark_zurich", _dz_depth_16bit,
             lambda r: load_all(DarkZurich(r, views=["depth"])), DataError, DEPTH_FIX),
    DataCase("dark_zurich_depth_float_tiff", "dark_zurich", _dz_depth_float,
             lambda r: load_all(DarkZurich(r, views=["depth"])), DataError, DEPTH_FIX),
    DataCase("dark_zurich_depth_truncated", "dark_zurich", _dz_depth_truncated,
             lambda r: load_all(DarkZurich(r, views=["depth"])), DataError, DEPTH_FIX),
]


@pytest.fixture
def dataset_copy(request, tmp_path):
    """The tiny dataset named by the case (a fresh copy per test)."""
    name = request.param
    if name == "cityscapes":
        return make_tiny_cityscapes(tmp_path / "cityscapes")
    return request.getfixturevalue("tiny_dark_zurich")


@pytest.mark.parametrize(
    "case,dataset_copy", [(c, c.dataset) for c in DATA_CASES], ids=[c.id for c in DATA_CASES],
    indirect=["dataset_copy"],
)
def test_loader_error_names_the_file_and_the_fix(case: DataCase, dataset_copy: Path):
    root = dataset_copy
    culprits = case.breaker(root)
    with pytest.raises(case.exc) as info:
        case.load(root)
    msg = str(info.value)
    for culprit in culprits:
        check_message(msg, culprit, case.fix)
    assert "Traceback" not in msg


CHECK_CASES = [c for c in DATA_CASES if c.check]


@pytest.mark.parametrize("case", CHECK_CASES, ids=[c.id for c in DATA_CASES if c.check])
def test_prepare_check_lists_the_problem_and_writes_nothing(case: DataCase, tmp_path):
    root = make_tiny_cityscapes(tmp_path / "cityscapes")
    culprits = case.breaker(root)
    before = snapshot(root)
    rc, out, err = run_cli(["prepare", "cityscapes", str(root), "--check", "--quiet",
                            "--workers", "1"])
    assert snapshot(root) == before, "prepare --check wrote into the dataset"
    assert "Traceback" not in err
    assert rc == 1, out
    for culprit in culprits:
        assert re.search(culprit, out), f"`prepare --check` does not list {culprit!r}:\n{out}"


# -- DSEC events.h5 -----------------------------------------------------------------------------


@pytest.fixture
def dsec_root(tmp_path) -> Path:
    """One prepared DSEC Night-Semantic sequence (test frames 5 and 19)."""
    from udaseg.data.dsec_index import prepare_dsec

    from .data.test_dsec import make_sequence

    root = tmp_path / "DSEC_Night"
    make_sequence(root, DSEC_SEQ, 20, list(range(10)), [5, 19], seed=2)
    prepare_dsec(root)
    return root


def _drop_h5(path: Path, key: str) -> None:
    import h5py
    import hdf5plugin  # noqa: F401  (the Blosc filter of the event datasets)

    with h5py.File(path, "a") as f:
        del f[key]


@pytest.mark.parametrize("key", ["events/t", "ms_to_idx", "events"])
def test_events_file_missing_entry(dsec_root: Path, key: str):
    from udaseg.data.datasets.dsec import DSECNightSemantic

    events = dsec_root / DSEC_EVENTS
    _drop_h5(events, key)
    with pytest.raises(DataError) as info:
        DSECNightSemantic(dsec_root, split="test")
    wanted = "events/t" if key == "events" else key
    check_message(str(info.value), re.escape(str(events)), r"extract it to <root>/<sequence>/events/left/")
    assert re.search(rf"lacks [^;]*{re.escape(wanted)}", str(info.value))


def test_events_file_truncated(dsec_root: Path):
    from udaseg.data.datasets.dsec import DSECNightSemantic

    events = truncate(dsec_root / DSEC_EVENTS)
    with pytest.raises(DataError) as info:
        DSECNightSemantic(dsec_root, split="test")
    check_message(str(info.value), re.escape(str(events)), r"Download the sequence's events archive")


def test_events_file_missing(dsec_root: Path):
    from udaseg.data.datasets.dsec import DSECNightSemantic

    (dsec_root / DSEC_EVENTS).unlink()
    with pytest.raises(DataError) as info:
        DSECNightSemantic(dsec_root, split="test")
    check_message(str(info.value), re.escape(str(dsec_root / DSEC_EVENTS)),
                  r"or drop the events view")


def test_prepare_dsec_on_a_broken_events_file_is_one_line(tmp_path):
    from .data.test_dsec import make_sequence

    root = tmp_path / "DSEC_Night"
    make_sequence(root, DSEC_SEQ, 20, list(range(10)), [5, 19], seed=2)
    _drop_h5(root / DSEC_EVENTS, "ms_to_idx")
    rc, _, err = run_cli(["prepare", "dsec_night", str(root), "--quiet", "--workers", "1"])
    check_cli_error(rc, err, "prepare", re.escape(str(root / DSEC_EVENTS)) + ".*ms_to_idx",
                    r"Download the sequence's events archive")
    assert not (root / DSEC_SEQ / "images/images_to_events_index.txt").exists()


# -- configs and checkpoints through `udaseg fit` / `udaseg export-weights` ---------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A read-only tiny Cityscapes and a few checkpoint files, made once for the module."""
    import torch

    from udaseg.engine.module import UDAModule

    base = tmp_path_factory.mktemp("bad_inputs")
    files = {"cityscapes": make_tiny_cityscapes(base / "cityscapes")}
    # a udaseg checkpoint of another architecture (DAFormer head; the configs below use SegFormer)
    other = UDAModule(backbone="mit_tiny", head="daformer", head_channels=16)
    files["other_arch"] = base / "daformer_tiny.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.model.state_dict().items()},
                "hyper_parameters": dict(other.hparams)}, files["other_arch"])
    # a checkpoint of another code base: mmseg-style keys, no `model.` prefix
    files["mmseg"] = base / "iter_40000.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in
                               other.model.backbone.state_dict().items()}
                | {"decode_head.conv_seg.weight": torch.zeros(19, 16, 1, 1)}}, files["mmseg"])
    files["text"] = base / "notes.ckpt"
    files["text"].write_text("step,loss\n0,1.0\n")  # a metrics file given as a checkpoint
    files["truncated"] = base / "cut.ckpt"  # an interrupted copy of a real checkpoint
    files["truncated"].write_bytes(files["other_arch"].read_bytes()[:4096])
    files["safetensors"] = base / "bad.safetensors"
    files["safetensors"].write_bytes(b"\x00" * 32)
    return files


def write_fit_config(path: Path, source_root: Path, out: Path, *, model: str = "",
                     source: str = "", top: str = "", num_workers: int = 0,
                     max_steps: int = 1) -> Path:
    path.write_text(
        f"trainer: {{accelerator: cpu, devices: 1, max_steps: {max_steps}, logger: false,\n"
        "          enable_progress_bar: false, enable_model_summary: false,\n"
        f"          num_sanity_val_steps: 0, default_root_dir: {out}}}\n"
        "model: {backbone: mit_tiny, head: segformer, head_channels: 16, "
        f"drop_path_rate: 0.0{model}}}\n"
        "data:\n"
        f"  source: {{name: cityscapes, root: {source_root}{source}}}\n"
        "  val: {}\n"
        "  batch_size: 1\n"
        f"  num_workers: {num_workers}\n"
        "  source_pipeline: {scale: [64, 32], crop_size: [32, 32]}\n"
        f"{top}"
    )
    return path


@dataclass(frozen=True)
class FitCase:
    """A config fragment for `udaseg fit`; the culprit and fix regexes of its error."""

    id: str
    model: str = ""
    source: str = ""
    top: str = ""
    culprit: str = ""
    fix: str = ""


CKPT_FIX = r"(re-save only the tensors|udaseg convert)"
FIT_CASES = [
    FitCase("unknown_model_key", model=", backbnoe: mit_b0", culprit=r"model\.backbnoe",
            fix=r"udaseg fit --help"),
    FitCase("unknown_top_level_key", top="seed_everythin: 3\n", culprit=r"seed_everythin",
            fix=r"udaseg fit --help"),
    FitCase("method_typo", model=", methods: {mci: {}}", culprit=r"'mci'",
            fix=r"known methods: .*\bmic\b"),
    FitCase("method_setting_typo", model=", methods: {mic: {blok_size: 32}}",
            culprit=r"model\.methods\.mic.*blok_size", fix=r"accepts: .*'block_size'"),
    FitCase("dataset_name_typo", source=", name: cityscape", culprit=r"'cityscape'",
            fix=r"known datasets: .*\bcityscapes\b"),
    FitCase("dataset_option_typo", source=", options: {conditon: night}",
            culprit=r"cityscapes.*'conditon'", fix=r"Cityscapes accepts \['depth_transform', 'views'\]"),
    FitCase("dataset_view_typo", source=", views: [icc]", culprit=r"cityscapes.*'icc'",
            fix=r"choose from \('ic', 'depth'\)"),
    FitCase("backbone_typo", model=", backbone: mit_b9", culprit=r"'mit_b9'",
            fix=r"mit_b0, .*mit_tiny"),
    FitCase("label_set_typo", model=", label_set: cityscapes20", culprit=r"'cityscapes20'",
            fix=r"known label sets"),
    FitCase("init_weights_other_architecture", model=", init_weights: {other_arch}",
            culprit=r"model\.init_weights: {other_arch}", fix=r"backbone.*head.*(width|channels)"),
    FitCase("init_weights_other_codebase", model=", init_weights: {mmseg}",
            culprit=r"model\.init_weights: {mmseg}", fix=r"udaseg convert"),
    FitCase("init_weights_not_a_checkpoint", model=", init_weights: {text}", culprit=r"{text}",
            fix=CKPT_FIX),
    FitCase("init_weights_truncated", model=", init_weights: {truncated}",
            culprit=r"{truncated}", fix=CKPT_FIX),
    FitCase("init_weights_bad_safetensors", model=", init_weights: {safetensors}",
            culprit=r"{safetensors}", fix=r"re-(download|export)|udaseg export-weights"),
    FitCase("init_weights_missing_file", model=", init_weights: {missing}",
            culprit=r"{missing}", fix=r"download them first"),
]


def _fill(text: str, files: dict[str, Path], escape: bool) -> str:
    for key, path in files.items():
        text = text.replace(f"{{{key}}}", re.escape(str(path)) if escape else str(path))
    return text


@pytest.mark.parametrize(
    "case",
    FIT_CASES,
    ids=[c.id for c in FIT_CASES],
)
def test_fit_config_error_is_one_clear_line(case: FitCase, shared, tmp_path):
    files = {**shared, "missing": tmp_path / "no_such.ckpt"}
    out = tmp_path / "out"
    cfg = write_fit_config(tmp_path / "bad.yaml", shared["cityscapes"], out,
                           model=_fill(case.model, files, False),
                           source=_fill(case.source, files, False), top=case.top)
    try:
        rc, _, err = run_cli(["fit", "--config", str(cfg)])
    except Exception as exc:  # noqa: BLE001 - an uncaught exception is a traceback for the user
        raise AssertionError(f"uncaught {type(exc).__name__} (a traceback in the CLI): {exc}")
    check_cli_error(rc, err, "fit", _fill(case.culprit, files, True), _fill(case.fix, files, True))
    assert not list(out.rglob("*.ckpt")), "a failed run wrote a checkpoint"


EXPORT_CASES = [
    pytest.param("mmseg", r"udaseg convert"),
    pytest.param("text", CKPT_FIX),
    pytest.param("truncated", CKPT_FIX),
    pytest.param("missing", r"download them first"),
]


@pytest.mark.parametrize("which,fix", EXPORT_CASES)
def test_export_weights_of_a_bad_checkpoint(which: str, fix: str, shared, tmp_path):
    files = {**shared, "missing": tmp_path / "no_such.ckpt"}
    target = tmp_path / "w.safetensors"
    rc, _, err = run_cli(["export-weights", str(files[which]), str(target)])
    check_cli_error(rc, err, "export-weights", re.escape(str(files[which])), fix)
    assert not list(tmp_path.glob("w.safetensors*")), "a partial output file was left behind"


# -- a failing run keeps the output folder intact -----------------------------------------------


OLD_FILES = {
    "checkpoints/last.ckpt": b"PK\x03\x04 a previous run's checkpoint",
    "metrics.csv": b"step,train/src\n0,2.5\n",
    "config.yaml": b"# the previous run's config\nmodel: {backbone: mit_b5}\n",
    "lightning_logs/version_0/metrics.csv": b"step,val/mIoU\n0,41.0\n",
    "lightning_logs/version_0/hparams.yaml": b"backbone: mit_b5\n",
}


@pytest.fixture(scope="module")
def failed_fit(shared, tmp_path_factory) -> dict:
    """`udaseg fit` into a folder holding a previous run, failing mid-run on a truncated label.

    3 training images, batch 1 and 3 steps: the sampler's permutation reaches the broken label
    within the run, possibly after some optimiser steps.
    """
    base = tmp_path_factory.mktemp("failed_fit")
    root = make_tiny_cityscapes(base / "cityscapes")
    broken = truncate(root / CS_LAB)
    out = base / "out"
    for rel, data in OLD_FILES.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    cfg = write_fit_config(base / "c.yaml", root, out, max_steps=3)
    rc, _, err = run_cli(["fit", "--config", str(cfg)])
    return {"rc": rc, "err": err, "out": out, "broken": broken}


def test_failed_fit_reports_the_broken_file(failed_fit):
    check_cli_error(failed_fit["rc"], failed_fit["err"], "fit",
                    re.escape(str(failed_fit["broken"])), r"re-run `udaseg prepare`")


def test_failed_fit_keeps_earlier_files_and_writes_no_checkpoint(failed_fit):
    out = failed_fit["out"]
    after = snapshot(out)
    for rel, data in OLD_FILES.items():
        if rel != "config.yaml":
            assert after.get(rel) == data, f"{rel} was changed or removed"
    new_ckpts = sorted({p for p in after if p.endswith(".ckpt")} - set(OLD_FILES))
    assert not new_ckpts, f"a failed run wrote checkpoints {new_ckpts}"
    assert not [p for p in after if p.endswith((".tmp", ".part"))]


def test_failed_fit_keeps_the_previous_config(failed_fit):
    """The new run's config.yaml does not overwrite the previous run's: that one is kept."""
    files = snapshot(failed_fit["out"])
    assert files.get("config.previous-1.yaml") == OLD_FILES["config.yaml"]
    assert files.get("config.yaml") != OLD_FILES["config.yaml"]  # this run's own config


def test_broken_file_read_in_a_loader_worker_is_one_line(tmp_path):
    root = make_tiny_cityscapes(tmp_path / "cityscapes")
    broken = truncate(root / CS_LAB)
    cfg = write_fit_config(tmp_path / "c.yaml", root, tmp_path / "out", num_workers=1,
                           max_steps=3)
    rc, _, err = run_cli(["fit", "--config", str(cfg)])
    check_cli_error(rc, err, "fit", re.escape(str(broken)), r"re-run `udaseg prepare`")
