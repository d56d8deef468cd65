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

Centre convention: ``fftshift`` moves frequency 0 to index floor(n/2) for even AND odd n (it rolls
by n // 2), so the (2b+1) x (2b+1) square around (floor(H/2), floor(W/2)) of the shifted spectrum is
exactly the set of signed frequencies {-b..b} x {-b..b}; it is symmetric about the DC term, so
the swap keeps the Hermitian symmetry of a real image's spectrum (the imaginary part of the
inverse FFT is round-off only). For an even n the Nyquist frequency -n/2 sits at shifted index 0
and is never in the square (b < n/2). We index the square on the unshifted spectrum by these
signed frequencies instead of shifting back and forth (same result), and work on the ``rfft2``
half spectrum (columns 0..W//2): the square's columns 0..b are there, its negative columns are
their conjugates, and ``irfft2`` of the Hermitian result equals Re(IFFT2(.)). ``beta`` must lie in
[0, 0.5) so that the square fits (2b + 1 <= min(H, W)); beta = 0 swaps only the DC term (the
per-channel mean).

Reinhard (content A, style B, sizes may differ; per image)::

    LMS   = M_lms @ RGB,  M_lms = [[0.3811, 0.5783, 0.0402],
                                   [0.1967, 0.7244, 0.0782],
                                   [0.0241, 0.1288, 0.8444]],   LMS == 0 -> eps
    lab   = diag(1/sqrt3, 1/sqrt6, 1/sqrt2) @ [[1, 1, 1], [1, 1, -2], [1, -1, 0]] @ ln(LMS)
    out_k = (lab_A,k - mu_A,k) * sigma_B,k / sigma_A,k + mu_B,k    (k = l, alpha, beta; all pixels)
    RGB   = clip(M_lms^-1 @ (exp(M_lab^-1 @ out) with values == eps -> 0), 0, 255)

mu / sigma are the mean and population standard deviation (ddof = 0) over all pixels of one
image. The computation runs in float64 (the reference's numpy arithmetic promotes to float64),
eps = float64 machine epsilon (2.2e-16, so an exact-black pixel has ln(LMS) = -36); the result
is cast back to the content's dtype. A constant channel of the content (sigma_A = 0) maps to
mu_B (ratio taken as 0 instead of dividing by zero).

Defaults (:class:`StylizeConfig`): FDA, beta = 0.01, both directions; the final CISS configs
(spec 1.12) add ``common_size = (1024, 1920)``. ``source.stylized = FDA(content = source,
style = target)`` ("source in target style"), ``target.stylized = FDA(content = target,
style = source)``; both from the ORIGINAL images (neither direction sees the other's output).

Reference quirks deliberately NOT replicated (spec 1.5 / 1.14):

* Reinhard: the reference applies the RGB-defined matrices to mmcv's BGR arrays; we apply them to
  RGB as the formula intends. It also prints shapes and timings on every call; we do not.
* FDA runs here in ``torch.fft`` (CPU workers or GPU); the reference uses numpy on CPU. Same maths
  (FDA treats the channels independently, so the reference's BGR order does not matter there).

Choices where the spec is silent: the Reinhard eps (float64 machine epsilon, see above) and the
sigma_A = 0 guard. The reference's FDA output is not clipped and neither is ours; out-of-range
values go through Normalize as they are.
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
    "fda_pair",
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
        raise ValueError(
            f"{name}: expected a (3, H, W) or (B, 3, H, W) RGB tensor, got {tuple(x.shape)}"
        )


def fda_half_width(h: int, w: int, beta: float) -> int:
    """b = floor(min(H, W) * beta): half-width of the swapped (2b+1) x (2b+1) amplitude square."""
    if not (0.0 <= beta < 0.5):
        raise ValueError(f"FDA beta must be in [0, 0.5) so the square fits the spectrum: {beta}")
    return math.floor(min(h, w) * beta)


def _square_index(h: int, w: int, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the swapped square in an UNshifted ``rfft2`` half spectrum.

    Rows: the signed frequencies -b..b mod H (2b + 1 rows); columns: 0..b (the half spectrum
    holds the non-negative column frequencies; the negative ones are their complex conjugates).
    """
    rows = torch.arange(-b, b + 1, device=device) % h
    cols = torch.arange(0, b + 1, device=device)
    return rows, cols


def _fda_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 stays float64; everything else (uint8, half: no CPU fft) computes in float32
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_pair(content: torch.Tensor, style: torch.Tensor) -> None:
    _check_image(content, "fda content")
    _check_image(style, "fda style")
    if content.shape[-2:] != style.shape[-2:]:
        raise ValueError(
            f"fda: content {tuple(content.shape[-2:])} and style {tuple(style.shape[-2:])} must "
            "have the same H x W (central-crop both to one size first: StylizeConfig.common_size)"
        )


def _fda_spectra(f_c: torch.Tensor, f_s: torch.Tensor, hw: tuple[int, int], b: int) -> torch.Tensor:
    """FDA from the two ``rfft2`` half spectra: swap the amplitude in the square, invert."""
    rows, cols = _square_index(*hw, b, f_c.device)
    sub_c = f_c[..., rows, :][..., cols]
    sub_s = f_s[..., rows, :][..., cols]
    swapped = torch.polar(sub_s.abs(), sub_c.angle())  # style amplitude, content phase
    shape = torch.broadcast_shapes(f_c.shape, f_s.shape)
    spec = f_c.expand(shape).clone()  # outside the square: F_A = |F_A| exp(i angle F_A) itself
    spec[..., rows[:, None], cols[None, :]] = swapped.expand(*shape[:-2], *swapped.shape[-2:])
    return torch.fft.irfft2(spec, s=hw).contiguous()


def fda(content: torch.Tensor, style: torch.Tensor, beta: float = 0.01) -> torch.Tensor:
    """Content image with the low-frequency amplitude of ``style`` (module docstring).

    Args:
        content: (3, H, W) or (B, 3, H, W) float RGB (0..255); its phase is kept.
        style: same H x W as ``content``; (3, H, W) is broadcast over a batched ``content``.
        beta: bandwidth; b = floor(min(H, W) * beta).

    Returns:
        float tensor shaped like ``content`` (broadcast with ``style``), NOT clipped; float64 for
        float64 input, float32 otherwise.

    Computed on the half spectrum (``rfft2`` / ``irfft2``): the swapped square is symmetric about
    the DC term, so the modified spectrum stays Hermitian and ``irfft2`` equals the real part of
    the full inverse FFT (what the reference keeps), at half the cost.
    """
    _check_pair(content, style)
    hw = (int(content.shape[-2]), int(content.shape[-1]))
    b = fda_half_width(*hw, beta)
    dtype = _fda_dtype(content)
    f_c = torch.fft.rfft2(content.to(dtype))
    f_s = torch.fft.rfft2(style.to(device=content.device, dtype=dtype))
    return _fda_spectra(f_c, f_s, hw, b)


def fda_pair(
    a: torch.Tensor, b_img: torch.Tensor, beta: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fda(a, b_img), fda(b_img, a))`` with one FFT per image (both directions of CISS)."""
    _check_pair(a, b_img)
    hw = (int(a.shape[-2]), int(a.shape[-1]))
    b = fda_half_width(*hw, beta)
    dtype = _fda_dtype(a)
    f_a = torch.fft.rfft2(a.to(dtype))
    f_b = torch.fft.rfft2(b_img.to(device=a.device, dtype=dtype))
    return _fda_spectra(f_a, f_b, hw, b), _fda_spectra(f_b, f_a, hw, b)


def _lab_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = lab.flatten(-2)
    mean = flat.mean(-1, keepdim=True)[..., None]
    return mean, flat.std(-1, correction=0, keepdim=True)[..., None]


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
    if cfg.method == "fda" and cfg.stylize_source and cfg.stylize_target:
        return fda_pair(source_img, target_img, cfg.beta)  # shares the two FFTs
    if cfg.method == "fda":
        def fn(a, b):
            return fda(a, b, cfg.beta)
    else:
        fn = reinhard
    src = fn(source_img, target_img) if cfg.stylize_source else None
    trg = fn(target_img, source_img) if cfg.stylize_target else None
    return src, trg
