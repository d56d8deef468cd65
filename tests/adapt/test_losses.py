import math

import pytest
import torch

from udaseg.adapt.losses import seg_cross_entropy


def test_ce_reductions_hand_checked():
    # two classes, logits (0, log 3) -> p(class1) = 3/4 at every pixel
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(3)
    target = torch.tensor([[[1, 0], [255, 255]]])
    ce1, ce0 = -math.log(3 / 4), -math.log(1 / 4)
    # mmseg: mean over all 4 pixels, ignored ones count as 0
    assert seg_cross_entropy(logits, target).item() == pytest.approx((ce1 + ce0) / 4)
    assert seg_cross_entropy(logits, target, reduction="valid_pixels").item() == pytest.approx((ce1 + ce0) / 2)
    w = torch.tensor([[[0.5, 2.0], [1.0, 1.0]]])
    assert seg_cross_entropy(logits, target, weight=w).item() == pytest.approx((0.5 * ce1 + 2 * ce0) / 4)


def test_ce_upsamples_logits_to_label_size():
    logits = torch.randn(2, 19, 4, 4, requires_grad=True)
    target = torch.randint(0, 19, (2, 16, 16))
    loss = seg_cross_entropy(logits, target)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_bad_reduction():
    with pytest.raises(ValueError, match="valid_pixels"):
        seg_cross_entropy(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), reduction="mean")
