"""DSEC event streams: lazy ``events.h5`` reader, rectification, voxel grid and CMDA normalisation.

File layout (DSEC ``events/left/events.h5``)
--------------------------------------------
``events/x``, ``events/y`` (distorted sensor pixels), ``events/t`` (µs relative to ``t_offset``),
``events/p`` (0/1), ``ms_to_idx`` (entry ``k`` is the index of the first event with
``t >= 1000 k``) and the scalar ``t_offset`` (µs). Real DSEC files compress the event datasets
with the Blosc filter of ``hdf5plugin`` (imported before the file is opened); SynthNight files
(:mod:`udaseg.data.synthnight.events`) use gzip and read the same way.
``events/left/rectify_map.h5`` holds ``rectify_map`` (H, W, 2): for a distorted pixel ``(y, x)``
the rectified float position ``(x_r, y_r)``.

Event tensor (spec section 2.4)
-------------------------------
For the events ``e_k = (x_k, y_k, t_k, p_k)``, ``k = 1..n``, of a window (rectified positions):

1. time normalisation: ``τ_k = (t_k - t_1) / (t_n - t_1)`` (0 when ``t_n = t_1``), scaled to the
   bin axis ``τ_k (B - 1)``;
2. trilinear splatting of the value ``v_k = 2 p_k - 1`` into the voxel grid ``V`` (B, H, W):

   ``V[b, i, j] = Σ_k v_k · max(0, 1 - |j - x_k|) · max(0, 1 - |i - y_k|) · max(0, 1 - |b - τ_k (B-1)|)``

   i.e. bilinear in (x, y) and linear in t; with ``B = 1`` all time weight goes to the one bin.
   Each of the (up to eight) corners outside the grid is dropped on its own;
3. normalisation over the non-zero cells ``Ω = {V ≠ 0}`` (zero cells stay 0):

   ``Z = (V - μ_Ω) / σ_Ω`` on Ω,  ``c = n · 1.5 / 500000`` (adaptive clip),

   ``P = clamp(Z, 0, c) / max clamp(Z, 0, c)``,  ``N = clamp(Z, -c, 0) / |min clamp(Z, -c, 0)|``,

   ``E = P + N ∈ [-1, 1]``;
4. the single channel is replicated to 3 (an ImageNet backbone with ``in_chans = 3``).

Choices where the spec leaves room (documented at :func:`normalize_events`): σ is the
Bessel-corrected standard deviation (``torch.std``'s default, as the DSEC voxel-grid code that
CMDA builds on uses), with ``σ = 0`` (or a single non-zero cell) only the mean is subtracted;
an all-zero part (no positive or no negative values) is left at 0 instead of dividing by 0;
``n`` counts every event of the window, including those that fall outside the frame.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from typing_extensions import Self

EVENT_FIELDS: tuple[str, ...] = ("x", "y", "t", "p")
"""The per-event datasets under the ``events`` group."""

CLIP_SCALE: float = 1.5 / 500_000
"""CMDA's adaptive clip: ``c = n_events * CLIP_SCALE``."""

DSEC_FIX = (
    "Download the sequence's events archive from DSEC (zurich_city_09_x_events_left.zip) and "
    "extract it to <root>/<sequence>/events/left/."
)


def _import_plugins() -> bool:
    """Register the HDF5 compression filters of ``hdf5plugin`` (Blosc, zstd, ...)."""
    try:
        import hdf5plugin  # noqa: F401  (importing registers the filters with HDF5)
    except ImportError:  # pragma: no cover - hdf5plugin is a dependency
        return False
    return True


def _read_error(path: Path, what: str, exc: Exception) -> DataError:
    plugin = "" if _import_plugins() else " (hdf5plugin is not installed: `pip install hdf5plugin`)"
    return DataError(
        f"cannot read {what} of {path}: {exc}{plugin}. The file is truncated or uses an HDF5 "
        f"filter that is not available. {DSEC_FIX}"
    )


@dataclass(eq=False)
class EventArrays:
    """Events of one window: x, y (pixels), t (µs relative to ``t_offset``, int64), p (0/1)."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray

    def __len__(self) -> int:
        return len(self.t)


class EventFile:
    """A DSEC ``events.h5``, opened lazily (and again in each DataLoader worker process).

    The layout is checked when the object is created, so a file without ``events/t`` or
    ``ms_to_idx`` fails at dataset construction with a :class:`DataError` naming the file and the
    missing entries. ``ms_to_idx`` and ``t_offset`` are read once; the event datasets are read per
    window.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._h5: Any = None
        self._pid: int | None = None
        if not self.path.is_file():
            raise FileNotFoundError(f"events file not found: {self.path}. {DSEC_FIX}")
        f = self._file()
        missing = [f"events/{k}" for k in EVENT_FIELDS if f"events/{k}" not in f]
        missing += [k for k in ("ms_to_idx", "t_offset") if k not in f]
        if missing:
            self.close()
            raise DataError(
                f"events file {self.path} lacks {', '.join(missing)}; a DSEC events.h5 holds "
                "events/{x,y,t,p}, ms_to_idx and t_offset. " + DSEC_FIX
            )
        sizes = {k: f["events"][k].shape for k in EVENT_FIELDS}
        if len({s for s in sizes.values()}) != 1 or len(sizes["t"]) != 1:
            self.close()
            raise DataError(
                f"events file {self.path}: events/x, y, t, p must be 1-D of equal length, got "
                f"{sizes}. {DSEC_FIX}"
            )
        try:
            self.t_offset = int(f["t_offset"][()])
            self.ms_to_idx = np.asarray(f["ms_to_idx"][()], dtype=np.int64)
        except (OSError, ValueError) as exc:
            self.close()
            raise _read_error(self.path, "t_offset/ms_to_idx", exc) from None
        self.num_events = int(sizes["t"][0])

    # -- file handle --------------------------------------------------------------------------

    def _file(self) -> Any:
        """The open h5py file; reopened after a fork (h5py handles must not cross processes)."""
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            _import_plugins()
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataError(
                    f"cannot open events file {self.path}: {exc}. The file is damaged or not "
                    f"HDF5. {DSEC_FIX}"
                ) from None
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        """Close the file handle (it is reopened on the next read)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._pid = None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"], state["_pid"] = None, None
        return state

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_events

    def __repr__(self) -> str:
        return f"EventFile({str(self.path)!r}, num_events={self.num_events})"

    # -- reading ------------------------------------------------------------------------------

    @property
    def t_dataset(self) -> Any:
        """The ``events/t`` dataset itself (sliceable without reading it all)."""
        return self._file()["events"]["t"]

    def read_t(self, i0: int, i1: int) -> np.ndarray:
        """Timestamps of events ``i0 .. i1 - 1`` as int64 (µs relative to ``t_offset``)."""
        i0, i1 = max(int(i0), 0), min(int(i1), self.num_events)
        if i1 <= i0:
            return np.zeros(0, dtype=np.int64)
        try:
            return np.asarray(self.t_dataset[i0:i1], dtype=np.int64)
        except (OSError, ValueError) as exc:
            raise _read_error(self.path, "events/t", exc) from None

    def slice_index(self, i0: int, i1: int) -> EventArrays:
        """Events with index in ``[i0, i1)`` (clipped to the file)."""
        i0, i1 = max(int(i0), 0), min(int(i1), self.num_events)
        i1 = max(i1, i0)
        g = self._file()["events"]
        try:
            return EventArrays(
                x=np.asarray(g["x"][i0:i1]),
                y=np.asarray(g["y"][i0:i1]),
                t=np.asarray(g["t"][i0:i1], dtype=np.int64),
                p=np.asarray(g["p"][i0:i1]),
            )
        except (OSError, ValueError) as exc:
            raise _read_error(self.path, "events", exc) from None

    def index_range(self, t0_us: float, t1_us: float) -> tuple[int, int]:
        """``[i0, i1)`` of the events with ``t0_us <= t < t1_us`` (times relative to ``t_offset``).

        ``ms_to_idx`` bounds the search to whole milliseconds, then a binary search on ``t``
        inside that block finds the exact ends.
        """
        n, n_ms = self.num_events, len(self.ms_to_idx)

        def block_start(ms: int) -> int:
            if ms <= 0:
                return 0
            return n if ms >= n_ms else int(self.ms_to_idx[ms])

        if t1_us <= t0_us or n == 0:
            i = block_start(math.floor(t0_us / 1000))
            return i, i
        lo = block_start(math.floor(t0_us / 1000))
        hi = block_start(math.ceil(t1_us / 1000))
        t = self.read_t(lo, hi)
        i0 = lo + int(np.searchsorted(t, t0_us, side="left"))
        i1 = lo + int(np.searchsorted(t, t1_us, side="left"))
        return i0, i1

    def slice_time(self, t0_us: float, t1_us: float) -> EventArrays:
        """Events with ``t0_us <= t < t1_us`` (µs relative to ``t_offset``)."""
        return self.slice_index(*self.index_range(t0_us, t1_us))


# -- rectification ------------------------------------------------------------------------------


def read_rectify_map(path: str | Path) -> np.ndarray:
    """Read DSEC's ``rectify_map.h5`` as a float32 (H, W, 2) array of rectified (x, y)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rectify map not found: {path}. {DSEC_FIX}")
    _import_plugins()
    try:
        with h5py.File(path, "r") as f:
            if "rectify_map" not in f:
                raise DataError(
                    f"rectify map {path} lacks the dataset 'rectify_map' (H x W x 2). {DSEC_FIX}"
                )
            rmap = np.asarray(f["rectify_map"][()], dtype=np.float32)
    except OSError as exc:
        raise _read_error(path, "rectify_map", exc) from None
    if rmap.ndim != 3 or rmap.shape[2] != 2:
        raise DataError(
            f"rectify map {path} has shape {rmap.shape}; expected (H, W, 2) (480 x 640 x 2 for "
            f"DSEC). {DSEC_FIX}"
        )
    return rmap


def rectify(x: np.ndarray, y: np.ndarray, rmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rectified float positions of distorted integer pixels: ``rmap[y, x]`` -> (x_r, y_r)."""
    x = np.asarray(x, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    h, w = rmap.shape[:2]
    if x.size and (x.min() < 0 or y.min() < 0 or x.max() >= w or y.max() >= h):
        raise DataError(
            f"event coordinates reach x={x.max()}, y={y.max()} (min {x.min()}, {y.min()}) but the "
            f"rectify map covers a {w}x{h} sensor; the events and the map belong to different "
            "cameras or sequences."
        )
    xy = rmap[y, x]
    return xy[:, 0], xy[:, 1]


# -- voxel grid -------------------------------------------------------------------------------


def events_to_voxel(
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    height: int,
    width: int,
    bins: int = 1,
) -> np.ndarray:
    """Voxel grid (bins, height, width) float32 of the events, by trilinear splatting.

    Each event adds ``2p - 1`` split bilinearly over the four pixels around its (float) position
    and linearly over the two bins around its normalised time ``τ (bins - 1)``, ``τ ∈ [0, 1]``
    within the window (with ``bins = 1`` all weight goes to the one bin). Corners outside the
    grid are dropped. Accumulation is in float64 (``np.bincount``), so the result does not
    depend on the event order.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    shape = (bins, height, width)
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return np.zeros(shape, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    value = 2.0 * np.asarray(p, dtype=np.float64) - 1.0
    span = t.max() - t.min()
    tau = (t - t.min()) / span if span > 0 else np.zeros_like(t)
    tb = tau * (bins - 1)

    x0, y0, b0 = np.floor(x), np.floor(y), np.floor(tb)
    fx, fy, fb = x - x0, y - y0, tb - b0
    x0, y0, b0 = x0.astype(np.int64), y0.astype(np.int64), b0.astype(np.int64)
    idx_parts, w_parts = [], []
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
        for dy, wy in ((0, 1.0 - fy), (1, fy)):
            for db, wb in ((0, 1.0 - fb), (1, fb)) if bins > 1 else ((0, np.ones_like(fb)),):
                xi, yi, bi = x0 + dx, y0 + dy, b0 + db
                w = value * wx * wy * wb
                ok = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height) & (bi >= 0) & (bi < bins)
                ok &= w != 0
                idx_parts.append((bi[ok] * height + yi[ok]) * width + xi[ok])
                w_parts.append(w[ok])
    grid = np.bincount(
        np.concatenate(idx_parts), weights=np.concatenate(w_parts), minlength=bins * height * width
    )
    return grid.reshape(shape).astype(np.float32)


def normalize_events(
    voxel: np.ndarray, n_events: int, clip_scale: float = CLIP_SCALE, clip: float | None = None
) -> np.ndarray:
    """CMDA's event normalisation (spec 2.4 step 4); output in [-1, 1], 0 where ``voxel`` is 0.

    1. over the non-zero cells only: subtract their mean and divide by their standard deviation
       (Bessel-corrected, ``ddof = 1``, as ``torch.std``; with fewer than two non-zero cells or
       ``σ = 0`` only the mean is subtracted); zero cells stay 0;
    2. clip range ``c = n_events * clip_scale`` (adaptive, ``1.5 / 500000`` per event), or the
       fixed ``clip`` when given;
    3. positive part clamped to [0, c] and divided by its maximum; negative part clamped to
       [-c, 0] and divided by the magnitude of its minimum (a part without values stays 0);
    4. the sum of both parts.

    The statistics are taken over the whole array (all bins together).
    """
    v = np.asarray(voxel, dtype=np.float64)
    c = float(clip) if clip is not None else float(n_events) * clip_scale
    out = np.zeros(v.shape, dtype=np.float64)
    mask = v != 0
    if c <= 0 or not mask.any():
        return out.astype(np.float32)
    vals = v[mask]
    vals = vals - vals.mean()
    std = vals.std(ddof=1) if vals.size > 1 else 0.0
    if std > 0:
        vals = vals / std
    pos = np.clip(vals, 0.0, c)
    neg = np.clip(vals, -c, 0.0)
    if pos.max() > 0:
        pos = pos / pos.max()
    if neg.min() < 0:
        neg = neg / -neg.min()
    out[mask] = pos + neg
    return out.astype(np.float32)


def event_tensor(
    events: EventFile | EventArrays,
    start: int | None = None,
    stop: int | None = None,
    *,
    rectify_map: np.ndarray | None = None,
    height: int | None = None,
    width: int | None = None,
    bins: int = 1,
    channels: int | None = 3,
    clip_scale: float = CLIP_SCALE,
    clip: float | None = None,
) -> np.ndarray:
    """Window -> rectify -> voxel grid -> normalise, as an (H, W, C) float32 array.

    Args:
        events: an :class:`EventFile` (then ``[start, stop)`` selects the events by index) or the
            already-sliced :class:`EventArrays` of the window.
        rectify_map: DSEC's (H, W, 2) map; None uses the sensor positions as they are.
        height, width: voxel grid size; default: the rectify map's size.
        bins: time bins B (CMDA: 1).
        channels: with ``bins = 1``, replicate the single channel this many times (3 for an
            ImageNet backbone); with ``bins > 1`` the output has B channels and ``channels`` must
            be None or B.
        clip_scale, clip: see :func:`normalize_events`.
    """
    if isinstance(events, EventFile):
        if start is None or stop is None:
            raise ValueError("event_tensor(EventFile, start, stop): give the index window")
        ev = events.slice_index(start, stop)
    else:
        ev = events
    if height is None or width is None:
        if rectify_map is None:
            raise ValueError("event_tensor: give height and width, or a rectify map")
        height, width = rectify_map.shape[:2]
    if bins > 1 and channels not in (None, bins):
        raise ValueError(f"channels={channels} cannot be used with bins={bins} (> 1)")
    if rectify_map is not None:
        x, y = rectify(ev.x, ev.y, rectify_map)
    else:
        x, y = ev.x, ev.y
    voxel = events_to_voxel(x, y, ev.t, ev.p, height, width, bins)
    voxel = normalize_events(voxel, len(ev), clip_scale=clip_scale, clip=clip)
    out = np.moveaxis(voxel, 0, -1)
    if bins == 1 and channels is not None and channels != 1:
        out = np.repeat(out, channels, axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)
