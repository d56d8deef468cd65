"""DAFormer and SegFormer decode heads: output sizes, mmseg key names, concat order."""

from __future__ import annotations

import pytest
import torch

from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.mit import MixTransformer
from udaseg.models.segformer_head import SegFormerHead


@pytest.fixture(scope="module")
def tiny_features() -> list[torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        return MixTransformer("mit_tiny").eval()(torch.randn(2, 3, 64, 96))


@pytest.mark.parametrize("head_cls", [DAFormerHead, SegFormerHead])
def test_head_output_size(tiny_features, head_cls):
    head = head_cls((16, 32, 64, 128), num_classes=19)
    assert head(tiny_features).shape == (2, 19, 16, 24)


def test_head_output_size_odd_input():
    with torch.no_grad():
        feats = MixTransformer("mit_tiny").eval()(torch.randn(1, 3, 70, 50))
    head = DAFormerHead((16, 32, 64, 128), num_classes=7, channels=32, embed_dim=16).eval()
    with torch.no_grad():
        assert head(feats).shape == (1, 7, 18, 13)


def _bn(prefix: str) -> set[str]:
    return {
        f"{prefix}.bn.{n}"
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }


def test_daformer_head_state_dict_names_match_mmseg():
    head = DAFormerHead((64, 128, 320, 512), num_classes=19)
    expected = set()
    for i in range(4):
        expected |= {f"embed_layers.{i}.proj.weight", f"embed_layers.{i}.proj.bias"}
    expected |= {"fuse_layer.aspp_modules.0.conv.weight"} | _bn("fuse_layer.aspp_modules.0")
    for k in (1, 2, 3):
        for part in ("depthwise_conv", "pointwise_conv"):
            p = f"fuse_layer.aspp_modules.{k}.{part}"
            expected |= {f"{p}.conv.weight"} | _bn(p)
    expected |= {"fuse_layer.bottleneck.conv.weight"} | _bn("fuse_layer.bottleneck")
    expected |= {"conv_seg.weight", "conv_seg.bias"}
    sd = head.state_dict()
    assert set(sd) == expected
    assert sd["fuse_layer.aspp_modules.0.conv.weight"].shape == (256, 1024, 1, 1)
    assert sd["fuse_layer.aspp_modules.2.depthwise_conv.conv.weight"].shape == (1024, 1, 3, 3)
    assert sd["fuse_layer.bottleneck.conv.weight"].shape == (256, 1024, 3, 3)
    assert sd["conv_seg.weight"].shape == (19, 256, 1, 1)
    dw = head.fuse_layer.aspp_modules[3].depthwise_conv.conv
    assert dw.dilation == (18, 18) and dw.padding == (18, 18) and dw.groups == 1024
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1


def test_daformer_conv_seg_init():
    torch.manual_seed(0)
    head = DAFormerHead((64, 128, 320, 512), num_classes=19)
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.001
    assert torch.all(head.conv_seg.bias == 0)


def test_segformer_head_state_dict_names():
    head = SegFormerHead((16, 32, 64, 128), num_classes=19, embed_dim=32)
    expected = {f"linear_c.{i}.proj.{p}" for i in range(4) for p in ("weight", "bias")}
    expected |= {"linear_fuse.conv.weight"} | _bn("linear_fuse")
    expected |= {"linear_pred.weight", "linear_pred.bias"}
    assert set(head.state_dict()) == expected


def test_segformer_concat_orders_are_a_channel_permutation(tiny_features):
    torch.manual_seed(0)
    e = 8
    a = SegFormerHead((16, 32, 64, 128), embed_dim=e, concat_order="daformer").eval()
    b = SegFormerHead((16, 32, 64, 128), embed_dim=e, concat_order="nvlabs").eval()
    b.load_state_dict(a.state_dict())
    w = a.linear_fuse.conv.weight.data  # (E, 4E, 1, 1), input blocks [c1, c2, c3, c4]
    b.linear_fuse.conv.weight.data = torch.cat(list(w.split(e, dim=1))[::-1], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(a(tiny_features), b(tiny_features))
        b.linear_fuse.conv.weight.data = w.clone()
        assert not torch.allclose(a(tiny_features), b(tiny_features))


def test_bad_concat_order():
    with pytest.raises(ValueError, match="concat_order"):
        SegFormerHead((16, 32), concat_order="reversed")  # type: ignore[arg-type]


@pytest.mark.parametrize("head_cls", [DAFormerHead, SegFormerHead])
def test_wrong_levels_are_reported(tiny_features, head_cls):
    head = head_cls((16, 32, 64, 128))
    with pytest.raises(ValueError, match="4 feature levels"):
        head(tiny_features[:3])
    with pytest.raises(ValueError, match="level 1 has 32 channels, expected 48"):
        head_cls((16, 48, 64, 128))(tiny_features)
