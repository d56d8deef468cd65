"""ICDA's composite enhancement (CEM): the illumination-enhanced, geometrically warped source view.

Paper: Dong, Kang and Ming, "ICDA: Illumination-Coupled Domain Adaptation Framework for
Unsupervised Nighttime Semantic Segmentation", IJCAI 2023, pp. 672-680. Reference:
chenghaoDong666/ICDA ``data_modules/transforms.py`` (``CompositeFlow`` and its flow generators,
themselves UAWarpC's stage-1 synthetic warps) and ``data_modules/datasets/cityscapes.py``; no
licence, read for semantics only; re-implemented from ``shared/spec/refign_dsrnss_icda_spec.md``
section 4.2.

Every source sample (x_s, y_s) gains the pair (x_e, y_e) = views ``enhanced`` / ``enhanced_label``::

    x_e0 = enhanced image   (folder in ICDA's layout, or the weight-free night rendering below)
    x_e1 = Blur_{p=0.2, k=7, sigma~U(0.2, 2)}(ColorJitter_{b=c=s=0.6, h=0}(x_e0))   x_e only
    m    = one CompositeFlow grid, shared by image and label:
           uniform choice of  homography (corner noise U(-t, t), t = 0.333),
                              TPS        (3x3 control points, noise t = 0.333),
                              affine+TPS (rotation/shear U(-0.26, 0.26) rad, scale 1 + U(-0.45,
                                          0.45), tx, ty U(-0.25, 0.25), TPS noise 0.08)
    x_e  = warp_nearest(Normalize(x_e1), m),  y_e = warp_nearest(y_s, m),  y_e = 255 off-image

``m`` maps every output pixel to a sampling position in normalised coordinates
(``align_corners=True``: -1 and 1 are the centres of the border pixels); sampling is
**nearest** with zero padding. :func:`warp_nearest` is separate from the bilinear
:func:`udaseg.models.alignment.warp` that Refign uses (the ICDA release switched its one global
``warp`` to nearest, changing every other user).

Weight-free night rendering (``render_night``; used when no enhanced folder is given). ICDA's
enhanced images are a precomputed day->night translation of Cityscapes (most likely CycleGAN,
spec 4.2 [inferred]), released only as files without a recipe. The role of the view in the
algorithm is an *illumination-changed copy of the source with the same labels*, which the
student and the DAR must treat like the source. We render it with a simple low-light camera
model on the image itself, in linear light (gamma 2.2)::

    L    = x^2.2 * e * tint            exposure e ~ U(0.03, 0.25), tint between sodium-orange
                                       (1.0, 0.75, 0.45) and cool blue (0.65, 0.8, 1.0)
    L    = x^2.2 where mean_c x^2.2 > 0.8   bright pixels keep their value (light sources)
    L    = L + N(0, (0.002 + 0.02 sqrt(L))^2)            read + shot noise
    x_n  = lerp(grey(y), y, s),  y = clip(L)^(1/2.2),  saturation s ~ U(0.4, 0.8)

It changes illumination (global exposure, colour cast, noise, saturation) and nothing else, so the
labels stay exact, like the paper's translated images. It is a fair stand-in for the *mechanism*
(a labelled illumination-shifted view coupled to its day original); it is not a learned target
style, so the gap it closes is smaller, and numbers with it are not comparable to the paper's.

Differences from the reference:
- Out-of-image pixels of y_e are found from the warp itself (sampling position outside the
  image), not by testing the warped *normalised* image for exact zeros (which also hits real
  pixels whose normalised value is 0 in all channels).
- Jitter and blur run after the flip, not before (they commute with a horizontal flip).
- The jitter draws its factors and order from torch's generator (the project's randomness),
  the release used torchvision's ColorJitter with the same ranges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .classes import IGNORE_INDEX
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Sample

__all__ = [
    "CEMConfig",
    "CEMTransform",
    "CityscapesCEM",
    "CompositeFlowConfig",
    "NightRenderConfig",
    "affine_grid",
    "affine_tps_grid",
    "composite_grid",
    "homography_grid",
    "render_night",
    "tps_grid",
    "warp_nearest",
]


def _u(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()).item())


def _base_grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixel centres in normalised ``align_corners=True`` coordinates: X, Y (H, W)."""
    ys = torch.linspace(-1, 1, h) if h > 1 else torch.zeros(1)
    xs = torch.linspace(-1, 1, w) if w > 1 else torch.zeros(1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return gx, gy


def homography_grid(h: int, w: int, t: float = 0.333, corners: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling grid (H, W, 2) (x, y) of the homography moving the four image corners
    (-1,-1), (-1,1), (1,-1), (1,1) (x, y) to ``corners`` (4, 2), default corner + U(-t, t)."""
    src = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    if corners is None:
        corners = src + (torch.rand(4, 2) - 0.5) * 2 * t
    rows = []
    for (x, y), (xp, yp) in zip(src.tolist(), corners.tolist(), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -x * xp, -y * xp, xp])
        rows.append([0, 0, 0, x, y, 1, -x * yp, -y * yp, yp])
    a = torch.tensor(rows, dtype=torch.float64)
    hvec = torch.linalg.solve(a[:, :8], a[:, 8])
    hm = torch.cat([hvec, hvec.new_ones(1)]).view(3, 3).float()
    gx, gy = _base_grid(h, w)
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1) @ hm.T  # (H, W, 3)
    return pts[..., :2] / pts[..., 2:3]


def _tps_control() -> torch.Tensor:
    axis = torch.tensor([-1.0, 0.0, 1.0])
    px, py = torch.meshgrid(axis, axis, indexing="ij")  # x varies slowest, as the reference
    return torch.stack([px.reshape(-1), py.reshape(-1)], dim=1)  # (9, 2)


def tps_grid(h: int, w: int, t: float = 0.333, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling grid (H, W, 2) of the thin-plate spline sending the 3x3 control points P (on
    {-1, 0, 1}^2) to ``targets`` Q (9, 2), default P + U(-t, t): m(p) = a0 + A p +
    sum_i w_i U(|p - P_i|^2), U(d) = d log d, with m(P_i) = Q_i."""
    p = _tps_control()
    if targets is None:
        targets = p + (torch.rand(9, 2) - 0.5) * 2 * t
    n = p.shape[0]
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    k = torch.where(d2 > 0, d2 * torch.log(d2.clamp_min(1e-12)), torch.zeros_like(d2))
    pp = torch.cat([torch.ones(n, 1), p], dim=1)
    big = torch.zeros(n + 3, n + 3, dtype=torch.float64)
    big[:n, :n], big[:n, n:], big[n:, :n] = k, pp, pp.T
    rhs = torch.zeros(n + 3, 2, dtype=torch.float64)
    rhs[:n] = targets
    coef = torch.linalg.solve(big, rhs).float()  # (n + 3, 2): w_1..w_n, a0, ax, ay
    gx, gy = _base_grid(h, w)
    g = torch.stack([gx, gy], dim=-1)  # (H, W, 2)
    dd = ((g[..., None, :] - p) ** 2).sum(-1)  # (H, W, n)
    u = torch.where(dd > 0, dd * torch.log(dd.clamp_min(1e-12)), torch.zeros_like(dd))
    return u @ coef[:n] + coef[n] + gx[..., None] * coef[n + 1] + gy[..., None] * coef[n + 2]


def affine_matrix(alpha: float = 0.26, s: float = 0.45, tx: float = 0.25, ty: float = 0.25,
                  ) -> torch.Tensor:
    """Random 2x3 affine [A | t], A = R(rot) R(sh)^T diag(l, l) R(sh) (aspect kept)."""
    rot, sh = _u(-alpha, alpha), _u(-alpha, alpha)
    lam = 1 + _u(-s, s)

    def rmat(a: float) -> torch.Tensor:
        return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

    a = rmat(rot) @ rmat(sh).T @ torch.diag(torch.tensor([lam, lam])) @ rmat(sh)
    return torch.cat([a, torch.tensor([[_u(-tx, tx)], [_u(-ty, ty)]])], dim=1)


def affine_grid(h: int, w: int, theta: torch.Tensor) -> torch.Tensor:
    """Sampling grid (H, W, 2) of m(p) = A p + t for ``theta`` = [A | t] (2, 3)."""
    gx, gy = _base_grid(h, w)
    g = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)
    return g @ theta.T


def affine_tps_grid(h: int, w: int, alpha: float = 0.26, s: float = 0.45, tx: float = 0.25,
                    ty: float = 0.25, t_tps: float = 0.08) -> torch.Tensor:
    """Affine after TPS: m(p) = A tps(p) + t; positions whose TPS point leaves the image are
    marked off-image (coordinate 1e10), as the reference's composition."""
    tg = tps_grid(h, w, t_tps)
    theta = affine_matrix(alpha, s, tx, ty)
    out = tg @ theta[:, :2].T + theta[:, 2]
    inside = (tg.abs() <= 1).all(dim=-1, keepdim=True)
    return torch.where(inside, out, torch.full_like(out, 1e10))


@dataclass
class CompositeFlowConfig:
    """CompositeFlow of ICDA's source transform (spec 4.2); no elastic part."""

    transforms: tuple[str, ...] = ("hom", "tps", "afftps")
    random_t_hom: float = 0.333
    random_t_tps: float = 0.333
    random_alpha: float = 0.26
    random_s: float = 0.45
    random_tx: float = 0.25
    random_ty: float = 0.25
    random_t_tps_for_afftps: float = 0.08

    def __post_init__(self) -> None:
        self.transforms = tuple(self.transforms)
        bad = [t for t in self.transforms if t not in ("hom", "tps", "afftps", "identity")]
        if bad or not self.transforms:
            raise ConfigError(f"cem.flow.transforms: {list(self.transforms)}; choose from hom, "
                              "tps, afftps (identity: no warp)")


def composite_grid(h: int, w: int, cfg: CompositeFlowConfig) -> torch.Tensor:
    """One random CompositeFlow sampling grid (H, W, 2): a uniform choice among the transforms."""
    kind = cfg.transforms[int(torch.randint(len(cfg.transforms), ()).item())]
    if kind == "hom":
        return homography_grid(h, w, cfg.random_t_hom)
    if kind == "tps":
        return tps_grid(h, w, cfg.random_t_tps)
    if kind == "afftps":
        return affine_tps_grid(h, w, cfg.random_alpha, cfg.random_s, cfg.random_tx,
                               cfg.random_ty, cfg.random_t_tps_for_afftps)
    gx, gy = _base_grid(h, w)
    return torch.stack([gx, gy], dim=-1)


def warp_nearest(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour backward warp with zero padding: ``out(p) = x(round(grid(p)))``.

    Args:
        x: (C, H, W) or (B, C, H, W) (integer labels are warped exactly: nearest sampling only
            copies values), or a (H, W) label map.
        grid: (H', W', 2) or (B, H', W', 2) sampling positions (x, y), normalised with
            ``align_corners=True``.

    Returns:
        ``(out, valid)``: the warped tensor (dtype and layout of ``x``) and a bool (H', W') /
        (B, H', W') map, True where the position lies inside the image.
    """
    squeeze = x.ndim == 2
    single = x.ndim in (2, 3)
    xb = x[None, None] if squeeze else (x[None] if single else x)
    gb = grid[None] if grid.ndim == 3 else grid
    if gb.shape[0] != xb.shape[0]:
        gb = gb.expand(xb.shape[0], -1, -1, -1)
    gb = gb.to(device=xb.device, dtype=torch.float32)
    out = F.grid_sample(xb.float(), gb, mode="nearest", padding_mode="zeros", align_corners=True)
    h, w = xb.shape[-2:]
    # nearest rounds to the closest pixel: a position is inside when it rounds into the image
    half_x = 1.0 / (w - 1) if w > 1 else 1.0
    half_y = 1.0 / (h - 1) if h > 1 else 1.0
    valid = (gb[..., 0].abs() < 1 + half_x) & (gb[..., 1].abs() < 1 + half_y)
    out = out.to(x.dtype) if x.is_floating_point() else out.round().to(x.dtype)
    if squeeze:
        return out[0, 0], valid[0]
    if single:
        return out[0], valid[0]
    return out, valid


@dataclass
class NightRenderConfig:
    """Ranges of the weight-free night rendering (module docstring)."""

    exposure: tuple[float, float] = (0.03, 0.25)
    saturation: tuple[float, float] = (0.4, 0.8)
    warm: tuple[float, float, float] = (1.0, 0.75, 0.45)
    cool: tuple[float, float, float] = (0.65, 0.8, 1.0)
    light_threshold: float = 0.8
    read_noise: float = 0.002
    shot_noise: float = 0.02


def render_night(img: torch.Tensor, cfg: NightRenderConfig | None = None) -> torch.Tensor:
    """A night rendering of an RGB image in [0, 1] (3, H, W) -> [0, 1] (module docstring)."""
    cfg = cfg or NightRenderConfig()
    lin = img.clamp(0, 1) ** 2.2
    mix = float(torch.rand(()).item())
    tint = torch.tensor([a * (1 - mix) + b * mix for a, b in zip(cfg.warm, cfg.cool, strict=True)])
    dark = lin * _u(*cfg.exposure) * tint.view(3, 1, 1)
    lights = (lin.mean(dim=0, keepdim=True) > cfg.light_threshold).to(lin.dtype)
    out = lights * lin + (1 - lights) * dark
    out = out + torch.randn_like(out) * (cfg.read_noise + cfg.shot_noise * out.clamp_min(0).sqrt())
    out = out.clamp(0, 1) ** (1 / 2.2)
    grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2]).unsqueeze(0)
    s = _u(*cfg.saturation)
    return (grey + s * (out - grey)).clamp(0, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float
                 ) -> torch.Tensor:
    """torchvision-style ColorJitter (hue 0) on [0, 1] RGB (3, H, W): factors U(1-v, 1+v),
    applied in a random order."""
    ops = []
    if brightness > 0:
        f = _u(max(0.0, 1 - brightness), 1 + brightness)
        ops.append(lambda t, f=f: (t * f).clamp(0, 1))
    if contrast > 0:
        f = _u(max(0.0, 1 - contrast), 1 + contrast)
        ops.append(lambda t, f=f: (f * t + (1 - f) * _grey(t).mean()).clamp(0, 1))
    if saturation > 0:
        f = _u(max(0.0, 1 - saturation), 1 + saturation)
        ops.append(lambda t, f=f: (f * t + (1 - f) * _grey(t)).clamp(0, 1))
    for i in torch.randperm(len(ops)).tolist():
        x = ops[i](x)
    return x


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W) with reflect padding (torchvision's semantics)."""
    r = kernel // 2
    t = torch.arange(kernel, dtype=x.dtype) - r
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    c = x.shape[0]
    y = F.pad(x[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k1.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    y = F.conv2d(y, k1.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)
    return y[0]


@dataclass
class CEMConfig:
    """CEM settings (dataset option ``cem`` of ``cityscapes_cem``); defaults are ICDA's."""

    jitter: tuple[float, float, float] = (0.6, 0.6, 0.6)
    """ColorJitter brightness, contrast, saturation (hue 0) on the enhanced view only."""
    blur_p: float = 0.2
    blur_kernel: int = 7
    blur_sigma: tuple[float, float] = (0.2, 2.0)
    flow: CompositeFlowConfig = field(default_factory=CompositeFlowConfig)
    render: NightRenderConfig = field(default_factory=NightRenderConfig)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    """Normalisation of the pipeline (the enhanced view is normalised here, like ``image``)."""

    def __post_init__(self) -> None:
        if isinstance(self.flow, dict):
            self.flow = CompositeFlowConfig(**self.flow)
        if isinstance(self.render, dict):
            self.render = NightRenderConfig(**self.render)
        if self.blur_kernel % 2 == 0 or self.blur_kernel < 1:
            raise ConfigError(f"cem.blur_kernel must be odd, got {self.blur_kernel}")


class CEMTransform:
    """Adds ``enhanced`` (normalised, warped) and ``enhanced_label`` to a transformed sample.

    Runs after the source pipeline: ``image`` is normalised, ``label`` cropped/flipped/padded and
    a loaded ``enhanced`` view (if any) went through the same geometry un-normalised (0..255).
    """

    def __init__(self, cfg: CEMConfig | None = None) -> None:
        self.cfg = cfg or CEMConfig()

    def __call__(self, sample: Sample) -> Sample:
        cfg = self.cfg
        mean = torch.tensor(cfg.mean).view(3, 1, 1)
        std = torch.tensor(cfg.std).view(3, 1, 1)
        if "enhanced" in sample:
            enh = sample["enhanced"].float() / 255.0
        else:
            enh = render_night(((sample["image"].float() * std + mean) / 255.0).clamp(0, 1),
                               cfg.render)
        enh = color_jitter(enh.clamp(0, 1), *cfg.jitter)
        if float(torch.rand(()).item()) < cfg.blur_p:
            enh = gaussian_blur(enh, cfg.blur_kernel, _u(*cfg.blur_sigma))
        enh = (enh * 255.0 - mean) / std
        h, w = enh.shape[-2:]
        grid = composite_grid(int(h), int(w), cfg.flow)
        enh, valid = warp_nearest(enh, grid)
        if "label" not in sample:
            raise ConfigError("CEM needs the source label (the enhanced view is labelled)")
        label, _ = warp_nearest(sample["label"], grid)
        label[~valid] = IGNORE_INDEX
        sample["enhanced"] = enh
        sample["enhanced_label"] = label
        return sample


def _cityscapes():
    from .datasets.cityscapes import Cityscapes

    return Cityscapes


class CityscapesCEM(_cityscapes()):
    """Cityscapes with ICDA's CEM source pair (catalogue name ``cityscapes_cem``).

    Args (beyond :class:`~udaseg.data.datasets.cityscapes.Cityscapes`):
        enhanced_root: ICDA's "Illumination Enhancement Images" in their layout
            ``<enhanced_root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` (the release's
            ``$DATA_DIR/CycleGANCityscapes``); None renders the view from the image itself
            (:func:`render_night`).
        cem: :class:`CEMConfig` fields (jitter, blur, flow, render, mean, std).
    """

    dataset_name = "cityscapes_cem"

    def __init__(self, root: str | Path, split: str = "train", labels: bool = True,
                 views: Sequence[str] = (), transform: Callable[[Sample], Sample] | None = None,
                 enhanced_root: str | Path | None = None, cem: dict | CEMConfig | None = None):
        super().__init__(root, split=split, labels=labels, views=views, transform=transform)
        if not labels:
            raise ConfigError("cityscapes_cem: the CEM view is labelled; use labels: true")
        self.cem = CEMTransform(cem if isinstance(cem, CEMConfig) else CEMConfig(**(cem or {})))
        self.enhanced_root = Path(enhanced_root) if enhanced_root is not None else None
        if self.enhanced_root is not None:
            from .datasets.base import Record, report_missing

            records, missing = [], []
            for rec in self.records:
                city = rec.image.parent.name
                path = self.enhanced_root / "leftImg8bit" / split / city / rec.image.name
                if not path.is_file():
                    missing.append(f"{rec.image} -> {path}")
                records.append(Record(rec.name, rec.image, rec.label, {**rec.views, "enhanced": path}))
            report_missing(
                missing, "cityscapes images have no enhanced image",
                "Put ICDA's Illumination Enhancement Images under enhanced_root in the layout "
                "leftImg8bit/<split>/<city>/<name>_leftImg8bit.png, or drop enhanced_root to "
                "render the view from the image (weight-free night rendering).")
            self.records = records

        # CEM is the last stage of the dataset's transform, so that wrappers calling
        # ``load`` + ``transform`` themselves (rare class sampling) get the view too
        self.transform = _Then(self.transform, self.cem)


class _Then:
    """``second(first(sample))`` (``first`` may be None)."""

    def __init__(self, first: Callable[[Sample], Sample] | None,
                 second: Callable[[Sample], Sample]) -> None:
        self.first, self.second = first, second

    def __call__(self, sample: Sample) -> Sample:
        return self.second(self.first(sample) if self.first is not None else sample)

    def __repr__(self) -> str:
        return f"{self.first!r} -> {self.second!r}"
