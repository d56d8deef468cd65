"""FDA and Reinhard stylisation: spectra by hand, NumPy references, batching, configuration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from udaseg.data.stylize import (
    RGB_TO_LMS,
    StylizeConfig,
    center_crop_size,
    fda,
    fda_half_width,
    reinhard,
    stylize_pair,
)


def images(h: int, w: int, n: int = 2, seed: int = 0, lo: float = 0.0, hi: float = 255.0):
    g = torch.Generator().manual_seed(seed)
    return [lo + (hi - lo) * torch.rand(3, h, w, generator=g, dtype=torch.float64)
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# FDA


def np_fda(content: np.ndarray, style: np.ndarray, beta: float) -> np.ndarray:
    """Straightforward reference: shift, swap the square, unshift, recombine with content phase."""
    fc = np.fft.fft2(content, axes=(-2, -1))
    fs = np.fft.fft2(style, axes=(-2, -1))
    amp_c = np.fft.fftshift(np.abs(fc), axes=(-2, -1))
    amp_s = np.fft.fftshift(np.abs(fs), axes=(-2, -1))
    h, w = content.shape[-2:]
    b = int(np.floor(min(h, w) * beta))
    ch, cw = h // 2, w // 2
    sq = (..., slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1))
    amp_c[sq] = amp_s[sq]
    amp = np.fft.ifftshift(amp_c, axes=(-2, -1))
    return np.real(np.fft.ifft2(amp * np.exp(1j * np.angle(fc)), axes=(-2, -1)))


def shifted_spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))


@pytest.mark.parametrize("h, w", [(12, 20), (11, 21), (13, 10)])
def test_fda_swaps_exactly_the_centre_square_and_keeps_the_phase(h, w):
    content, style = images(h, w)
    beta = 0.2
    b = fda_half_width(h, w, beta)
    assert b == math.floor(min(h, w) * 0.2) == 2
    out = fda(content, style, beta)
    assert out.shape == content.shape and out.dtype == torch.float64

    f_out, f_c, f_s = (shifted_spectrum(x) for x in (out, content, style))
    square = torch.zeros(h, w, dtype=torch.bool)
    square[h // 2 - b : h // 2 + b + 1, w // 2 - b : w // 2 + b + 1] = True  # centre = floor(n/2)
    # amplitude: style's inside the (2b+1)^2 square, content's outside, on every channel
    torch.testing.assert_close(f_out.abs()[:, square], f_s.abs()[:, square], rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(f_out.abs()[:, ~square], f_c.abs()[:, ~square], rtol=1e-9, atol=1e-6)
    changed = ~torch.isclose(f_out.abs(), f_c.abs(), rtol=1e-9, atol=1e-6)
    assert changed.sum() == 3 * (2 * b + 1) ** 2 and changed[:, ~square].sum() == 0
    # phase of the content everywhere (compared as unit phasors, so no 2*pi wrap issues)
    torch.testing.assert_close(
        f_out / f_out.abs(), f_c / f_c.abs(), rtol=0, atol=1e-9
    )
    # the centre of the shifted spectrum is the DC term: the swapped mean is the style's mean
    torch.testing.assert_close(out.mean((-2, -1)), style.mean((-2, -1)))


def test_fda_half_width_rounding_on_non_square_sizes():
    assert fda_half_width(1024, 1920, 0.01) == 10  # CISS: a 21x21 square
    assert fda_half_width(30, 50, 0.07) == 2  # floor(min * beta) = floor(2.1), not floor(50 * 0.07)
    assert fda_half_width(50, 30, 0.099) == 2  # floor(2.97): floor, not round
    assert fda_half_width(512, 512, 0.0) == 0
    content, style = images(30, 50)
    out = fda(content, style, 0.07)
    amp_out, amp_c = shifted_spectrum(out).abs(), shifted_spectrum(content).abs()
    changed = ~torch.isclose(amp_out, amp_c, atol=1e-6)
    rows, cols = changed.any(0).nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 17, 23, 27)  # 15 +- 2, 25 +- 2
    with pytest.raises(ValueError, match="beta"):
        fda_half_width(10, 10, 0.5)


@pytest.mark.parametrize("h, w", [(12, 20), (11, 21)])
def test_fda_matches_numpy_reference(h, w):
    content, style = images(h, w, seed=1)
    ref = np_fda(content.numpy(), style.numpy(), 0.1)
    np.testing.assert_allclose(fda(content, style, 0.1).numpy(), ref, atol=1e-8)
    # float32 (the data pipeline's dtype): same to ~1e-4 on a 0..255 image
    out32 = fda(content.float(), style.float(), 0.1)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, atol=1e-3, rtol=1e-5)
    assert np.abs(out32.numpy() - ref).mean() < 1e-4


def test_fda_batch_equals_single_and_style_broadcast():
    content = torch.stack(images(12, 16, seed=2))
    style = torch.stack(images(12, 16, seed=3))
    batch = fda(content, style, 0.1)
    assert batch.shape == (2, 3, 12, 16)
    for i in range(2):
        torch.testing.assert_close(batch[i], fda(content[i], style[i], 0.1))
    torch.testing.assert_close(fda(content, style[0], 0.1)[1], fda(content[1], style[0], 0.1))


def test_fda_is_not_clipped_and_beta_zero_swaps_only_the_mean():
    content = images(8, 8, n=1, seed=13, lo=200, hi=255)[0]  # bright, mean about 227
    style = torch.full((3, 8, 8), 250.0, dtype=torch.float64)
    out = fda(content, style, 0.0)  # b = 0: DC only -> content + (mean_style - mean_content)
    expected = content - content.mean((-2, -1), keepdim=True) + 250.0
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=0)
    assert out.max() > 255  # not clipped (as the reference; Reinhard is clipped)


def test_fda_rejects_different_sizes_and_bad_shapes():
    with pytest.raises(ValueError, match="same H x W"):
        fda(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9))
    with pytest.raises(ValueError, match="RGB"):
        fda(torch.zeros(8, 8), torch.zeros(8, 8))


# ---------------------------------------------------------------------------------------------
# Reinhard


def np_lab(rgb: np.ndarray) -> np.ndarray:
    m = np.array(RGB_TO_LMS)
    lms = np.einsum("ij,jhw->ihw", m, rgb)
    lms[lms == 0] = np.finfo(np.float64).eps
    lab = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
        [[1, 1, 1], [1, 1, -2], [1, -1, 0]]
    )
    return np.einsum("ij,jhw->ihw", lab, np.log(lms))


def np_reinhard(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    a, b = np_lab(content), np_lab(style)
    mu_a, sd_a = a.mean((1, 2), keepdims=True), a.std((1, 2), keepdims=True)
    mu_b, sd_b = b.mean((1, 2), keepdims=True), b.std((1, 2), keepdims=True)
    out = (a - mu_a) * (sd_b / sd_a) + mu_b
    # analytic inverse of the l-alpha-beta transform (Reinhard et al. 2001)
    inv_lab = np.array([[1, 1, 1], [1, 1, -1], [1, -2, 0]]) @ np.diag(
        [np.sqrt(3) / 3, np.sqrt(6) / 6, np.sqrt(2) / 2]
    )
    lms = np.exp(np.einsum("ij,jhw->ihw", inv_lab, out))
    rgb = np.einsum("ij,jhw->ihw", np.linalg.inv(np.array(RGB_TO_LMS)), lms)
    return np.clip(rgb, 0, 255)


def test_reinhard_matches_numpy_reference_with_different_sizes():
    content = images(10, 14, n=1, seed=4)[0]
    content[:, 0, 0] = 0.0  # an exact-black pixel: LMS 0 -> eps
    style = images(7, 9, n=1, seed=5, lo=30, hi=200)[0]
    out = reinhard(content, style)
    assert out.shape == content.shape and out.dtype == torch.float64
    assert out.min() >= 0 and out.max() <= 255
    np.testing.assert_allclose(out.numpy(), np_reinhard(content.numpy(), style.numpy()), atol=1e-8)


def test_reinhard_output_has_the_style_statistics():
    content = images(12, 16, n=1, seed=6, lo=90, hi=160)[0]
    style = images(9, 11, n=1, seed=7, lo=100, hi=140)[0]
    style[0] += 20  # a warmer style
    out = reinhard(content, style)
    assert out.min() > 0 and out.max() < 255  # no clipping happened
    lab_out, lab_style = np_lab(out.numpy()), np_lab(style.numpy())
    np.testing.assert_allclose(lab_out.mean((1, 2)), lab_style.mean((1, 2)), atol=1e-9)
    np.testing.assert_allclose(lab_out.std((1, 2)), lab_style.std((1, 2)), rtol=1e-9)
    # channel order is RGB (the reference's BGR mix-up is not replicated): the red cast moves over
    assert out[0].mean() - out[2].mean() > 10


def test_reinhard_identity_and_batch():
    x = images(8, 12, n=1, seed=8)[0]
    torch.testing.assert_close(reinhard(x, x), x, atol=1e-9, rtol=0)
    content = torch.stack(images(8, 12, seed=9)).float()
    style = torch.stack(images(6, 10, seed=10)).float()
    batch = reinhard(content, style)
    assert batch.dtype == torch.float32
    for i in range(2):
        torch.testing.assert_close(batch[i], reinhard(content[i], style[i]))


def test_reinhard_constant_channel_takes_the_style_mean():
    content = torch.full((3, 4, 4), 80.0, dtype=torch.float64)  # sigma_A = 0 in every channel
    style = images(4, 4, n=1, seed=11, lo=50, hi=150)[0]
    out = reinhard(content, style)
    assert torch.isfinite(out).all()
    assert out.std((-2, -1)).max() < 1e-9  # still constant


# ---------------------------------------------------------------------------------------------
# config and pair helper


def test_stylize_pair_directions_and_methods():
    src, trg = images(8, 10, seed=12)
    s, t = stylize_pair(src, trg, StylizeConfig(beta=0.2))
    torch.testing.assert_close(s, fda(src, trg, 0.2))
    torch.testing.assert_close(t, fda(trg, src, 0.2))
    s, t = stylize_pair(src, trg, StylizeConfig(directions="source"))
    assert s is not None and t is None
    s, t = stylize_pair(src, trg, StylizeConfig(directions="target"))
    assert s is None and t is not None
    s, t = stylize_pair(src, trg[:, :6], StylizeConfig(method="reinhard"))
    torch.testing.assert_close(s, reinhard(src, trg[:, :6]))
    assert t.shape == (3, 6, 10)


def test_config_validation_and_common_size():
    assert StylizeConfig(common_size=[1024, 1920]).common_size == (1024, 1920)
    with pytest.raises(ValueError, match="method"):
        StylizeConfig(method="cyclegan")
    with pytest.raises(ValueError, match="directions"):
        StylizeConfig(directions="none")
    with pytest.raises(ValueError, match="beta"):
        StylizeConfig(beta=0.6)
    with pytest.raises(ValueError, match="common_size"):
        StylizeConfig(common_size=(0, 10))
    assert center_crop_size(StylizeConfig(), (1024, 2048), (1080, 1920)) == (1024, 1920)
    fixed = StylizeConfig(common_size=(512, 960))
    assert center_crop_size(fixed, (1024, 2048), (1080, 1920)) == (512, 960)
    assert center_crop_size(StylizeConfig(method="reinhard"), (1024, 2048), (1080, 1920)) is None
