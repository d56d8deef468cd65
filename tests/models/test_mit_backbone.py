"""MiT backbone: variant table, parameter counts, shapes, SR attention math, norms, drop path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.layers import DropPath
from udaseg.models.mit import (
    MIT_VARIANTS,
    PAPER_VARIANTS,
    EfficientSelfAttention,
    MixFFN,
    MixTransformer,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_meta(variant: str) -> MixTransformer:
    with torch.device("meta"):
        return MixTransformer(variant)


# spec table 1.1
SPEC_TABLE = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2), 3.32),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2), 13.15),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3), 24.20),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3), 44.07),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3), 60.84),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3), 81.44),
}


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_variant_table_and_param_count(variant):
    dims, depths, millions = SPEC_TABLE[variant]
    cfg = MIT_VARIANTS[variant]
    assert cfg.embed_dims == dims
    assert cfg.depths == depths
    assert cfg.num_heads == (1, 2, 5, 8)
    assert cfg.sr_ratios == (8, 4, 2, 1)
    assert cfg.mlp_ratios == (4, 4, 4, 4)
    assert round(n_params(build_meta(variant)) / 1e6, 2) == millions


def test_mit_b5_exact_counts():
    model = build_meta("mit_b5")
    assert n_params(model) == 81_443_008
    # 49 blocks with SR x 20 + 3 blocks without SR x 16 + 16 patch-embed + 8 stage-norm tensors
    assert len(model.state_dict()) == 1052
    with torch.device("meta"):
        head = DAFormerHead(model.out_channels, num_classes=19)
    assert n_params(head) == 3_712_275


def test_mit_tiny_is_documented_non_paper_variant():
    cfg = MIT_VARIANTS["mit_tiny"]
    assert "mit_tiny" not in PAPER_VARIANTS
    assert cfg.embed_dims == (16, 32, 64, 128)
    assert cfg.depths == (1, 1, 1, 1)
    assert cfg.num_heads == (1, 1, 2, 4)
    assert cfg.sr_ratios == (8, 4, 2, 1)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="mit_b0.*mit_b5"):
        MixTransformer("mit_b9")


@pytest.mark.parametrize(
    ("variant", "size", "expected"),
    [
        ("mit_b0", (512, 512), [(128, 128), (64, 64), (32, 32), (16, 16)]),
        ("mit_tiny", (540, 960), [(135, 240), (68, 120), (34, 60), (17, 30)]),
        ("mit_tiny", (65, 33), [(17, 9), (9, 5), (5, 3), (3, 2)]),
    ],
)
def test_stage_shapes(variant, size, expected):
    torch.manual_seed(0)
    model = MixTransformer(variant).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    assert len(feats) == 4
    for f, c, hw in zip(feats, model.out_channels, expected, strict=True):
        assert f.shape == (1, c, *hw)
        assert f.is_contiguous()


def test_feature_info():
    model = MixTransformer("mit_tiny")
    assert model.out_channels == (16, 32, 64, 128)
    assert [fi["num_chs"] for fi in model.feature_info] == [16, 32, 64, 128]
    assert [fi["reduction"] for fi in model.feature_info] == [4, 8, 16, 32]
    assert model.forward_features is not None


def test_bad_input_shape_is_reported():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        MixTransformer("mit_tiny")(torch.randn(1, 1, 32, 32))


def naive_sr_attention(
    attn: EfficientSelfAttention, x: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v with the SR conv + LayerNorm, written independently."""
    b, n, c = x.shape
    nh, d, r = attn.num_heads, c // attn.num_heads, attn.sr_ratio
    q = x @ attn.q.weight.T + attn.q.bias
    if r > 1:
        x_map = x.transpose(1, 2).reshape(b, c, h, w)
        x_r = nn.functional.conv2d(x_map, attn.sr.weight, attn.sr.bias, stride=r)
        x_r = x_r.flatten(2).transpose(1, 2)
        x_r = nn.functional.layer_norm(x_r, (c,), attn.norm.weight, attn.norm.bias, eps=1e-5)
    else:
        x_r = x
    kv = x_r @ attn.kv.weight.T + attn.kv.bias
    k_all, v_all = kv[..., :c], kv[..., c:]  # first C output rows are K, the last C are V
    outs = []
    for head in range(nh):
        sl = slice(head * d, (head + 1) * d)
        scores = q[..., sl] @ k_all[..., sl].transpose(1, 2) / math.sqrt(d)
        outs.append(torch.softmax(scores, dim=-1) @ v_all[..., sl])
    out = torch.cat(outs, dim=-1)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize(("dim", "heads", "sr"), [(32, 2, 4), (24, 3, 2), (16, 1, 1)])
def test_sr_attention_matches_naive_reference(dim, heads, sr):
    torch.manual_seed(0)
    attn = EfficientSelfAttention(dim, heads, sr)
    for p in attn.parameters():  # non-trivial LN/bias values
        nn.init.normal_(p, std=0.3)
    h, w = 16, 12
    x = torch.randn(2, h * w, dim, dtype=torch.float64)
    attn = attn.double()
    assert attn.reduce(x, h, w).shape == (2, h * w // sr**2, dim)
    torch.testing.assert_close(attn(x, h, w), naive_sr_attention(attn, x, h, w))
    if sr == 1:
        assert not hasattr(attn, "sr") and not hasattr(attn, "norm")


def test_mix_ffn_order():
    torch.manual_seed(0)
    ffn = MixFFN(8, 32).double()
    h, w = 5, 7
    x = torch.randn(2, h * w, 8, dtype=torch.float64)
    hidden = x @ ffn.fc1.weight.T + ffn.fc1.bias
    hidden = hidden.transpose(1, 2).reshape(2, 32, h, w)
    hidden = nn.functional.conv2d(
        hidden, ffn.dwconv.dwconv.weight, ffn.dwconv.dwconv.bias, padding=1, groups=32
    )
    hidden = nn.functional.gelu(hidden.flatten(2).transpose(1, 2))
    torch.testing.assert_close(ffn(x, h, w), hidden @ ffn.fc2.weight.T + ffn.fc2.bias)


def test_layer_norm_eps():
    model = build_meta("mit_b0")
    seen = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.LayerNorm):
            continue
        seen += 1
        if name.startswith("patch_embed") or name.endswith("attn.norm"):
            assert m.eps == 1e-5, name
        else:
            assert name.endswith(("norm1", "norm2")) or name in {
                "norm1",
                "norm2",
                "norm3",
                "norm4",
            }, name
            assert m.eps == 1e-6, name
    # 4 patch-embed + 4 stage + 8 blocks x 2 + 6 SR norms
    assert seen == 4 + 4 + 16 + 6


def test_drop_path_linspace_over_all_blocks():
    model = build_meta("mit_b5")
    rates = []
    for i in range(1, 5):
        for blk in getattr(model, f"block{i}"):
            rates.append(blk.drop_path.drop_prob if isinstance(blk.drop_path, DropPath) else 0.0)
    assert len(rates) == 52
    assert rates[0] == 0.0 and isinstance(model.block1[0].drop_path, nn.Identity)
    for k, r in enumerate(rates):
        assert r == pytest.approx(0.1 * k / 51)
