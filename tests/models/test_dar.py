"""ICDA's DAR: shapes, the one-pixel offset bound, and hand checks of both attention kinds."""

import pytest
import torch

from udaseg.models.dar import DAR, DARConfig, DeformableCrossAttention, LocalWindowAttention
from udaseg.models.mit import MixTransformer


def _manual_attention(q, k, v, heads):
    """Multi-head attention of (B, C, N) maps, written out: softmax(Q K^T / sqrt d) V."""
    b, c, n = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(b, heads, d, -1) for t in (q, k, v))
    att = torch.softmax(torch.einsum("bhdm,bhdn->bhmn", qh, kh) / d ** 0.5, dim=-1)
    return torch.einsum("bhmn,bhdn->bhdm", att, vh).reshape(b, c, n)


def test_dar_keeps_the_pyramid_shapes_and_changes_levels_2_3_only():
    torch.manual_seed(0)
    bb = MixTransformer("mit_tiny")
    dar = DAR(bb.out_channels)
    fq, fr = bb(torch.randn(2, 3, 128, 128)), bb(torch.randn(2, 3, 128, 128))
    out = dar(fq, fr)
    assert [o.shape for o in out] == [f.shape for f in fq]
    assert out[0] is fq[0] and out[1] is fq[1]
    assert not torch.allclose(out[2], fq[2]) and not torch.allclose(out[3], fq[3])
    # defaults are ICDA's dat_tiny: heads, groups, kernels, drop-path linspace(0, 0.2) over 4 blocks
    d1, d2 = dar.stages[0].blocks[1].attn, dar.stages[1].blocks[1].attn
    assert (d1.heads, d1.groups, d2.heads, d2.groups) == (4, 4, 8, 8)
    assert d1.offset_conv[0].kernel_size == (9, 9) and d2.offset_conv[0].kernel_size == (7, 7)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in dar.stages for b in s.blocks]
    assert rates == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])
    assert [b.kind for s in dar.stages for b in s.blocks] == ["L", "D", "L", "D"]


def test_dar_gradients_reach_every_parameter():
    torch.manual_seed(0)
    dar = DAR((16, 32, 64, 128), DARConfig(drop_path_rate=0.0))
    fq = [torch.randn(1, c, s, s) for c, s in zip((16, 32, 64, 128), (32, 16, 8, 4))]
    fr = [torch.randn_like(f) for f in fq]
    sum(o.square().mean() for o in dar(fq, fr)[2:]).backward()
    missing = [n for n, p in dar.named_parameters() if p.grad is None]
    assert missing == []


def test_offsets_are_bounded_by_one_feature_pixel():
    torch.manual_seed(0)
    att = DeformableCrossAttention(32, heads=4, groups=4, kernel=3)
    with torch.no_grad():  # saturate tanh: offsets at the bound
        att.offset_conv[3].weight.mul_(1e4)
    q, r = torch.randn(2, 32, 6, 10), torch.randn(2, 32, 6, 10)
    out, pix = att(q, r, return_offsets=True)
    assert out.shape == q.shape and pix.shape == (2, 4, 6, 10, 2)
    assert pix.abs().max() <= 1.0 + 1e-5
    assert pix.abs().max() > 0.99  # the bound is reached: +-1 pixel, not less


def test_zero_offsets_with_identical_night_and_day_is_plain_attention_over_the_fused_map():
    torch.manual_seed(0)
    c, heads, h, w = 8, 2, 3, 5
    att = DeformableCrossAttention(c, heads=heads, groups=2, kernel=3)
    with torch.no_grad():
        att.offset_conv[3].weight.zero_()  # tanh(0) = 0: every sample at its pixel centre
    x = torch.randn(1, c, h, w)
    out = att(x, x)
    fused = att.fuse(torch.cat([x, x], dim=1))
    q, k, v = att.proj_q(x), att.proj_k(fused), att.proj_v(fused)
    want = _manual_attention(q.flatten(2), k.flatten(2), v.flatten(2), heads)
    want = att.proj_out(want.reshape(1, c, h, w))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_local_attention_is_self_attention_inside_each_window():
    torch.manual_seed(0)
    att = LocalWindowAttention(8, heads=2, window=4)
    x = torch.randn(1, 8, 4, 8)  # two 4x4 windows side by side
    out = att(x)
    for left in (0, 4):
        win = x[..., left:left + 4].flatten(2).transpose(1, 2)  # (1, 16, 8)
        q, k, v = att.qkv(win).chunk(3, dim=-1)
        o = _manual_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 2)
        o = att.proj(o.transpose(1, 2)).transpose(1, 2).reshape(1, 8, 4, 4)
        torch.testing.assert_close(out[..., left:left + 4], o, rtol=1e-5, atol=1e-5)
    # r is ignored by the L block; maps not divisible by the window are padded and cropped
    assert att(torch.randn(1, 8, 3, 5)).shape == (1, 8, 3, 5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        DeformableCrossAttention(30, heads=4, groups=4, kernel=3)
    with pytest.raises(ValueError, match="4-level"):
        DAR((16, 32, 64))
    with pytest.raises(ValueError, match="block kind"):
        DAR((16, 32, 64, 128), DARConfig(stage_spec=("L", "X")))
