"""Importing DeepLabV2 (ResNet) segmentor checkpoints: DAFormer's mmseg DACS checkpoints
(``DLV2Head``: ``decode_head.aspp_modules.<k>.conv.*``, no ``conv_seg``) and Refign / DSRNSS
Lightning checkpoints (``head.conv2d_list.<k>.*``). The fake files use those key names with
ResNet-50/101 v1c shapes written out by ``tests/models/test_resnet.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.test_resnet import imagenet_shapes
from udaseg.models.checkpoint_import import convert_main, import_checkpoint, load_converted
from udaseg.models.checkpoint_import.common import UnsupportedCheckpointError

K = 19


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(3) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
        for k, s in shapes.items()
    }


def _backbone(depth: int, seed: int) -> dict[str, torch.Tensor]:
    return _tensors(imagenet_shapes(depth, "mmcv"), seed)  # fc.* included, as an mmcls file


def _head(names: str, branches: int, seed: int) -> dict[str, torch.Tensor]:
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(branches):
        stem = f"aspp_modules.{k}.conv" if names == "mmseg" else f"conv2d_list.{k}"
        shapes[f"{stem}.weight"] = (K, 2048, 3, 3)
        shapes[f"{stem}.bias"] = (K,)
    return _tensors(shapes, seed)


def test_daformer_dlv2red_dacs_checkpoint(tmp_path: Path):
    student_bb, student_head = _backbone(50, 0), _head("mmseg", 2, 1)
    sd = {f"model.backbone.{k}": v for k, v in student_bb.items()}
    sd.update({f"model.decode_head.{k}": v for k, v in student_head.items()})
    sd.update({f"ema_model.backbone.{k}": v + 1 for k, v in student_bb.items()})
    sd.update({f"ema_model.decode_head.{k}": v + 1 for k, v in student_head.items()})
    sd.update({f"imnet_model.backbone.{k}": v for k, v in student_bb.items()})
    src = tmp_path / "gta2cs_dacs_dlv2red_r50v1c.pth"
    torch.save({"state_dict": sd, "meta": {"iter": 40000}}, src)

    imported = import_checkpoint(src)
    cfg = imported.report.config
    want = ("resnet50_v1c", "deeplabv2_red", K)
    assert (cfg["backbone"], cfg["head"], cfg["num_classes"]) == want
    model = imported.build_model()
    assert model.decode_head.dilations == (6, 12)
    own = model.state_dict()
    assert torch.equal(own["backbone.layer3.5.conv2.weight"], student_bb["layer3.5.conv2.weight"])
    assert torch.equal(own["backbone.stem.3.weight"], student_bb["stem.3.weight"])
    key = "aspp_modules.1.conv.bias"
    assert torch.equal(own[f"decode_head.{key}"], student_head[key])
    assert "backbone.fc.*" in imported.report.dropped
    assert not imported.report.unexpected

    teacher = import_checkpoint(src, which="teacher").build_model().state_dict()
    torch.testing.assert_close(teacher["backbone.layer1.0.bn1.weight"],
                               student_bb["layer1.0.bn1.weight"] + 1)
    dst = tmp_path / "dlv2.safetensors"
    assert convert_main([str(src), str(dst)]) == 0
    loaded = load_converted(None, dst)
    assert type(loaded).__name__ == "EncoderDecoder"
    assert type(loaded.decode_head).__name__ == "DeepLabV2Head"
    with torch.no_grad():
        out = loaded.eval()(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, K, 8, 8)


def test_refign_deeplabv2_lightning_checkpoint(tmp_path: Path):
    bb, head = _backbone(101, 2), _head("refign", 4, 3)
    bb = {k: v for k, v in bb.items() if not k.startswith("fc.")}
    sd = {f"backbone.{k}": v for k, v in bb.items()}
    sd.update({f"head.{k}": v for k, v in head.items()})
    sd.update({f"m_backbone.{k}": torch.zeros_like(v) for k, v in bb.items()})
    sd.update({f"m_head.{k}": torch.zeros_like(v) for k, v in head.items()})
    src = tmp_path / "refign_deeplabv2.ckpt"
    torch.save({"state_dict": sd, "pytorch-lightning_version": "1.6.0"}, src)

    imported = import_checkpoint(src)
    cfg = imported.report.config
    assert (cfg["backbone"], cfg["head"]) == ("resnet101_v1c_refign", "deeplabv2")
    mapping = imported.report.mapping
    assert mapping["decode_head.aspp_modules.3.conv.weight"] == "head.conv2d_list.3.weight"
    model = imported.build_model()
    assert model.backbone.layer3[0].conv2.dilation == (2, 2)  # Refign: no dilation contraction
    assert torch.equal(model.decode_head.aspp_modules[3].conv.weight, head["conv2d_list.3.weight"])
    assert torch.equal(model.backbone.layer3[22].bn3.running_mean, bb["layer3.22.bn3.running_mean"])
    # --backbone picks the other flavour of the same weights
    mm = import_checkpoint(src, backbone="resnet101_v1c")
    assert mm.metadata["backbone"] == "resnet101_v1c"
    assert mm.build_model().backbone.layer3[0].conv2.dilation == (1, 1)


def test_unsupported_resnet_heads_and_depths(tmp_path: Path):
    bb = _backbone(50, 4)
    three = _head("mmseg", 3, 5)
    sd = {f"backbone.{k}": v for k, v in bb.items()}
    sd.update({f"decode_head.{k}": v for k, v in three.items()})
    src = tmp_path / "three.pth"
    torch.save(sd, src)
    with pytest.raises(UnsupportedCheckpointError, match=r"branches \[0, 1, 2\].*4 \(dilations"):
        import_checkpoint(src)
    shallow = {k: v for k, v in bb.items() if not k.startswith("layer3.5.")}
    sd = {f"backbone.{k}": v for k, v in shallow.items()}
    sd.update({f"decode_head.{k}": v for k, v in _head("mmseg", 4, 6).items()})
    torch.save(sd, src)
    with pytest.raises(UnsupportedCheckpointError, match="5 layer3 blocks"):
        import_checkpoint(src)
