"""The `udaseg` command: help, subcommand dispatch, config files and the demo end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from udaseg.engine.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "synth", "fit", "validate", "test", "predict"):
        assert f"\n  {cmd} " in out


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_help_does_not_import_lightning():
    code = "import sys; from udaseg.engine.cli import main; main(['--help']); print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_synth_writes_a_copy(tmp_path, capsys):
    out = tmp_path / "sn"
    args = [str(out), "--width", "64", "--height", "32", "--n-day-train", "2", "--n-day-val", "1",
            "--n-night-train", "2", "--n-night-val", "1", "--workers", "0", "--no-events"]
    assert main(["synth", *args]) == 0
    meta = json.loads((out / "synthnight.json").read_text())
    assert meta["version"] == 1 and meta["size"] == [64, 32]
    assert len(list((out / "cityscapes/leftImg8bit/train").rglob("*.png"))) == 2


def _cli(args):
    from lightning.pytorch.cli import LightningCLI

    from udaseg.engine.datamodule import UDADataModule
    from udaseg.engine.module import UDAModule

    return LightningCLI(UDAModule, UDADataModule, args=args, run=False)


def test_synthnight_config_instantiates():
    cli = _cli(["--config", str(REPO / "configs/synthnight/source_only.yaml")])
    assert cli.model.hparams.backbone == "mit_tiny"
    assert cli.model.optim_cfg.lr == pytest.approx(2e-3)
    assert cli.datamodule.val_names == ["day_val", "night_val"]
    assert cli.datamodule.source_pipeline.crop_size == (128, 128)


def test_config_typo_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbnoe: mit_b0\n")
    with pytest.raises(SystemExit):
        _cli(["--config", str(bad), "--data.source", '{"name": "cityscapes", "root": "x"}', "--data.val", "{}"])
    assert "backbnoe" in capsys.readouterr().err


def test_demo_end_to_end_tiny(tmp_path):
    from udaseg.engine.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"), steps=3, batch_size=2, num_workers=0, overlays_per_split=1,
        runs=["source_only"],
        train_scale=(128, 64), crop_size=(64, 64),
        synth=dict(width=128, height=64, n_day_train=4, n_day_val=2, n_night_train=2, n_night_val=2),
    )
    results = run_demo(cfg)
    from udaseg.engine.demo import read_loss_curve

    steps, values = read_loss_curve(tmp_path / "demo" / "logs" / "source_only" / "metrics.csv")
    assert steps and all(v > 0 for v in values)
    report = tmp_path / "demo" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["source_only"]) == {"day_val", "night_val"}
    day = metrics["source_only"]["day_val"]
    assert day["mIoU"] == pytest.approx(100 * results["source_only"]["day_val"].miou("cityscapes19"))
    assert "road" in day["IoU"]
    for name in ("iou_table.csv", "iou_table.md", "loss_curve.png"):
        assert (report / name).stat().st_size > 0
    assert len(list((report / "overlays/source_only/night_val").glob("*.png"))) == 1


def test_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("UDASEG_DEBUG", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "trainer: {accelerator: cpu, max_steps: 1, logger: false, enable_progress_bar: false}\n"
        "model: {backbone: mit_tiny, head: segformer, head_channels: 16}\n"
        f"data: {{source: {{name: cityscapes, root: {tmp_path / 'nowhere'}}}, val: {{}}, num_workers: 0}}\n"
    )
    assert main(["fit", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "udaseg fit: error:" in err and "nowhere" in err and "Traceback" not in err


def test_export_weights_roundtrip(tmp_path):
    import torch

    from udaseg.engine.module import UDAModule

    m = UDAModule(backbone="mit_tiny", head="segformer", head_channels=16)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in m.model.state_dict().items()},
                "hyper_parameters": dict(m.hparams)}, ckpt)
    out = tmp_path / "w.safetensors"
    assert main(["export-weights", str(ckpt), str(out)]) == 0
    m2 = UDAModule(backbone="mit_tiny", head="segformer", head_channels=16, init_weights=str(out))
    for a, b in zip(m.model.state_dict().values(), m2.model.state_dict().values()):
        assert torch.equal(a, b)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["backbone"] == "mit_tiny"


def test_training_only_modules_are_not_exported(tmp_path):
    """A method's training-only module (ICDA's DAR: ``model.train_only.*``) is in the checkpoint
    but not in exported weights, ONNX's weight reader or ``init_weights`` from the .ckpt."""
    import torch

    from udaseg.engine.module import UDAModule
    from udaseg.eval.onnx_export import _read_weights
    from udaseg.models.segmentor import attach_training_module, training_module

    m = UDAModule(backbone="mit_tiny", head="segformer", head_channels=16)
    extra = attach_training_module(m.model, "dar", torch.nn.Linear(3, 2))
    assert training_module(m.model, "dar") is extra
    assert attach_training_module(m.model, "dar", torch.nn.Linear(3, 2)) is extra  # kept
    state = {f"model.{k}": v for k, v in m.model.state_dict().items()}
    assert "model.train_only.dar.weight" in state
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(m.hparams)}, ckpt)
    out = tmp_path / "w.safetensors"
    assert main(["export-weights", str(ckpt), str(out)]) == 0
    for init in (out, ckpt):
        m2 = UDAModule(backbone="mit_tiny", head="segformer", head_channels=16,
                       init_weights=str(init))
        assert not any(k.startswith("train_only") for k in m2.model.state_dict())
        torch.testing.assert_close(m2.model.decode_head.state_dict(),
                                   m.model.decode_head.state_dict())
    exported, _ = _read_weights(ckpt)
    assert exported and not any(k.startswith("train_only.") for k in exported)


def test_demo_with_dacs_equal_compute(tmp_path):
    from udaseg.engine.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"), steps=2, uda_steps=2, cost_ratio=1.5, batch_size=2,
        num_workers=0, overlays_per_split=1, train_scale=(128, 64), crop_size=(64, 64),
        runs=["source_only", "dacs"], source_model="scratch",
        synth=dict(width=128, height=64, n_day_train=4, n_day_val=2, n_night_train=4, n_night_val=2),
    )
    run_demo(cfg)
    out = tmp_path / "demo"
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics) == {"source_only", "dacs"} and "night_val" in metrics["dacs"]
    assert (out / "checkpoints" / "source_pretrain.safetensors").is_file()
    from udaseg.engine.demo import read_loss_curve

    # the control trains round(2 * 1.5) = 3 iterations, DACS 2, both logging every step
    assert read_loss_curve(out / "logs" / "source_only" / "metrics.csv")[0] == [0, 1, 2]
    assert read_loss_curve(out / "logs" / "dacs" / "metrics.csv", "train/mix")[0] == [0, 1]


def test_demo_starts_from_the_packaged_source_model(tmp_path):
    """The shipped source model is in the package, loads into the demo model, and both runs
    start from it (no pre-training here)."""
    from udaseg.engine.demo import DemoConfig, run_demo, shipped_source_path
    from udaseg.models.weights import load_state_dict_file

    path = shipped_source_path()
    assert path.is_file() and path.stat().st_size < 8_000_000
    assert any(k.startswith("backbone.") for k in load_state_dict_file(path))
    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"), uda_steps=1, cost_ratio=1.0, batch_size=2, num_workers=0,
        overlays_per_split=1, train_scale=(128, 64), crop_size=(64, 64),
        synth=dict(width=128, height=64, n_day_train=4, n_day_val=2, n_night_train=4, n_night_val=2),
    )
    run_demo(cfg)
    assert not (tmp_path / "demo" / "checkpoints" / "source_pretrain.safetensors").exists()
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    # a trained model: far above chance on day images even after one more iteration
    assert metrics["source_only"]["day_val"]["mIoU"] > 10


def test_default_precision_is_bf16_on_bf16_gpus_only(monkeypatch):
    import torch

    from udaseg.engine.cli import default_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # H100
    assert default_precision("auto") == "bf16-mixed" and default_precision("gpu") == "bf16-mixed"
    assert default_precision("cpu") is None
    assert default_precision("auto", "ddp_fork") is None  # must not initialise CUDA
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))  # V100
    assert default_precision(None) is None


def test_fit_writes_the_chosen_default_precision_into_its_config(tmp_path, monkeypatch):
    from tests.conftest import make_tiny_cityscapes
    from tests.test_bad_inputs import run_cli, write_fit_config
    from udaseg.engine import cli

    calls = []
    monkeypatch.setattr(cli, "default_precision",
                        lambda accelerator, strategy=None: calls.append(accelerator) or "bf16-mixed")
    root = make_tiny_cityscapes(tmp_path / "cityscapes")
    cfg = write_fit_config(tmp_path / "c.yaml", root, tmp_path / "out", max_steps=1)
    rc, _, err = run_cli(["fit", "--config", str(cfg)])
    assert rc == 0, err[-2000:]
    assert calls == ["cpu"] and "trainer.precision bf16-mixed" in err
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "precision: bf16-mixed" in saved
    calls.clear()
    rc, _, err = run_cli(["fit", "--config", str(cfg), "--trainer.precision", "32-true"])
    assert rc == 0 and calls == []  # an explicit precision is kept
