"""`predict` end to end: the data module's predict split, predict_step and SubmissionWriter."""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_png
from udaseg.data.transforms import PipelineConfig
from udaseg.engine.callbacks import SubmissionWriter
from udaseg.engine.datamodule import DatasetSpec, UDADataModule
from udaseg.engine.module import UDAModule
from udaseg.errors import ConfigError
from udaseg.eval.export import DARK_ZURICH_FOLDERS, check_submission

MODEL = {"backbone": "mit_tiny", "head": "segformer", "head_channels": 16, "drop_path_rate": 0.0}


def make_dm(dz_root: Path, predict: DatasetSpec | None) -> UDADataModule:
    # 32x64 images keep their size; larger ones are resized down and predicted back up
    pipe = PipelineConfig(scale=(64, 32), crop_size=(32, 32))
    return UDADataModule(
        source=DatasetSpec("cityscapes", "unused"),
        val={"night_val": DatasetSpec("dark_zurich", "unused/val/root", "val")},
        source_pipeline=pipe,
        target_pipeline=pipe,
        num_workers=0,
        predict=predict,
    )


def trainer(tmp_path: Path, callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def test_predict_writes_a_valid_dark_zurich_submission(tiny_dark_zurich, tmp_path, capsys):
    L.seed_everything(0)
    # labels: true is overridden (the test split of the real dataset has none)
    dm = make_dm(
        tiny_dark_zurich, DatasetSpec("dark_zurich", str(tiny_dark_zurich), "val", labels=True)
    )
    out = tmp_path / "preds" / "dz"
    writer = SubmissionWriter(
        str(out), fmt="dark_zurich", invalid_threshold=0.9, expected_size=(32, 64)
    )
    module = UDAModule(**MODEL)
    result = trainer(tmp_path, [writer]).predict(module, datamodule=dm, return_predictions=False)
    assert result is None
    assert dm.predict_set is not None and not hasattr(dm, "val_sets")  # val roots never touched
    assert all(r.label is None for r in dm.predict_set.records)

    names = [r.name for r in dm.predict_set.records]
    files = sorted(f"{n}_rgb_anon.png" for n in names)
    zip_path = tmp_path / "preds" / "dz.zip"
    with zipfile.ZipFile(zip_path) as zf:
        entries = zf.namelist()
    assert {e.split("/")[0] for e in entries} == set(DARK_ZURICH_FOLDERS)
    for folder in DARK_ZURICH_FOLDERS:
        assert (
            sorted(
                e.split("/", 1)[1]
                for e in entries
                if e.startswith(f"{folder}/") and e != f"{folder}/"
            )
            == files
        )
    assert check_submission(zip_path, "dark_zurich", names, expected_size=(32, 64)) == []
    assert check_submission(out, "dark_zurich", names, expected_size=(32, 64)) == []
    assert writer.problems == [] and writer.written == len(names)
    assert sorted(p.name for p in (out / "color").iterdir()) == files
    summary = capsys.readouterr().out
    assert (
        f"SubmissionWriter: {len(names)} dark_zurich predictions" in summary
        and "check: OK" in summary
    )

    # the written maps are the module's predictions: same argmax, confidence scaled to uint16
    direct = trainer(tmp_path, []).predict(module, datamodule=dm)
    assert len(direct) == len(names)
    for batch in direct:
        name, pred, conf = batch["name"][0], batch["pred"][0], batch["confidence"][0]
        assert pred.dtype == torch.uint8 and pred.shape == (32, 64) and conf.dtype == torch.float32
        with Image.open(out / "labelTrainIds" / f"{name}_rgb_anon.png") as im:
            np.testing.assert_array_equal(np.array(im), pred.numpy())
        with Image.open(out / "confidence" / f"{name}_rgb_anon.png") as im:
            c16 = np.array(im)
        np.testing.assert_array_equal(c16, np.rint(conf.double().numpy() * 65535).astype(np.uint16))
        with Image.open(out / "labelTrainIds_invalid" / f"{name}_rgb_anon.png") as im:
            inv = np.array(im)
        expected = pred.numpy().copy()
        expected[conf.numpy() < 0.9] = 255
        np.testing.assert_array_equal(inv, expected)


def test_predict_step_keeps_each_original_size(tmp_path):
    """Images of different original sizes: batch size 1 in the loader, lists in predict_step."""
    root = tmp_path / "dz"
    rng = np.random.default_rng(0)
    for stem, (h, w) in (("GOPR0001_frame_000000", (64, 128)), ("GOPR0001_frame_000001", (48, 80))):
        write_png(
            root / "rgb_anon/test/night/GOPR0001" / f"{stem}_rgb_anon.png",
            rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        )
    dm = make_dm(root, DatasetSpec("dark_zurich", str(root), "test"))
    out = tmp_path / "acdc_like"
    writer = SubmissionWriter(str(out), fmt="acdc", color=False, expected_size="any")
    module = UDAModule(**MODEL)
    trainer(tmp_path, [writer]).predict(module, datamodule=dm, return_predictions=False)
    sizes = {}
    for p in sorted(out.iterdir()):
        with Image.open(p) as im:
            sizes[p.name] = (im.height, im.width, im.mode)
    assert sizes == {
        "GOPR0001_frame_000000_rgb_anon.png": (64, 128, "L"),
        "GOPR0001_frame_000001_rgb_anon.png": (48, 80, "L"),
    }
    assert (tmp_path / "acdc_like.zip").is_file() and writer.problems == []

    # a batch of two equally resized images with different original sizes
    module.eval()
    batch = {
        "image": torch.randn(2, 3, 32, 64),
        "name": ["a", "b"],
        "ori_size": torch.tensor([[32, 64], [20, 48]]),
    }
    with torch.no_grad():
        res = module.predict_step(batch, 0)
    assert res["name"] == ["a", "b"]
    assert [tuple(p.shape) for p in res["pred"]] == [(32, 64), (20, 48)]
    assert [tuple(c.shape) for c in res["confidence"]] == [(32, 64), (20, 48)]
    assert all(p.dtype == torch.uint8 for p in res["pred"])
    # same sizes: stacked tensors, identical to the per-sample path
    batch["ori_size"] = torch.tensor([[32, 64], [32, 64]])
    with torch.no_grad():
        same = module.predict_step(batch, 0)
        single = module.predict_step(
            {
                **batch,
                "image": batch["image"][1:],
                "name": ["b"],
                "ori_size": batch["ori_size"][1:],
            },
            0,
        )
    assert same["pred"].shape == (2, 32, 64) and same["pred"].dtype == torch.uint8
    torch.testing.assert_close(same["confidence"][1], single["confidence"][0])


def test_predict_without_a_split_is_a_clear_error(tiny_dark_zurich, tmp_path):
    dm = make_dm(tiny_dark_zurich, None)
    with pytest.raises(ConfigError, match=r"data\.predict"):
        trainer(tmp_path, []).predict(UDAModule(**MODEL), datamodule=dm)


def test_submission_writer_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="unknown fmt"):
        SubmissionWriter(str(tmp_path), fmt="cityscapes")
    with pytest.raises(ValueError, match="dark_zurich only"):
        SubmissionWriter(str(tmp_path), fmt="acdc", invalid_threshold=0.5)
    w = SubmissionWriter(str(tmp_path / "x"), fmt="trainids")
    assert not w.make_zip


def test_predict_from_a_yaml_config(tiny_dark_zurich, tmp_path, monkeypatch):
    """`udaseg predict --config`: SubmissionWriter in trainer.callbacks, data.predict."""
    from udaseg.engine.cli import main

    out = tmp_path / "sub"
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(
        f"""
model: {{backbone: mit_tiny, head: segformer, head_channels: 16, drop_path_rate: 0.0}}
data:
  source: {{name: cityscapes, root: unused}}
  val: {{}}
  target_pipeline: {{scale: [64, 32]}}
  num_workers: 0
  predict: {{name: dark_zurich, root: {tiny_dark_zurich}, split: val}}
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: udaseg.engine.callbacks.SubmissionWriter
      init_args: {{out_dir: {out}, fmt: dark_zurich, invalid_threshold: 0.5, expected_size: any}}
return_predictions: false
"""
    )
    monkeypatch.setattr("sys.argv", ["udaseg"])
    assert main(["predict", "--config", str(cfg)]) == 0
    assert check_submission(tmp_path / "sub.zip", "dark_zurich", expected_size=(32, 64)) == []
    assert len(list((out / "labelTrainIds").glob("*.png"))) == 2
