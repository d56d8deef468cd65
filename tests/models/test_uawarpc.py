import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udaseg.errors import CheckpointError
from udaseg.models.alignment import Alignment, DenseAligner
from udaseg.models.alignment.uawarpc import (
    UAWarpC,
    UAWarpCAligner,
    certainty_from_log_var,
    diag_log_var_offset,
    load_uawarpc_state_dict,
    mapping_to_flow,
    uawarpc_state_dict_from_checkpoint,
)
from udaseg.models.alignment.vgg import VGG16Features, load_vgg16_weights

# Verified by reading brdav/refign: models/heads/uawarpc.py (UAWarpCHead.__init__: attribute
# names, in_channels 256 / 81+2+1 / 81+2+2+1, reduce 32->2 1x1) and models/modules.py
# (ConvBNReLU: .conv/.bn, bias only without norm; OpticalFlowEstimatorResidualConnection:
# conv_0, conv0_skip, conv_1, conv_2, conv2_skip, conv_3, conv_4, predict_mapping;
# RefinementModule.dc_convs 0-5 ConvBNReLU + 6 Conv2d; UncertaintyModule: conv_0/1/2,
# predict_uncertainty 16->6, pred_conv_0 6+32(+3), pred_conv_1, predict_uncertainty_final).
UPSTREAM_KEYS = {
    "decoder4.conv_0.conv.weight": (128, 256, 3, 3),
    "decoder4.conv_0.bn.running_var": (128,),
    "decoder3.conv_0.conv.weight": (128, 84, 3, 3),
    "decoder2.conv_0.conv.weight": (128, 84, 3, 3),
    "decoder1.conv_0.conv.weight": (128, 86, 3, 3),
    "decoder2.conv0_skip.conv.weight": (96, 128, 1, 1),
    "decoder2.conv2_skip.conv.weight": (32, 96, 1, 1),
    "decoder3.conv_3.conv.weight": (64, 96, 3, 3),
    "decoder3.conv_1.bn.num_batches_tracked": (),
    "decoder1.predict_mapping.weight": (2, 32, 3, 3),
    "decoder1.predict_mapping.bias": (2,),
    "refinement_module_adaptive.dc_convs.0.conv.weight": (128, 32, 3, 3),
    "refinement_module_finest.dc_convs.4.conv.weight": (64, 96, 3, 3),
    "refinement_module_finest.dc_convs.6.weight": (2, 32, 3, 3),
    "reduce.weight": (2, 32, 1, 1),
    "reduce.bias": (2,),
    "estimate_uncertainty_components4.conv_0.conv.weight": (32, 1, 3, 3),
    "estimate_uncertainty_components4.pred_conv_0.conv.weight": (32, 38, 3, 3),
    "estimate_uncertainty_components3.pred_conv_0.conv.weight": (32, 41, 3, 3),
    "estimate_uncertainty_components1.predict_uncertainty.weight": (6, 16, 3, 3),
    "estimate_uncertainty_components2.predict_uncertainty_final.weight": (1, 16, 3, 3),
    "estimate_uncertainty_components2.pred_conv_1.bn.weight": (16,),
}
ABSENT_KEYS = ["decoder4.conv_0.conv.bias", "estimate_uncertainty_components4.maxpool.weight",
               "refinement_module_finest.dc_convs.0.conv.bias"]


def _real_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in UAWarpC().state_dict().items()}


def test_key_names_and_shapes_match_upstream():
    sd = UAWarpC().state_dict()
    for k, shape in UPSTREAM_KEYS.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    for k in ABSENT_KEYS:
        assert k not in sd
    assert len(sd) == 390  # 4 x 44 decoder + 2 x 38 refinement + 2 reduce + 4 x 34 uncertainty
    assert not any("activation" in k or "leaky" in k for k in sd)


def test_parameter_counts():
    head = UAWarpC()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    flow = sum(n(getattr(head, a)) for a in ("decoder4", "decoder3", "decoder2", "decoder1",
                                             "refinement_module_adaptive",
                                             "refinement_module_finest", "reduce"))
    assert 2.9e6 < flow < 3.1e6  # spec estimate ~3.0 M
    assert 0.64e6 < n(head.decoder4) < 0.65e6
    unc = sum(n(getattr(head, f"estimate_uncertainty_components{i}")) for i in range(1, 5))
    assert 0.1e6 < unc < 0.2e6
    assert 7.6e6 < n(VGG16Features()) < 7.7e6  # VGG16 to pool4 ~7.6 M


def test_mapping_to_flow():
    h, w = 3, 5
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack((xs, ys))[None]
    assert torch.allclose(mapping_to_flow(identity), torch.zeros(1, 2, h, w), atol=1e-6)
    # every pixel maps to the top-left corner: flow = -grid
    flow = mapping_to_flow(torch.full((1, 2, h, w), -1.0))
    assert torch.allclose(flow[0, 0], -torch.arange(w).float().expand(h, w))
    assert torch.allclose(flow[0, 1], -torch.arange(h).float()[:, None].expand(h, w))
    # +1 in normalised x = (W - 1) / 2 pixels
    shifted = mapping_to_flow(identity + torch.tensor([0.5, 0.0]).view(1, 2, 1, 1))
    assert torch.allclose(shifted[0, 0], torch.full((h, w), 0.5 * (w - 1) / 2))


def _zero_head():
    head = UAWarpC().eval()
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return head


def test_per_level_flow_and_log_var_rescaling_on_crafted_weights():
    # all weights zero: every decoder / refinement / uncertainty output is its final bias
    head = _zero_head()
    with torch.no_grad():
        head.decoder3.predict_mapping.bias.copy_(torch.tensor([0.5, 0.25]))
        head.refinement_module_adaptive.dc_convs[6].bias.copy_(torch.tensor([0.1, 0.2]))
        head.decoder2.predict_mapping.bias.copy_(torch.tensor([1.0, 2.0]))
        head.decoder1.predict_mapping.bias.copy_(torch.tensor([0.5, 0.5]))
        head.refinement_module_finest.dc_convs[6].bias.copy_(torch.tensor([0.25, 0.0]))
        for i, v in zip((4, 3, 2, 1), (0.3, -0.2, 0.7, 1.1)):
            unc = getattr(head, f"estimate_uncertainty_components{i}")
            unc.predict_uncertainty_final.bias.fill_(v)
    H, W = 48, 80
    g = torch.Generator().manual_seed(0)
    feats = lambda: [torch.randn(1, 128, H // 4, W // 4, generator=g),  # noqa: E731
                     torch.randn(1, 256, H // 8, W // 8, generator=g),
                     torch.randn(1, 256, 32, 32, generator=g),
                     torch.randn(1, 512, 16, 16, generator=g)]
    with torch.no_grad():
        (f4, l4), (f3, l3), (f2, l2), (f1, l1) = head(feats(), feats(), out_size=(H, W))
    assert f4.shape == (1, 2, 16, 16) and f3.shape == (1, 2, 32, 32)
    assert f2.shape == (1, 2, H // 8, W // 8) and f1.shape == (1, 2, H // 4, W // 4)
    # level 4: mapping 0 -> centre of the 16x16 grid, x16 to 256-space, then to W x H pixels
    grid = torch.arange(16).float()
    f4_256 = torch.stack(((7.5 - grid).expand(16, 16),
                          (7.5 - grid)[:, None].expand(16, 16)))[None] * 16
    s = torch.tensor([W / 256, H / 256]).view(1, 2, 1, 1)
    assert torch.allclose(f4, f4_256 * s, atol=1e-4)
    off = 2 * math.log(math.hypot(H, W) / math.hypot(256, 256))
    assert off == pytest.approx(diag_log_var_offset((H, W), (256, 256)))
    assert torch.allclose(l4, torch.full_like(l4, 0.3 + 2 * math.log(16) + off), atol=1e-5)
    # level 3: upsampled level-4 flow + residuals, in 256 space, then scaled to W x H
    up4 = F.interpolate(f4_256, size=(32, 32), mode="bilinear", align_corners=False)
    f3_exp = (up4 + torch.tensor([0.6, 0.45]).view(1, 2, 1, 1)) * s
    assert torch.allclose(f3, f3_exp, atol=1e-4)
    assert torch.allclose(l3, torch.full_like(l3, -0.2 + off), atol=1e-5)
    # levels 2 and 1: already in W x H pixels, no extra rescaling of flow or log-variance
    up3 = F.interpolate(f3_exp, size=(H // 8, W // 8), mode="bilinear", align_corners=False)
    f2_exp = up3 + torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    assert torch.allclose(f2, f2_exp, atol=1e-4)
    up2 = F.interpolate(f2_exp, size=(H // 4, W // 4), mode="bilinear", align_corners=False)
    assert torch.allclose(f1, up2 + torch.tensor([0.75, 0.5]).view(1, 2, 1, 1), atol=1e-4)
    assert torch.allclose(l2, torch.full_like(l2, 0.7), atol=1e-5)
    assert torch.allclose(l1, torch.full_like(l1, 1.1), atol=1e-5)


def test_certainty_from_log_var():
    lv = torch.tensor([-50.0, 0.0, math.log(0.5), 50.0])
    p = certainty_from_log_var(lv)
    assert p[0] == pytest.approx(1.0) and p[3] == pytest.approx(0.0, abs=1e-12)
    assert p[1] == pytest.approx(1 - math.exp(-0.5))
    assert p[2] == pytest.approx(1 - math.exp(-1.0))


def _fake_lightning_ckpt(path, head_sd, with_vgg=None):
    sd = {f"alignment_head.{k}": v for k, v in head_sd.items()}
    if with_vgg is not None:
        sd.update({f"alignment_backbone.{k}": v for k, v in with_vgg.items()})
    torch.save({"epoch": 3, "global_step": 10, "state_dict": sd}, path)


def _fake_torchvision_vgg(seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    sd, idx, cin = {}, 0, 3
    for v in cfg:
        if v == "M":
            idx += 1
            continue
        sd[f"features.{idx}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * 0.01
        sd[f"features.{idx}.bias"] = torch.randn(v, generator=g)
        cin, idx = v, idx + 2
    sd["classifier.0.weight"] = torch.zeros(4, 8)
    sd["classifier.0.bias"] = torch.zeros(4)
    return sd


def test_strict_loading_from_a_lightning_checkpoint(tmp_path):
    head_sd = _real_state_dict()
    vgg_sd = _fake_torchvision_vgg()
    ckpt = tmp_path / "uawarpc_megadepth.ckpt"
    _fake_lightning_ckpt(ckpt, head_sd, with_vgg=vgg_sd)
    aligner = UAWarpCAligner.from_files(str(ckpt))
    got = aligner.alignment_head.state_dict()
    assert all(torch.equal(got[k], head_sd[k]) for k in head_sd)
    # VGG taken from alignment_backbone.features.* (conv5 and classifier ignored)
    assert torch.equal(aligner.alignment_backbone.features[21].weight, vgg_sd["features.21.weight"])
    # state_dict() of the aligner has the checkpoint's head names
    assert "alignment_head.decoder4.conv_0.conv.weight" in aligner.state_dict()
    # a plain head state dict (no prefix) works too, with an explicit VGG file
    plain, vgg_file = tmp_path / "head.pth", tmp_path / "vgg16-397923af.pth"
    torch.save(head_sd, plain)
    torch.save(vgg_sd, vgg_file)
    aligner = UAWarpCAligner.from_files(plain, vgg=vgg_file)
    assert torch.equal(aligner.alignment_head.reduce.weight, head_sd["reduce.weight"])
    stripped = uawarpc_state_dict_from_checkpoint(torch.load(ckpt, weights_only=True))
    assert stripped.keys() == head_sd.keys()


def test_loading_errors_name_file_prefix_and_keys(tmp_path):
    head_sd = _real_state_dict()
    del head_sd["decoder2.conv_1.conv.weight"]
    ckpt = tmp_path / "broken.ckpt"
    _fake_lightning_ckpt(ckpt, head_sd, with_vgg=_fake_torchvision_vgg())
    with pytest.raises(CheckpointError) as e:
        UAWarpCAligner.from_files(ckpt)
    msg = str(e.value)
    assert "broken.ckpt" in msg and "alignment_head." in msg
    assert "1 missing" in msg and "decoder2.conv_1.conv.weight" in msg
    # unexpected key and shape mismatch
    sd = _real_state_dict()
    sd["decoder9.weight"] = torch.zeros(1)
    sd["reduce.weight"] = torch.zeros(3, 32, 1, 1)
    pattern = r"1 unexpected .*decoder9.weight.*shape mismatches.*reduce.weight"
    with pytest.raises(CheckpointError, match=pattern):
        load_uawarpc_state_dict(UAWarpC(), sd, source="x")
    # no VGG in the checkpoint and none given
    only_head = tmp_path / "only_head.ckpt"
    _fake_lightning_ckpt(only_head, _real_state_dict())
    with pytest.raises(CheckpointError, match="vgg16-397923af"):
        UAWarpCAligner.from_files(only_head)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        UAWarpCAligner.from_files(tmp_path / "nope.ckpt")


def test_vgg_loading_from_torchvision_layout(tmp_path):
    sd = _fake_torchvision_vgg(1)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    model = VGG16Features()
    load_vgg16_weights(model, path)
    for n in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21):
        assert torch.equal(model.features[n].weight, sd[f"features.{n}.weight"])
        assert torch.equal(model.features[n].bias, sd[f"features.{n}.bias"])
    outs = model(torch.randn(1, 3, 32, 48))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    assert [tuple(o.shape) for o in model(torch.randn(1, 3, 32, 32), first=3, last=4)] == [
        (1, 256, 4, 4), (1, 512, 2, 2)]
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match=r"resnet\.pth.*features\.N\.weight"):
        load_vgg16_weights(VGG16Features(), bad)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("features.19.")}, partial)
    with pytest.raises(CheckpointError, match=r"partial\.pth.*missing 2.*features\.19\.weight"):
        load_vgg16_weights(VGG16Features(), partial)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_vgg16_weights(VGG16Features(), tmp_path / "missing.pth")


class _CheapBackbone(nn.Module):
    """VGG16Features' interface and output shapes (pool2 128 ch, pool3 256, pool4 512) at a
    fraction of the cost: average pooling and a fixed 1x1 projection."""

    def __init__(self):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(3, c, 1) for c in (128, 256, 512))

    def forward(self, x, first=2, last=4):
        return [self.proj[s - 2](F.avg_pool2d(x, 2**s)) for s in range(first, last + 1)]


def _aligner(backbone=None):
    torch.manual_seed(0)
    a = UAWarpCAligner(backbone=backbone)
    with torch.no_grad():  # keep random-weight activations tame
        for m in a.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(0.5)
    return a


@pytest.mark.parametrize("size", [(64, 64), (60, 84)])
def test_aligner_end_to_end_shapes(size):
    h, w = size
    # the real VGG16 at 64x64; a cheap stand-in with the same shapes for the resize path
    aligner = _aligner(None if size == (64, 64) else _CheapBackbone())
    g = torch.Generator().manual_seed(3)
    trg, ref = torch.randn(1, 3, h, w, generator=g), torch.randn(1, 3, h, w, generator=g)
    out = aligner(trg, ref)
    assert isinstance(aligner, DenseAligner) and isinstance(out, Alignment)
    assert out.flow.shape == (1, 2, h, w) and out.flow.dtype == torch.float32
    assert out.certainty.shape == (1, 1, h, w) and out.valid.shape == (1, h, w)
    assert out.valid.dtype == torch.bool
    assert torch.isfinite(out.flow).all()
    assert out.certainty.min() >= 0 and out.certainty.max() <= 1
    assert not out.flow.requires_grad
    if size != (64, 64):
        levels, size8 = aligner.forward_levels(trg, ref)
        assert size8 == (64, 88)  # 60 / 8 = 7.5 -> 8, 84 / 8 = 10.5 -> 11 (half rounds up)
        assert [tuple(f.shape[-2:]) for f, _ in levels] == [(16, 16), (32, 32), (8, 11), (16, 22)]


def test_aligner_rescales_flow_from_the_multiple_of_8_grid():
    class ConstHead(nn.Module):
        def forward(self, target, reference, out_size):
            b = target[0].shape[0]
            h, w = out_size
            flow = torch.ones(b, 2, h // 4, w // 4)
            return [(flow, torch.zeros(b, 1, h // 4, w // 4))] * 4

    a = UAWarpCAligner(head=ConstHead())
    flow, lv = a.estimate(torch.zeros(1, 3, 60, 84), torch.zeros(1, 3, 60, 84))
    assert torch.allclose(flow[0, 0], torch.full((60, 84), 84 / 88))
    assert torch.allclose(flow[0, 1], torch.full((60, 84), 60 / 64))
    assert torch.allclose(lv, torch.full_like(lv, diag_log_var_offset((60, 84), (64, 88))))


def test_aligner_is_frozen():
    a = UAWarpCAligner()
    a.train()
    assert not a.training and not a.alignment_head.decoder1.conv_0.bn.training
    assert not any(p.requires_grad for p in a.parameters())
