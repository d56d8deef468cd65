"""Training-free stylisation for CISS: Fourier Domain Adaptation (FDA) and Reinhard colour transfer.

Papers: C. Sakaridis, D. Bruggemann, F. Yu, L. Van Gool, "Condition-Invariant Semantic
Segmentation", IEEE TPAMI 47(4), 2025, https://arxiv.org/abs/2305.17349 (the stylised views);
Y. Yang, S. Soatto, "FDA: Fourier Domain Adaptation for Semantic Segmentation", CVPR 2020
(the amplitude swap); E. Reinhard et al., "Color Transfer between Images", IEEE CG&A 2001.
Written from ``ciss_cmda_spec.md`` sections 1.4 and 1.5, not from the reference code.

Both functions work on UN-normalised RGB images, float 0..255, shaped (3, H, W) or (B, 3, H, W),
on any device, vectorised over the batch. The data pipeline stylises after Resize and the
central crop and before RandomCrop / Flip / Normalize (see :mod:`udaseg.data.paired`).

FDA (content A, style B, both H x W; per channel c, 2-D FFT over (H, W))::

    F_A = FFT2(A_c),  F_B = FFT2(B_c)
    b   = floor(min(H, W) * beta)                       beta = 0.01 -> b = 10 for 1024x1920
    S   = { (u, v) : |u - floor(H/2)| <= b and |v - floor(W/2)| <= b }  in fftshift-ed coordinates
    |F'|(u, v) = |F_B|(u, v) if (u, v) in S else |F_A|(u, v)            (hard swap, no blending)
    out_c = Re( IFFT2( |F'| * exp(i * angle(F_A)) ) )                   (no clipping)

Centre convention: ``fftshift`` moves frequency 0 to index floor(n/2) for even AND odd n (it rolls by
n // 2), so the (2b+1) x (2b+1) square around (floor(H/2), floor(W/2)) of the shifted spectrum is
exactly the set of signed frequencies {-b..b} x {-b..b}; it is symmetric about the DC term, so
the swap keeps the Hermitian symmetry of a real image's spectrum (the imaginary part of the
inverse FFT is round-off only). For an even n the Nyquist frequency -n/2 sits at shifted index 0
and is never in the square (b < n/2). We build the mask on the unshifted spectrum from these
signed frequencies instead of shifting back and forth (same result). ``beta`` must lie in
[0, 0.5) so that the square fits (2b + 1 <= min(H, W)); beta = 0 swaps only the DC term (the
per-channel mean).

Reinhard (content A, style B, sizes may differ; per image)::

    LMS   = M_lms @ RGB,  M_lms = [[0.3811, 0.5783, 0.0402],
                                   [0.1967, 0.7244, 0.0782],
                                   [0.0241, 0.1288, 0.8444]],   LMS == 0 -> eps
    lab   = diag(1/sqrt3, 1/sqrt6, 1/sqrt2) @ [[1, 1, 1], [1, 1, -2], [1, -1, 0]] @ ln(LMS)
    out_k = (lab_A,k - mu_A,k) * sigma_B,k / sigma_A,k + mu_B,k      (k = l, alpha, beta; all pixels)
    RGB   = clip(M_lms^-1 @ (exp(M_lab^-1 @ out) with values == eps -> 0), 0, 255)

mu / sigma are the mean and population standard deviation (ddof = 0) over all pixels of one
image. The computation runs in float64 (the reference's numpy arithmetic promotes to float64),
eps = float64 machine epsilon (2.2e-16, so an exact-black pixel has ln(LMS) = -36); the result
is cast back to the content's dtype. A constant channel of the content (sigma_A = 0) maps to
mu_B (ratio taken as 0 instead of dividing by zero).

Defaults (final CISS, spec 1.12): FDA, beta = 0.01, both directions, common size (1024, 1920):
``source.stylized = FDA(content = source, style = target)`` ("source in target style"),
``target.stylized = FDA(content = target, style = source)``; both from the ORIGINAL images.

Reference quirks deliberately NOT replicated (spec 1.5 / 1.14):

* Reinhard: the reference applies the RGB-defined matrices to mmcv's BGR arrays; we apply them to
  RGB as the formula intends. It also prints shapes and timings on every call; we do not.
* FDA runs here in ``torch.fft`` (CPU workers or GPU); the reference uses numpy on CPU. Same maths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "RGB_TO_LMS",
    "StylizeConfig",
    "center_crop_size",
    "fda",
    "fda_half_width",
    "reinhard",
    "stylize_pair",
]

RGB_TO_LMS = (
    (0.3811, 0.5783, 0.0402),
    (0.1967, 0.7244, 0.0782),
    (0.0241, 0.1288, 0.8444),
)
"""Reinhard et al.'s RGB -> LMS matrix (spec 1.5)."""


def _lms_to_lab() -> torch.Tensor:
    s = torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    return s[:, None] * m


def _check_image(x: torch.Tensor, name: str) -> None:
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"{name}: expected a (3, H, W) or (B, 3, H, W) RGB tensor, got {tuple(x.shape)}")


def fda_half_width(h: int, w: int, beta: float) -> int:
    """b = floor(min(H, W) * beta): half-width of the swapped (2b+1) x (2b+1) amplitude square."""
    if not (0.0 <= beta < 0.5):
        raise ValueError(f"FDA beta must be in [0, 0.5) so the square fits the spectrum, got {beta}")
    return int(math.floor(min(h, w) * beta))


def _low_freq_mask(h: int, w: int, b: int, device) -> torch.Tensor:
    """(H, W) bool mask over the UNshifted spectrum: signed frequencies in [-b, b] on both axes."""

    def axis(n: int) -> torch.Tensor:
        k = torch.arange(n, device=device)
        shifted = (k + n // 2) % n  # fftshift position of frequency index k
        return (shifted - n // 2).abs() <= b

    return axis(h)[:, None] & axis(w)[None, :]


def fda(content: torch.Tensor, style: torch.Tensor, beta: float = 0.01) -> torch.Tensor:
    """Content image with the low-frequency amplitude of ``style`` (module docstring).

    Args:
        content: (3, H, W) or (B, 3, H, W) float RGB (0..255); its phase is kept.
        style: same H x W as ``content``; (3, H, W) is broadcast over a batched ``content``.
        beta: bandwidth; b = floor(min(H, W) * beta).

    Returns:
        float tensor shaped like ``content`` (broadcast with ``style``), NOT clipped.
    """
    _check_image(content, "fda content")
    _check_image(style, "fda style")
    if content.shape[-2:] != style.shape[-2:]:
        raise ValueError(
            f"fda: content {tuple(content.shape[-2:])} and style {tuple(style.shape[-2:])} must have "
            "the same H x W (central-crop both to a common size first, StylizeConfig.common_size)"
        )
    h, w = content.shape[-2:]
    b = fda_half_width(h, w, beta)
    dtype = content.dtype if content.is_floating_point() else torch.float32
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # fft has no half support on CPU
    f_c = torch.fft.fft2(content.to(dtype))
    f_s = torch.fft.fft2(style.to(device=content.device, dtype=dtype))
    mask = _low_freq_mask(h, w, b, content.device)
    swapped = torch.polar(f_s.abs(), f_c.angle())  # style amplitude, content phase
    spec = torch.where(mask, swapped, f_c)  # outside the square F_A itself (= |F_A| e^{i angle F_A})
    return torch.fft.ifft2(spec).real.contiguous()


def _lab_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = lab.flatten(-2)
    return flat.mean(-1, keepdim=True)[..., None], flat.std(-1, correction=0, keepdim=True)[..., None]


def _rgb_to_lab(rgb: torch.Tensor, eps: float) -> torch.Tensor:
    m = torch.tensor(RGB_TO_LMS, dtype=torch.float64, device=rgb.device)
    lms = torch.einsum("ij,...jhw->...ihw", m, rgb.to(torch.float64))
    lms = torch.where(lms == 0, torch.full_like(lms, eps), lms)
    lab_m = _lms_to_lab().to(rgb.device)
    return torch.einsum("ij,...jhw->...ihw", lab_m, torch.log(lms))


def reinhard(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Reinhard colour transfer of ``style``'s l-alpha-beta statistics onto ``content``.

    Args:
        content: (3, H, W) or (B, 3, H, W) RGB float 0..255.
        style: (3, H', W') or (B, 3, H', W'); the size may differ from ``content``'s.

    Returns:
        RGB clipped to [0, 255], shaped like ``content`` (broadcast over a batch), content's dtype.
    """
    _check_image(content, "reinhard content")
    _check_image(style, "reinhard style")
    out_dtype = content.dtype if content.is_floating_point() else torch.float32
    eps = torch.finfo(torch.float64).eps
    lab_c = _rgb_to_lab(content, eps)
    lab_s = _rgb_to_lab(style.to(content.device), eps)
    mu_c, sd_c = _lab_stats(lab_c)
    mu_s, sd_s = _lab_stats(lab_s)
    ratio = torch.where(sd_c > 0, sd_s / torch.where(sd_c > 0, sd_c, 1.0), torch.zeros_like(sd_c))
    lab = (lab_c - mu_c) * ratio + mu_s
    inv_lab = torch.linalg.inv(_lms_to_lab()).to(content.device)
    lms = torch.exp(torch.einsum("ij,...jhw->...ihw", inv_lab, lab))
    lms = torch.where(lms == eps, torch.zeros_like(lms), lms)
    inv_lms = torch.linalg.inv(torch.tensor(RGB_TO_LMS, dtype=torch.float64)).to(content.device)
    rgb = torch.einsum("ij,...jhw->...ihw", inv_lms, lms)
    return rgb.clamp(0.0, 255.0).to(out_dtype).contiguous()


@dataclass
class StylizeConfig:
    """Stylised views for CISS (YAML: ``data.stylize``).

    The pipeline (per domain: load, resize) then central-crops both images to ``common_size`` and
    stylises each towards the other (FDA); see :mod:`udaseg.data.paired`.
    """

    method: Literal["fda", "reinhard"] = "fda"
    beta: float = 0.01
    """FDA bandwidth: b = floor(min(H, W) * beta) of the common size (ignored by Reinhard)."""
    common_size: tuple[int, int] | None = None
    """(H, W) central crop of both images before stylising (CISS: (1024, 1920)). None: the smaller
    of the two sizes per axis for FDA; no central crop for Reinhard (it works on the full,
    possibly different-sized images, spec 1.5). With Reinhard and a size given, the crop happens
    after the stylisation (on image and stylised view alike)."""
    directions: Literal["both", "source", "target"] = "both"
    """Which views to create: ``source`` = only source.stylized (source in target style),
    ``target`` = only target.stylized, ``both`` (CISS)."""

    def __post_init__(self) -> None:
        if self.method not in ("fda", "reinhard"):
            raise ValueError(f"stylize.method must be 'fda' or 'reinhard', got {self.method!r}")
        if self.directions not in ("both", "source", "target"):
            raise ValueError(
                f"stylize.directions must be 'both', 'source' or 'target', got {self.directions!r}"
            )
        if self.method == "fda" and not (0.0 <= self.beta < 0.5):
            raise ValueError(f"stylize.beta must be in [0, 0.5), got {self.beta}")
        if self.common_size is not None:
            size = tuple(int(s) for s in self.common_size)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"stylize.common_size must be (H, W) > 0, got {self.common_size}")
            self.common_size = size

    @property
    def stylize_source(self) -> bool:
        return self.directions in ("both", "source")

    @property
    def stylize_target(self) -> bool:
        return self.directions in ("both", "target")


def center_crop_size(
    cfg: StylizeConfig, source_hw: tuple[int, int], target_hw: tuple[int, int]
) -> tuple[int, int] | None:
    """The (H, W) both images are centrally cropped to before stylising (None: no crop)."""
    if cfg.common_size is not None:
        return cfg.common_size
    if cfg.method == "reinhard":
        return None
    return min(source_hw[0], target_hw[0]), min(source_hw[1], target_hw[1])


def stylize_pair(
    source_img: torch.Tensor, target_img: torch.Tensor, cfg: StylizeConfig
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(source in target style, target in source style), each None when not configured.

    Both computed from the given (original) images; for FDA they must have the same H x W.
    """
    if cfg.method == "fda":
        def fn(a, b):
            return fda(a, b, cfg.beta)
    else:
        fn = reinhard
    src = fn(source_img, target_img) if cfg.stylize_source else None
    trg = fn(target_img, source_img) if cfg.stylize_target else None
    return src, trg
