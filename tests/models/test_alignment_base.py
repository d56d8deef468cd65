import pytest
import torch

from udaseg.models.alignment import Alignment, DenseAligner, IdentityAligner, warp, warp_nearest


def test_warp_integer_shift_recovers_the_image_and_marks_the_border_invalid():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 3, 12, 16, generator=g)
    # target pixel (x, y) sees reference pixel (x + 3, y - 2)
    flow = torch.zeros(1, 2, 12, 16)
    flow[:, 0], flow[:, 1] = 3.0, -2.0
    out, valid = warp(ref, flow)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 2:, :13], ref[0, :, :10, 3:], atol=1e-5)
    # strictly inside: the last column x = 12 + 3 = 15 = W - 1 maps onto u = 1 -> invalid
    expected = torch.zeros(12, 16, dtype=torch.bool)
    expected[3:, :12] = True
    assert torch.equal(valid[0], expected)
    assert torch.all(out[0, :, :, 14:] == 0)  # outside the reference: zero padding


def test_warp_nearest_fills_outside_with_ignore():
    labels = torch.arange(4 * 5).view(1, 4, 5) % 19
    flow = torch.zeros(1, 2, 4, 5)
    flow[:, 0] = 1.0
    out, valid = warp_nearest(labels, flow)
    assert out.dtype == labels.dtype
    # rows 0 and H - 1 sit on v = -1 / +1: not strictly inside, so invalid (Refign's rule)
    assert torch.equal(out[0, 1:3, :3], labels[0, 1:3, 1:4])
    assert torch.all(out[0, :, 3:] == 255)  # x + 1 = 4 = W - 1 is on the border: invalid
    assert torch.all(out[0, [0, 3]] == 255) and not valid[0, 0].any()
    with pytest.raises(ValueError, match="differ"):
        warp_nearest(labels, torch.zeros(1, 2, 4, 4))


def test_identity_aligner():
    a = IdentityAligner()
    assert isinstance(a, DenseAligner)
    out = a(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    assert isinstance(out, Alignment)
    assert torch.equal(out.flow, torch.zeros(2, 2, 8, 8))
    assert torch.all(out.certainty == 0.5) and out.valid.all()
