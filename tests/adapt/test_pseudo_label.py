import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.pseudo_label import pl_crop_v2_mask, pseudo_labels_from_logits


def _crafted():
    # p(class 1) per pixel, 2 classes, B=2, 2x2; conf = max(p, 1-p)
    p1 = torch.tensor([[[0.99, 0.2], [0.45, 0.97]],    # conf .99* .8 .55 .97*
                       [[0.01, 0.6], [0.3, 0.9]]])     # conf .99* .6 .7 .9
    prob = torch.stack([1 - p1, p1], dim=1)
    return prob.log(), p1


def test_batch_scalar_quality_weight_and_labels():
    logits, p1 = _crafted()
    pl = pseudo_labels_from_logits(logits, (2, 2))
    assert torch.equal(pl.label, (p1 > 0.5).long())
    assert pl.label.dtype == torch.int64 and pl.weight.dtype == torch.float32
    assert torch.allclose(pl.weight, torch.full((2, 2, 2), 0.375))  # 3 of 8 pixels >= 0.968
    assert torch.allclose(pl.prob[:, 1], p1, atol=1e-6)
    assert pl.valid is None


def test_pixel_weight_mode():
    logits, _ = _crafted()
    pl = pseudo_labels_from_logits(logits, (2, 2), weight_mode="pixel")
    exp = torch.tensor([[[1.0, 0], [0, 1]], [[1, 0], [0, 0]]])
    assert torch.equal(pl.weight, exp)
    with pytest.raises(ValueError):
        pseudo_labels_from_logits(logits, (2, 2), weight_mode="image")


def test_upsampling_to_out_size():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 3)
    pl = pseudo_labels_from_logits(logits, (8, 12), threshold=0.0)
    up = F.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False)
    assert pl.label.shape == (2, 8, 12) and pl.prob.shape == (2, 3, 8, 12)
    assert torch.equal(pl.label, up.argmax(1))
    assert torch.allclose(pl.prob, up.softmax(1))
    assert torch.equal(pl.weight, torch.ones(2, 8, 12))  # every pixel passes threshold 0


def test_pl_crop_v1_rows():
    logits = torch.zeros(2, 2, 6, 4)
    logits[:, 0] = 10.0  # confident everywhere -> q = 1
    pl = pseudo_labels_from_logits(logits, (6, 4), ignore_top=1, ignore_bottom=2)
    rows = pl.weight[:, :, 0]
    assert torch.equal(rows, torch.tensor([[0.0, 1, 1, 1, 0, 0]] * 2))
    assert torch.equal(pl.valid, pl.weight)
    # quality is computed before the crop (over all B*H*W pixels)
    pl = pseudo_labels_from_logits(logits, (6, 4), ignore_bottom=0)
    assert torch.equal(pl.weight, torch.ones(2, 6, 4))


def test_valid_mask_multiplies_weight():
    logits, _ = _crafted()
    valid = torch.ones(2, 2, 2)
    valid[:, :, 0] = 0
    pl = pseudo_labels_from_logits(logits, (2, 2), valid=valid)
    assert torch.allclose(pl.weight, 0.375 * valid)
    assert torch.equal(pl.valid, valid)


def test_pl_crop_v2_mask():
    m = pl_crop_v2_mask(1024, 2048)
    assert m.shape == (1024, 2048)
    assert m.sum().item() == (1024 - 30 - 240) * (2048 - 60)
    assert m[29].sum() == 0 and m[30, 30] == 1 and m[30, 29] == 0
    assert m[1024 - 241, 2048 - 31] == 1 and m[1024 - 240].sum() == 0 and m[:, 2048 - 30].sum() == 0
    small = pl_crop_v2_mask(5, 4, top=1, bottom=2, left=0, right=1)
    exp = torch.tensor([[0.0] * 4, [1, 1, 1, 0], [1, 1, 1, 0], [0] * 4, [0] * 4])
    assert torch.equal(small, exp)
