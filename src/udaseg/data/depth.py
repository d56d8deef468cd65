"""The ``depth`` view: 8-bit Depth-Anything-style maps in the ``depth_any/`` layout, and CDDA's
load-time transform.

Layout (CDDA's README, ``cdda_spec.md`` 2.1; the depth file has the image's base name)::

    gta:         <root>/depth_any/<nnnnn>.png
    synthia:     <root>/depth_any/<nnnnnnn>.png
    cityscapes:  <root>/depth_any/<split>/<city>/<city>_<seq>_<frame>_depth.png
    dark_zurich: <root>/depth_any/<split>/night/<rec>/<name>_depth.png

The files are single-channel 8-bit PNGs, values 0..255, larger = nearer (Depth Anything V2's
``run.py --grayscale --pred-only`` output: the relative disparity min-max normalised per image);
a 3-channel grey PNG is collapsed to grey. ``udaseg depth`` writes them.

Load-time transform ``depth_transform="cdda"`` (spec 2.2), applied to the raw value d::

    d' = floor(255 * exp(-6 d / 256))          stored as uint8, then float32

so far/sky pixels (d = 0) land in bin 255 and the nearest (d = 255) in bin 0; d = 0, 10, 25, 50,
100, 150, 200, 255 map to 255, 201, 141, 78, 24, 7, 2, 0. The view is then resized bilinearly
with the image (no rounding: CDDA truncates the float to its bin), cropped and flipped with it.
``depth_transform="none"`` keeps the raw map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError

DEPTH_DIR = "depth_any"
DEPTH_TRANSFORMS = ("cdda", "none")

DEPTH_FIX = (
    "Regenerate it as an 8-bit grey PNG (values 0..255, larger = nearer), e.g. with `udaseg depth` "
    "or Depth Anything's --grayscale output; rescale 16-bit, 32-bit or float maps to 0..255 first."
)


def cdda_depth_transform(depth: np.ndarray) -> np.ndarray:
    """CDDA's d' = floor(255 exp(-6 d / 256)) of a uint8 map, as uint8 (same shape)."""
    d = np.asarray(depth).astype(np.float64)
    return np.floor(255.0 * np.exp(-6.0 * d / 256.0)).astype(np.uint8)


def check_depth_transform(name: str) -> str:
    if name not in DEPTH_TRANSFORMS:
        raise ConfigError(f"depth_transform: {name!r}; choose from {DEPTH_TRANSFORMS}")
    return name


def read_depth_view(path: str | Path, transform: str = "cdda") -> np.ndarray:
    """Read a ``depth_any`` map as (H, W, 1) uint8, with the load-time ``transform``.

    16-bit, 32-bit and float maps are an error (converting them to 8 bits would clip)."""
    from .io import read_grey

    arr = read_grey(path, "depth map", modes=("L", "RGB"), fix=DEPTH_FIX)
    if transform == "cdda":
        arr = cdda_depth_transform(arr)
    return arr


def add_flat_depth_views(name: str, root: Path, records: list, views, transform_name: str) -> list:
    """GTA/SYNTHIA: records with the ``"depth"`` view ``<root>/depth_any/<image name>`` added
    when asked for; unknown views and missing depth files are reported (one error)."""
    import dataclasses

    from .datasets.base import report_missing

    views = tuple(views or ())
    unknown = [v for v in views if v != "depth"]
    if unknown:
        raise ConfigError(f"{name}: unknown views {unknown}; choose from ('depth',)")
    check_depth_transform(transform_name)
    if "depth" not in views:
        return records
    out, missing = [], []
    for rec in records:
        path = Path(root) / DEPTH_DIR / rec.image.name
        if not path.is_file():
            missing.append(f"{rec.image} -> {path}")
        out.append(dataclasses.replace(rec, views={**rec.views, "depth": path}))
    report_missing(
        missing, f"{name} images have no depth map",
        f"Write them with `udaseg depth {name} {root}` (or put CDDA's depth_any download into "
        f"{Path(root) / DEPTH_DIR}), or drop the `depth` view.",
    )
    return out
