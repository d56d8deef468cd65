"""ResNet v1c / v1 encoders: DeepLab output stride, parameter counts, both ImageNet layouts."""

from __future__ import annotations

import pytest
import torch

from udaseg.errors import CheckpointError
from udaseg.models.resnet import RESNET_VARIANTS, ResNet, load_resnet_weights

_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _bn(prefix: str, c: int, counters: bool) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    if counters:
        out[f"{prefix}.num_batches_tracked"] = ()
    return out


def imagenet_shapes(depth: int, layout: str, counters: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an ImageNet ResNet file, written out from the published layouts (not from
    our model): ``layout`` "mmcv" (open-mmlab ``resnet*_v1c``) or "torchvision" (``resnet*``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if layout == "mmcv":
        for conv, bn, c_in, c_out in ((0, 1, 3, 32), (3, 4, 32, 32), (6, 7, 32, 64)):
            shapes[f"stem.{conv}.weight"] = (c_out, c_in, 3, 3)
            shapes.update(_bn(f"stem.{bn}", c_out, counters))
    else:
        shapes["conv1.weight"] = (64, 3, 7, 7)
        shapes.update(_bn("bn1", 64, counters))
    prev = 64
    for i, (n, w) in enumerate(zip(_DEPTHS[depth], (64, 128, 256, 512), strict=True), start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            c_in = prev if j == 0 else 4 * w
            shapes[f"{p}.conv1.weight"] = (w, c_in, 1, 1)
            shapes.update(_bn(f"{p}.bn1", w, counters))
            shapes[f"{p}.conv2.weight"] = (w, w, 3, 3)
            shapes.update(_bn(f"{p}.bn2", w, counters))
            shapes[f"{p}.conv3.weight"] = (4 * w, w, 1, 1)
            shapes.update(_bn(f"{p}.bn3", 4 * w, counters))
            if j == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * w, c_in, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", 4 * w, counters))
        prev = 4 * w
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def fake_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Distinct constant tensors (the k-th key holds k / 1000) so a test can see where each went."""
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.full(s, i / 1000.0)
        for i, (k, s) in enumerate(shapes.items())
    }


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    with torch.device("meta"):
        models = {v: ResNet(v) for v in RESNET_VARIANTS}
    # torchvision's resnet101: 44,549,160 parameters, 2,049,000 of them in fc (2048 x 1000 + 1000)
    assert n_params(models["resnet101"]) == 44_549_160 - 2_049_000 == 42_500_160
    assert n_params(models["resnet50"]) == 25_557_032 - 2_049_000  # torchvision resnet50
    # the deep stem: 3x3 convs 3->32->32->64 + three BNs, instead of the 7x7 conv + one BN
    deep = 27 * 32 + 2 * 32 + 9 * 32 * 32 + 2 * 32 + 9 * 32 * 64 + 2 * 64
    plain = 49 * 3 * 64 + 2 * 64
    assert deep - plain == 19_232
    assert n_params(models["resnet101_v1c"]) == 42_500_160 + 19_232 == 42_519_392
    assert n_params(models["resnet101_v1c_refign"]) == 42_519_392
    assert n_params(models["resnet50_v1c"]) == 23_508_032 + 19_232
    assert n_params(models["resnet_tiny"]) < 200_000
    # the file layouts hold exactly the model's parameters (+ fc), written out independently
    for depth, v1c, v1 in ((101, "resnet101_v1c", "resnet101"), (50, "resnet50_v1c", "resnet50")):
        for layout, name in (("mmcv", v1c), ("torchvision", v1)):
            shapes = imagenet_shapes(depth, layout, counters=False)
            params = sum(torch.Size(s).numel() for k, s in shapes.items()
                         if not k.endswith(("running_mean", "running_var")))
            assert params - 2_049_000 == n_params(models[name])


@pytest.mark.parametrize("variant", ["resnet101_v1c", "resnet101", "resnet50_v1c"])
def test_output_stride_8_meta(variant):
    with torch.device("meta"):
        model = ResNet(variant)
        feats = model(torch.empty(2, 3, 512, 1024))
    assert [tuple(f.shape) for f in feats] == [
        (2, 256, 128, 256), (2, 512, 64, 128), (2, 1024, 64, 128), (2, 2048, 64, 128)]
    assert model.out_channels == (256, 512, 1024, 2048)
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 8, 8]


def test_tiny_shapes_and_odd_sizes():
    model = ResNet("resnet_tiny").eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 65, 97))
    # ceil at each stride-2 step: 65 -> 33 -> 17 -> 9, 97 -> 49 -> 25 -> 13
    assert [tuple(f.shape) for f in feats] == [
        (1, 32, 17, 25), (1, 64, 9, 13), (1, 128, 9, 13), (1, 256, 9, 13)]
    assert model.out_channels == (32, 64, 128, 256)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_dilations_and_strides():
    with torch.device("meta"):
        mm, rf = ResNet("resnet101_v1c"), ResNet("resnet101_v1c_refign")
    # mmseg/DAFormer contract the dilation of a dilated stage's first block; Refign does not
    assert mm.layer3[0].conv2.dilation == (1, 1) and mm.layer3[1].conv2.dilation == (2, 2)
    assert mm.layer4[0].conv2.dilation == (2, 2) and mm.layer4[2].conv2.dilation == (4, 4)
    assert rf.layer3[0].conv2.dilation == (2, 2) and rf.layer4[0].conv2.dilation == (4, 4)
    for m in (mm, rf):
        # "pytorch" style: the stride is on the 3x3 conv
        assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)
        assert m.layer2[0].downsample[0].stride == (2, 2)
        assert m.layer3[0].conv2.stride == (1, 1) and m.layer4[0].conv2.stride == (1, 1)
        assert m.layer4[1].conv2.padding == m.layer4[1].conv2.dilation
    assert mm.stem[0].stride == (2, 2) and mm.stem[3].stride == (1, 1)


def test_norm_eval_and_frozen_norm():
    model = ResNet("resnet_tiny", norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and bns and not any(b.training for b in bns)
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    frozen = ResNet("resnet_tiny", freeze_norm=True)
    frozen_bns = [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not p.requires_grad for m in frozen_bns for p in m.parameters())
    assert frozen.layer1[0].conv1.weight.requires_grad
    assert ResNet("resnet_tiny").train().layer1[0].bn1.training


@pytest.mark.parametrize(
    ("layout", "variant"), [("mmcv", "resnet101_v1c"), ("torchvision", "resnet101")]
)
def test_imagenet_layouts_load(layout, variant):
    sd = fake_state_dict(imagenet_shapes(101, layout))
    model = ResNet(variant)
    report = load_resnet_weights(model, sd)
    assert report.complete and report.ignored == ["fc.bias", "fc.weight"]
    own = model.state_dict()
    for k in ("layer3.22.conv2.weight", "layer4.0.downsample.1.running_var", "layer1.0.bn3.weight"):
        assert torch.equal(own[k], sd[k]), k
    stem = "stem.6.weight" if layout == "mmcv" else "conv1.weight"
    assert torch.equal(own[stem], sd[stem])


def test_loads_without_bn_counters_and_from_segmentor_file(tmp_path):
    model = ResNet("resnet_tiny")
    sd = {k: v.clone() + 1 for k, v in ResNet("resnet_tiny").state_dict().items()
          if not k.endswith("num_batches_tracked")}
    assert load_resnet_weights(model, sd).complete
    path = tmp_path / "seg.pth"
    wrapped = {f"backbone.{k}": v for k, v in sd.items()}
    wrapped["decode_head.aspp_modules.0.conv.weight"] = torch.zeros(19, 256, 3, 3)
    torch.save({"state_dict": wrapped}, path)
    fresh = ResNet("resnet_tiny")
    report = load_resnet_weights(fresh, path)
    assert report.ignored == ["decode_head.aspp_modules.0.conv.weight"]
    assert torch.equal(fresh.layer2[0].conv2.weight, sd["layer2.0.conv2.weight"])


def test_loud_errors():
    v1c = fake_state_dict(imagenet_shapes(50, "mmcv", counters=False))
    want = r"ResNet-50, deep v1c stem.*resnet50 has the plain 7x7 stem.*resnet50_v1c for"
    with pytest.raises(CheckpointError, match=want):
        load_resnet_weights(ResNet("resnet50"), v1c)
    tv = fake_state_dict(imagenet_shapes(50, "torchvision", counters=False))
    want = r"plain 7x7 stem network.*use backbone resnet101 / resnet50 for"
    with pytest.raises(CheckpointError, match=want):
        load_resnet_weights(ResNet("resnet50_v1c"), tv)
    # a ResNet-50 file for a ResNet-101 model: strict loading names the missing blocks
    want = r"missing keys \['layer3\.10\..*looks like ResNet-50"
    with pytest.raises(CheckpointError, match=want):
        load_resnet_weights(ResNet("resnet101"), tv)
    bad = dict(tv)
    bad["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    want = r"'layer2\.0\.conv2\.weight'.*\(128, 128, 1, 1\) vs model \(128, 128, 3, 3\)"
    with pytest.raises(CheckpointError, match=want):
        load_resnet_weights(ResNet("resnet50"), bad)
    extra = dict(tv, **{"layer1.0.se.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['layer1\.0\.se\.weight'\]"):
        load_resnet_weights(ResNet("resnet50"), extra)
    report = load_resnet_weights(ResNet("resnet50"), extra, strict=False)
    assert report.unexpected == ["layer1.0.se.weight"] and not report.missing
    with pytest.raises(FileNotFoundError):
        load_resnet_weights(ResNet("resnet_tiny"), "/nonexistent/resnet101_v1c.pth")
