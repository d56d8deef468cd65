"""A weight-free global aligner for GPS-matched day/night pairs: scale + translation by phase
correlation of edge-orientation images (:class:`SimilarityAligner`).

Why this is a fair stand-in for Refign's UAWarpC on GPS-matched pairs. Dark Zurich / ACDC pair
each adverse-condition frame with the day frame recorded nearest by GPS: the same street seen
from nearly the same pose. For a distant or mostly planar scene and a nearly pure translation or
zoom of the camera along its axis, the dense flow between such frames is close to a global
similarity, and SynthNight's references are exactly that (a change of intrinsics: focal * zoom and
a shifted principal point, so target -> reference is ``F = (zoom - 1)(p - c) + shift`` with no
rotation; :func:`udaseg.data.synthnight.writer.reference_flow`). Refign uses the warped
reference only through (i) the per-pixel certainty-weighted label fusion and (ii) the certainty
itself; a correct global alignment with an honest per-image confidence feeds both. The estimator
has no weights, so it runs on any machine and can be checked against SynthNight's exact flow.

Method. Both images are de-normalised (ImageNet mean/std), turned into log-luminance (day/night
is mostly a change of illumination, multiplicative, so additive in the log) and then into
*doubled-angle orientation* images ``o = (g_x + i g_y)^2 / (|g|^2 + local mean |g|^2)``
(structure tensor smoothed over 3 x 3). Orientation ignores the gradient's strength (night
contrast is far lower) and the doubled angle ignores its polarity (a lit window is brighter than
the wall at night, darker by day); flat areas vote ~0. Then, coarse to fine:

1. Global search at the coarse level (longest side ``coarse_size``): the reference orientation
   image is resampled by every scale of a log-spaced grid over ``1 +/- max_zoom`` (~0.5 px steps
   at the border) about the image centre and phase-correlated (FFT, Hann window, whitened
   cross-power spectrum) with the target's, all scales in one batched FFT. The ``hypotheses``
   strongest distinct peaks over scale x shift are kept.
2. Verification and refinement on tiles: the reference is moved by a hypothesis, overlapping
   tiles (32 or 64 px, half overlap) are phase-correlated with the target's tiles, and a residual
   similarity (scale, translation; rotation with ``rotation=True``) is fitted to the tiles' shifts
   by robust (Cauchy, 1 px) iteratively reweighted least squares, each tile voting with its
   peak-to-sidelobe ratio (PSR) above ``tile_psr_floor``. Tiles on re-drawn traffic or on
   textureless road and sky get no vote or are outliers. The hypothesis with the largest inlier
   support wins (this rescues pairs where a large vehicle dominates the global correlation).
3. The same refinement at each finer level (twice the size, up to ``fine_size``) gives sub-pixel
   scale and translation.

Everything is batched torch (``torch.fft``, ``grid_sample``, ``unfold``); no Python loop runs over
the batch. Measured on 2 CPU cores: ~0.05 s for a 128 x 128 pair, ~0.13 s for 512 x 256 and
~0.3 s for 512 x 512 (benchmarks/results.md, "Alignment on SynthNight"); mean end-point error on
SynthNight's night/reference pairs ~0.15 px.

Certainty: the PSR-weighted share of the finest level's tiles that agree with the estimate within
one pixel (scaled down when their summed weight is below ``min_support``), held constant over the
image: roughly the share of the image where the global model holds. Unrelated or flat pairs get
~0 (a flat pair, with no agreeing tile, also gets the identity flow). ``valid`` is the shared
warp rule (:func:`~udaseg.models.alignment.base.sample_grid`).

Limits. One global similarity: no parallax (near objects move more than far ones when the
camera translates sideways or forwards; SynthNight's references have none, real GPS pairs have
some: a constant-per-image certainty cannot say where), only small rotation (none by default; with
``rotation=True`` the tiles fit a small roll, but the global search does not search rotation, so
rolls beyond a few degrees break the initialisation), no independent motion (re-drawn traffic is
an outlier to the fit; its pixels get the global flow and the image's certainty), scales within
``1 +/- max_zoom`` and shifts within ``max_shift`` of the image size. Very large appearance change
(snow cover, fog that hides the edges, a reference of another street) leaves few agreeing tiles:
the estimate may be wrong but the certainty is then low, which Refign's fusion reads as "trust the
model's own prediction". UAWarpC has none of these limits but needs trained weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Alignment, sample_grid

__all__ = ["SimilarityAligner", "SimilarityEstimate"]

_MEAN = (123.675, 116.28, 103.53)
_STD = (58.395, 57.12, 57.375)


class SimilarityEstimate:
    """Per-image global similarity, target -> reference: ``p_ref = s R(angle) (p - c) + c + t``
    with ``c`` the image centre, ``t = shift * (W, H)``, pixel centres at index + 0.5.

    Attributes: ``scale`` (B,), ``angle`` (B,) radians, ``shift`` (B, 2) (x, y) fractions of
    (W, H), ``psr`` (B,) peak-to-sidelobe ratio of the chosen coarse peak, ``inliers`` (B,)
    vote-weighted share of the finest level's tiles that agree with the estimate within 1 px and
    ``support`` (B,) their summed vote weight.
    """

    def __init__(
        self,
        scale: Tensor,
        angle: Tensor,
        shift: Tensor,
        psr: Tensor | None = None,
        inliers: Tensor | None = None,
        support: Tensor | None = None,
    ) -> None:
        self.scale, self.angle, self.shift = scale, angle, shift
        self.psr = torch.zeros_like(scale) if psr is None else psr
        self.inliers = torch.ones_like(scale) if inliers is None else inliers
        self.support = torch.zeros_like(scale) if support is None else support

    def flow(self, h: int, w: int) -> Tensor:
        """(B, 2, h, w) flow in pixels of an (h, w) grid."""
        return _similarity_flow(self.scale, self.angle, self.shift, h, w)


def _similarity_flow(scale: Tensor, angle: Tensor, shift: Tensor, h: int, w: int) -> Tensor:
    dev = scale.device
    n = scale.shape[0]
    xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5 - w / 2).view(1, 1, w)
    ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5 - h / 2).view(1, h, 1)
    a = (scale * torch.cos(angle)).view(n, 1, 1)
    b = (scale * torch.sin(angle)).view(n, 1, 1)
    fx = (a - 1.0) * xs - b * ys + (shift[:, 0] * w).view(n, 1, 1)
    fy = b * xs + (a - 1.0) * ys + (shift[:, 1] * h).view(n, 1, 1)
    return torch.stack((fx.expand(n, h, w), fy.expand(n, h, w)), dim=1)


def _to_log_luminance(x: Tensor) -> Tensor:
    """(B, 3, H, W) ImageNet-normalised -> (B, 1, H, W) log luminance."""
    mean = x.new_tensor(_MEAN).view(1, 3, 1, 1) / 255.0
    std = x.new_tensor(_STD).view(1, 3, 1, 1) / 255.0
    rgb = (x.float() * std + mean).clamp(0.0, 1.0)
    lum = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    return torch.log(lum + 1.0 / 64.0)


def _orientation(lum: Tensor, eps: float = 1e-3) -> Tensor:
    """(B, 1, H, W) -> (B, 2, H, W): real and imaginary part of the weighted doubled-angle
    orientation image."""
    h, w = lum.shape[-2:]
    x = F.pad(lum, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (x[:, :, 1:-1, 2:] - x[:, :, 1:-1, :-2])
    gy = 0.5 * (x[:, :, 2:, 1:-1] - x[:, :, :-2, 1:-1])
    # structure tensor (doubled angle) smoothed over 3 x 3, so one noisy pixel does not vote alone
    st = torch.cat((gx * gx - gy * gy, 2.0 * gx * gy, gx * gx + gy * gy), dim=1)
    st = F.avg_pool2d(st, 3, stride=1, padding=1, count_include_pad=False)
    energy = st[:, 2:3]
    # weight: energy relative to its local mean (~16 px, computed at quarter resolution);
    # saturating, so strong and weak edges vote alike and flat areas vote ~0
    k = 4 if min(h, w) >= 32 else 1
    local = F.avg_pool2d(energy, k, stride=k, ceil_mode=True) if k > 1 else energy
    local = F.avg_pool2d(local, 5, stride=1, padding=2, count_include_pad=False)
    local = F.interpolate(local, size=(h, w), mode="bilinear", align_corners=False)
    norm = 1.0 / (energy + local + eps)
    return st[:, :2] * norm


def _hann(h: int, w: int, device) -> Tensor:
    wy = torch.hann_window(h, periodic=False, device=device) if h > 1 else torch.ones(1)
    wx = torch.hann_window(w, periodic=False, device=device) if w > 1 else torch.ones(1)
    return (wy.view(h, 1) * wx.view(1, w)).to(device)


def _resample(feat: Tensor, scale: Tensor, angle: Tensor, shift: Tensor) -> Tensor:
    """Sample ``feat`` (N, C, h, w) at the similarity's p_ref for every target pixel p: the
    reference moved onto the target grid."""
    _, _, h, w = feat.shape
    flow = _similarity_flow(scale, angle, shift, h, w)
    grid, _ = sample_grid(flow)
    return F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _parabola(ym: Tensor, y0: Tensor, yp: Tensor) -> Tensor:
    """Offset in [-0.5, 0.5] of a parabola's vertex through (-1, ym), (0, y0), (1, yp)."""
    den = ym - 2.0 * y0 + yp
    off = 0.5 * (ym - yp) / torch.where(den.abs() > 1e-12, den, torch.full_like(den, -1e-12))
    return off.clamp(-0.5, 0.5)


class SimilarityAligner(nn.Module):
    """Global scale + translation (+ optional small rotation) aligner without weights (module
    docstring for the method and its limits).

    Args:
        max_zoom: scales searched at the coarse level: ``1 +/- max_zoom`` (log-spaced).
        max_shift: largest translation searched, fraction of the image side.
        coarse_size: longest side of the coarse level (the global search).
        fine_size: longest side of the finest refinement level (or the input size if smaller).
        rotation: also estimate a small in-plane rotation in the tile refinement (off by default:
            GPS-matched pairs from a car and SynthNight's references have none).
        refine_steps: refinement steps at the finest level (one at each other level).
        hypotheses: peaks of the global search verified on tiles (the best supported wins).
        tile_psr_floor: a tile votes with weight max(PSR - tile_psr_floor, 0) (0: no peak).
        min_support: summed vote weight of the agreeing tiles below which the certainty is
            scaled down proportionally (too little structure to trust the estimate).
    """

    def __init__(
        self,
        max_zoom: float = 0.08,
        max_shift: float = 0.15,
        coarse_size: int = 128,
        fine_size: int = 512,
        rotation: bool = False,
        refine_steps: int = 1,
        hypotheses: int = 4,
        tile_psr_floor: float = 4.0,
        min_support: float = 20.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= max_zoom < 0.5:
            raise ValueError(f"SimilarityAligner: max_zoom must be in [0, 0.5), got {max_zoom}")
        if not 0.0 < max_shift <= 0.5:
            raise ValueError(f"SimilarityAligner: max_shift must be in (0, 0.5], got {max_shift}")
        if coarse_size < 16 or fine_size < coarse_size:
            raise ValueError(
                "SimilarityAligner: need 16 <= coarse_size <= fine_size, got "
                f"{coarse_size}, {fine_size}"
            )
        self.max_zoom = float(max_zoom)
        self.max_shift = float(max_shift)
        self.coarse_size = int(coarse_size)
        self.fine_size = int(fine_size)
        self.rotation = bool(rotation)
        if refine_steps < 1 or hypotheses < 1:
            raise ValueError(
                "SimilarityAligner: refine_steps and hypotheses must be >= 1, got "
                f"{refine_steps}, {hypotheses}"
            )
        self.refine_steps = int(refine_steps)
        self.hypotheses = int(hypotheses)
        self.tile_psr_floor = float(tile_psr_floor)
        self.min_support = float(min_support)

    # ------------------------------------------------------------------ internals

    def _levels(self, h: int, w: int) -> list[tuple[int, int]]:
        """Level sizes from coarse to fine (never larger than the input)."""
        side = max(h, w)
        sizes = []
        target = min(self.fine_size, side)
        while True:
            f = target / side
            sizes.append((max(8, round(h * f)), max(8, round(w * f))))
            if target <= self.coarse_size:
                break
            target = max(self.coarse_size, target // 2)
        return sizes[::-1]

    @staticmethod
    def _correlate(ft: Tensor, fr: Tensor, window: Tensor) -> Tensor:
        """Whitened cross-correlation surfaces (N, h, w) of target and reference orientation
        images (N, 2, h, w); index d holds the score of ``target(p) ~ reference(p + d)``."""
        zt = torch.complex(ft[:, 0], ft[:, 1]) * window
        zr = torch.complex(fr[:, 0], fr[:, 1]) * window
        cross = torch.fft.fft2(zr) * torch.conj(torch.fft.fft2(zt))
        mag = cross.abs()
        cross = cross / (mag + 1e-3 * mag.mean(dim=(-2, -1), keepdim=True) + 1e-12)
        return torch.fft.ifft2(cross).real

    @staticmethod
    def _peak(corr: Tensor, rx: int, ry: int) -> tuple[Tensor, Tensor, Tensor]:
        """Best shift with |dx| <= rx, |dy| <= ry on circular surfaces (N, h, w): sub-pixel
        shifts (N, 2), peak values (N,) and whether the peak is inside the range (N,)."""
        n, h, w = corr.shape
        rx, ry = max(1, min(rx, (w - 3) // 2)), max(1, min(ry, (h - 3) // 2))
        # re-centre the circular surface so that zero shift sits at (ry + 1, rx + 1)
        sub = torch.roll(corr, shifts=(ry + 1, rx + 1), dims=(-2, -1))
        sub = sub[:, : 2 * ry + 3, : 2 * rx + 3]
        inner = sub[:, 1:-1, 1:-1].reshape(n, -1)
        val, idx = inner.max(dim=1)
        iy, ix = idx // (2 * rx + 1) + 1, idx % (2 * rx + 1) + 1
        ar = torch.arange(n, device=corr.device)
        ox = _parabola(sub[ar, iy, ix - 1], val, sub[ar, iy, ix + 1])
        oy = _parabola(sub[ar, iy - 1, ix], val, sub[ar, iy + 1, ix])
        d = torch.stack(((ix - rx - 1).float() + ox, (iy - ry - 1).float() + oy), dim=1)
        inside = (ix > 1) & (ix < 2 * rx + 1) & (iy > 1) & (iy < 2 * ry + 1)
        return d, val, inside

    @staticmethod
    def _psr(corr: Tensor, d: Tensor, radius: int) -> Tensor:
        """Peak-to-sidelobe ratio of surfaces (N, h, w) whose peaks are at shifts ``d``."""
        n, h, w = corr.shape
        ix = torch.round(d[:, 0]).long() % w
        iy = torch.round(d[:, 1]).long() % h
        ar = torch.arange(n, device=corr.device)
        peak = corr[ar, iy, ix]
        yy = torch.arange(h, device=corr.device).view(1, h, 1)
        xx = torch.arange(w, device=corr.device).view(1, 1, w)
        dy = torch.minimum((yy - iy.view(-1, 1, 1)) % h, (iy.view(-1, 1, 1) - yy) % h)
        dx = torch.minimum((xx - ix.view(-1, 1, 1)) % w, (ix.view(-1, 1, 1) - xx) % w)
        side = ~((dy <= radius) & (dx <= radius))
        cnt = side.sum(dim=(1, 2)).clamp(min=1)
        mean = (corr * side).sum(dim=(1, 2)) / cnt
        var = ((corr - mean.view(-1, 1, 1)) ** 2 * side).sum(dim=(1, 2)) / cnt
        return (peak - mean) / var.sqrt().clamp(min=1e-12)

    def _global(self, ft: Tensor, fr: Tensor, k_hyp: int) -> tuple[Tensor, Tensor, Tensor]:
        """Coarse level: every scale of the grid, whole-image phase correlation. Returns the
        ``k_hyp`` strongest distinct peaks over scales and shifts as hypotheses: scale (B, K),
        shift (B, K, 2) fractions of (w, h) and PSR (B, K)."""
        b, _, h, w = ft.shape
        dev = ft.device
        z = math.log1p(self.max_zoom)
        k = max(3, 2 * math.ceil(z / 0.008) + 1)  # ~0.5 px at the border of a 128 px image
        sc = torch.exp(torch.linspace(-z, z, k, device=dev)).repeat(b)
        zero = torch.zeros(b * k, device=dev)
        frs = _resample(fr.repeat_interleave(k, dim=0), sc, zero, torch.zeros(b * k, 2, device=dev))
        corr = self._correlate(ft.repeat_interleave(k, dim=0), frs, _hann(h, w, dev))
        corr = corr.view(b, k, h, w)
        rx = max(1, min(math.ceil(self.max_shift * w) + 1, (w - 3) // 2))
        ry = max(1, min(math.ceil(self.max_shift * h) + 1, (h - 3) // 2))
        # zero shift at (ry, rx) of the searched window
        win = torch.roll(corr, shifts=(ry, rx), dims=(-2, -1))[..., : 2 * ry + 1, : 2 * rx + 1]
        best, which = win.max(dim=1)  # over scales: (B, 2 ry + 1, 2 rx + 1)
        # distinct peaks: local maxima of the best-over-scales surface (5 x 5 neighbourhood)
        pooled = F.max_pool2d(best[:, None], 5, stride=1, padding=2)[:, 0]
        cand = torch.where(best >= pooled, best, torch.full_like(best, -float("inf")))
        kk = min(k_hyp, cand[0].numel())
        _, idx = cand.view(b, -1).topk(kk, dim=1)
        iy, ix = idx // (2 * rx + 1), idx % (2 * rx + 1)
        ar = torch.arange(b, device=dev).view(b, 1)
        si = which[ar, iy, ix]  # (B, K) scale index
        scale = sc.view(b, k)[ar, si]
        d = torch.stack(((ix - rx).float(), (iy - ry).float()), dim=-1)  # (B, K, 2) pixels
        # target(p) ~ ref_s(p + d) = ref(s (p + d - c) + c): shift s d (pixels)
        shift = scale.unsqueeze(-1) * d / d.new_tensor([w, h])
        surf = corr[ar, si].reshape(b * kk, h, w)
        psr = self._psr(surf, d.reshape(-1, 2), radius=max(2, min(h, w) // 32)).view(b, kk)
        return scale, shift, psr

    def _refine(
        self, ft: Tensor, fr: Tensor, scale: Tensor, angle: Tensor, shift: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One refinement step: the reference is moved by the estimate, local shifts of
        overlapping tiles are measured by phase correlation and a residual similarity is fitted
        to them by robust (Cauchy) iteratively reweighted least squares. Returns the new scale,
        angle, shift, the inlier share and the inlier support (sum of the inlier tiles'
        confidences, the score that picks among hypotheses)."""
        b, _, h, w = ft.shape
        dev = ft.device
        moved = _resample(fr, scale, angle, shift)
        t = 64 if min(h, w) >= 160 else 32
        t = min(t, h, w)
        stride = t // 2
        ny, nx = (h - t) // stride + 1, (w - t) // stride + 1
        y0 = (h - ((ny - 1) * stride + t)) // 2  # centre the tile grid
        x0 = (w - ((nx - 1) * stride + t)) // 2
        crop_t = ft[:, :, y0 : y0 + (ny - 1) * stride + t, x0 : x0 + (nx - 1) * stride + t]
        crop_r = moved[:, :, y0 : y0 + (ny - 1) * stride + t, x0 : x0 + (nx - 1) * stride + t]

        def tiles(x: Tensor) -> Tensor:  # (B, 2, H', W') -> (B * L, 2, t, t)
            u = F.unfold(x, kernel_size=t, stride=stride)  # (B, 2 t t, L)
            return u.view(b, 2, t, t, -1).permute(0, 4, 1, 2, 3).reshape(-1, 2, t, t)

        tt, tr = tiles(crop_t), tiles(crop_r)
        n_tiles = ny * nx
        corr = self._correlate(tt, tr, _hann(t, t, dev))
        radius = max(2, t // 4)
        d, _, inside = self._peak(corr, radius, radius)
        psr = self._psr(corr, d, radius=2)
        energy = (tt.square().sum(1).mean(dim=(1, 2)) * tr.square().sum(1).mean(dim=(1, 2))).sqrt()
        conf = (psr - self.tile_psr_floor).clamp(min=0.0) * inside * (energy > 1e-3)
        # tile centres relative to the image centre (pixels of this level)
        cy = y0 + torch.arange(ny, device=dev, dtype=torch.float32) * stride + t / 2 - h / 2
        cx = x0 + torch.arange(nx, device=dev, dtype=torch.float32) * stride + t / 2 - w / 2
        px = cx.view(1, nx).expand(ny, nx).reshape(-1)
        py = cy.view(ny, 1).expand(ny, nx).reshape(-1)
        d = d.view(b, n_tiles, 2)
        conf = conf.view(b, n_tiles)
        # residual model d = G (p - c) + tau, G = [[a, -r], [r, a]] (r = 0 without rotation)
        one, zero = torch.ones_like(px), torch.zeros_like(px)
        if self.rotation:
            jx = torch.stack((px, -py, one, zero), dim=1)  # unknowns (a, r, tau_x, tau_y)
            jy = torch.stack((py, px, zero, one), dim=1)
        else:
            jx = torch.stack((px, one, zero), dim=1)  # unknowns (a, tau_x, tau_y)
            jy = torch.stack((py, zero, one), dim=1)
        jac = torch.cat((jx, jy), dim=0)  # (2 L, P)
        obs = torch.cat((d[..., 0], d[..., 1]), dim=1)  # (B, 2 L)
        npar = jac.shape[1]
        wts = conf.clone()
        c_px = 1.0  # Cauchy scale in pixels of this level
        # ridge towards "no change": keeps the solve defined with few or no usable tiles
        ridge = torch.diag(
            torch.tensor([1.0 * max(h, w) ** 2] * (npar - 2) + [1.0, 1.0], device=dev)
        ) * 1e-3
        sol = torch.zeros(b, npar, device=dev)
        for _ in range(4):
            ww = torch.cat((wts, wts), dim=1)  # (B, 2 L)
            jw = jac.unsqueeze(0) * ww.unsqueeze(-1)
            lhs = jw.transpose(1, 2) @ jac.unsqueeze(0) + ridge
            rhs = (jw * obs.unsqueeze(-1)).sum(dim=1)
            sol = torch.linalg.solve(lhs, rhs)
            res = obs - sol @ jac.T
            r2 = res[:, :n_tiles] ** 2 + res[:, n_tiles:] ** 2
            wts = conf / (1.0 + r2 / c_px**2)
        support = (conf * (r2 < 1.0)).sum(1)
        inl = support / conf.sum(1).clamp(min=1e-6)
        a = sol[:, 0]
        r = sol[:, 1] if self.rotation else torch.zeros_like(a)
        tau = sol[:, -2:]
        # new map: A (I + G) (p - c) + c + t + A tau, with A = s R(angle)
        g = torch.complex(1.0 + a, r)
        new_scale = scale * g.abs()
        new_angle = angle + torch.angle(g)
        cos, sin = torch.cos(angle), torch.sin(angle)
        atx = scale * (cos * tau[:, 0] - sin * tau[:, 1])
        aty = scale * (sin * tau[:, 0] + cos * tau[:, 1])
        new_shift = shift + torch.stack((atx / w, aty / h), dim=1)
        return new_scale, new_angle, new_shift, inl, support

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def estimate(self, target: Tensor, reference: Tensor) -> SimilarityEstimate:
        """Global similarity of every pair of (B, 3, H, W) ImageNet-normalised images."""
        if target.shape != reference.shape or target.ndim != 4 or target.shape[1] != 3:
            raise ValueError(
                "SimilarityAligner: target and reference must be (B, 3, H, W) of one size, got "
                f"{tuple(target.shape)} and {tuple(reference.shape)}"
            )
        b, _, h, w = target.shape
        lt, lr = _to_log_luminance(target), _to_log_luminance(reference)
        angle = None
        inl = None
        levels = self._levels(h, w)
        for li, (hl, wl) in enumerate(levels):
            if (hl, wl) == (h, w):
                ft, fr = _orientation(lt), _orientation(lr)
            else:
                ft = _orientation(F.interpolate(lt, size=(hl, wl), mode="area"))
                fr = _orientation(F.interpolate(lr, size=(hl, wl), mode="area"))
            if li == 0:
                # hypotheses from the global search, each refined on tiles; the best supported
                # one wins
                hs, ht, hp = self._global(ft, fr, self.hypotheses)
                kk = hs.shape[1]
                scale, shift = hs.reshape(-1), ht.reshape(-1, 2)
                angle = torch.zeros_like(scale)
                fts, frs = ft.repeat_interleave(kk, dim=0), fr.repeat_interleave(kk, dim=0)
                for _ in range(2):
                    scale, angle, shift, inl, sup = self._refine(fts, frs, scale, angle, shift)
                pick = torch.arange(b, device=ft.device) * kk + sup.view(b, kk).argmax(dim=1)
                scale, angle, shift = scale[pick], angle[pick], shift[pick]
                psr, inl, sup = hp.reshape(-1)[pick], inl[pick], sup[pick]
                if len(levels) > 1:
                    continue
            steps = self.refine_steps if li == len(levels) - 1 else 1
            for _ in range(steps):
                scale, angle, shift, inl, sup = self._refine(ft, fr, scale, angle, shift)
        # no tile agrees (a flat or unrelated pair): the estimate is noise, report identity
        none = sup <= 0
        scale = torch.where(none, torch.ones_like(scale), scale)
        angle = torch.where(none, torch.zeros_like(angle), angle)
        shift = torch.where(none[:, None], torch.zeros_like(shift), shift)
        return SimilarityEstimate(scale, angle, shift, psr, inl, sup)

    def certainty_from(self, est: SimilarityEstimate) -> Tensor:
        """Per-image certainty in [0, 1] (B,): the PSR-weighted share of the finest level's
        tiles that agree with the estimate within one pixel, scaled down when their summed
        weight is below ``min_support``."""
        enough = (est.support / max(self.min_support, 1e-6)).clamp(max=1.0)
        return (est.inliers * enough).clamp(0.0, 1.0)

    def forward(self, target: Tensor, reference: Tensor) -> Alignment:
        est = self.estimate(target, reference)
        b, _, h, w = target.shape
        flow = est.flow(h, w)
        _, valid = sample_grid(flow)
        cert = self.certainty_from(est).view(b, 1, 1, 1).expand(b, 1, h, w).contiguous()
        return Alignment(flow=flow, certainty=cert, valid=valid)
