"""Image self-residual and IC images against a NumPy/PIL re-statement of CMDA's CPU code.

The reference below restates ``XiaRho/CMDA:mmseg/datasets/utils.py`` (``get_ic``,
``get_image_change_from_pil``) and ``create_cityscapes_image_change.py`` one image at a time with
PIL greyscale, float32 NumPy logs and torch thresholding, in the release's operation order.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from udaseg.data.isr import (
    DIRECTIONS,
    ISR_PRESETS,
    ISRParams,
    crop_isr_direction,
    decode_ic_png,
    encode_ic_png,
    image_change,
    image_self_residual,
    mixed_isr_direction,
    pil_grey,
    release_uint8,
    shift_copy,
)

# --------------------------------------------------------------------------- reference (release)


def _ref_minmax(t, lo, hi):
    mn, mx = torch.min(t), torch.max(t)
    return (t - mn) / (mx - mn + 1e-8) * (hi - lo) + lo


def _ref_signed(change, thr, clip):
    change = change.clone()
    change[torch.abs(change) <= thr] = 0
    neg = change.detach().clone()
    change[change < 0] = 0
    change = _ref_minmax(torch.clamp(change, 0, clip), 0, 1)
    neg[neg > 0] = 0
    neg = _ref_minmax(torch.clamp(neg, -clip, 0), -1, 0)
    change += neg
    return change


def _ref_get_ic(front, now, val_range, threshold, clip_range):
    a, b = val_range
    front = np.log(np.asarray(front, dtype=np.float32) / 255 * (b - a) + a)
    now = np.log(np.asarray(now, dtype=np.float32) / 255 * (b - a) + a)
    change = torch.unsqueeze(torch.from_numpy(now - front), dim=0)
    span = np.log(b) - np.log(a)
    return _ref_signed(change, span * threshold, span * clip_range)


def _ref_isr(rgb_hwc: np.ndarray, p: ISRParams, direction: str) -> torch.Tensor:
    g = np.array(Image.fromarray(rgb_hwc).convert("L"))
    h, w = g.shape
    s = p.shift
    left = np.concatenate((g[:, s:], g[:, w - s :]), axis=1)
    right = np.concatenate((g[:, :s], g[:, : w - s]), axis=1)
    up = np.concatenate((g[s:, :], g[h - s :, :]), axis=0)
    down = np.concatenate((g[:s, :], g[: h - s, :]), axis=0)
    kw = dict(val_range=p.val_range, threshold=p.threshold, clip_range=p.clip)
    if direction == "all":
        c = [_ref_get_ic(g, x, **kw) for x in (up, left, down, right)]
        return c[0] / 4 + c[1] / 4 + c[2] / 4 + c[3] / 4
    row = left if "left" in direction else right
    col = up if "up" in direction else down
    return _ref_get_ic(g, row, **kw) / 2 + _ref_get_ic(g, col, **kw) / 2


def _ref_ic(now_rgb: np.ndarray, front_rgb: np.ndarray, log_add=50, threshold=0.1, clip=0.8):
    front = np.log(np.asarray(Image.fromarray(front_rgb).convert("L"), dtype=np.float32) + log_add)
    now = np.log(np.asarray(Image.fromarray(now_rgb).convert("L"), dtype=np.float32) + log_add)
    return _ref_signed(torch.unsqueeze(torch.from_numpy(now - front), 0), threshold, clip)[0]


def _random_images(b, h, w, seed):
    """Smooth random scenes plus noise: realistic edges and flat areas, full 0..255 range."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(b, 3, h // 8 + 1, w // 8 + 1)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(base), size=(h, w), mode="bilinear")
    noisy = big + torch.from_numpy(rng.normal(0, 6, size=(b, 3, h, w)).astype(np.float32))
    return noisy.round().clamp(0, 255).to(torch.uint8)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------- greyscale


def test_pil_grey_matches_pillow_on_every_rgb_triple():
    r, g, b = np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij")
    rgb = np.stack([r, g, b], -1).reshape(4096, 4096, 3).astype(np.uint8)
    want = np.asarray(Image.fromarray(rgb).convert("L"))
    got = pil_grey(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0].numpy()
    np.testing.assert_array_equal(got, want)
    # PIL does not compute round(0.299 R + 0.587 G + 0.114 B) exactly: the 16-bit fixed point
    # differs by one level on a few triples, which is why pil_grey uses PIL's integers.
    exact = np.floor((r * 299 + g * 587 + b * 114).reshape(4096, 4096) / 1000 + 0.5)
    assert 0 < np.count_nonzero(exact != want) < 0.001 * want.size


def test_pil_grey_rejects_normalised_floats():
    with pytest.raises(ValueError, match="release_uint8"):
        pil_grey(torch.randn(1, 3, 4, 4))


# --------------------------------------------------------------------------- ISR vs release


@pytest.mark.parametrize("preset", sorted(ISR_PRESETS))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_isr_equals_release(preset, direction):
    p = ISR_PRESETS[preset]
    imgs = _random_images(2, 48, 64, seed=hash((preset, direction)) % 2**32)
    got = image_self_residual(imgs, preset, direction)
    assert got.shape == (2, 1, 48, 64) and got.dtype == torch.float32
    for i in range(2):
        want = _ref_isr(_hwc(imgs[i]), p, direction)
        # identical float32 operations in identical order: bit-for-bit equality
        assert torch.equal(got[i], want), (preset, direction, (got[i] - want).abs().max())


def test_isr_per_sample_directions_and_float_input():
    imgs = _random_images(4, 32, 40, seed=3)
    dirs = ["leftup", "rightdown", "all", "leftdown"]
    got = image_self_residual(imgs.float(), "cityscapes", dirs)
    for i, d in enumerate(dirs):
        assert torch.equal(got[i], _ref_isr(_hwc(imgs[i]), ISR_PRESETS["cityscapes"], d))


def test_isr_range_threshold_and_illumination_invariance():
    imgs = _random_images(1, 64, 64, seed=7)
    isr = image_self_residual(imgs, "darkzurich", "rightdown")
    assert isr.min() >= -1 and isr.max() <= 1
    # a 2x darker copy: with a = 1 << b = 100 the log-difference barely changes (log is scale
    # invariant up to the offset a), and the per-image min-max removes the global scale
    dark = (imgs.float() / 2).round().to(torch.uint8)
    isr_dark = image_self_residual(dark, "darkzurich", "rightdown")
    strong = isr.abs() > 0.5
    assert (torch.sign(isr_dark[strong]) == torch.sign(isr[strong])).float().mean() > 0.95
    assert (isr_dark - isr).abs().mean() < 0.1


def test_isr_release_quirk_constant_image_and_fix():
    flat = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    want = _ref_isr(_hwc(flat[0]), ISR_PRESETS["dsec"], "rightdown")
    assert torch.equal(image_self_residual(flat, "dsec"), want[None])
    assert torch.all(want == -1)  # the release's empty negative part scales to -1
    assert torch.all(image_self_residual(flat, "dsec", empty_as_zero=True) == 0)


def test_isr_single_edge_by_hand():
    # left half grey 50, right half grey 200 (R = G = B so PIL's grey is exact)
    img = torch.full((1, 3, 8, 8), 50, dtype=torch.uint8)
    img[..., 4:] = 200
    out = image_self_residual(img, "cityscapes", "rightdown", empty_as_zero=True)[0, 0]
    # shifting right by 3 puts dark pixels at columns 4..6 of the copy: D < 0 there -> -1 after
    # scaling, halved by the average with the (zero) column residual
    assert torch.allclose(out[:, 4:7], torch.full((8, 3), -0.5), atol=1e-6)
    assert torch.all(out[:, :4] == 0) and torch.all(out[:, 7] == 0)


def test_isr_rejects_bad_arguments():
    imgs = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="shift direction"):
        image_self_residual(imgs, "dsec", "sideways")
    with pytest.raises(ValueError, match="2 shift directions|batch of 2"):
        image_self_residual(imgs, "dsec", ["leftup"])
    with pytest.raises(ValueError, match="unknown ISR preset"):
        image_self_residual(imgs, "nope")
    with pytest.raises(ValueError, match="does not fit"):
        image_self_residual(imgs, ISRParams((1.0, 10.0), 0.03, 0.2, 8))
    with pytest.raises(ValueError, match="0 < a < b"):
        ISRParams((0.0, 10.0), 0.03, 0.2, 3)


def test_shift_copy_repeats_border():
    g = torch.arange(5).view(1, 5)
    assert shift_copy(g, 2, "right").tolist() == [[0, 1, 0, 1, 2]]
    assert shift_copy(g, 2, "left").tolist() == [[2, 3, 4, 3, 4]]
    assert shift_copy(g.T, 2, "down").flatten().tolist() == [0, 1, 0, 1, 2]
    assert shift_copy(g.T, 2, "up").flatten().tolist() == [2, 3, 4, 3, 4]


# --------------------------------------------------------------------------- mixed image


def _ref_denorm_cuda(x, m, s):
    """The release's ``torch.clamp(denorm(img, means, stds), 0, 1) * 255`` as CUDA computes it:
    PyTorch's CUDA kernel divides by a Python number as a multiplication by the float32
    reciprocal (a CPU true division differs by one ulp on a few pixels)."""
    inv = np.float32(1.0) / np.float32(255.0)
    return torch.clamp(x.mul(s).add(m) * float(inv), 0, 1) * 255


def test_release_uint8_truncates_like_np_uint8():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    x = torch.randn(2, 3, 64, 64) * 1.5  # normalised values, some outside the 0..255 range
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    want = np.uint8(_ref_denorm_cuda(x, m, s).numpy())
    got = release_uint8(x, mean, std)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want)
    # truncation, not rounding: about half the pixels sit one level below the rounded value
    rounded = torch.round(_ref_denorm_cuda(x, m, s)).to(torch.uint8)
    assert 0.3 < (rounded != got).float().mean() < 0.7


def test_mixed_isr_from_normalised_image_equals_release():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (_random_images(2, 32, 32, seed=11).float() + torch.rand(2, 3, 32, 32) - m) / s
    got = image_self_residual(release_uint8(x, mean, std), "dsec", "leftup")
    for i in range(2):
        arr = _ref_denorm_cuda(x[i : i + 1], m, s).numpy()[0]
        arr = np.transpose(arr, (1, 2, 0))
        want = _ref_isr(np.uint8(arr), ISR_PRESETS["dsec"], "leftup")
        assert torch.equal(got[i], want)


def test_mixed_isr_direction_digits():
    # first decimal digit even -> left, odd -> right; second digit even -> down, odd -> up
    assert mixed_isr_direction(0.05) == "leftup"
    assert mixed_isr_direction(0.12) == "rightdown"
    assert mixed_isr_direction(0.13) == "rightup"
    assert mixed_isr_direction(0.0) == "leftdown"
    # loaders: x offset parity -> left/right, flip flag (source) or y parity (DSEC) -> down/up
    assert crop_isr_direction(0, 0) == "leftdown" and crop_isr_direction(3, 1) == "rightup"
    assert crop_isr_direction(10, 7) == "leftup" and crop_isr_direction(5, 4) == "rightdown"


# --------------------------------------------------------------------------- IC


def test_ic_equals_release_and_png_codec():
    rng = np.random.default_rng(5)
    prev = _random_images(2, 40, 56, seed=21)
    moved = torch.roll(prev, shifts=2, dims=-1)
    noise = torch.from_numpy(rng.integers(-3, 4, size=prev.shape))
    now = (moved.int() + noise).clamp(0, 255).to(torch.uint8)
    got = image_change(now, prev)
    for i in range(2):
        want = _ref_ic(_hwc(now[i]), _hwc(prev[i]))
        assert torch.equal(got[i], want)
        png = np.uint8(np.around((want.numpy() + 1) / 2 * 255))
        assert np.array_equal(encode_ic_png(got[i]).numpy(), png)
    v = torch.tensor([0, 255, 128])
    assert torch.allclose(decode_ic_png(v), torch.tensor([-1.0, 1.0, 1 / 255]), atol=1e-6)


def test_ic_crafted_pair_by_hand():
    # grey frames (R = G = B): 50 -> 150 is D = log(200/100) = 0.693 (kept, below the 0.8 clip),
    # 100 -> 95 is D = log(145/150) = -0.034 (below the 0.1 threshold: zeroed),
    # 200 -> 20 is D = log(70/250) = -1.273 (clipped at -0.8)
    prev = torch.tensor([[50, 100, 200, 80]], dtype=torch.uint8).view(1, 1, 4).expand(1, 2, 4)
    now = torch.tensor([[150, 95, 20, 80]], dtype=torch.uint8).view(1, 1, 4).expand(1, 2, 4)
    ic = image_change(now, prev)[0, 0]
    # positive part: max 0.693 -> 1; negative part: min -0.8 -> -1, zeros -> 0 (up to -6e-8)
    assert torch.allclose(ic, torch.tensor([1.0, 0.0, -1.0, 0.0]), atol=1e-6)
    # identical frames: the release's empty negative part gives -1 everywhere (PNG value 0)
    same = image_change(prev, prev)
    assert torch.all(same == -1) and torch.all(encode_ic_png(same) == 0)
    assert torch.all(image_change(prev, prev, empty_as_zero=True) == 0)
