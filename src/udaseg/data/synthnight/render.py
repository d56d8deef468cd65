"""Day and night rendering of a SynthNight :class:`~udaseg.data.synthnight.scene.SceneRaster`.

All light is computed in linear radiance (1.0 = a white surface in full daylight) and encoded
with the sRGB OETF to 8 bits at the end. ``A`` is the linear albedo, ``s(n)`` a shading factor
per surface orientation, ``N`` zero-mean unit-variance noise per pixel and channel.

Day (source domain)
-------------------
    I_day = e * w ⊙ A * s_day(n),  hazed:  I <- I (1 - h) + e c_haze h,  h = 1 - exp(-Z / d_haze)
    out   = sRGB(I_day + σ_day U)

with exposure ``e ∈ [0.85, 1.1]``, a white-balance gain ``w`` within ±4 %, one facade side in
sun (0.9) and the other in shade (0.55-0.7), haze distance ``d_haze ∈ [250, 700]`` m and a faint
uniform noise ``U`` of std ``σ_day = 0.004``. Sky pixels keep their gradient-plus-cloud radiance.

Night (target domain)
---------------------
    I_amb   = g * (cast ⊙ A * s_night(n))^γ      ambient moon / sky-glow light; s_night = 1 on
              the ground, 0.75 elsewhere, so A * s_night is the day radiance without exposure
    I_lamp  = A ⊙ c_lamp P Σ_l cos_n cos_down² / d²   street lamps: d = |L_l - X|, cos_n the
              incidence cosine, cos_down = (L_y - Y) / d the downward cut-off optics (lamps
              within 120 m, evaluated on every 2nd pixel)
    I_head  = A ⊙ c_head P_h exp(-(X/Z)²/σx² - ((Y - 0.7)/Z)²/σy²) / Z²   ego headlights
    I_emit  = lamp heads + lit windows + vehicle and traffic lights
    I_glare = a_halo B_small(I_emit) + a_veil B_wide(I_emit)   (B: twice-iterated box blurs of
              radius 1.2 % and 6 % of the width, computed at 1/4 resolution)
    I_sky   = L_sky (0.6 (1 - w) c_cool + 0.5 (0.4 + 0.6 w) c_sodium (1 + (G - 1) e^(-a / 0.15)))
              × clouds: dark zenith, light pollution at the horizon (a = height above the
              horizon as a fraction of the image height, w = cast warmth, G = sky glow)
    I       = I_amb + I_lamp + I_head + I_emit + I_glare     (sky pixels: I_sky + I_glare)
    I_noisy = I + sqrt(k_shot I + σ_read²) N                          shot + read noise
              (N: zero-mean unit-variance triangular noise, see sensor_noise)
    out     = sRGB(clip(k_b * I_noisy, 0, 1)),  k_b = [b/4, 1 - b/2, b/4] separable 3-tap blur

This is the brief's ``I_night = clip(gain * (cast ⊙ I_day_linear)^γ + lights + noise)`` with
the lights spelt out. The transform of the ambient term is monotone per channel, so edges and
per-class contrast survive; the domain gap comes from the darkness, the colour cast, the
spatially varying lamp pools, the glare around emitters, noise and blur. ``render_night`` also
returns the noise-free luminance ``Y(I)``, the input of the event simulator.

Night defaults (:class:`NightStyle`; each a (low, high) range drawn uniformly per image into
:class:`NightParams`)::

    ``exposure`` (0.05, 0.12)           g: ambient gain relative to daylight
    ``gamma`` (1.15, 1.45)              γ: ambient exponent
    ``cast_warmth`` (0.0, 1.0)          w: from moonlight (0.55, 0.7, 1) to sodium (1, 0.62, 0.32)
    ``sky_level`` (0.01, 0.03)          L_sky: zenith sky radiance
    ``sky_glow`` (1.5, 5.0)             G: horizon light-pollution factor
    ``lamp_power`` (8.0, 30.0)          P: street-lamp intensity
    ``lamp_warmth`` (0.0, 1.0)          c_lamp: from LED (0.95, 0.97, 1) to sodium (1, 0.55, 0.18)
    ``lamp_head`` (3.0, 10.0)           radiance of a lamp head
    ``headlights`` (5.0, 15.0)          P_h: ego headlights
    ``window_lit`` (0.12, 0.45)         fraction of lit windows
    ``window_radiance`` (0.1, 0.45)     radiance of a lit window (x 0.5..1.5 per window)
    ``vehicle_lights`` (0.6, 1.4)       scale of vehicle and traffic-light lamps
    ``halo`` (0.3, 0.8)                 a_halo
    ``veil`` (0.03, 0.1)                a_veil
    ``read_noise`` (0.002, 0.005)       σ_read
    ``shot_noise`` (0.0005, 0.002)      k_shot
    ``blur`` (0.2, 0.7)                 b

With these, the default copy's night images have a mean encoded luminance of about 33 (day: 117)
on the 0..255 scale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np

from .scene import (
    N_FRONT,
    N_GROUND,
    N_LEFT,
    N_RIGHT,
    N_SKY,
    NORMALS,
    SceneRaster,
    frac,
    srgb_to_linear,
)

_LUM = (0.2126, 0.7152, 0.0722)
_LUT_SIZE = 16384


@functools.lru_cache(maxsize=1)
def _srgb_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, _LUT_SIZE, dtype=np.float64)
    y = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return np.round(y * 255.0).astype(np.uint8)


def encode_srgb(planes: np.ndarray) -> np.ndarray:
    """Linear radiance planes (3, H, W) -> 8-bit sRGB image (H, W, 3), clipped to [0, 1]."""
    x = np.clip(planes, 0.0, 1.0)
    x *= np.float32(_LUT_SIZE - 1)
    x += np.float32(0.5)
    idx = x.astype(np.int32)
    lut = _srgb_lut()
    out = np.empty(planes.shape[1:] + (3,), dtype=np.uint8)
    for c in range(3):
        out[..., c] = np.take(lut, idx[c])
    return out


def luminance(planes: np.ndarray) -> np.ndarray:
    """Rec. 709 luminance of (3, ...) channel planes."""
    return _LUM[0] * planes[0] + _LUM[1] * planes[1] + _LUM[2] * planes[2]


def image_luminance(image: np.ndarray) -> float:
    """Mean Rec. 709 luminance (0..255 scale, on the encoded values) of an (H, W, 3) uint8 image."""
    planes = image.reshape(-1, 3).astype(np.float32).T
    return float(luminance(planes).mean())


# ----------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class DayStyle:
    """Ranges of the day rendering, each (low, high) sampled uniformly per image."""

    exposure: tuple[float, float] = (0.85, 1.1)
    """Global exposure e."""
    white_balance: tuple[float, float] = (-0.04, 0.04)
    """Per-channel relative gain jitter of w."""
    shade_side: tuple[float, float] = (0.55, 0.7)
    """Shading of the facade side away from the sun (the sunny side gets 0.9)."""
    haze_distance: tuple[float, float] = (250.0, 700.0)
    """Distance d_haze (m) of the aerial-perspective haze."""
    noise: float = 0.004
    """Std σ_day of the (uniform) sensor noise in linear radiance."""


@dataclass(frozen=True)
class NightParams:
    """One draw of :class:`NightStyle` (same field names, scalars)."""

    exposure: float
    gamma: float
    cast_warmth: float
    sky_level: float
    sky_glow: float
    lamp_power: float
    lamp_warmth: float
    lamp_head: float
    headlights: float
    window_lit: float
    window_radiance: float
    vehicle_lights: float
    halo: float
    veil: float
    read_noise: float
    shot_noise: float
    blur: float


@dataclass(frozen=True)
class NightStyle:
    """Ranges of the night rendering, each (low, high), sampled uniformly per image."""

    exposure: tuple[float, float] = (0.05, 0.12)
    """Gain g of the ambient term (fraction of the day exposure)."""
    gamma: tuple[float, float] = (1.15, 1.45)
    """Exponent γ of the ambient term; > 1 darkens dark surfaces more than bright ones."""
    cast_warmth: tuple[float, float] = (0.0, 1.0)
    """Ambient colour cast: 0 = moonlight (0.55, 0.7, 1.0), 1 = sodium glow (1.0, 0.62, 0.32)."""
    sky_level: tuple[float, float] = (0.01, 0.03)
    """Linear radiance of the zenith sky."""
    sky_glow: tuple[float, float] = (1.5, 5.0)
    """Light-pollution brightening of the sky at the horizon (factor)."""
    lamp_power: tuple[float, float] = (8.0, 30.0)
    """Street-lamp intensity P (irradiance P cos_n cos_down² / d², d in metres)."""
    lamp_warmth: tuple[float, float] = (0.0, 1.0)
    """Lamp colour: 0 = white LED (0.95, 0.97, 1.0), 1 = sodium (1.0, 0.55, 0.18)."""
    lamp_head: tuple[float, float] = (3.0, 10.0)
    """Radiance of a lamp head."""
    headlights: tuple[float, float] = (5.0, 15.0)
    """Ego-vehicle headlight intensity P_h."""
    window_lit: tuple[float, float] = (0.12, 0.45)
    """Fraction of windows lit from inside."""
    window_radiance: tuple[float, float] = (0.1, 0.45)
    """Radiance of a lit window (times a per-window factor in [0.5, 1.5])."""
    vehicle_lights: tuple[float, float] = (0.6, 1.4)
    """Scale of vehicle head/tail lights and traffic-light lamps."""
    halo: tuple[float, float] = (0.3, 0.8)
    """Weight a_halo of the narrow glare halo around emitters."""
    veil: tuple[float, float] = (0.03, 0.1)
    """Weight a_veil of the wide veiling glare."""
    read_noise: tuple[float, float] = (0.002, 0.005)
    """Read-noise std σ_read (linear radiance)."""
    shot_noise: tuple[float, float] = (0.0005, 0.002)
    """Shot-noise variance per unit radiance k_shot."""
    blur: tuple[float, float] = (0.2, 0.7)
    """Blur strength b: separable 3-tap kernel [b/4, 1 - b/2, b/4] (defocus, long exposure)."""

    def sample(self, rng: np.random.Generator) -> NightParams:
        return NightParams(
            **{f.name: float(rng.uniform(*getattr(self, f.name))) for f in fields(self)}
        )


# ----------------------------------------------------------------------------- helpers


def _box(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Box filter of radius r along ``axis`` with edge padding (cumulative sums)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float32)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) / np.float32(2 * r + 1)


def _blur(a: np.ndarray, r: int, passes: int = 2) -> np.ndarray:
    """Iterated box blur over the last two axes."""
    for _ in range(passes):
        a = _box(_box(a, r, a.ndim - 2), r, a.ndim - 1)
    return a


def _upsample4_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """Linear x4 upsampling along ``axis`` (pixel-centre aligned, edges clamped)."""
    a = np.moveaxis(a, axis, 0)
    prev = np.concatenate([a[:1], a[:-1]])
    nxt = np.concatenate([a[1:], a[-1:]])
    parts = [
        a * np.float32(1 - w) + (prev if o < 0 else nxt) * np.float32(w)
        for o, w in ((-1, 0.375), (-1, 0.125), (1, 0.125), (1, 0.375))
    ]
    out = np.stack(parts, axis=1).reshape((4 * a.shape[0],) + a.shape[1:])
    return np.moveaxis(out, 0, axis)


def glare(
    emission: np.ndarray, radii_px: tuple[float, ...], weights: tuple[float, ...]
) -> np.ndarray:
    """Weighted sum of box-blurred copies of (3, H, W) emission planes, at 1/4 resolution."""
    _, H, W = emission.shape
    h, w = -(-H // 4), -(-W // 4)
    pad = (
        emission
        if (4 * h, 4 * w) == (H, W)
        else np.pad(emission, ((0, 0), (0, 4 * h - H), (0, 4 * w - W)), mode="edge")
    )
    small = sum(pad[:, i::4, j::4] for i in range(4) for j in range(4)) * np.float32(1 / 16)
    out = sum(
        np.float32(wt) * _blur(small, max(1, int(round(r / 4))))
        for r, wt in zip(radii_px, weights, strict=True)
    )
    return _upsample4_axis(_upsample4_axis(out, 2), 1)[:, :H, :W]


def _blur3(a: np.ndarray, c: float) -> np.ndarray:
    """Separable 3-tap blur [c, 1 - 2c, c] on the image axes of (3, H, W) planes, edges clamped."""
    c = np.float32(c)
    out = a * (1 - 2 * c)
    out[:, 1:] += c * a[:, :-1]
    out[:, :-1] += c * a[:, 1:]
    out[:, 0] += c * a[:, 0]
    out[:, -1] += c * a[:, -1]
    res = out * (1 - 2 * c)
    res[:, :, 1:] += c * out[:, :, :-1]
    res[:, :, :-1] += c * out[:, :, 1:]
    res[:, :, 0] += c * out[:, :, 0]
    res[:, :, -1] += c * out[:, :, -1]
    return res


def sensor_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance float32 noise with a triangular density (sum of two random bytes).

    Several times cheaper than ``rng.standard_normal``; bounded at ±2.45σ, which is harmless for
    sensor noise after 8-bit quantisation.
    """
    n = int(np.prod(shape))
    b = np.frombuffer(rng.bytes(2 * n), np.uint8)
    s = b[:n].astype(np.float32)
    s += b[n:]
    s -= np.float32(255.0)
    s *= np.float32(1 / 104.52)  # std of the sum of two bytes: sqrt(2 (256² - 1) / 12)
    return s.reshape(shape)


def _per_normal(table: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(5, 3) per-orientation, per-channel factors -> (3, H, W) planes."""
    return np.take(table.T.astype(np.float32), normal, axis=1)


# ----------------------------------------------------------------------------- day


def render_day(
    r: SceneRaster, rng: np.random.Generator, style: DayStyle = DayStyle()
) -> np.ndarray:
    """Day image (H, W, 3) uint8 of a scene raster."""
    e = rng.uniform(*style.exposure)
    wb = 1.0 + rng.uniform(*style.white_balance, size=3)
    shade_side = rng.uniform(*style.shade_side)
    d_haze = rng.uniform(*style.haze_distance)
    shade = np.ones(5)
    shade[N_FRONT] = 0.8
    sunny_left = rng.random() < 0.5
    shade[N_LEFT], shade[N_RIGHT] = (0.9, shade_side) if sunny_left else (shade_side, 0.9)
    gain = e * wb
    img = r.albedo * _per_normal(shade[:, None] * gain, r.normal)
    h = -np.expm1(r.depth * np.float32(-1 / d_haze))  # 1 - exp(-Z / d_haze); sky (Z = inf) -> 1
    h[r.normal == N_SKY] = 0.0
    haze = (srgb_to_linear([0.78, 0.81, 0.86]) * gain).astype(np.float32)
    img += (haze[:, None, None] - img) * h
    # Slight sensor noise: uniform, std σ_day (one random byte per value).
    noise = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape).astype(np.float32)
    noise -= np.float32(127.5)
    img += noise * np.float32(style.noise * np.sqrt(12.0) / 256.0)
    return encode_srgb(img)


# ----------------------------------------------------------------------------- night

_CAST_COOL = np.array([0.55, 0.7, 1.0], dtype=np.float32)
_CAST_SODIUM = np.array([1.0, 0.62, 0.32], dtype=np.float32)
_LAMP_LED = np.array([0.95, 0.97, 1.0], dtype=np.float32)
_LAMP_SODIUM = np.array([1.0, 0.55, 0.18], dtype=np.float32)
_WINDOW = np.array([1.0, 0.72, 0.4], dtype=np.float32)
_HEAD = np.array([1.0, 0.97, 0.9], dtype=np.float32)


def _lamp_light(r: SceneRaster, step: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Street-lamp and headlight irradiance maps (H, W), evaluated on every ``step``-th pixel.

    Lamps: Σ_l cos_n cos_down² / d² with d = |L_l - X|, cos_n = max(0, n·(L_l - X)) / d the
    incidence cosine (billboards: wrapped diffuse (cos_n + 0.5) / 1.5) and cos_down = (L_y - Y) / d
    the cut-off optics of a street lamp (light goes down, not sideways);
    headlights: exp(-(X/Z)²/0.12 - ((Y - 0.7)/Z)²/0.01) / Z², a forward beam from (0, 0.7 m, 0).
    Both without power or colour; nearest-neighbour upsampled to full size.
    """
    cam = r.camera
    H, W = r.label.shape
    depth = r.depth[::step, ::step]
    normal = r.normal[::step, ::step]
    Z = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
    xs = (np.arange(0, W, step, dtype=np.float32) + 0.5 - cam.cx) / cam.focal
    ys = (np.arange(0, H, step, dtype=np.float32) + 0.5 - cam.cy) / cam.focal
    X = xs[None, :] * Z
    Y = cam.elevation - ys[:, None] * Z
    n = NORMALS[normal]
    nx, ny, nz = n[..., 0], n[..., 1], n[..., 2]
    front = normal == N_FRONT
    irr = np.zeros(Z.shape, dtype=np.float32)
    for lamp in r.lamps:
        if lamp.z > 120.0:
            continue
        dx, dy, dz = lamp.x - X, lamp.y - Y, lamp.z - Z
        d2 = dx * dx + dy * dy + dz * dz + np.float32(0.25)
        inv_d = 1.0 / np.sqrt(d2)
        cos = (nx * dx + ny * dy + nz * dz) * inv_d
        cos = np.where(front, (cos + np.float32(0.5)) * np.float32(1 / 1.5), cos)
        down = np.maximum(dy * inv_d, 0.0)  # cosine from the lamp's downward axis
        irr += np.maximum(cos, 0.0) * down * down / d2
    zs = np.maximum(Z, np.float32(0.5))
    beam = np.exp(
        -((X / zs) ** 2) * np.float32(1 / 0.12)
        - ((Y - np.float32(0.7)) / zs) ** 2 * np.float32(100)
    )
    beam /= zs * zs
    sky = normal == N_SKY
    irr[sky] = 0.0
    beam[sky] = 0.0
    up = lambda a: np.repeat(np.repeat(a, step, axis=0), step, axis=1)[:H, :W]  # noqa: E731
    return up(irr), up(beam)


def render_night(
    r: SceneRaster, rng: np.random.Generator, p: NightParams
) -> tuple[np.ndarray, np.ndarray]:
    """Night image (H, W, 3) uint8 and its noise-free linear luminance (H, W) float32."""
    _, H, W = r.albedo.shape
    cam = r.camera

    # Ambient term g (cast ⊙ A s)^γ, plus lamp and headlight light reflected by the albedo.
    shade = np.full(5, 0.75)
    shade[N_GROUND] = 1.0
    cast = (1 - p.cast_warmth) * _CAST_COOL + p.cast_warmth * _CAST_SODIUM
    img = np.power(r.albedo * _per_normal(shade[:, None] * cast, r.normal), np.float32(p.gamma))
    img *= np.float32(p.exposure)
    lamp_rgb = (1 - p.lamp_warmth) * _LAMP_LED + p.lamp_warmth * _LAMP_SODIUM
    irr, beam = _lamp_light(r)
    irr *= np.float32(p.lamp_power)
    beam *= np.float32(p.headlights)
    for c in range(3):
        img[c] += r.albedo[c] * (np.float32(lamp_rgb[c]) * irr + np.float32(_HEAD[c]) * beam)

    # Emitters: lamp heads, lit windows, vehicle and traffic lights.
    emit = r.emission * np.float32(p.vehicle_lights)
    if r.lamp_head.any():
        emit[:, r.lamp_head] = (lamp_rgb * np.float32(p.lamp_head))[:, None]
    lit = (r.window >= 0) & (r.window < p.window_lit)
    if lit.any():
        w = r.window[lit]
        strength = p.window_radiance * (0.5 + frac(w * 13.37))
        tint = _WINDOW[:, None] + np.array([0.0, 0.2, 0.5], dtype=np.float32)[:, None] * (
            frac(w * 7.1) - 0.5
        )
        emit[:, lit] += strength * tint
    img += emit

    # Night sky: dark zenith, light pollution towards the horizon, clouds lit from below.
    rows = int(np.clip(np.floor(cam.cy + 0.5), 0, H))
    yc = np.arange(rows, dtype=np.float32) + 0.5
    above = (cam.cy - yc) / max(H, 1)
    glow_profile = 1.0 + (p.sky_glow - 1.0) * np.exp(-above / 0.15)
    sky_col = p.sky_level * (
        (1 - p.cast_warmth) * 0.6 * _CAST_COOL[:, None]
        + 0.5 * (0.4 + 0.6 * p.cast_warmth) * _CAST_SODIUM[:, None] * glow_profile[None, :]
    )  # (3, rows)
    # clouds keep visible structure at night (a day-trained model must still find the sky)
    cloud = np.clip(luminance(r.albedo[:, :rows]) / 0.5, 0.3, 2.5)
    np.copyto(
        img[:, :rows],
        (sky_col[:, :, None] * cloud).astype(np.float32),
        where=r.normal[:rows] == N_SKY,
    )

    # Glare around emitters.
    img += glare(emit, (0.012 * W, 0.06 * W), (p.halo, p.veil))
    clean = luminance(img).astype(np.float32)

    noise = sensor_noise(rng, img.shape)
    noise *= np.sqrt(
        np.float32(p.shot_noise) * np.maximum(img, 0.0) + np.float32(p.read_noise) ** 2
    )
    img += noise
    return encode_srgb(_blur3(img, p.blur / 4)), clean
