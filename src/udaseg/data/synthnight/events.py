"""Event-camera simulation for SynthNight night frames, and a DSEC-layout ``events.h5`` writer.

Model (ESIM-style, idealised DVS pixel)
---------------------------------------
The night frame's noise-free linear luminance ``I`` is seen over a window of ``T = 50 ms`` ending
at the frame, while the ego vehicle moves forward: ``K`` sub-frames at ``t_k = k T / (K - 1)``
are the frame zoomed out about the vanishing point ``c`` and shifted,

    L_k(x) = L(c + (x - c)(1 + ζ a_k) + δ a_k),   a_k = 1 - k / (K - 1),   L = log(I + ε),

so the last sub-frame is the frame itself (bilinear resampling of the log image; zoom ``ζ`` and
shake ``δ`` are drawn per frame). Each pixel keeps a reference level ``L_ref`` (initialised at
``t_0``) and fires whenever

    |L(t) - L_ref| ≥ C_p,

with polarity 1 for an increase and 0 for a decrease; ``L_ref`` then moves by ``±C_p``. Between
sub-frames ``L`` is linear in time, so a step that crosses ``n`` levels yields ``n`` events with
timestamps interpolated at the crossings (at most ``max_events_per_step`` of them, a refractory
limit; ``L_ref`` still moves by all ``n`` levels). ``C_p = C (1 + σ_C U)`` is a per-pixel
threshold (fixed-pattern mismatch, ``U`` uniform with unit variance). Background activity adds
Poisson(``r_noise H W``) events at uniform random pixels, times and polarities.

Defaults (:class:`EventSimConfig`): ``T = 50 ms``, ``K = 8``, ``C = 0.2``, ``σ_C = 0.1``,
``ζ ∈ [0.003, 0.012]``, ``δ ∈ [-0.004, 0.004] W`` per axis, ``ε = 0.003``, ``r_noise = 0.004``,
at most 3 events per pixel and sub-step. At 512 x 256 this gives about 70 k events per frame on
average, mostly on edges, window grids and foliage.

File layout (DSEC ``events/left/events.h5``)
--------------------------------------------
``events/x`` uint16, ``events/y`` uint16, ``events/t`` uint32 (µs relative to ``t_offset``),
``events/p`` uint8 (0/1), ``ms_to_idx`` uint64 (for millisecond k: index of the first event
with ``t >= 1000 k``), scalar ``t_offset`` int64. The file attribute ``frame_timestamp_us``
(absolute, µs) gives the time of the night frame: the end of the window. Real DSEC files
compress the event datasets with the Blosc filter of ``hdf5plugin``; SynthNight uses plain
gzip (+ shuffle), which h5py reads without plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np


@dataclass(frozen=True)
class EventSimConfig:
    """Parameters of the event simulation."""

    window_us: int = 50_000
    """Length of the event window before the frame (µs); 20 Hz frames as in DSEC."""
    n_steps: int = 8
    """Number K of rendered sub-frames over the window (the last is the frame)."""
    threshold: float = 0.2
    """Contrast threshold C on the log intensity."""
    threshold_jitter: float = 0.1
    """Relative per-pixel std σ_C of the threshold."""
    zoom: tuple[float, float] = (0.003, 0.012)
    """Range of the forward-motion zoom ζ over the window."""
    shift: tuple[float, float] = (-0.004, 0.004)
    """Range of the camera shake δ over the window, as a fraction of the image width."""
    noise_rate: float = 0.004
    """Background-activity events per pixel per window."""
    log_eps: float = 3e-3
    """Offset ε inside the logarithm (linear radiance units)."""
    max_events_per_step: int = 3
    """Events one pixel can emit per sub-step (refractory period / read-out bandwidth); the
    reference level still follows the full change."""


@dataclass(eq=False)
class EventStream:
    """Events sorted by time: x, y (pixels), t (µs from the window start), p (0/1)."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray

    def __len__(self) -> int:
        return len(self.t)


def _affine_sample(
    img: np.ndarray, cx: float, cy: float, scale: float, sx: float, sy: float
) -> np.ndarray:
    """Bilinear sample of ``img`` at (c + (x - c) scale + s), separable, with edge clamping."""
    H, W = img.shape

    def coords(n: int, c: float, s: float):
        p = np.clip(c + (np.arange(n, dtype=np.float32) + 0.5 - c) * scale + s - 0.5, 0, n - 1)
        i0 = np.floor(p).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, (p - i0).astype(np.float32)

    c0, c1, wc = coords(W, cx, sx)
    r0, r1, wr = coords(H, cy, sy)
    a = np.take(img, c0, axis=1)
    tmp = a + (np.take(img, c1, axis=1) - a) * wc
    b = np.take(tmp, r0, axis=0)
    return b + (np.take(tmp, r1, axis=0) - b) * wr[:, None]


def simulate_events(
    lum: np.ndarray,
    cx: float,
    cy: float,
    rng: np.random.Generator,
    cfg: EventSimConfig = EventSimConfig(),
) -> EventStream:
    """Events of the window ending at the frame with linear luminance ``lum`` (H, W)."""
    H, W = lum.shape
    K = cfg.n_steps
    zoom = rng.uniform(*cfg.zoom)
    shift = rng.uniform(*cfg.shift, size=2) * W
    # Fixed-pattern threshold mismatch (uniform, std threshold_jitter relative to C).
    u = rng.random(H * W, dtype=np.float32)
    C = np.float32(cfg.threshold) * (
        1.0 + np.float32(cfg.threshold_jitter * np.sqrt(3.0)) * (2.0 * u - 1.0)
    )
    C = np.maximum(C, np.float32(0.25 * cfg.threshold))
    times = np.linspace(0.0, cfg.window_us, K)
    log_lum = np.log(lum.astype(np.float32) + np.float32(cfg.log_eps))

    def log_frame(k: int) -> np.ndarray:
        # Sub-frames interpolate the log image (equivalent to ESIM's log-domain interpolation).
        a = 1.0 - k / (K - 1)
        f = (
            log_lum
            if a == 0
            else _affine_sample(log_lum, cx, cy, 1.0 + zoom * a, shift[0] * a, shift[1] * a)
        )
        return f.ravel()

    l_ref = log_frame(0)
    l_prev = l_ref.copy()
    xs, ts, ps = [], [], []
    for k in range(1, K):
        l_k = log_frame(k)
        d = l_k - l_ref
        idx = np.flatnonzero(np.abs(d) >= C)
        if idx.size:
            di, ci = d[idx], C[idx]
            n_full = np.floor(np.abs(di) / ci)
            nk = np.minimum(n_full, cfg.max_events_per_step).astype(np.int64)
            sgn = np.sign(di)
            rep = np.repeat(np.arange(idx.size), nk)
            j = np.arange(rep.size) - np.repeat(np.cumsum(nk) - nk, nk) + 1
            pix = idx[rep]
            start, den = l_prev[pix], l_k[pix] - l_prev[pix]
            level = l_ref[pix] + sgn[rep] * j * ci[rep]
            frac = np.clip((level - start) / np.where(den == 0, 1.0, den), 0.0, 1.0)
            xs.append(pix)
            ts.append(times[k - 1] + frac * (times[k] - times[k - 1]))
            ps.append(sgn[rep] > 0)
            l_ref[idx] += sgn * n_full * ci
        l_prev = l_k
    n_noise = int(rng.poisson(cfg.noise_rate * H * W))
    xs.append(rng.integers(0, H * W, n_noise))
    ts.append(rng.uniform(0, cfg.window_us, n_noise))
    ps.append(rng.random(n_noise) < 0.5)
    pix = np.concatenate(xs)
    t = np.minimum(np.floor(np.concatenate(ts)), cfg.window_us).astype(np.uint32)
    # Stable sort keeps the generation order of simultaneous events; uint16 keys sort by radix.
    order = np.argsort(t.astype(np.uint16) if cfg.window_us < 2**16 else t, kind="stable")
    y, x = np.divmod(pix[order].astype(np.int32), np.int32(W))
    return EventStream(
        x=x.astype(np.uint16),
        y=y.astype(np.uint16),
        t=t[order],
        p=np.concatenate(ps)[order].view(np.uint8),
    )


def ms_to_idx(t: np.ndarray, n_ms: int) -> np.ndarray:
    """DSEC's millisecond index: entry k is the index of the first event with ``t >= 1000 k``."""
    return np.searchsorted(t, np.arange(n_ms, dtype=np.int64) * 1000, side="left").astype(np.uint64)


def write_events_h5(
    path: str | Path, ev: EventStream, t_offset: int, frame_timestamp_us: int
) -> None:
    """Write ``ev`` in DSEC's events.h5 layout (gzip-compressed, deterministic bytes)."""
    n_ms = int(ev.t[-1]) // 1000 + 1 if len(ev) else 1
    n_ms = max(n_ms, int(frame_timestamp_us - t_offset) // 1000 + 1)
    with h5py.File(path, "w", track_order=False) as f:
        f.attrs["frame_timestamp_us"] = np.int64(frame_timestamp_us)
        g = f.create_group("events")
        for name in ("p", "t", "x", "y"):
            data = getattr(ev, name)
            opts = dict(
                compression="gzip",
                compression_opts=1,
                shuffle=True,
                chunks=(min(len(data), 1 << 17),),
            )
            opts = opts if len(data) else {}
            g.create_dataset(name, data=data, track_times=False, **opts)
        f.create_dataset("ms_to_idx", data=ms_to_idx(ev.t, n_ms), track_times=False)
        f.create_dataset("t_offset", data=np.int64(t_offset), track_times=False)


def read_events_h5(path: str | Path) -> dict[str, np.ndarray | int]:
    """Read a DSEC-layout events.h5: keys x, y, t, p, ms_to_idx (arrays) and t_offset (int)."""
    with h5py.File(path, "r") as f:
        out: dict[str, np.ndarray | int] = {k: f["events"][k][()] for k in ("x", "y", "t", "p")}
        out["ms_to_idx"] = f["ms_to_idx"][()]
        out["t_offset"] = int(f["t_offset"][()])
    return out
