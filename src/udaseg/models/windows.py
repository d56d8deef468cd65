"""Sliding-window geometry shared by HRDA (models) and sliding-window inference (eval).

mmseg semantics: ``h_grids = max(ceil((H - crop_h) / stride_h), 0) + 1``; windows are clipped to
the image and shifted back so each is ``min(crop, image)`` long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class Window(NamedTuple):
    """Half-open window ``images[..., y1:y2, x1:x2]``."""

    y1: int
    y2: int
    x1: int
    x2: int


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or (h, w), got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair  # type: ignore[return-value]


def slide_windows(
    height: int,
    width: int,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
) -> list[Window]:
    """The windows of mmseg's ``slide_inference`` for an ``height x width`` image.

    ``h_grids = max(ceil((H - crop_h) / stride_h), 0) + 1`` (same for w); window ``(i, j)`` starts
    at ``(i * stride_h, j * stride_w)``, is clipped to the image and then shifted back so that it
    is ``min(crop, image)`` long: ``y2 = min(y1 + crop_h, H)``, ``y1 = max(y2 - crop_h, 0)``.
    An image smaller than the crop (in a dimension) therefore gets a single window covering that
    whole dimension. Row-major order (all x for the first y, ...).
    """
    crop_h, crop_w = pair(crop_size, "crop_size")
    stride_h, stride_w = pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(
            f"stride {(stride_h, stride_w)} larger than crop_size {(crop_h, crop_w)} would leave "
            "pixels no window covers; use stride <= crop_size"
        )
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {(height, width)}")
    h_grids = max(math.ceil((height - crop_h) / stride_h), 0) + 1
    w_grids = max(math.ceil((width - crop_w) / stride_w), 0) + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * stride_h, j * stride_w
            y2, x2 = min(y1 + crop_h, height), min(x1 + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            windows.append(Window(y1, y2, x1, x2))
    return windows
