import pytest
import torch
from torch import nn

from udaseg.adapt.hooks import AuxLoss, StepContext
from udaseg.adapt.methods.fd import FDConfig, ImageNetFeatureDistance, downscale_label_ratio
from udaseg.errors import ConfigError
from udaseg.models.segmentor import SegOutput, build_segmentor


def test_downscale_label_ratio_hand_checked():
    label = torch.tensor([[
        [13, 13, 13, 13],
        [13, 0, 0, 0],
        [255, 255, 11, 11],
        [255, 11, 11, 11],
    ]])
    # cells: TL 3/4 car -> 13; TR 2/4 car + 2/4 road -> 255; BL 3/4 ignore -> 255;
    # BR all person -> 11
    out = downscale_label_ratio(label, 2, min_ratio=0.75)
    assert out.shape == (1, 2, 2) and out.dtype == torch.int64
    assert out.tolist() == [[[13, 255], [255, 11]]]
    # a lower ratio accepts the 3/4 cell and the 1/2 tie, but an ignore majority stays ignored
    out = downscale_label_ratio(label.unsqueeze(1), 2, min_ratio=0.0)
    assert out[0, 0, 0] == 13 and out[0, 0, 1] in (0, 13)
    assert out[0, 1, 0] == 255 and out[0, 1, 1] == 11


def test_downscale_label_ratio_scale_one_and_bad_input():
    label = torch.tensor([[[1, 255], [42, 3]]])  # 42 is outside [0, 19): counted as ignore
    assert downscale_label_ratio(label, 1).tolist() == [[[1, 255], [255, 3]]]
    with pytest.raises(ValueError, match="scale"):
        downscale_label_ratio(label, 0)
    with pytest.raises(ValueError, match="label must be"):
        downscale_label_ratio(label[0], 2)


class FixedBackbone(nn.Module):
    """Returns a fixed stage-4 map whatever the image (a stand-in for the ImageNet backbone)."""

    def __init__(self, feat: torch.Tensor):
        super().__init__()
        self.feat = nn.Parameter(feat.clone())

    def forward(self, x):
        return [self.feat.expand(x.shape[0], -1, -1, -1)]


def _label():
    # 4x4 label -> 2x2 feature cells (scale 2):
    # TL car (thing), TR road, BL person (thing), BR ignore
    return torch.tensor([[
        [13, 13, 0, 0],
        [13, 13, 0, 0],
        [11, 11, 255, 255],
        [11, 11, 255, 255],
    ]])


def _ctx(student_feats, label=None):
    image = torch.zeros(1, 3, 4, 4)
    src = {"image": image, "label": _label() if label is None else label}
    out = SegOutput(logits=torch.zeros(1, 19, 1, 1), features=[student_feats])
    return StepContext(step=0, source=src, target={}, student=nn.Identity(), teacher=None,
                       source_out=out)


def test_fd_hand_computed_value_and_gradient():
    imnet = torch.zeros(1, 2, 2, 2)
    fd = ImageNetFeatureDistance(FixedBackbone(imnet))
    assert isinstance(fd, AuxLoss) and fd.name == "fd" and fd.stage == "source"
    delta = torch.zeros(1, 2, 2, 2)
    delta[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # car cell: d = 5
    delta[0, :, 0, 1] = torch.tensor([6.0, 8.0])  # road cell (not a thing): excluded
    delta[0, :, 1, 1] = torch.tensor([1.0, 0.0])  # ignore cell: excluded
    # person cell: d = 0 -> mean over the 2 thing cells = (5 + 0) / 2
    feats = (imnet + delta).requires_grad_(True)
    loss = fd(_ctx(feats))
    assert loss.item() == pytest.approx(0.005 * 2.5)
    loss.backward()
    assert feats.grad is not None
    # d(0.005 * d/2)/dF at the car cell = 0.005/2 * (3, 4)/5; zero on excluded cells
    assert torch.allclose(feats.grad[0, :, 0, 0], torch.tensor([0.0015, 0.002]))
    assert feats.grad[0, :, 0, 1].abs().sum() == 0 and feats.grad[0, :, 1, 1].abs().sum() == 0
    assert all(p.grad is None and not p.requires_grad for p in fd.imnet_backbone.parameters())


def test_fd_weight_and_explicit_classes():
    imnet = torch.zeros(1, 2, 2, 2)
    delta = torch.zeros(1, 2, 2, 2)
    delta[0, :, 0, 1] = torch.tensor([6.0, 8.0])  # road cell, d = 10
    fd = ImageNetFeatureDistance(FixedBackbone(imnet), FDConfig(weight=1.0, classes=[0]))
    assert fd(_ctx(imnet + delta)).item() == pytest.approx(10.0)
    fd_all = ImageNetFeatureDistance(FixedBackbone(imnet), FDConfig(weight=1.0, classes=None))
    assert fd_all(_ctx(imnet + delta)).item() == pytest.approx(10.0 / 4)
    with pytest.raises(ValueError, match="unknown class group"):
        ImageNetFeatureDistance(FixedBackbone(imnet), FDConfig(classes="vehicles"))


def test_fd_empty_mask_is_zero_not_nan():
    imnet = torch.zeros(1, 2, 2, 2)
    fd = ImageNetFeatureDistance(FixedBackbone(imnet))
    feats = torch.randn(1, 2, 2, 2, requires_grad=True)
    label = torch.zeros(1, 4, 4, dtype=torch.long)  # road only: no thing cell
    loss = fd(_ctx(feats, label))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert feats.grad is not None and torch.equal(feats.grad, torch.zeros_like(feats))


def test_fd_real_segmentor_identical_features_and_frozen_copy():
    torch.manual_seed(0)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16).eval()
    fd = ImageNetFeatureDistance(student)
    assert fd.imnet_backbone is not student.backbone and not fd.imnet_backbone.training
    image = torch.randn(2, 3, 64, 64)
    label = torch.full((2, 64, 64), 13)
    out = student(image)
    ctx = StepContext(step=0, source={"image": image, "label": label}, target={},
                      student=student, teacher=None, source_out=out)
    loss = fd(ctx)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # d = 0 everywhere: the norm's gradient must be finite (zero), not NaN
    grads = [p.grad for p in student.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in fd.imnet_backbone.parameters())
    # the frozen copy stays in eval mode when the parent is put in train mode
    fd.train()
    assert fd.training and not fd.imnet_backbone.training
    # the copy does not follow later student updates, and round-trips through state_dict
    with torch.no_grad():
        for p in student.backbone.parameters():
            p.add_(1.0)
    assert fd(StepContext(step=1, source=ctx.source, target={}, student=student, teacher=None,
                          source_out=student(image))).item() > 0
    other = ImageNetFeatureDistance(build_segmentor("mit_tiny", "segformer", head_channels=16))
    other.load_state_dict(fd.state_dict())
    for a, b in zip(other.imnet_backbone.parameters(), fd.imnet_backbone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fd_hrda_context_features_use_resized_imagenet_input():
    # HRDA: the student's features come from the x0.5 context image; FD must feed the ImageNet
    # backbone the same resized image, while the mask uses the full-resolution label.
    torch.manual_seed(0)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16).eval()
    fd = ImageNetFeatureDistance(student)
    image = torch.randn(1, 3, 128, 128)
    context = nn.functional.interpolate(image, scale_factor=0.5, mode="bilinear",
                                        align_corners=False)
    out = student(context)  # F4 is 2x2, the label 128x128 -> scale 64
    label = torch.full((1, 128, 128), 11)
    ctx = StepContext(step=0, source={"image": image, "label": label}, target={},
                      student=student, teacher=None, source_out=out)
    assert fd(ctx).item() == pytest.approx(0.0, abs=1e-6)


def test_fd_views_sum_original_and_stylized_and_share_the_pass():
    torch.manual_seed(0)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16).eval()
    one = ImageNetFeatureDistance(student, FDConfig(weight=1.0))
    both = ImageNetFeatureDistance(student, FDConfig(weight=1.0, views=["image", "stylized"]))
    assert both.cfg.views == ("image", "stylized") and one.cfg.views == ("image",)
    with torch.no_grad():  # move the student away from the frozen copy so FD > 0
        for p in student.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image, stylized = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    label = torch.full((2, 64, 64), 13)
    src = {"image": image, "stylized": stylized, "label": label}

    def ctx():
        return StepContext(step=0, source=src, target={}, student=student, teacher=None,
                           source_out=student(image))

    c = ctx()
    total = both(c)
    assert set(c.outputs) == {"source/stylized"}  # the pass CISS reuses
    c2 = StepContext(step=0, source={"image": stylized, "label": label}, target={},
                     student=student, teacher=None, source_out=student(stylized))
    want = one(ctx()) + one(c2)  # FD(x_s) + FD(x~_s)
    assert total.item() == pytest.approx(want.item(), rel=1e-5) and total.item() > 0
    # a cached pass is reused, not recomputed
    c3 = ctx()
    cached = student(stylized)
    c3.outputs["source/stylized"] = cached
    both(c3)
    assert c3.outputs["source/stylized"] is cached
    with pytest.raises(ConfigError, match="data.stylize"):
        both(StepContext(step=0, source={"image": image, "label": label}, target={},
                         student=student, teacher=None, source_out=student(image)))
    with pytest.raises(ValueError, match="distinct"):
        FDConfig(views=["image", "image"])
