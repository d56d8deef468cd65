"""Math tests for udaseg.models.layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from udaseg.models.layers import (
    MLP,
    ConvBNReLU,
    DepthwiseSeparableConvModule,
    DropPath,
    init_transformer_weights,
)


def test_drop_path_is_identity_in_eval_and_at_zero():
    x = torch.randn(4, 5, 6)
    dp = DropPath(0.5).eval()
    assert torch.equal(dp(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_is_per_sample_and_rescaled():
    torch.manual_seed(0)
    p = 0.3
    dp = DropPath(p).train()
    x = torch.rand(2000, 3, 4) + 1.0  # strictly positive so zeros mean "dropped"
    y = dp(x)
    for b in range(x.shape[0]):
        dropped = torch.all(y[b] == 0)
        kept = torch.allclose(y[b], x[b] / (1 - p))
        assert dropped or kept, "each sample is either dropped entirely or rescaled by 1/(1-p)"
    keep_rate = (y.flatten(1) != 0).all(dim=1).float().mean().item()
    assert abs(keep_rate - (1 - p)) < 0.05


def test_drop_path_rejects_bad_rate():
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)


def test_conv_bn_relu_names_and_bias():
    m = ConvBNReLU(8, 4, 3)
    assert m.conv.bias is None
    assert m.conv.padding == (1, 1)
    assert set(m.state_dict()) == {
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert (m(torch.randn(2, 8, 5, 5)) >= 0).all()


def test_depthwise_separable_structure():
    m = DepthwiseSeparableConvModule(16, 8, 3, padding=6, dilation=6)
    assert m.depthwise_conv.conv.groups == 16
    assert m.depthwise_conv.conv.dilation == (6, 6)
    assert m.pointwise_conv.conv.kernel_size == (1, 1)
    assert m(torch.randn(1, 16, 20, 20)).shape == (1, 8, 20, 20)


def test_mlp_projects_each_token():
    m = MLP(6, 3)
    x = torch.randn(2, 6, 4, 5)
    expected = torch.einsum("bchw,ec->behw", x, m.proj.weight) + m.proj.bias[None, :, None, None]
    torch.testing.assert_close(m(x), expected)


def test_transformer_init():
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    conv = nn.Conv2d(8, 64, 3, groups=8)
    ln = nn.LayerNorm(7)
    for m in (lin, conv, ln):
        m.apply(init_transformer_weights)
    assert abs(lin.weight.std().item() - 0.02) < 0.002 and lin.weight.abs().max() <= 2.0
    assert torch.all(lin.bias == 0)
    fan_out = 3 * 3 * 64 // 8
    assert abs(conv.weight.std().item() - math.sqrt(2 / fan_out)) < 0.05
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
