"""DeepLabV2 head: the summed ASPP against a hand-built equivalent, keys, init, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from udaseg.models.deeplabv2_head import DLV2_DILATIONS, DLV2_RED_DILATIONS, DeepLabV2Head


def test_sum_matches_hand_built_aspp():
    torch.manual_seed(0)
    head = DeepLabV2Head((8, 16, 24), num_classes=5)
    for p in head.parameters():  # non-trivial biases too
        p.data.normal_()
    feats = [torch.randn(2, c, 11, 13) for c in (8, 16, 24)]
    x = feats[-1]
    want = torch.zeros(2, 5, 11, 13)
    for k, d in enumerate((6, 12, 18, 24)):
        w = head.state_dict()[f"aspp_modules.{k}.conv.weight"]
        b = head.state_dict()[f"aspp_modules.{k}.conv.bias"]
        want += F.conv2d(x, w, b, padding=d, dilation=d)
    got = head(feats)
    assert got.shape == (2, 5, 11, 13)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-5)  # a bare F_L works too


def test_keys_shapes_and_init():
    head = DeepLabV2Head((256, 512, 1024, 2048))
    assert head.dilations == DLV2_DILATIONS == (6, 12, 18, 24)
    sd = head.state_dict()
    assert sorted(sd) == sorted(
        f"aspp_modules.{k}.conv.{n}" for k in range(4) for n in ("weight", "bias"))
    assert sd["aspp_modules.3.conv.weight"].shape == (19, 2048, 3, 3)
    assert sd["aspp_modules.0.conv.bias"].shape == (19,)
    assert all(float(sd[f"aspp_modules.{k}.conv.bias"].abs().max()) == 0 for k in range(4))
    assert 0.009 < float(sd["aspp_modules.0.conv.weight"].std()) < 0.011
    assert sum(p.numel() for p in head.parameters()) == 4 * (19 * 2048 * 9 + 19)
    red = DeepLabV2Head(2048, dilations=DLV2_RED_DILATIONS)
    assert len(red.aspp_modules) == 2 and red.in_channels == (2048,)


def test_channel_mismatch_is_loud():
    head = DeepLabV2Head((8, 16), num_classes=3)
    with pytest.raises(ValueError, match="last level has 8 channels, expected 16"):
        head([torch.randn(1, 16, 4, 4), torch.randn(1, 8, 4, 4)])
