import math

import torch
import torch.nn.functional as F

from udaseg.adapt.hooks import Mixer, PseudoLabels, StepContext
from udaseg.adapt.mixing import (
    ClassMix,
    ClassMixConfig,
    StrongAugConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    class_mix_choices,
    class_mix_masks,
    color_jitter,
    gaussian_blur,
    gaussian_kernel1d,
    hsv_to_rgb,
    mix,
    rgb_to_hsv,
    strong_augment,
)
from udaseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _source_labels():
    # image 0 holds {0, 3}, image 1 holds {3, 255}: batch classes {0, 3, 255}, n = 3
    y = torch.zeros(2, 4, 4, dtype=torch.long)
    y[0, :, 2:] = 3
    y[1] = 3
    y[1, 0] = 255
    return y


# ---------------------------------------------------------------- ClassMix


def test_class_mix_picks_ceil_half_of_batch_classes():
    y = _source_labels()
    seen_255 = False
    pairs = {}
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        chosen = class_mix_choices(y, g)
        assert chosen.shape == (2, 256)
        assert torch.equal(chosen.sum(1), torch.tensor([2, 2]))  # ceil(3/2)
        for i in range(2):
            picked = chosen[i].nonzero().flatten().tolist()
            assert set(picked) <= {0, 3, 255}
            pairs[tuple(picked)] = pairs.get(tuple(picked), 0) + 1
            seen_255 |= 255 in picked
        g = torch.Generator().manual_seed(seed)
        mask = class_mix_masks(y, g)
        assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.float32
        for i in range(2):
            exp = torch.isin(y[i], chosen[i].nonzero().flatten()).float()
            assert torch.equal(mask[i, 0], exp)
    assert seen_255
    assert set(pairs) == {(0, 3), (0, 255), (3, 255)}
    assert all(80 < c < 190 for c in pairs.values())  # ~400/3 each: uniform subsets


def test_class_mix_without_ignore_never_picks_255():
    y = _source_labels()
    for seed in range(50):
        chosen = class_mix_choices(y, torch.Generator().manual_seed(seed), include_ignore=False)
        assert not chosen[:, 255].any()
        assert torch.equal(chosen.sum(1), torch.tensor([1, 1]))  # ceil(2/2)
        assert set(chosen.nonzero()[:, 1].tolist()) <= {0, 3}


def test_class_mix_is_seedable():
    y = torch.randint(0, 19, (2, 8, 8))
    a = class_mix_masks(y, torch.Generator().manual_seed(3))
    b = class_mix_masks(y, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_mix_formula():
    mask = torch.tensor([[[[1.0, 0], [0, 1]]]])
    a, b = torch.full((1, 3, 2, 2), 2.0), torch.full((1, 3, 2, 2), -1.0)
    assert torch.equal(mix(mask, a, b), mask * a + (1 - mask) * b)
    la, lb = torch.full((1, 2, 2), 7), torch.full((1, 2, 2), 255)
    out = mix(mask, la, lb)
    assert out.dtype == torch.long and torch.equal(out, torch.tensor([[[7, 255], [255, 7]]]))


def test_class_mix_mixer_contents_and_pseudo_weight_untouched():
    torch.manual_seed(0)
    y_s = _source_labels()
    x_s, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    pseudo = PseudoLabels(label=torch.full((2, 4, 4), 5), weight=torch.full((2, 4, 4), 0.4))
    w_before = pseudo.weight.clone()
    ctx = StepContext(step=0, source={"image": x_s, "label": y_s}, target={"image": x_t},
                      student=torch.nn.Identity(), teacher=None)
    mixer = ClassMix(ClassMixConfig(), generator=torch.Generator().manual_seed(1))
    assert isinstance(mixer, Mixer)
    out = mixer(ctx, pseudo)
    m = out.mask
    assert torch.equal(m, class_mix_masks(y_s, torch.Generator().manual_seed(1)))
    assert torch.equal(out.image, m * x_s + (1 - m) * x_t)
    mb = m[:, 0].bool()
    assert torch.equal(out.label, torch.where(mb, y_s, pseudo.label))
    assert torch.equal(out.weight, torch.where(mb, torch.ones(()), w_before))
    assert torch.equal(pseudo.weight, w_before) and out.weight is not pseudo.weight


# ---------------------------------------------------------------- strong augmentation


def _normalised(seed=0, shape=(2, 3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    x01 = torch.rand(shape, generator=g)
    return (x01 * 255 - MEAN) / STD


def test_gates_off_is_identity():
    x = _normalised()
    assert torch.equal(strong_augment(x, StrongAugConfig(), jitter_gate=False, blur_gate=False), x)
    never = StrongAugConfig(color_jitter_probability=1.0, blur=False)
    assert torch.equal(strong_augment(x, never), x)


def test_brightness_is_additive_and_contrast_multiplicative():
    x = torch.rand(2, 3, 4, 4)
    # additive, not x * 1.1
    assert torch.allclose(adjust_brightness(x, 1.1), (x + 0.1).clamp(0, 1), atol=1e-6)
    assert torch.equal(adjust_brightness(x, 1.5), (x + 0.5).clamp(0, 1))
    b = torch.tensor([0.8, 1.2])
    exp = torch.stack([(x[0] - 0.2).clamp(0, 1), (x[1] + 0.2).clamp(0, 1)])
    assert torch.allclose(adjust_brightness(x, b), exp)
    assert torch.equal(adjust_contrast(x, 1.2), (x * 1.2).clamp(0, 1))
    # the order of the ops matters and is respected
    y = color_jitter(x, 1.1, 1.2, 1.0, 0.0, order=[0, 1, 2, 3])
    assert torch.allclose(y, ((x + 0.1).clamp(0, 1) * 1.2).clamp(0, 1), atol=1e-5)


def test_hsv_round_trip_and_known_colours():
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    assert torch.allclose(adjust_hue(x, 0.0), x, atol=1e-5)
    assert torch.allclose(adjust_saturation(x, 1.0), x, atol=1e-5)
    colours = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0, 0, 0]]
    rgb = torch.tensor(colours).T.reshape(1, 3, 1, 5)
    hsv = rgb_to_hsv(rgb)[0, :, 0]
    assert torch.allclose(hsv[0], torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3, 0, 0]))
    assert torch.allclose(hsv[1], torch.tensor([1.0, 1, 1, 0, 0]))
    assert torch.allclose(hsv[2], torch.tensor([1.0, 1, 1, 0.5, 0]))
    # a third of a turn maps red -> green -> blue; saturation 0 gives grey
    rotated = adjust_hue(rgb, 1 / 3)[0, :, 0, :3]
    assert torch.allclose(rotated, torch.eye(3)[:, [1, 2, 0]], atol=1e-6)
    grey = adjust_saturation(x, 0.0)
    assert torch.allclose(grey, x.max(1, keepdim=True).values.expand_as(x), atol=1e-6)


def test_blur_kernel_size():
    assert blur_kernel_size(512) == 51
    assert blur_kernel_size(1024) == 103
    assert blur_kernel_size(64) == 7 and blur_kernel_size(16) == 1
    k = gaussian_kernel1d(5, torch.tensor([1.0]))
    assert torch.allclose(k.sum(), torch.tensor(1.0)) and torch.equal(k, k.flip(1))


def test_blur_matches_2d_reflect_conv_and_smooths():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 64, generator=g)
    sigma = torch.tensor([0.5, 1.1])
    out = gaussian_blur(x, sigma)
    ky, kx = blur_kernel_size(40), blur_kernel_size(64)  # 5, 7
    for i in range(2):
        k2 = gaussian_kernel1d(ky, sigma[i:i + 1]).T @ gaussian_kernel1d(kx, sigma[i:i + 1])
        ref = F.conv2d(F.pad(x[i:i + 1], (kx // 2,) * 2 + (ky // 2,) * 2, mode="reflect"),
                       k2.expand(3, 1, ky, kx).contiguous(), groups=3)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)
    assert out.var() < 0.8 * x.var()
    const = torch.full((1, 3, 40, 64), 0.7)
    assert torch.allclose(gaussian_blur(const, 1.0), const, atol=1e-6)


def test_strong_augment_range_and_seeding():
    x = _normalised(shape=(3, 3, 32, 32))
    lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
    for order_per_image in (False, True):
        cfg = StrongAugConfig(order_per_image=order_per_image)
        gen = torch.Generator().manual_seed(1)
        y = strong_augment(x, cfg, gen, jitter_gate=True, blur_gate=True)
        assert y.shape == x.shape and not torch.equal(y, x)
        assert (y >= lo - 1e-4).all() and (y <= hi + 1e-4).all()
        gen = torch.Generator().manual_seed(1)
        y2 = strong_augment(x, cfg, gen, jitter_gate=True, blur_gate=True)
        assert torch.equal(y, y2)
    # blur only: the per-channel spatial mean is nearly preserved
    yb = strong_augment(x, StrongAugConfig(), jitter_gate=False, blur_gate=True)
    assert torch.allclose(yb.mean((2, 3)), x.mean((2, 3)), atol=0.05)


def test_strong_augment_gates_follow_probabilities():
    x = _normalised(shape=(1, 3, 8, 8))
    g = torch.Generator().manual_seed(0)
    # p = 0 -> jitter always (u > 0); blur disabled -> only jitter can change x
    always = StrongAugConfig(color_jitter_probability=0.0, blur=False)
    changed = [not torch.equal(strong_augment(x, always, g), x) for _ in range(20)]
    assert all(changed)


# -- kornia 0.5.8 colour jitter on inputs outside [0, 1] (CISS's unclipped FDA views) ----------


def _kornia058_jitter_reference(x: torch.Tensor, factors, order) -> torch.Tensor:
    """kornia 0.5.8 ColorJitter written out per pixel in NumPy (float64), from its formulas:
    brightness x + (b - 1) and contrast x * c clamped to [0, 1]; saturation and hue through HSV
    with S = (max - min) / (max + 1e-6), hue from the first maximal channel, fmod rotation,
    the sector table back to RGB, and NO clamp after either."""
    import numpy as np

    img = x.double().numpy().copy()
    b, c, s, h = (float(f) for f in factors)

    def to_hsv(px):
        r, g, bl = px
        mx, mn = max(px), min(px)
        idx = [r, g, bl].index(mx)  # first maximal channel
        delta = mx - mn
        sat = delta / (mx + 1e-6)
        d = delta if delta != 0 else 1.0
        rc, gc, bc = mx - r, mx - g, mx - bl
        hue6 = [bc - gc, 2 * d + rc - bc, 4 * d + gc - rc][idx] / d
        return 2 * math.pi * ((hue6 / 6.0) % 1.0), sat, mx

    def to_rgb(hue, sat, val):
        hh = hue / (2 * math.pi)
        i = math.floor(hh * 6) % 6
        f = ((hh * 6) % 6) - i
        p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
        return [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]

    def per_pixel(fn):
        out = np.empty_like(img)
        for n in range(img.shape[0]):
            for yy in range(img.shape[2]):
                for xx in range(img.shape[3]):
                    out[n, :, yy, xx] = fn(*to_hsv(img[n, :, yy, xx]))
        return out

    for op in order:
        if op == 0:
            img = np.clip(img + (b - 1), 0, 1)
        elif op == 1:
            img = np.clip(img * c, 0, 1)
        elif op == 2:
            img = per_pixel(lambda hue, sat, val: to_rgb(hue, min(max(sat * s, 0), 1), val))
        else:
            img = per_pixel(lambda hue, sat, val: to_rgb(math.fmod(hue + h * 2 * math.pi,
                                                                   2 * math.pi), sat, val))
    return torch.from_numpy(img).float()


def test_saturation_and_hue_do_not_clamp_out_of_range_inputs():
    # a bright pixel (max 1.2 > 1) survives an identity saturation/hue unchanged, as in kornia
    px = torch.tensor([1.2, 0.6, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(adjust_saturation(px, 1.0), px, atol=1e-5)
    assert torch.allclose(adjust_hue(px, 0.0), px, atol=1e-5)
    # a pixel whose maximum is <= 0: kornia's S = (max - min) / (max + eps) is negative and is
    # kept through a hue rotation (round trip), so the pixel comes back, not grey/clamped
    neg = torch.tensor([-0.2, -0.5, -0.4]).view(1, 3, 1, 1)
    hsv = rgb_to_hsv(neg)[0, :, 0, 0]
    assert math.isclose(float(hsv[1]), 0.3 / (-0.2 + 1e-6), rel_tol=1e-5)
    assert float(hsv[2]) == torch.tensor(-0.2).item()
    assert torch.allclose(adjust_hue(neg, 0.0), neg, atol=1e-5)
    # saturation clamps S * a into [0, 1] there: a negative S becomes 0, the pixel grey at V
    assert torch.allclose(adjust_saturation(neg, 1.1), torch.full_like(neg, -0.2), atol=1e-6)


def test_color_jitter_matches_kornia_058_for_any_input_range():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 5, 6, generator=g) * 2.0 - 0.5  # values in [-0.5, 1.5]
    x[0, :, 0, 0] = torch.tensor([-0.3, -0.1, -0.2])  # maximum <= 0
    x[1, :, 1, 1] = torch.tensor([0.4, 0.4, 0.4])  # grey: delta = 0
    x[1, :, 2, 2] = torch.tensor([0.7, 0.7, 0.2])  # tie for the maximum: first channel wins
    for order in ([2, 3, 0, 1], [3, 2, 1, 0], [0, 2, 1, 3]):
        for factors in ((1.1, 0.9, 1.15, -0.12), (0.85, 1.2, 0.8, 0.18)):
            got = torch.cat([color_jitter(x[i : i + 1], *factors, order=order) for i in range(2)])
            ref = torch.cat([_kornia058_jitter_reference(x[i : i + 1], factors, order)
                             for i in range(2)])
            assert torch.allclose(got, ref, atol=2e-6), (order, factors, (got - ref).abs().max())
    # saturation/hue first on the raw input: results leave [0, 1] (no clamp), as kornia's do
    out = color_jitter(x, 1.0, 1.0, 1.15, 0.1, order=[2, 3])
    assert out.min() < 0 and out.max() > 1
