"""ResNet + DeepLabV2 through build_segmentor: output stride 8, features, weights, optimiser groups,
and a DACS + FD iteration on SynthNight images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from udaseg.errors import CheckpointError
from udaseg.models import BACKBONES, HEADS, SegOutput, build_segmentor, param_groups
from udaseg.models.deeplabv2_head import DeepLabV2Head
from udaseg.models.resnet import ResNet


def test_registered_names():
    resnets = {"resnet101_v1c", "resnet101_v1c_refign", "resnet101", "resnet50_v1c", "resnet_tiny"}
    assert resnets <= set(BACKBONES)
    assert {"deeplabv2", "deeplabv2_red", "daformer", "segformer"} <= set(HEADS)


def test_tiny_deeplabv2_output_stride_8_and_features():
    torch.manual_seed(0)
    model = build_segmentor("resnet_tiny", "deeplabv2", num_classes=7).eval()
    assert isinstance(model.backbone, ResNet) and isinstance(model.decode_head, DeepLabV2Head)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 7, 8, 12)  # stride 8
    assert [tuple(f.shape) for f in out.features] == [
        (2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 8, 12), (2, 256, 8, 12)]
    assert model.num_classes == 7
    assert set(k.split(".")[0] for k in model.state_dict()) == {"backbone", "decode_head"}


def test_resnet101_deeplabv2_meta_shapes_and_keys():
    with torch.device("meta"):
        model = build_segmentor("resnet101_v1c", "deeplabv2")
        out = model(torch.empty(1, 3, 512, 512))
    assert out.logits.shape == (1, 19, 64, 64)
    assert out.features[-1].shape == (1, 2048, 64, 64)
    keys = model.state_dict().keys()
    assert {"backbone.stem.0.weight", "backbone.layer3.22.bn3.running_var",
            "decode_head.aspp_modules.3.conv.bias"} <= set(keys)
    head = sum(p.numel() for p in model.decode_head.parameters())
    assert head == 4 * (19 * 2048 * 9 + 19)
    assert sum(p.numel() for p in model.parameters()) == 42_519_392 + head
    with torch.device("meta"):
        red = build_segmentor("resnet101_v1c", "deeplabv2_red")
    assert red.decode_head.dilations == (6, 12)
    # the other heads work on the ResNet levels too (backbone-agnostic contract)
    seg = build_segmentor("resnet_tiny", "daformer", head_channels=16).eval()
    with torch.no_grad():
        assert seg(torch.randn(1, 3, 64, 64)).logits.shape == (1, 19, 16, 16)


def test_pretrained_path_is_strict(tmp_path):
    src = ResNet("resnet_tiny")
    for p in src.parameters():
        p.data.normal_()
    path = tmp_path / "resnet_tiny_imagenet.pth"
    sd = dict(src.state_dict())
    sd.update({"fc.weight": torch.zeros(1000, 256), "fc.bias": torch.zeros(1000)})
    torch.save(sd, path)
    model = build_segmentor("resnet_tiny", "deeplabv2", pretrained=str(path))
    assert torch.equal(model.backbone.layer4[0].conv2.weight, src.layer4[0].conv2.weight)
    del sd["layer1.0.bn1.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \['layer1\.0\.bn1\.weight'\]"):
        build_segmentor("resnet_tiny", "deeplabv2", pretrained=str(path))


def test_param_groups_and_backward():
    torch.manual_seed(0)
    model = build_segmentor("resnet_tiny", "deeplabv2").train()
    out = model(torch.randn(2, 3, 64, 64))
    out.logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    groups = {g["name"]: g for g in param_groups(model, lr=6e-5, weight_decay=0.01)}
    assert all(n.startswith("decode_head.") for n in groups["head"]["param_names"])
    assert len(groups["head"]["param_names"]) == 8
    # mmcv's custom_keys: no "norm" in ResNet names, so BN parameters keep weight decay (DAFormer)
    assert "no_decay" not in groups
    assert "backbone.layer1.0.bn1.weight" in groups["decay"]["param_names"]
    refign = {g["name"]: g for g in param_groups(model, lr=6e-5, weight_decay=0.01, no_decay="1d")}
    assert "backbone.layer1.0.bn1.weight" in refign["no_decay"]["param_names"]
    assert "decode_head.aspp_modules.0.conv.bias" in refign["head_no_decay"]["param_names"]


def _synthnight_batch(split: str, n: int, size: int = 64) -> dict[str, torch.Tensor]:
    from udaseg.data.synthnight import SynthNightConfig, make_sample

    cfg = SynthNightConfig(seed=5, width=size, height=size, with_events=False, with_refs=False)
    samples = [make_sample(cfg, split, i) for i in range(n)]
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    image = np.stack([(s.image.astype(np.float32) - mean) / std for s in samples])
    label = np.stack([s.label.astype(np.int64) for s in samples])
    return {"image": torch.from_numpy(image).permute(0, 3, 1, 2).contiguous(),
            "label": torch.from_numpy(label)}


def test_dacs_iteration_with_fd_on_synthnight():
    from udaseg.adapt.self_training import DACSConfig, SelfTraining
    from udaseg.catalog import build_methods

    torch.manual_seed(0)
    student = build_segmentor("resnet_tiny", "deeplabv2")
    hooks = build_methods({"fd": {"weight": 0.005, "classes": "things"}}, student)
    algo = SelfTraining(student, DACSConfig(pseudo_threshold=0.0), aux_losses=hooks.aux_losses)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    src = _synthnight_batch("day_train", 2)
    tgt = {"image": _synthnight_batch("night_train", 2)["image"]}
    assert set(np.unique(src["label"].numpy())) & {6, 7, 11, 12, 13, 14, 15, 16, 17, 18}  # things
    history = []
    for step in range(2):
        opt.zero_grad()
        losses = algo.step(student, src, tgt, step=step, backward=lambda l: l.backward())
        assert {"src", "fd", "mix"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        assert all(p.grad is not None for _, p in trainable)
        opt.step()
        history.append(losses)
    # after an update the student's stride-8 features differ from the frozen ImageNet copy's
    assert history[1]["fd"].item() > 0
    fd = hooks.aux_losses[0]
    assert not any(p.requires_grad for p in fd.imnet_backbone.parameters())
    assert not fd.imnet_backbone.training


def test_hrda_wraps_deeplabv2_with_a_deeplabv2_attention_head():
    from udaseg.models.hrda import HRDAConfig, HRDASegmentor

    torch.manual_seed(0)
    # output stride 8 at context scale 0.5: crop offsets must be multiples of 8 / 0.5 = 16
    model = HRDASegmentor(build_segmentor("resnet_tiny", "deeplabv2"), HRDAConfig(crop_divisor=16))
    att = model.scale_attention_head
    assert isinstance(att, DeepLabV2Head) and att.num_classes == 19  # class-wise attention
    assert att.dilations == (6, 12, 18, 24) and att.in_channels == (32, 64, 128, 256)
    out = model.train()(torch.randn(2, 3, 128, 128))
    assert out.detail_logits.shape == (2, 19, 8, 8) and out.logits.shape[1] == 19
    assert out.features[-1].shape == (2, 256, 8, 8)  # context features (64 px at stride 8)


def test_slide_inference_and_onnx_export(tmp_path):
    from udaseg.eval.inference import slide_inference

    torch.manual_seed(0)
    model = build_segmentor("resnet_tiny", "deeplabv2").eval()
    images = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        logits = slide_inference(lambda x: model(x).logits, images, 64, 48, num_classes=19)
    assert logits.shape == (1, 19, 96, 160) and torch.isfinite(logits).all()
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from udaseg.eval.onnx_export import export_onnx, verify_onnx

    path = export_onnx(model, tmp_path / "dlv2.onnx", example_size=(64, 64), dynamic=True)
    assert verify_onnx(path, model, [(64, 64), (72, 120)]) < 1e-4
