"""Day and night rendering of a SynthNight :class:`~udaseg.data.synthnight.scene.SceneRaster`.

All light is computed in linear radiance (1.0 = a white surface in full daylight) and encoded
with the sRGB OETF to 8 bits at the end. ``A`` is the linear albedo, ``s(n)`` a shading factor
per surface orientation, ``N`` standard normal noise per pixel and channel.

Day (source domain)
-------------------
    I_day = e * w ⊙ A * s_day(n),  hazed:  I <- I (1 - h) + e c_haze h,  h = 1 - exp(-Z / d_haze)
    out   = sRGB(I_day + σ_day U)

with exposure ``e ∈ [0.85, 1.1]``, a white-balance gain ``w`` within ±4 %, one facade side in
sun (0.9) and the other in shade (0.55-0.7), haze distance ``d_haze ∈ [250, 700]`` m and a faint
uniform noise ``U`` of std ``σ_day = 0.004``. Sky pixels keep their gradient-plus-cloud radiance.

Night (target domain)
---------------------
    I_amb   = g * (cast ⊙ A * s_night(n))^γ                      ambient moon / sky-glow light
    I_lamp  = A ⊙ c_lamp P Σ_l max(0, n·(L_l - X)) / |L_l - X|³   street lamps (cos / d² fall-off,
              lamps within 120 m, evaluated on every 2nd pixel)
    I_head  = A ⊙ c_head P_h exp(-(X/Z)²/σx² - ((Y - 0.7)/Z)²/σy²) / Z²   ego headlights
    I_emit  = lamp heads + lit windows + vehicle and traffic lights
    I_glare = a_halo B_small(I_emit) + a_veil B_wide(I_emit)   (B: twice-iterated box blurs of
              radius 1.2 % and 6 % of the width, computed at 1/4 resolution)
    I       = I_amb + I_lamp + I_head + I_emit + I_glare               (sky: sky-glow gradient)
    I_noisy = I + sqrt(k_shot I + σ_read²) N                          shot + read noise
              (N ≈ standard normal, see gaussian_noise)
    out     = sRGB(clip(k_b * I_noisy, 0, 1)),  k_b = [b/4, 1 - b/2, b/4] separable 3-tap blur

This is the brief's ``I_night = clip(gain * (cast ⊙ I_day_linear)^γ + lights + noise)`` with
the lights spelt out. The transform of the ambient term is monotone per channel, so edges and
per-class contrast survive; the domain gap comes from the darkness, the colour cast, the
spatially varying lamp pools, the glare around emitters, noise and blur. Defaults are in
:class:`NightStyle`; every field is a (low, high) range sampled uniformly per image into
:class:`NightParams`. ``render_night`` also returns the noise-free luminance ``Y(I)``, the input of
the event simulator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np

from .scene import N_FRONT, N_GROUND, N_LEFT, N_RIGHT, N_SKY, NORMALS, SceneRaster, frac, srgb_to_linear

_LUM = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
_LUT_SIZE = 16384


@functools.lru_cache(maxsize=1)
def _srgb_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, _LUT_SIZE, dtype=np.float64)
    y = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return np.round(y * 255.0).astype(np.uint8)


def encode_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear radiance -> 8-bit sRGB through a lookup table (clipped to [0, 1])."""
    idx = (np.clip(linear, 0.0, 1.0) * (_LUT_SIZE - 1) + 0.5).astype(np.int32)
    return _srgb_lut()[idx]


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _LUM


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

    exposure: tuple[float, float] = (0.10, 0.22)
    """Gain g of the ambient term (fraction of the day exposure)."""
    gamma: tuple[float, float] = (1.1, 1.4)
    """Exponent γ of the ambient term; > 1 darkens dark surfaces more than bright ones."""
    cast_warmth: tuple[float, float] = (0.0, 1.0)
    """Ambient colour cast: 0 = cool moonlight (0.55, 0.7, 1.0), 1 = sodium sky-glow (1.0, 0.62, 0.32)."""
    sky_level: tuple[float, float] = (0.003, 0.012)
    """Linear radiance of the zenith sky."""
    sky_glow: tuple[float, float] = (1.5, 5.0)
    """Light-pollution brightening of the sky at the horizon (factor)."""
    lamp_power: tuple[float, float] = (40.0, 140.0)
    """Street-lamp intensity P (irradiance P cosθ / d², d in metres)."""
    lamp_warmth: tuple[float, float] = (0.0, 1.0)
    """Lamp colour: 0 = white LED (0.95, 0.97, 1.0), 1 = sodium (1.0, 0.55, 0.18)."""
    lamp_head: tuple[float, float] = (3.0, 10.0)
    """Radiance of a lamp head."""
    headlights: tuple[float, float] = (8.0, 25.0)
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
        return NightParams(**{f.name: float(rng.uniform(*getattr(self, f.name))) for f in fields(self)})


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
    for _ in range(passes):
        a = _box(_box(a, r, 0), r, 1)
    return a


def _upsample4_axis(a: np.ndarray, axis: int) -> np.ndarray:
    """Linear x4 upsampling along ``axis`` (pixel-centre aligned, edges clamped)."""
    a = np.moveaxis(a, axis, 0)
    prev = np.concatenate([a[:1], a[:-1]])
    nxt = np.concatenate([a[1:], a[-1:]])
    parts = [a * np.float32(1 - w) + (prev if o < 0 else nxt) * np.float32(w)
             for o, w in ((-1, 0.375), (-1, 0.125), (1, 0.125), (1, 0.375))]  # fmt: skip
    out = np.stack(parts, axis=1).reshape((4 * a.shape[0],) + a.shape[1:])
    return np.moveaxis(out, 0, axis)


def glare(emission: np.ndarray, radii_px: tuple[float, ...], weights: tuple[float, ...]) -> np.ndarray:
    """Sum of box-blurred copies of an (H, W, 3) emission image, computed at 1/4 resolution."""
    H, W = emission.shape[:2]
    h, w = -(-H // 4), -(-W // 4)
    pad = np.pad(emission, ((0, 4 * h - H), (0, 4 * w - W), (0, 0)), mode="edge")
    small = sum(pad[i::4, j::4] for i in range(4) for j in range(4)) * np.float32(1 / 16)
    out = sum(np.float32(wt) * _blur(small, max(1, int(round(r / 4)))) for r, wt in zip(radii_px, weights))
    return _upsample4_axis(_upsample4_axis(out, 0), 1)[:H, :W]


def _blur3(a: np.ndarray, c: float) -> np.ndarray:
    """Separable 3-tap blur [c, 1 - 2c, c] along both image axes, edges clamped."""
    for axis in (0, 1):
        a = np.moveaxis(a, axis, 0)
        out = a * np.float32(1 - 2 * c)
        out[1:] += np.float32(c) * a[:-1]
        out[:-1] += np.float32(c) * a[1:]
        out[0] += np.float32(c) * a[0]
        out[-1] += np.float32(c) * a[-1]
        a = np.moveaxis(out, 0, axis)
    return a


def _irradiance(r: SceneRaster, p: NightParams, step: int = 2) -> np.ndarray:
    """Street-lamp and headlight irradiance (H, W, 3), evaluated on every ``step``-th pixel.

    Lamps: P c_lamp max(0, n·(L - X)) / |L - X|³ (billboards: wrapped diffuse (cos + 0.5) / 1.5);
    headlights: a forward beam from (0, 0.7 m, 0). Nearest-neighbour upsampled to full size.
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
        cos = (nx * dx + ny * dy + nz * dz) / np.sqrt(d2)
        cos = np.where(front, (cos + np.float32(0.5)) * np.float32(1 / 1.5), cos)
        irr += np.maximum(cos, 0.0) / d2
    lamp_rgb = (1 - p.lamp_warmth) * _LAMP_LED + p.lamp_warmth * _LAMP_SODIUM
    zs = np.maximum(Z, np.float32(0.5))
    beam = np.exp(-((X / zs) ** 2) * np.float32(1 / 0.12) - ((Y - np.float32(0.7)) / zs) ** 2 * np.float32(100)) / (zs * zs)
    light = irr[..., None] * (np.float32(p.lamp_power) * lamp_rgb) + (beam * np.float32(p.headlights))[..., None] * _HEAD
    light[normal == N_SKY] = 0.0
    return np.repeat(np.repeat(light, step, axis=0), step, axis=1)[:H, :W]


# ----------------------------------------------------------------------------- day


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Approximately standard normal float32 noise: the Irwin-Hall sum of four uniform bytes.

    Twice as fast as ``rng.standard_normal`` and indistinguishable from it for sensor noise
    (tails are cut at ±3.45σ).
    """
    n = int(np.prod(shape))
    b = np.frombuffer(rng.bytes(4 * n), np.uint8).reshape(4, n)
    s = b[0].astype(np.float32)
    s += b[1]
    s += b[2]
    s += b[3]
    s -= np.float32(510.0)
    s *= np.float32(1 / 147.80)  # std of the sum of four bytes: sqrt(4 (256² - 1) / 12)
    return s.reshape(shape)


def render_day(r: SceneRaster, rng: np.random.Generator, style: DayStyle = DayStyle()) -> np.ndarray:
    """Day image (H, W, 3) uint8 of a scene raster."""
    e = rng.uniform(*style.exposure)
    wb = 1.0 + rng.uniform(*style.white_balance, size=3)
    shade_side = rng.uniform(*style.shade_side)
    d_haze = rng.uniform(*style.haze_distance)
    shade = np.ones(5, dtype=np.float32)
    shade[N_FRONT] = 0.8
    sunny_left = rng.random() < 0.5
    shade[N_LEFT], shade[N_RIGHT] = (0.9, shade_side) if sunny_left else (shade_side, 0.9)
    gain = (e * wb).astype(np.float32)
    img = r.albedo * (shade[:, None] * gain)[r.normal]
    h = -np.expm1(r.depth * np.float32(-1 / d_haze))  # 1 - exp(-Z / d_haze); sky (Z = inf) -> 1
    h[r.normal == N_SKY] = 0.0
    haze = srgb_to_linear([0.78, 0.81, 0.86]) * gain
    img += (haze - img) * h[..., None]
    # Slight sensor noise: uniform, std σ_day (one random byte per value).
    img += (np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape) - np.float32(127.5)) * np.float32(
        style.noise * np.sqrt(12.0) / 256.0
    )
    return encode_srgb(img)


# ----------------------------------------------------------------------------- night

_CAST_COOL = np.array([0.55, 0.7, 1.0], dtype=np.float32)
_CAST_SODIUM = np.array([1.0, 0.62, 0.32], dtype=np.float32)
_LAMP_LED = np.array([0.95, 0.97, 1.0], dtype=np.float32)
_LAMP_SODIUM = np.array([1.0, 0.55, 0.18], dtype=np.float32)
_WINDOW = np.array([1.0, 0.72, 0.4], dtype=np.float32)
_HEAD = np.array([1.0, 0.97, 0.9], dtype=np.float32)


def render_night(r: SceneRaster, rng: np.random.Generator, p: NightParams) -> tuple[np.ndarray, np.ndarray]:
    """Night image (H, W, 3) uint8 and its noise-free linear luminance (H, W) float32."""
    H, W = r.label.shape
    cam = r.camera
    sky = r.normal == N_SKY

    # Ambient term g (cast ⊙ A s)^γ, plus lamp and headlight light reflected by the albedo.
    shade = np.full(5, 0.75, dtype=np.float32)
    shade[N_GROUND] = 1.0
    cast = ((1 - p.cast_warmth) * _CAST_COOL + p.cast_warmth * _CAST_SODIUM).astype(np.float32)
    img = np.float32(p.exposure) * np.power(r.albedo * shade[r.normal][..., None] * cast, np.float32(p.gamma))
    img += r.albedo * _irradiance(r, p)

    # Emitters: lamp heads, lit windows, vehicle and traffic lights.
    lamp_rgb = (1 - p.lamp_warmth) * _LAMP_LED + p.lamp_warmth * _LAMP_SODIUM
    emit = r.emission * np.float32(p.vehicle_lights)
    emit[r.lamp_head] = lamp_rgb * np.float32(p.lamp_head)
    lit = (r.window >= 0) & (r.window < p.window_lit)
    if lit.any():
        w = r.window[lit]
        strength = p.window_radiance * (0.5 + frac(w * 13.37))
        tint = _WINDOW + (frac(w * 7.1) - 0.5)[:, None] * np.array([0.0, 0.2, 0.5], dtype=np.float32)
        emit[lit] += strength[:, None] * tint
    img += emit

    # Night sky: dark zenith, light pollution towards the horizon, clouds lit from below.
    rows = int(np.clip(np.floor(cam.cy + 0.5), 0, H))
    yc = np.arange(rows, dtype=np.float32) + 0.5
    above = (cam.cy - yc) / max(H, 1)
    glow_profile = 1.0 + (p.sky_glow - 1.0) * np.exp(-above / 0.15)
    sky_col = p.sky_level * (
        (1 - p.cast_warmth) * 0.6 * _CAST_COOL
        + 0.5 * (0.4 + 0.6 * p.cast_warmth) * _CAST_SODIUM * glow_profile[:, None]
    )  # (rows, 3)
    cloud = np.clip(luminance(r.albedo[:rows]) / 0.6, 0.5, 2.0)
    top = img[:rows]
    np.copyto(top, (sky_col[:, None, :] * cloud[..., None]).astype(np.float32), where=sky[:rows, :, None])

    # Glare around emitters.
    img += glare(emit, (0.012 * W, 0.06 * W), (p.halo, p.veil))
    clean = luminance(img).astype(np.float32)

    noise = gaussian_noise(rng, img.shape)
    img += np.sqrt(np.float32(p.shot_noise) * np.maximum(img, 0.0) + np.float32(p.read_noise) ** 2) * noise
    img = _blur3(img, p.blur / 4)
    return encode_srgb(img), clean
