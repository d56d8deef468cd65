import math

import pytest
import torch

from udaseg.adapt.hooks import AuxLoss, PseudoLabels, StepContext
from udaseg.adapt.methods.mic import MaskedImageConsistency, MICConfig, block_mask
from udaseg.models.segmentor import SegOutput, build_segmentor


def test_block_mask_keeps_about_one_minus_ratio_and_is_blockwise_constant():
    g = torch.Generator().manual_seed(0)
    m = block_mask((4, 256, 256), block_size=8, ratio=0.7, generator=g)
    assert m.shape == (4, 1, 256, 256) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - 0.3) < 0.05
    blocks = m.reshape(4, 1, 32, 8, 32, 8)
    assert torch.equal(blocks.amin(dim=(3, 5)), blocks.amax(dim=(3, 5)))
    # a (B, 3, H, W) shape gives the same (B, 1, H, W) mask layout
    assert block_mask((2, 3, 16, 16), 8, 0.5).shape == (2, 1, 16, 16)


def test_block_mask_non_divisible_sizes_round_the_grid():
    g = torch.Generator().manual_seed(3)
    m = block_mask((2, 100, 70), block_size=32, ratio=0.5, generator=g)
    assert m.shape == (2, 1, 100, 70)
    # grid round(100/32) = 3 x round(70/32) = 2; nearest upsampling: rows 0-33 | 34-66 | 67-99,
    # columns 0-34 | 35-69; the cells are the (u > 0.5) of the generator's first draw
    u = torch.rand((2, 1, 3, 2), generator=torch.Generator().manual_seed(3))
    rows, cols = ((0, 34), (34, 67), (67, 100)), ((0, 35), (35, 70))
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            cell = m[:, 0, r0:r1, c0:c1]
            expected = (u[:, 0, i, j] > 0.5).float()
            assert torch.equal(cell, expected[:, None, None].expand_as(cell))
    # images smaller than half a block still get one cell (not an empty grid)
    assert block_mask((1, 20, 20), 64, 0.0).shape == (1, 1, 20, 20)
    # Python rounding: 96/64 = 1.5 -> 2 cells, 160/64 = 2.5 -> 2 cells (rows 0-47 | 48-95)
    m = block_mask((64, 96, 8), 64, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m[:, :, :48], m[:, :, :1].expand(-1, -1, 48, -1))
    assert torch.equal(m[:, :, 48:], m[:, :, 48:49].expand(-1, -1, 48, -1))
    assert not torch.equal(m[:, :, 0], m[:, :, 95])


def test_block_mask_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        block_mask((1, 8, 8), 4, 1.5)
    with pytest.raises(ValueError, match="block_size"):
        block_mask((1, 8, 8), 0, 0.5)


def _ctx(student, b=2, h=4, w=4, pl_weight=0.5):
    torch.manual_seed(0)
    source = {"image": torch.randn(b, 3, h, w) + 5.0,
              "label": torch.ones(b, h, w, dtype=torch.long)}
    source["label"][0, 0] = 255
    target = {"image": torch.randn(b, 3, h, w) + 5.0}
    pseudo = PseudoLabels(label=torch.zeros(b, h, w, dtype=torch.long),
                          weight=torch.full((b, h, w), pl_weight))
    return StepContext(step=0, source=source, target=target, student=student, teacher=None,
                       pseudo=pseudo)


class StubStudent:
    """Records its input and returns fixed logits: p(class 1) = 3/4 at every pixel."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x)
        logits = torch.zeros(x.shape[0], 2, x.shape[-2], x.shape[-1])
        logits[:, 1] = math.log(3)
        return SegOutput(logits=logits, features=[])


CE1, CE0 = -math.log(3 / 4), -math.log(1 / 4)


def test_separate_mode_batch_and_hand_checked_loss():
    student = StubStudent()
    ctx = _ctx(student)
    mic = MaskedImageConsistency(MICConfig(mode="separate", mask_ratio=0.0, weight=2.0))
    assert isinstance(mic, AuxLoss) and mic.name == "mic" and mic.stage == "target"
    batch = mic.masked_batch(ctx)
    # [source image 0, target image 0], no augmentation; ratio 0 keeps every pixel
    assert batch.image.shape == (2, 3, 4, 4)
    assert torch.equal(batch.image[0], ctx.source["image"][0])
    assert torch.equal(batch.image[1], ctx.target["image"][0])
    assert torch.equal(batch.label[0], ctx.source["label"][0])
    assert torch.equal(batch.label[1], ctx.pseudo.label[0])
    assert torch.equal(batch.weight[0], torch.ones(4, 4))  # weight 1 for the source image
    assert torch.equal(batch.weight[1], ctx.pseudo.weight[0])
    # loss: source image: 12 valid pixels of class 1 (row 0 ignored) with weight 1; target image:
    # 16 pseudo-label-0 pixels with weight 0.5; mmseg mean over all 2*16 pixels; times lambda 2
    loss = mic(ctx)
    expected = 2.0 * (12 * CE1 + 16 * 0.5 * CE0) / 32
    assert loss.item() == pytest.approx(expected)
    assert student.inputs[-1].shape == (2, 3, 4, 4)


def test_loss_uses_the_pseudo_weights():
    student = StubStudent()
    mic = MaskedImageConsistency(MICConfig(mode="separate", mask_ratio=0.0))
    zero = mic(_ctx(student, pl_weight=0.0)).item()
    assert zero == pytest.approx(12 * CE1 / 32)  # only the source image remains


def test_masked_pixels_are_zero_and_kept_pixels_unchanged():
    student = StubStudent()
    ctx = _ctx(student, h=32, w=32)
    mic = MaskedImageConsistency(MICConfig(mode="separate", block_size=8, mask_ratio=0.5),
                                 generator=torch.Generator().manual_seed(1))
    batch = mic.masked_batch(ctx)
    x = torch.stack((ctx.source["image"][0], ctx.target["image"][0]))
    keep = batch.mask.expand_as(x).bool()
    assert 0 < batch.mask.mean() < 1
    assert torch.all(batch.image[~keep] == 0)
    assert torch.equal(batch.image[keep], x[keep])  # inputs are ~N(5, 1): never 0 by accident
    mic.generator.manual_seed(1)
    mic(ctx)
    assert torch.equal(student.inputs[-1], batch.image)  # the student sees the masked image


def test_separatetrgaug_masks_after_the_colour_augmentation(monkeypatch):
    import udaseg.adapt.mixing as mixing

    seen = []

    def fake_augment(images, cfg, generator=None, jitter_gate=None, blur_gate=None):
        seen.append(cfg)
        return images + 1.0

    monkeypatch.setattr(mixing, "strong_augment", fake_augment)
    ctx = _ctx(StubStudent(), h=16, w=16)
    cfg = MICConfig(block_size=4, color_jitter_strength=0.3, color_jitter_probability=0.1,
                    blur=False)
    batch = MaskedImageConsistency(cfg).masked_batch(ctx)
    keep = batch.mask.expand_as(batch.image).bool()
    assert torch.all(batch.image[~keep] == 0)  # 0 after augmentation, not aug(0)
    assert torch.equal(batch.image[keep], (ctx.target["image"] + 1.0)[keep])
    (aug,) = seen
    assert (aug.color_jitter_strength, aug.color_jitter_probability, aug.blur) == (0.3, 0.1, False)
    assert aug.sigma_per_image is False  # one blur sigma for the MIC batch (spec 8.2)


def test_separatetrgaug_uses_target_batch_and_pseudo_labels():
    from udaseg.adapt.mixing import StrongAugConfig  # noqa: F401  (written by the mixing module)

    student = StubStudent()
    ctx = _ctx(student, b=3, h=16, w=16, pl_weight=0.25)
    ctx.pseudo.label[1] = 1
    mic = MaskedImageConsistency(MICConfig(block_size=4, mask_ratio=0.7),
                                 generator=torch.Generator().manual_seed(0))
    batch = mic.masked_batch(ctx)
    assert batch.image.shape == (3, 3, 16, 16)
    assert torch.equal(batch.label, ctx.pseudo.label)
    assert torch.equal(batch.weight, ctx.pseudo.weight)
    assert torch.all(batch.image[~batch.mask.expand_as(batch.image).bool()] == 0)
    loss = mic(ctx)
    # images 0 and 2: pseudo-label 0; image 1: pseudo-label 1; all weights 0.25
    expected = 0.25 * (2 * 256 * CE0 + 256 * CE1) / (3 * 256)
    assert loss.item() == pytest.approx(expected)


def test_separatetrgaug_ratio_zero_without_jitter_or_blur_is_the_input():
    student = StubStudent()
    ctx = _ctx(student, h=16, w=16)
    cfg = MICConfig(mask_ratio=0.0, color_jitter_probability=1.0, blur=False)
    batch = MaskedImageConsistency(cfg).masked_batch(ctx)
    assert torch.allclose(batch.image, ctx.target["image"])


def test_mic_gradient_reaches_a_real_student():
    torch.manual_seed(0)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16, num_classes=3)
    ctx = _ctx(student, h=32, w=32)
    ctx.source["label"].clamp_(max=2)
    ctx.source["label"][0, 0] = 255
    mic = MaskedImageConsistency(MICConfig(mode="separate", block_size=8))
    loss = mic(ctx)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_bad_mode():
    with pytest.raises(ValueError, match="supported modes"):
        MaskedImageConsistency(MICConfig(mode="separatesrc"))  # type: ignore[arg-type]


def test_separate_mode_size_mismatch():
    ctx = _ctx(StubStudent())
    ctx.target["image"] = torch.randn(2, 3, 8, 8)
    ctx.pseudo = PseudoLabels(label=torch.zeros(2, 8, 8, dtype=torch.long),
                              weight=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="sizes differ"):
        MaskedImageConsistency(MICConfig(mode="separate")).masked_batch(ctx)


class HRDAStubStudent(StubStudent):
    """Fused logits as StubStudent plus a detail crop (rows/cols 0..1) predicting class 0."""

    def __call__(self, x):
        out = super().__call__(x)
        detail = torch.zeros(x.shape[0], 2, 2, 2)
        detail[:, 0] = math.log(3)
        return SegOutput(logits=out.logits, features=[], detail_logits=detail, crop_box=(0, 2, 0, 2))


def test_mic_uses_the_loops_loss_settings_and_scales_only_the_fused_hrda_term():
    from udaseg.adapt.self_training import SelfTraining

    loop = SelfTraining(torch.nn.Identity(), cfg=None, ce_reduction="valid_pixels",
                        detail_loss_weight=0.3)
    ctx = _ctx(HRDAStubStudent())
    ctx.seg_loss = loop.seg_loss
    # separate mode: source image 0 (row 0 ignored: 12 valid pixels of class 1, weight 1) and
    # target image 0 (16 pseudo-label-0 pixels, weight 0.5); lambda_M = 2
    mic = MaskedImageConsistency(MICConfig(mode="separate", mask_ratio=0.0, weight=2.0))
    fused = (12 * CE1 + 16 * 0.5 * CE0) / 28  # valid_pixels: divide by the 28 labelled pixels
    # detail crop rows 0-1, cols 0-1: source has row 0 ignored -> 2 pixels of class 1 (p=1/4
    # under the detail logits), target 4 pixels of class 0 (p=3/4) with weight 0.5; 6 valid
    detail = (2 * CE0 + 4 * 0.5 * CE1) / 6
    assert mic(ctx).item() == pytest.approx(2.0 * 0.7 * fused + 0.3 * detail)
    scoped_all = MaskedImageConsistency(MICConfig(mode="separate", mask_ratio=0.0, weight=2.0,
                                                  weight_scope="all"))
    assert scoped_all(ctx).item() == pytest.approx(2.0 * (0.7 * fused + 0.3 * detail))
    with pytest.raises(ValueError, match="weight_scope"):
        MaskedImageConsistency(MICConfig(weight_scope="detail"))  # type: ignore[arg-type]
