"""HRDA segmentor: crop boxes, fusion math, HR slide, shapes, gradients, loss, param counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udaseg.adapt.losses import segmentation_loss
from udaseg.eval.inference import slide_inference
from udaseg.models import EncoderDecoder, SegOutput, param_groups
from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.hrda import HRDAConfig, HRDASegmentor, build_hrda, make_attention_head
from udaseg.models.segformer_head import SegFormerHead

K = 19


# ---------------------------------------------------------------------------------------- stubs
class PoolBackbone(nn.Module):
    """One feature level: 4x4 average pooling (stride 4, translation-equivariant on a 4-grid)."""

    out_channels = (3,)
    feature_info = [{"num_chs": 3, "reduction": 4}]

    def forward(self, x):
        return [F.avg_pool2d(x, 4)]


class ConstBySizeHead(nn.Module):
    """Logits ``ctx_value`` on the context grid (width ``ctx_width``), else ``det_value``."""

    def __init__(self, ctx_width: int, ctx_value: float = 1.0, det_value: float = 5.0):
        super().__init__()
        self.num_classes = K
        self.ctx_width, self.ctx_value, self.det_value = ctx_width, ctx_value, det_value

    def forward(self, feats):
        f = feats[0]
        v = self.ctx_value if f.shape[-1] == self.ctx_width else self.det_value
        return f.new_full((f.shape[0], K, *f.shape[-2:]), v)


class ConstAttention(nn.Module):
    def __init__(self, value: float, channels: int = K):
        super().__init__()
        self.logit, self.channels = math.log(value / (1 - value)), channels

    def forward(self, feats):
        f = feats[0]
        return f.new_full((f.shape[0], self.channels, *f.shape[-2:]), self.logit)


class ConvHead(nn.Module):
    """1x1 conv on the first level (translation-equivariant)."""

    def __init__(self, out: int = K):
        super().__init__()
        self.num_classes = out
        self.conv = nn.Conv2d(3, out, 1)

    def forward(self, feats):
        return self.conv(feats[0])


def _up(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _ring_free(h, w, box_hr, inside: bool):
    """Boolean (h, w) mask of cells strictly inside/outside the box, skipping a 1-cell ring."""
    y1, y2, x1, x2 = box_hr
    m = torch.zeros(h, w, dtype=torch.bool)
    if inside:
        m[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1] = True
    else:
        m[:] = True
        m[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = False
    return m


def _tiny(**kw) -> HRDASegmentor:
    return build_hrda("mit_tiny", "daformer", head_channels=16, drop_path_rate=0.0, **kw)


# ------------------------------------------------------------------------------------ crop box
def test_crop_box_multiples_inside_and_sized():
    base = EncoderDecoder(PoolBackbone(), ConvHead())
    hrda = HRDASegmentor(base, attention_head=ConstAttention(0.5))
    torch.manual_seed(0)
    assert hrda.detail_crop_size(1024, 1024) == (512, 512)
    assert hrda.detail_crop_size(128, 200) == (64, 96)  # 100 rounded down to a multiple of 8
    seen = set()
    for _ in range(200):
        y1, y2, x1, x2 = hrda.random_crop_box(128, 200)
        assert y1 % 8 == 0 and x1 % 8 == 0 and y2 % 8 == 0 and x2 % 8 == 0
        assert 0 <= y1 < y2 <= 128 and 0 <= x1 < x2 <= 200
        assert (y2 - y1, x2 - x1) == (64, 96)
        seen.add((y1, x1))
    # the reference's randint(0, (H - h + 1) // 8) * 8: margins 64 and 104 give 8 and 13
    # offsets (0..56, 0..96), never the last fitting multiple (64, 104)
    assert {y for y, _ in seen} == set(range(0, 57, 8))
    assert {x for _, x in seen} == set(range(0, 97, 8))
    torch.manual_seed(3)
    a = hrda.random_crop_box(1024, 1024)
    torch.manual_seed(3)
    assert hrda.random_crop_box(1024, 1024) == a and (a[1] - a[0], a[3] - a[2]) == (512, 512)



def test_crop_box_offsets_match_reference_on_paper_sizes():
    # a 1024 crop with a 512 detail crop: offsets 0..504 in steps of 8, 64 positions per side
    base = EncoderDecoder(PoolBackbone(), ConvHead())
    hrda = HRDASegmentor(base, attention_head=ConstAttention(0.5))
    g = torch.Generator().manual_seed(0)
    ys, xs = set(), set()
    for _ in range(1500):
        y1, _, x1, _ = hrda.random_crop_box(1024, 1024, generator=g)
        ys.add(y1)
        xs.add(x1)
    assert ys == xs == set(range(0, 505, 8))
    # a detail crop as large as the input (margin 0 < d - 1): the offset is 0, not an error
    hrda_full = HRDASegmentor(base, attention_head=ConstAttention(0.5),
                              cfg=HRDAConfig(detail_crop_ratio=1.0))
    assert hrda_full.random_crop_box(64, 64, generator=g) == (0, 64, 0, 64)


# ---------------------------------------------------------------------------------- fusion math
def test_fusion_constants_on_stub():
    # 128 input: context 64 -> logits 16x16 (value 1); detail crop 32 -> logits 8x8 (value 5)
    cfg = HRDAConfig(detail_crop_ratio=0.25)
    base = EncoderDecoder(PoolBackbone(), ConstBySizeHead(ctx_width=16))
    hrda = HRDASegmentor(base, cfg, attention_head=ConstAttention(0.25)).train()
    torch.manual_seed(0)
    for box in [(32, 64, 48, 80), None, None]:
        out = hrda(torch.randn(2, 3, 128, 128), crop_box=box)
        y1, y2, x1, x2 = out.crop_box
        assert out.logits.shape == (2, K, 32, 32) and out.detail_logits.shape == (2, K, 8, 8)
        bhr = (y1 // 4, y2 // 4, x1 // 4, x2 // 4)
        inside, outside = _ring_free(32, 32, bhr, True), _ring_free(32, 32, bhr, False)
        assert torch.allclose(out.logits[..., inside], torch.tensor(2.0))  # 0.25*5 + 0.75*1
        assert torch.equal(out.logits[..., outside], torch.ones_like(out.logits[..., outside]))
        # exact reference formula everywhere (ring included)
        a = torch.zeros(2, K, 16, 16)
        a[..., y1 // 8 : y2 // 8, x1 // 8 : x2 // 8] = 0.25
        ins = torch.zeros(2, K, 32, 32)
        ins[..., bhr[0] : bhr[1], bhr[2] : bhr[3]] = 5.0
        expect = _up(a, (32, 32)) * ins + _up((1 - a) * torch.ones(2, K, 16, 16), (32, 32))
        assert torch.allclose(out.logits, expect, atol=1e-6)

    fixed = HRDASegmentor(base, HRDAConfig(detail_crop_ratio=0.25, fixed_attention=0.5),
                          attention_head=ConstAttention(0.25)).train()
    out = fixed(torch.randn(1, 3, 128, 128), crop_box=(32, 64, 48, 80))
    inside = _ring_free(32, 32, (8, 16, 12, 20), True)
    assert torch.allclose(out.logits[..., inside], torch.tensor(3.0))  # 0.5*5 + 0.5*1


def test_fusion_formula_on_conv_stub():
    torch.manual_seed(0)
    head, att = ConvHead(), ConvHead()
    hrda = HRDASegmentor(EncoderDecoder(PoolBackbone(), head), attention_head=att).train()
    x = torch.randn(2, 3, 128, 128)
    out = hrda(x)
    y1, y2, x1, x2 = out.crop_box
    with torch.no_grad():
        f_c = F.avg_pool2d(_up(x, (64, 64)), 4)
        y_c, a_full = head.conv(f_c), torch.sigmoid(att.conv(f_c))
        a = torch.zeros_like(a_full)  # attention zeroed outside the box (LR stride 8)
        box_lr = (..., slice(y1 // 8, y2 // 8), slice(x1 // 8, x2 // 8))
        a[box_lr] = a_full[box_lr]
        y_d = head.conv(F.avg_pool2d(x[..., y1:y2, x1:x2], 4))
        ins = torch.zeros(2, K, 32, 32)
        ins[..., y1 // 4 : y2 // 4, x1 // 4 : x2 // 4] = y_d
        expect = _up(a, (32, 32)) * ins + _up((1 - a) * y_c, (32, 32))
    assert torch.allclose(out.detail_logits, y_d, atol=1e-6)
    assert torch.allclose(out.logits, expect, atol=1e-5)
    outside = _ring_free(32, 32, (y1 // 4, y2 // 4, x1 // 4, x2 // 4), False)
    assert torch.allclose(out.logits[..., outside], _up(y_c, (32, 32))[..., outside], atol=1e-5)


# ---------------------------------------------------------------------------------- HR slide
def test_hr_windows_coverage_and_count():
    hrda = HRDASegmentor(EncoderDecoder(PoolBackbone(), ConvHead()), attention_head=ConvHead())
    for size in [(128, 128), (1024, 1024), (128, 256), (96, 160)]:
        wins = hrda.hr_windows(*size)
        ch, cw = hrda.detail_crop_size(*size)
        cover = torch.zeros(size[0] // 4, size[1] // 4)
        for w in wins:
            assert (w.y2 - w.y1, w.x2 - w.x1) == (ch, cw)
            assert all(v % 4 == 0 for v in w)
            cover[w.y1 // 4 : w.y2 // 4, w.x1 // 4 : w.x2 // 4] += 1
        assert cover.min() >= 1
    assert len(hrda.hr_windows(128, 128)) == 9
    wins = hrda.hr_windows(1024, 1024)
    assert len(wins) == 9 and {w.y1 for w in wins} == {0, 256, 512}
    assert len(hrda.hr_windows(128, 256)) == 9  # crop 64x128, stride 32x64
    nov = HRDASegmentor(EncoderDecoder(PoolBackbone(), ConvHead()),
                        HRDAConfig(hr_slide_overlapping=False), attention_head=ConvHead())
    assert len(nov.hr_windows(1024, 1024)) == 4


def test_eval_slide_equals_whole_for_equivariant_stub():
    torch.manual_seed(0)
    head, att = ConvHead(), ConvHead()
    hrda = HRDASegmentor(EncoderDecoder(PoolBackbone(), head), attention_head=att).eval()
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        out = hrda(x)
        f_c = F.avg_pool2d(_up(x, (64, 80)), 4)
        y_c, a = head.conv(f_c), torch.sigmoid(att.conv(f_c))  # no mask at inference
        y_d = head.conv(F.avg_pool2d(x, 4))  # stitched windows == whole-image HR logits
        expect = _up(a, (32, 40)) * y_d + _up((1 - a) * y_c, (32, 40))
    assert out.detail_logits is None and out.crop_box is None
    assert out.logits.shape == (2, K, 32, 40)
    assert torch.allclose(out.logits, expect, atol=1e-5)
    # mode= overrides self.training
    hrda.train()
    with torch.no_grad():
        assert torch.allclose(hrda(x, mode="inference").logits, expect, atol=1e-5)
        assert hrda(x, mode="train").crop_box is not None


# ------------------------------------------------------------------------- real (tiny) network
def test_shapes_train_and_eval():
    torch.manual_seed(0)
    hrda = _tiny()
    x = torch.randn(2, 3, 128, 128)
    out = hrda.train()(x)
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, K, 32, 32) and out.detail_logits.shape == (2, K, 16, 16)
    y1, y2, x1, x2 = out.crop_box
    assert (y2 - y1, x2 - x1) == (64, 64)
    assert [f.shape[-1] for f in out.features] == [16, 8, 4, 2]  # context features
    with torch.no_grad():
        ev = hrda.eval()(x)
        assert ev.logits.shape == (2, K, 32, 32) and ev.detail_logits is None
        assert [f.shape[-1] for f in ev.features] == [16, 8, 4, 2]
        assert [f.shape[-1] for f in hrda.extract_features(x)] == [16, 8, 4, 2]
        # test time: outer slide over a wider image, each window through the HRDA procedure
        full = slide_inference(hrda, torch.randn(1, 3, 128, 256), crop_size=128, stride=64,
                               num_classes=K, batch_windows=None)
    assert full.shape == (1, K, 128, 256) and torch.isfinite(full).all()
    assert hrda.num_classes == K
    assert hrda.backbone is hrda.model.backbone and hrda.decode_head is hrda.model.decode_head


def test_attention_head_types():
    hrda = _tiny()
    att = hrda.scale_attention_head
    assert type(att) is DAFormerHead and att.num_classes == K and hrda.scale_attention is att
    keys = set(att.state_dict())
    assert "fuse_layer.conv.weight" in keys and "fuse_layer.bn.running_mean" in keys
    assert not any("aspp" in k or "bottleneck" in k for k in keys)
    single = _tiny(cfg=HRDAConfig(attention_classwise=False))
    assert single.scale_attention_head.num_classes == 1
    out = single.train()(torch.randn(1, 3, 128, 128))
    assert out.logits.shape == (1, K, 32, 32)
    seg = build_hrda("mit_tiny", "segformer", head_channels=16)
    assert isinstance(seg.scale_attention_head, SegFormerHead)
    assert seg.scale_attention_head.linear_pred.out_channels == K
    with pytest.raises(TypeError, match="attention_head"):
        make_attention_head(ConvHead(), K)


def test_gradients_and_param_names():
    torch.manual_seed(0)
    hrda = _tiny().train()
    x, label = torch.randn(2, 3, 128, 128), torch.randint(0, K, (2, 128, 128))
    segmentation_loss(hrda(x), label).backward()
    names = [n for n, _ in hrda.named_parameters()]
    for name, p in hrda.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(n.startswith("model.backbone.") for n in names)
    assert any(n.startswith("model.decode_head.") for n in names)
    att = [n for n in names if n.startswith("scale_attention_head.")]
    assert att and all("head" in n for n in att)
    assert any(hrda.scale_attention_head.conv_seg.weight.grad.abs().flatten() > 0)
    head_group = next(g for g in param_groups(hrda, 6e-5, 0.01) if g["name"] == "head")
    assert set(att) <= set(head_group["param_names"])
    assert not any(n.startswith("model.backbone.") for n in head_group["param_names"])


def test_segmentation_loss_matches_hand_computation():
    torch.manual_seed(0)
    hrda = _tiny().train()
    x = torch.randn(2, 3, 128, 128)
    label = torch.randint(0, K, (2, 128, 128))
    label[:, :10] = 255
    out = hrda(x)
    y1, y2, x1, x2 = out.crop_box

    def ce(logits, target):
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        per_px = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
        return per_px.sum() / per_px.numel()  # mmseg: divide by all pixels

    expect = 0.9 * ce(out.logits, label) + 0.1 * ce(out.detail_logits, label[:, y1:y2, x1:x2])
    loss = segmentation_loss(out, label, detail_weight=hrda.cfg.detail_loss_weight)
    assert torch.allclose(loss, expect, rtol=1e-5)


def test_attention_head_param_count_mit_b5():
    with torch.device("meta"):
        hrda = build_hrda("mit_b5", "daformer")
    assert sum(p.numel() for p in hrda.scale_attention_head.parameters()) == 530_707
    assert sum(p.numel() for p in hrda.decode_head.parameters()) == 3_712_275
    assert sum(p.numel() for p in hrda.parameters()) == 85_685_990  # spec: 85.69 M


def test_config_validation():
    with pytest.raises(ValueError, match="context_scale"):
        HRDAConfig(context_scale=0.0)
    with pytest.raises(ValueError, match="fixed_attention"):
        HRDAConfig(fixed_attention=1.5)
    with pytest.raises(ValueError, match="crop_divisor"):
        HRDAConfig(crop_divisor=0)
    base = EncoderDecoder(PoolBackbone(), ConvHead())
    hrda = HRDASegmentor(base, attention_head=ConvHead()).train()
    with pytest.raises(ValueError, match="crop box"):
        hrda(torch.randn(1, 3, 128, 128), crop_box=(100, 164, 0, 64))
    with pytest.raises(ValueError, match="multiple of 8"):
        hrda(torch.randn(1, 3, 128, 128), crop_box=(4, 68, 0, 64))


def test_refign_hrda_star_segformer_attention_head():
    from udaseg.models.segformer_head import SegFormerHead

    torch.manual_seed(0)
    from udaseg.models.segmentor import build_segmentor

    base = build_segmentor("mit_tiny", "daformer", num_classes=19)
    model = HRDASegmentor(base, HRDAConfig(attention_head="segformer"))
    head = model.scale_attention_head
    assert isinstance(head, SegFormerHead) and head.concat_order == "nvlabs"
    assert head.embed_dim == 256
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 19, 16, 16)
    with pytest.raises(ValueError, match="attention_head"):
        HRDAConfig(attention_head="mlp")
