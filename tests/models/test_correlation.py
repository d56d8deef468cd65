import pytest
import torch
import torch.nn.functional as F

from udaseg.models.alignment.correlation import (
    global_correlation,
    global_correlation_layer,
    local_correlation,
    local_correlation_layer,
    mutual_matching,
)


def _brute_global(t, r):
    b, c, ht, wt = t.shape
    hr, wr = r.shape[-2:]
    out = torch.zeros(b, hr * wr, ht, wt, dtype=torch.float64)
    for n in range(b):
        for y in range(hr):
            for x in range(wr):
                for i in range(ht):
                    for j in range(wt):
                        prod = r[n, :, y, x].double() * t[n, :, i, j].double()
                        out[n, y * wr + x, i, j] = prod.sum()
    return out


def _brute_local(t, r, p):
    b, c, h, w = t.shape
    rad = p // 2
    out = torch.zeros(b, p * p, h, w, dtype=torch.float64)
    for n in range(b):
        for dy in range(p):
            for dx in range(p):
                for i in range(h):
                    for j in range(w):
                        y, x = i + dy - rad, j + dx - rad
                        if 0 <= y < h and 0 <= x < w:
                            prod = t[n, :, i, j].double() * r[n, :, y, x].double()
                            out[n, dy * p + dx, i, j] = prod.sum()
    return out


def test_global_correlation_is_row_major_over_reference_positions():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 3, 4, generator=g)
    r = torch.randn(2, 5, 2, 3, generator=g)  # non-square: H-first vs W-first order differ
    out = global_correlation(t, r)
    assert out.shape == (2, 6, 3, 4)
    assert torch.allclose(out.double(), _brute_global(t, r), atol=1e-5)
    # channel k = y * W_r + x: reference position (x=2, y=1) is channel 5
    assert torch.allclose(out[0, 5], (r[0, :, 1, 2, None, None] * t[0]).sum(0), atol=1e-5)


def test_mutual_matching_and_layer():
    g = torch.Generator().manual_seed(1)
    corr = torch.rand(1, 4, 2, 2, generator=g)
    eps = 1e-5
    expected = torch.empty_like(corr)
    for k in range(4):
        for i in range(2):
            for j in range(2):
                v = corr[0, k, i, j]
                expected[0, k, i, j] = v * (v / (corr[0, :, i, j].max() + eps)) * (
                    v / (corr[0, k].max() + eps))
    assert torch.allclose(mutual_matching(corr), expected, atol=1e-6)
    t, r = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    layer = global_correlation_layer(t, r)
    ref = F.normalize(F.relu(mutual_matching(global_correlation(t, r))), dim=1)
    assert torch.allclose(layer, ref)


@pytest.mark.parametrize("p", [3, 9])
def test_local_correlation_matches_brute_force_dy_major_zero_outside_no_division(p):
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 7, 6, 5, generator=g)
    r = torch.randn(2, 7, 6, 5, generator=g)
    out = local_correlation(t, r, p)
    assert out.shape == (2, p * p, 6, 5)
    assert torch.allclose(out.double(), _brute_local(t, r, p), atol=1e-5)


def test_local_correlation_channel_order_and_scale_on_a_crafted_case():
    # one-hot features: target pixel (1, 1) carries value 2 in channel 0 only; reference pixel
    # (row 0, col 2) carries 3 in channel 0 -> offset dy = -1, dx = +1 from (1, 1)
    t = torch.zeros(1, 4, 3, 3)
    r = torch.zeros(1, 4, 3, 3)
    t[0, 0, 1, 1] = 2.0
    r[0, 0, 0, 2] = 3.0
    out = local_correlation(t, r, 3)
    nz = out.nonzero().tolist()
    # dy index 0 (dy = -1), dx index 2 (dx = +1): dy-major channel 0 * 3 + 2 = 2
    assert nz == [[0, 2, 1, 1]]
    assert out[0, 2, 1, 1].item() == 6.0  # plain sum over channels, not / C
    layer = local_correlation_layer(t, r, 3)
    assert layer[0, 2, 1, 1].item() == pytest.approx(1.0)


def test_local_correlation_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in size"):
        local_correlation(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="odd"):
        local_correlation(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), 4)


def test_local_correlation_channel_groups_do_not_change_the_result():
    g = torch.Generator().manual_seed(4)
    t, r = torch.randn(2, 10, 5, 6, generator=g), torch.randn(2, 10, 5, 6, generator=g)
    whole = local_correlation(t, r, 5, chunk_elements=1 << 30)
    for chunk in (1, 2 * 5 * 5 * 6 * 3):  # groups of 1 and of 3 channels (last group 1)
        assert torch.allclose(local_correlation(t, r, 5, chunk_elements=chunk), whole, atol=1e-5)
