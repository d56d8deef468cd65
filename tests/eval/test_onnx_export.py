"""ONNX export: one dynamic-size file per segmentor, checked against PyTorch with onnxruntime.

The dynamo (torch.export) exporter takes tens of seconds per model on a small CPU, so each
exported file is built once per module and shared by the tests that read it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from udaseg.errors import CheckpointError, ConfigError
from udaseg.eval.onnx_export import (
    SegmentorForExport,
    export_main,
    export_onnx,
    load_segmentor_for_export,
    verify_onnx,
)
from udaseg.models.hrda import HRDAConfig, HRDASegmentor
from udaseg.models.segmentor import build_segmentor

SIZES = [(64, 96), (96, 128)]
TOL = 1e-4


def tiny(head: str, seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_segmentor("mit_tiny", head, num_classes=num_classes, head_channels=16)
    # non-trivial BatchNorm statistics, so eval-mode folding is exercised
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def run_ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


@pytest.fixture(scope="module")
def daformer_onnx(tmp_path_factory):
    model = tiny("daformer")
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "daformer.onnx",
                       example_size=(64, 96), dynamic=True)
    return model, path


def test_dynamo_export_is_a_valid_dynamic_model(daformer_onnx):
    model, path = daformer_onnx
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    out_shape = proto.graph.output[0].type.tensor_type.shape
    out_dims = [d.dim_param or d.dim_value for d in out_shape.dim]
    assert out_dims == ["batch", 5, "height", "width"]
    assert proto.graph.input[0].name == "image" and proto.graph.output[0].name == "logits"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["udaseg.output"] == "logits" and meta["udaseg.num_classes"] == "5"
    assert json.loads(meta["udaseg.input_mean"]) == [123.675, 116.28, 103.53]
    # one self-contained file, no temporary or external-data file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["daformer.onnx"]
    # the export leaves the model's mode alone
    assert not model.training


def test_dynamo_export_matches_pytorch_at_two_sizes(daformer_onnx):
    model, path = daformer_onnx
    assert verify_onnx(path, model, SIZES) < TOL
    # explicit check, independent of verify_onnx: batch 2, a size that is not a multiple of 32
    x = torch.randn(2, 3, 80, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.nn.functional.interpolate(
            model(x).logits, size=(80, 112), mode="bilinear", align_corners=False
        )
    got = run_ort(path, x)
    assert got.shape == (2, 5, 80, 112)
    assert np.abs(got - ref.numpy()).max() < TOL


@pytest.mark.parametrize("output", ["logits", "probs", "labels"])
def test_torchscript_exporter_segformer_outputs(tmp_path, output):
    model = tiny("segformer", seed=1)
    path = export_onnx(model, tmp_path / "seg.onnx", example_size=(64, 64), output=output,
                       exporter="torchscript")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    diff = verify_onnx(path, model, SIZES)  # labels: fraction of differing pixels
    assert diff == 0.0 if output == "labels" else diff < TOL
    x = torch.randn(1, 3, 96, 128)
    got = run_ort(path, x)
    with torch.no_grad():
        ref = SegmentorForExport(model, output)(x).numpy()
    if output == "labels":
        assert got.dtype == np.int64 and got.shape == (1, 96, 128)
        assert (got == ref).mean() == 1.0
    else:
        assert got.shape == (1, 5, 96, 128)
        assert np.abs(got - ref).max() < TOL
    if output == "probs":
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_static_export_and_verify_rejects_other_sizes(tmp_path):
    model = tiny("segformer", seed=2)
    path = export_onnx(model, tmp_path / "s.onnx", example_size=(64, 64), dynamic=False,
                       exporter="torchscript")
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    assert verify_onnx(path, model, [(64, 64)]) < TOL
    with pytest.raises(ValueError, match="static input"):
        verify_onnx(path, model, [(96, 96)])


def test_bad_arguments(tmp_path):
    model = tiny("segformer")
    with pytest.raises(ValueError, match="output must be one of"):
        export_onnx(model, tmp_path / "x.onnx", output="scores")
    with pytest.raises(ValueError, match="exporter must be one of"):
        export_onnx(model, tmp_path / "x.onnx", exporter="tf")
    with pytest.raises(ValueError, match="at least 32x32"):
        export_onnx(model, tmp_path / "x.onnx", example_size=(16, 64))
    hrda = HRDASegmentor(model, HRDAConfig())
    with pytest.raises(ValueError, match="fixed input size.*segmentor.model"):
        export_onnx(hrda, tmp_path / "x.onnx", dynamic=True)
    assert not list(tmp_path.iterdir())


def _udamodule_checkpoint(tmp_path, **kw):
    from udaseg.engine.module import UDAModule

    torch.manual_seed(3)
    m = UDAModule(backbone="mit_tiny", head="daformer", head_channels=16, num_classes=7, **kw)
    ckpt = tmp_path / "m.ckpt"
    # the layout Lightning writes: the whole module state and the saved hyperparameters
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "epoch": 0, "global_step": 0}, ckpt)
    return m, ckpt


def test_cli_from_checkpoint_and_safetensors(tmp_path, capsys):
    from udaseg.engine.cli import export_weights_main

    m, ckpt = _udamodule_checkpoint(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    assert export_main([str(ckpt), str(out), "--format", "onnx", "--height", "64",
                        "--width", "96", "--output", "probs", "--exporter", "torchscript",
                        "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "dynamic batch x 3 x height x width" in printed and "max abs diff" in printed
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["udaseg.backbone"] == "mit_tiny" and meta["udaseg.num_classes"] == "7"
    assert meta["udaseg.output"] == "probs"
    assert verify_onnx(out, m.model, SIZES) < TOL

    weights = tmp_path / "w.safetensors"
    assert export_weights_main([str(ckpt), str(weights)]) == 0
    out2 = tmp_path / "w.onnx"
    assert export_main([str(weights), str(out2), "--height", "64", "--width", "64",
                        "--exporter", "torchscript", "--opset", "17"]) == 0
    proto2 = onnx.load(str(out2))
    assert [o.version for o in proto2.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert verify_onnx(out2, m.model, SIZES) < TOL


def test_checkpoint_errors(tmp_path):
    model = tiny("segformer")
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="--backbone, --head, --num-classes"):
        load_segmentor_for_export(plain)
    loaded, info = load_segmentor_for_export(
        plain, overrides={"backbone": "mit_tiny", "head": "segformer", "num_classes": 5,
                          "head_channels": 16})
    assert info["hrda"] is None and not loaded.training
    with pytest.raises(CheckpointError, match="does not fit mit_tiny \\+ daformer"):
        load_segmentor_for_export(
            plain, overrides={"backbone": "mit_tiny", "head": "daformer", "num_classes": 5})
    with pytest.raises(FileNotFoundError):
        load_segmentor_for_export(tmp_path / "missing.ckpt")


def test_cli_hrda_checkpoint_fused_and_single_scale(tmp_path, capsys):
    m, ckpt = _udamodule_checkpoint(tmp_path, hrda={"context_scale": 0.5})
    assert isinstance(m.model, HRDASegmentor)
    # fused: the whole HRDA inference forward, at one fixed size (HRDA found by its weights)
    fused = tmp_path / "fused.onnx"
    assert export_main([str(ckpt), str(fused), "--height", "64", "--width", "64"]) == 0
    printed = capsys.readouterr().out
    assert "fused HRDA" in printed
    assert "paper defaults" not in printed  # the checkpoint records its HRDA settings
    proto = onnx.load(str(fused))
    onnx.checker.check_model(proto, full_check=True)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    assert verify_onnx(fused, m.model, [(64, 64)]) < TOL
    # single-scale: the shared network, dynamic sizes
    single = tmp_path / "single.onnx"
    assert export_main([str(ckpt), str(single), "--hrda", "single-scale", "--height", "64",
                        "--width", "64", "--exporter", "torchscript"]) == 0
    assert "single-scale network" in capsys.readouterr().out
    assert verify_onnx(single, m.model.model, SIZES) < TOL
    with pytest.raises(ConfigError, match="fixed input size"):
        export_main([str(ckpt), str(tmp_path / "x.onnx")])  # fused needs a size


def test_hrda_settings_and_inference_crop_from_checkpoint(tmp_path):
    """A checkpoint whose hyper_parameters record ``hrda`` and ``inference`` (dicts)."""
    _, ckpt = _udamodule_checkpoint(tmp_path, hrda={"hr_slide_overlapping": False})
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"]["hrda"] = {"hr_slide_overlapping": False, "context_scale": 0.5}
    raw["hyper_parameters"]["inference"] = {"mode": "slide", "crop": (64, 64), "stride": (32, 32)}
    torch.save(raw, ckpt)
    seg, info = load_segmentor_for_export(ckpt)
    assert isinstance(seg, HRDASegmentor) and seg.cfg.hr_slide_overlapping is False
    assert info["inference"]["crop"] == (64, 64)
    # the CLI takes the fused size from the inference crop (stops before the slow export here)
    with pytest.raises(ConfigError, match="needs --exporter dynamo"):
        export_main([str(ckpt), str(tmp_path / "x.onnx"), "--exporter", "torchscript"])
