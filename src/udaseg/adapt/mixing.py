"""ClassMix cross-domain mixing and DACS strong augmentation (kornia-0.5.8 semantics, pure torch).

References: DACS (Tranheden et al., "DACS: Domain Adaptation via Cross-domain Mixed Sampling",
WACV 2021, arXiv 2007.08702), ClassMix (Olsson et al., WACV 2021) and DAFormer (Hoyer et al.,
CVPR 2022, arXiv 2111.14887). Spec sections 3.3 step (4), 3.5, 3.6 and 11 (items 5, 6).
Written from the spec; no code copied from DACS, DAFormer or kornia.

ClassMix (per image i of the batch)::

    C    = unique values of the WHOLE stacked source label batch y_s (255 included if present,
           the faithful quirk; ``include_ignore=False`` drops it), n = |C|
    S_i  = ceil(n / 2) = (n + n mod 2) / 2 values of C, uniformly without replacement,
           drawn independently per image (torch RNG, seedable ``generator``)
    M_i  = [y_s[i] in S_i]                                          (1, H, W)
    x_m  = M * x_s + (1 - M) * x_t
    y_m  = M * y_s + (1 - M) * yhat_t       (source ignore regions stay 255 when 255 is chosen)
    w_m  = M * 1   + (1 - M) * W_t

The pseudo-weight ``W_t`` is never written in place (MIC reuses the unmixed weight).

Strong augmentation of the mixed image (mix -> colour jitter -> blur; labels/weights untouched)::

    gates, one per call:  jitter if u_cj > p (p = color_jitter_probability = 0.2, i.e. prob 0.8)
                          blur   if blur and u_blur > 0.5
    denormalise           x01 = (x * std + mean) / 255
    colour jitter (s = color_jitter_strength = 0.2), per-sample factors:
        brightness  b ~ U(1 - s, 1 + s):  x <- clamp(x + (b - 1), 0, 1)   ADDITIVE (kornia 0.5.8)
        contrast    c ~ U(1 - s, 1 + s):  x <- clamp(x * c, 0, 1)              multiplicative
        saturation  a ~ U(1 - s, 1 + s):  S <- clamp(S * a, 0, 1) in HSV
        hue         h ~ U(-s, s):         H <- fmod(H + 2 pi h, 2 pi) in HSV (H in radians)
        the four ops in a random order (one permutation per call; per image with
        ``order_per_image``); brightness and contrast clamp to [0, 1], saturation and hue
        do not (kornia 0.5.8: an input outside [0, 1], such as CISS's unclipped FDA views,
        stays outside through them); HSV with kornia's arithmetic (S = (max - min) /
        (max + 1e-6), hue from the first maximal channel, fmod for the rotation)
    renormalise           x = (255 * x01 - mean) / std
    Gaussian blur         sigma ~ U(0.15, 1.15) per image (once per call with
                          ``sigma_per_image=False``), odd kernel per side L
                          (L = H for the vertical kernel, W for the horizontal one)
                          k(L) = floor(ceil(0.1 L) - 0.5 + (ceil(0.1 L) mod 2))
                          (51 for L = 512, 103 for L = 1024)
                          g(x) ∝ exp(-x^2 / (2 sigma^2)), x = -(k//2)..k//2, normalised to sum 1;
                          separable, reflect padding, same sigma in x and y; applied to the
                          normalised image (it commutes with the per-channel affine normalisation).

torchvision's ``ColorJitter`` differs: brightness is multiplicative (x * b), contrast blends with
the grey mean, hue is a shift in [-0.5, 0.5] turns on a differently computed HSV, and its factor
order is drawn per call; results are therefore not interchangeable with the above.

Parity notes. In DACS/DAFormer the strong transform is called once per mixed image (a batch of
one), so each image gets its own op order and its own sigma: ``StrongAugConfig(order_per_image=True,
sigma_per_image=True)``. MIC's ``*aug`` masking modes call it once for the whole batch (one order,
one sigma): ``order_per_image=False, sigma_per_image=False``. The defaults here (one order per call,
sigma per image) follow the udaseg contract. Random streams are torch's, not numpy's/Python's.
Gates and the op order are drawn on the generator's device (CPU for the global RNG) and read on
the host; with a CUDA generator that costs one synchronisation per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.classes import IGNORE_INDEX
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .hooks import MixedBatch, PseudoLabels, StepContext

__all__ = [
    "class_mix_choices",
    "class_mix_masks",
    "mix",
    "ClassMixConfig",
    "ClassMix",
    "StrongAugConfig",
    "strong_augment",
    "color_jitter",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "blur_kernel_size",
    "gaussian_kernel1d",
    "gaussian_blur",
]

_NUM_LABEL_SLOTS = 256  # label values are uint8 train IDs (0..18, 255 = ignore)


# ----------------------------------------------------------------------------------------------
# random draws


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
             low: float = 0.0, high: float = 1.0) -> Tensor:
    """U(low, high) of ``shape`` on ``device``, from ``generator`` (on its own device) if given."""
    if generator is None:
        u = torch.rand(shape, device=device)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return low + (high - low) * u


def _host_uniform(generator: torch.Generator | None) -> float:
    """One U(0, 1) read on the host (global CPU RNG when no generator: no device sync)."""
    if generator is None:
        return float(torch.rand(()))
    return float(torch.rand((), generator=generator, device=generator.device))


def _host_randperm(n: int, generator: torch.Generator | None) -> list[int]:
    if generator is None:
        return torch.randperm(n).tolist()
    return torch.randperm(n, generator=generator, device=generator.device).tolist()


# ----------------------------------------------------------------------------------------------
# ClassMix


def _as_bhw(source_labels: Tensor) -> Tensor:
    y = source_labels
    if y.ndim == 4 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 3:
        raise ValueError(f"ClassMix: expected (B, H, W) labels, got {tuple(source_labels.shape)}")
    return y.long()


def class_mix_choices(
    source_labels: Tensor,
    generator: torch.Generator | None = None,
    include_ignore: bool = True,
) -> Tensor:
    """The classes each image pastes: (B, 256) bool over label values 0..255.

    Candidates are the values present anywhere in the (B, H, W) batch (255 included when
    ``include_ignore``); each row independently picks ceil(n/2) of them uniformly without
    replacement (the ceil(n/2) smallest of i.i.d. U(0, 1) sort keys). On-device, no host sync.
    """
    y = _as_bhw(source_labels)
    present = torch.zeros(_NUM_LABEL_SLOTS, dtype=torch.bool, device=y.device)
    present.index_fill_(0, y.reshape(-1), True)  # (a fill value, not a tensor from Python data)
    if not include_ignore:
        present[IGNORE_INDEX].fill_(False)
    n = present.sum()
    k = (n + n % 2) // 2
    keys = _uniform((y.shape[0], _NUM_LABEL_SLOTS), generator, y.device)
    keys = torch.where(present, keys, torch.full_like(keys, 2.0))  # absent values sort last
    rank = keys.argsort(dim=1).argsort(dim=1)
    return rank < k  # absent values are never chosen: their rank is >= n >= k


def class_mix_masks(
    source_labels: Tensor,
    generator: torch.Generator | None = None,
    include_ignore: bool = True,
) -> Tensor:
    """ClassMix masks (B, 1, H, W) float from source labels (B, H, W) (or (B, 1, H, W)).

    ``M_i = [y_s[i] in S_i]`` with ``S_i`` from :func:`class_mix_choices`. Label values must lie
    in 0..255. Fully on-device, no host synchronisation.
    """
    y = _as_bhw(source_labels)
    chosen = class_mix_choices(y, generator, include_ignore).float()
    b = y.shape[0]
    return torch.gather(chosen, 1, y.reshape(b, -1)).reshape(b, 1, *y.shape[-2:])


def mix(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``mask * a + (1 - mask) * b``; ``mask`` (B, 1, H, W) broadcasts to (B, C, H, W) or (B, H, W).

    Integer tensors (labels) are selected with ``where(mask != 0, a, b)``, which equals the formula
    for a binary mask and keeps the dtype.
    """
    m = mask
    if a.ndim == mask.ndim - 1:
        m = mask[:, 0]
    if a.is_floating_point():
        m = m.to(a.dtype)
        return m * a + (1 - m) * b
    return torch.where(m != 0, a, b)


@dataclass
class ClassMixConfig:
    """ClassMix options; ``include_ignore`` keeps 255 among the candidate classes (faithful)."""

    include_ignore: bool = True


class ClassMix:
    """Default :class:`~udaseg.adapt.hooks.Mixer`: paste half of the source classes onto the target.

    Reads ``ctx.source["image"]``, ``ctx.source["label"]`` and ``ctx.target["image"]``; returns a
    new :class:`MixedBatch` (``pseudo`` is not modified).
    """

    def __init__(
        self, cfg: ClassMixConfig | None = None, generator: torch.Generator | None = None
    ) -> None:
        self.cfg = cfg or ClassMixConfig()
        self.generator = generator

    def __call__(self, ctx: StepContext, pseudo: PseudoLabels) -> MixedBatch:
        src_img, tgt_img = ctx.source["image"], ctx.target["image"]
        src_lbl = ctx.source["label"]
        if src_lbl.ndim == 4:
            src_lbl = src_lbl[:, 0]
        mask = class_mix_masks(src_lbl, self.generator, self.cfg.include_ignore)
        image = mix(mask, src_img, tgt_img)
        label = mix(mask, src_lbl.long(), pseudo.label.long())
        weight = mix(mask, torch.ones_like(pseudo.weight), pseudo.weight)
        return MixedBatch(image=image, label=label, weight=weight, mask=mask)


# ----------------------------------------------------------------------------------------------
# colour space


def rgb_to_hsv(rgb: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., 3, H, W) RGB -> HSV with H in radians [0, 2 pi), kornia-0.5.8 arithmetic.

    ``V = max``, ``S = (max - min) / (max + eps)`` (not clipped: an out-of-range pixel whose
    maximum is <= 0 gets a negative or huge S, exactly as kornia), and the hexcone hue taken
    from the FIRST channel holding the maximum, computed as kornia does::

        (r', g', b') = max - (r, g, b);   D = max - min (1 where max = min)
        H6 = [b' - g',  2 D + r' - b',  4 D + g' - r'][argmax] / D
        H  = 2 pi ((H6 / 6) mod 1)

    Any input range is accepted; the same operations in the same order give the same floats.
    """
    maxc = rgb.max(dim=-3).values
    is_max = rgb == maxc.unsqueeze(-3)
    first_max = ((is_max.cumsum(dim=-3) == 1) & is_max).max(dim=-3).indices
    minc = rgb.min(dim=-3).values
    delta = maxc - minc
    s = delta / (maxc + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc.unsqueeze(-3) - rgb).unbind(dim=-3)
    h = torch.stack((bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc), dim=-3)
    h = torch.gather(h, -3, first_max.unsqueeze(-3)).squeeze(-3) / delta
    h = 2 * math.pi * ((h / 6.0) % 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv` (any real H, S, V; H taken mod 2 pi), kornia-0.5.8 arithmetic.

    With ``h = H / 2 pi``, ``i = floor(6 h) mod 6`` and ``f = (6 h mod 6) - i``, the sector table
    over ``p = V (1 - S)``, ``q = V (1 - f S)``, ``t = V (1 - (1 - f) S)``::

        i:  0  1  2  3  4  5
        R:  V  q  p  p  t  V
        G:  t  V  V  q  p  p
        B:  p  p  t  V  V  q

    No clipping: S and V outside [0, 1] give RGB outside [0, 1], as in kornia.
    """
    h = hsv[..., 0, :, :] / (2 * math.pi)
    s = hsv[..., 1, :, :]
    v = hsv[..., 2, :, :]
    sector = torch.floor(h * 6) % 6
    f = ((h * 6) % 6) - sector
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    sector = sector.long()
    table = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=-3)
    index = torch.stack((sector, sector + 6, sector + 12), dim=-3)
    return torch.gather(table, -3, index)


# ----------------------------------------------------------------------------------------------
# colour jitter (kornia 0.5.8 semantics)


def _per_sample(factor: Tensor | float, x: Tensor) -> Tensor:
    """A float or a (B,) tensor of factors shaped to broadcast over (B, ..., H, W) images."""
    f = torch.as_tensor(factor, dtype=x.dtype, device=x.device)
    if f.ndim == 1:
        f = f.view(-1, *([1] * (x.ndim - 1)))
    return f


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Additive brightness (kornia 0.5.8): ``clamp(x + (b - 1), 0, 1)``; b per sample or scalar."""
    return (x + (_per_sample(factor, x) - 1)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Multiplicative contrast (kornia 0.5.8): ``clamp(x * c, 0, 1)``."""
    return (x * _per_sample(factor, x)).clamp(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """HSV saturation scaling (kornia 0.5.8): ``S <- clamp(S * a, 0, 1)``, back to RGB, NOT
    clamped (an input outside [0, 1] stays outside)."""
    h, s, v = rgb_to_hsv(x).unbind(dim=-3)
    s = (s * _per_sample(factor, s)).clamp(0.0, 1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def adjust_hue(x: Tensor, factor: Tensor | float) -> Tensor:
    """HSV hue rotation by ``h`` turns (U(-s, s) in the jitter; kornia's ColorJitter passes
    ``h * 2 * pi`` radians): ``H <- fmod(H + h * 2 * pi, 2 pi)`` (fmod: the sign of the
    dividend, as kornia), back to RGB, NOT clamped."""
    h, s, v = rgb_to_hsv(x).unbind(dim=-3)
    h = torch.fmod(h + _per_sample(factor, h) * 2 * math.pi, 2 * math.pi)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(
    x: Tensor,
    brightness: Tensor | float,
    contrast: Tensor | float,
    saturation: Tensor | float,
    hue: Tensor | float,
    order: list[int] | tuple[int, ...] = (0, 1, 2, 3),
) -> Tensor:
    """Apply the four jitter ops to (B, 3, H, W) images in [0, 1] in ``order``.

    ``order`` indexes (0 brightness, 1 contrast, 2 saturation, 3 hue); factors are floats or (B,).
    """
    factors = (brightness, contrast, saturation, hue)
    for i in order:
        x = _JITTER_OPS[i](x, factors[i])
    return x


# ----------------------------------------------------------------------------------------------
# Gaussian blur


def blur_kernel_size(length: int) -> int:
    """DACS kernel size for a side of L pixels: floor(ceil(0.1 L) - 0.5 + ceil(0.1 L) mod 2)."""
    c = math.ceil(0.1 * length)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_kernel1d(size: int, sigma: Tensor) -> Tensor:
    """Normalised 1-D Gaussian kernels (N, size) for sigmas (N,), centred at size // 2."""
    sigma = sigma.reshape(-1, 1)
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor | float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W), per-image ``sigma`` (float or (B,)), reflect pad.

    Kernel sizes are :func:`blur_kernel_size` of H (vertical) and W (horizontal).
    """
    b, c, hgt, wid = x.shape
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if sig.numel() == 1:
        sig = sig.expand(b)
    ky, kx = blur_kernel_size(hgt), blur_kernel_size(wid)
    out = x.reshape(1, b * c, hgt, wid)
    if ky > 1:
        wy = gaussian_kernel1d(ky, sig).repeat_interleave(c, dim=0).view(b * c, 1, ky, 1)
        out = F.conv2d(F.pad(out, (0, 0, ky // 2, ky // 2), mode="reflect"), wy, groups=b * c)
    if kx > 1:
        wx = gaussian_kernel1d(kx, sig).repeat_interleave(c, dim=0).view(b * c, 1, 1, kx)
        out = F.conv2d(F.pad(out, (kx // 2, kx // 2, 0, 0), mode="reflect"), wx, groups=b * c)
    return out.reshape(b, c, hgt, wid)


# ----------------------------------------------------------------------------------------------
# strong augmentation


@dataclass
class StrongAugConfig:
    """DACS strong augmentation settings (spec 3.6 / 3.8 defaults).

    Attributes:
        color_jitter_strength: s; factors U(1-s, 1+s), hue U(-s, s).
        color_jitter_probability: p; jitter is applied when the gate u > p (prob 1 - p).
        blur: enable the Gaussian blur gate (applied when u > 0.5).
        mean, std: the normalisation of the input images (0..255 units).
        order_per_image: draw the jitter op order per image (DACS mixed-image parity) instead
            of once per call.
        sigma_per_image: draw the blur sigma per image (DACS mixed-image parity) instead of once
            per call (MIC ``*aug`` modes).
    """

    color_jitter_strength: float = 0.2
    color_jitter_probability: float = 0.2
    blur: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    order_per_image: bool = False
    sigma_per_image: bool = True


_MEAN_STD_CACHE: dict = {}


def _mean_std(mean, std, dtype, device) -> tuple[Tensor, Tensor]:
    """(1, 3, 1, 1) mean/std tensors, built once per device (no host copy in each step)."""
    key = (tuple(mean), tuple(std), dtype, str(device))
    if key not in _MEAN_STD_CACHE:
        _MEAN_STD_CACHE[key] = (
            torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1),
            torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1),
        )
    return _MEAN_STD_CACHE[key]


def strong_augment(
    images: Tensor,
    cfg: StrongAugConfig | None = None,
    generator: torch.Generator | None = None,
    jitter_gate: bool | None = None,
    blur_gate: bool | None = None,
    return_gates: bool = False,
) -> Tensor | tuple[Tensor, tuple[bool, bool]]:
    """DACS colour jitter + Gaussian blur of normalised (B, 3, H, W) images (module docstring).

    Both gates are always drawn (so the random stream does not depend on the overrides);
    ``jitter_gate`` / ``blur_gate`` = True/False force them (``blur_gate=True`` blurs even when
    ``cfg.blur`` is False). With both gates off the input tensor is returned unchanged.
    ``return_gates=True`` also returns the (jitter, blur) decisions taken, so that a second view
    can be augmented with the same decisions and fresh parameters (CISS).
    Random draws, in order: u_cj, u_blur, then (jitter) brightness, contrast, saturation, hue
    factors (B,) and the op order, then (blur) sigma.
    """
    cfg = cfg or StrongAugConfig()
    u_cj = _host_uniform(generator)
    u_blur = _host_uniform(generator)
    do_jitter = (u_cj > cfg.color_jitter_probability) if jitter_gate is None else bool(jitter_gate)
    do_blur = (cfg.blur and u_blur > 0.5) if blur_gate is None else bool(blur_gate)
    if not (do_jitter or do_blur):
        return (images, (False, False)) if return_gates else images
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"strong_augment: expected (B, 3, H, W) images, got {tuple(images.shape)}")
    x = images.float()
    b, dev = x.shape[0], x.device
    if do_jitter:
        s = float(cfg.color_jitter_strength)
        lo, hi = max(0.0, 1.0 - s), 1.0 + s
        bri = _uniform((b,), generator, dev, lo, min(hi, 2.0))
        con = _uniform((b,), generator, dev, lo, hi)
        sat = _uniform((b,), generator, dev, lo, hi)
        hue = _uniform((b,), generator, dev, -min(s, 0.5), min(s, 0.5))
        mean, std = _mean_std(cfg.mean, cfg.std, x.dtype, dev)
        x01 = (x * std + mean) / 255.0
        if cfg.order_per_image:
            orders = [_host_randperm(4, generator) for _ in range(b)]
            x01 = torch.cat([
                color_jitter(x01[i : i + 1], bri[i : i + 1], con[i : i + 1], sat[i : i + 1],
                             hue[i : i + 1], orders[i])
                for i in range(b)
            ])
        else:
            x01 = color_jitter(x01, bri, con, sat, hue, _host_randperm(4, generator))
        x = (x01 * 255.0 - mean) / std
    if do_blur:
        sigma = _uniform((b,) if cfg.sigma_per_image else (1,), generator, dev, 0.15, 1.15)
        x = gaussian_blur(x, sigma)
    out = x.to(images.dtype)
    return (out, (bool(do_jitter), bool(do_blur))) if return_gates else out
