"""CMDA's two image-only pseudo-event extractors, batched torch on any device.

* **Image Content-Extractor** (image self-residual, ISR; spec 2.6,
  ``XiaRho/CMDA:mmseg/datasets/utils.py`` ``get_image_change_from_pil`` / ``get_ic``): the signed,
  thresholded log-difference of a greyscale image and a copy of itself shifted by ``s`` pixels
  (once along rows, once along columns), averaged: an edge map in [-1, 1] that the events encoder
  reads in place of (or besides) real events.
* **Image Motion-Extractor, first half** (IC, spec 2.5,
  ``XiaRho/CMDA:create_cityscapes_image_change.py``): the same signed normalisation applied to
  the temporal log-difference of two consecutive Cityscapes frames; CMDA distributes the result
  as ``leftImg8bit_IC1`` 8-bit PNGs (:func:`encode_ic_png` / :func:`decode_ic_png`). The second
  half, the frozen CycleGAN generator that turns IC images into event-like images, is
  :mod:`udaseg.models.cyclegan`.

Both reproduce the release's CPU computation (PIL greyscale, float32 NumPy logs, torch
thresholding/min-max) value for value; ``tests/data/test_isr.py`` checks this against a NumPy/PIL
re-statement of the release on random images for every parameter set and direction. On an H200
(torch 2.11) the CUDA results were identical to the release's too (all presets and directions,
2x512^2), and a mixed-image ISR of a 2x512^2 batch took 1.8 ms against 18.5 ms for the release's
GPU -> PIL/NumPy -> GPU path.

Input convention
----------------
``images`` are RGB, (B, 3, H, W), with **integer values 0..255** (uint8, or any integer or float
dtype holding whole numbers): the values PIL would see. Greyscale is PIL's ``convert("L")`` for
Pillow >= 7 (``(19595 R + 38470 G + 7471 B + 32768) >> 16``, i.e. ITU-R 601 0.299/0.587/0.114
weights in 16-bit fixed point, rounded half up; Pillow < 7 truncated instead). This differs from
``round(0.299 R + 0.587 G + 0.114 B)`` by one grey level on 0.05 % of RGB triples, which changes
the log-difference, so it is done exactly. Grey levels go through a 256-entry float32 log table
computed with NumPy exactly as the release computes the logs, so the log values are bit-identical
to the release's on every device; everything after it is elementwise IEEE float32 in the
release's operation order.

The **mixed image** of a DACS step is normalised and augmented (ClassMix, colour jitter, blur);
the release recomputes its ISR from it (``mixed_image_to_mixed_isr``) by un-normalising with the
mmseg ImageNet mean/std (0-255 scale), dividing by 255, clamping to [0, 1], multiplying by 255 and
casting with ``np.uint8``, which **truncates** (does not round). :func:`release_uint8` does exactly
that; feed its output here. (``udaseg.data.transforms.denormalize`` rounds, and would shift about
half the pixels by one grey level.)

Release quirks kept on purpose (the released checkpoints were trained on them)
-----------------------------------------------------------------------------
* Min-max scaling divides by ``max - min + 1e-8``, per image and per sign: values are at most 1
  (not exactly 1), and unchanged pixels get ``-6e-8`` rather than 0 once any negative change
  exists.
* If a difference has **no negative values at all** (a constant image, or two identical frames),
  the negative part is all zeros, its min-max scaling maps 0 to -1, and the whole output becomes
  -1 (ISR of a constant image = -1; IC of identical frames = -1, stored as PNG value 0). Pass
  ``empty_as_zero=True`` for the corrected behaviour (an empty part stays 0).
* With no zero pixels in a part (every pixel changed in that sign) its minimum is not 0 and the
  smallest change maps to 0; kept as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DIRECTIONS",
    "ISR_PRESETS",
    "ISRParams",
    "crop_isr_direction",
    "decode_ic_png",
    "encode_ic_png",
    "image_change",
    "image_self_residual",
    "mixed_isr_direction",
    "pil_grey",
    "release_uint8",
    "shift_copy",
    "signed_minmax",
]

DIRECTIONS = ("leftup", "leftdown", "rightup", "rightdown", "all")
"""Shift directions of the release: a row shift (left/right) and a column shift (up/down) averaged,
or ``"all"``: the four shifts averaged."""


@dataclass(frozen=True)
class ISRParams:
    """One parameter set of the image self-residual (spec 2.6 table).

    Attributes:
        val_range: (a, b): grey level v maps to log(v / 255 * (b - a) + a); a > 0.
        threshold: |D| <= threshold * (log b - log a) is set to 0.
        clip: each sign is clipped at clip * (log b - log a) before its min-max scaling.
        shift: shift in pixels.
    """

    val_range: tuple[float, float]
    threshold: float
    clip: float
    shift: int

    def __post_init__(self):
        a, b = self.val_range
        if not (a > 0 and b > a):
            raise ValueError(f"ISRParams.val_range must satisfy 0 < a < b, got {self.val_range}")
        if self.shift < 1:
            raise ValueError(f"ISRParams.shift must be >= 1 pixel, got {self.shift}")
        if self.threshold < 0 or self.clip <= 0:
            raise ValueError(
                f"ISRParams needs threshold >= 0 and clip > 0, got {self.threshold}, {self.clip}"
            )


ISR_PRESETS: dict[str, ISRParams] = {
    # Cityscapes source ISR, CMDA's default "day" set (DSEC and Dark Zurich configs alike).
    "cityscapes": ISRParams(val_range=(1.0, 10.0), threshold=0.03, clip=0.2, shift=3),
    # DSEC target ISR (on the cropped/flipped/resized 512x512 warp image) and the DSEC mixed ISR
    # (UDA ``isr_parms``).
    "dsec": ISRParams(val_range=(0.01, 1.01), threshold=0.005, clip=0.1, shift=1),
    # Dark Zurich target ISR (on the 960x540 frame, before the crop) and the Dark Zurich mixed ISR.
    "darkzurich": ISRParams(val_range=(1.0, 100.0), threshold=0.01, clip=0.1, shift=3),
}
"""The parameter sets CMDA uses (spec 2.6); directions are chosen per use, see the spec table."""


# --------------------------------------------------------------------------- greyscale, shifts


def pil_grey(images: Tensor) -> Tensor:
    """PIL's ``Image.convert("L")`` of RGB (B, 3, H, W) 0..255 -> (B, H, W) int32 0..255.

    Pillow >= 7 (python-pillow/Pillow#4320): ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.is_floating_point():
        if not bool(((images >= 0) & (images <= 255) & (images == images.round())).all()):
            raise ValueError(
                "images must hold whole grey levels 0..255 (uint8 RGB as PIL sees it); for a "
                "normalised image use release_uint8(image, mean, std) first"
            )
    elif images.dtype != torch.uint8 and bool(((images < 0) | (images > 255)).any()):
        raise ValueError("images must hold values 0..255")
    x = images.to(torch.int32)
    return (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16


def shift_copy(grey: Tensor, shift: int, direction: str) -> Tensor:
    """The release's shifted copy of (..., H, W) ``grey``, padded by repeating border pixels.

    ``right``: the first ``shift`` columns, then columns 0..W-shift-1 (content moves right);
    ``left``: columns shift..W-1, then the last ``shift`` columns; ``down`` / ``up`` likewise on
    rows.
    """
    h, w = grey.shape[-2:]
    s = shift
    size = w if direction in ("left", "right") else h
    if not 0 < s < size:
        raise ValueError(f"shift {s} does not fit an image of size {h}x{w}")
    if direction == "right":
        return torch.cat((grey[..., :s], grey[..., : w - s]), dim=-1)
    if direction == "left":
        return torch.cat((grey[..., s:], grey[..., w - s :]), dim=-1)
    if direction == "down":
        return torch.cat((grey[..., :s, :], grey[..., : h - s, :]), dim=-2)
    if direction == "up":
        return torch.cat((grey[..., s:, :], grey[..., h - s :, :]), dim=-2)
    raise ValueError(f"shift direction must be left, right, up or down, got {direction!r}")


# --------------------------------------------------------------------------- shared normalisation


def _minmax(t: Tensor, lo: float, hi: float) -> Tensor:
    """The release's ``tensor_normalize_to_range`` per image of (B, H, W) ``t``."""
    mn = t.amin(dim=(-2, -1), keepdim=True)
    mx = t.amax(dim=(-2, -1), keepdim=True)
    return (t - mn) / (mx - mn + 1e-8) * (hi - lo) + lo


def signed_minmax(
    diff: Tensor, threshold: float, clip: float, *, empty_as_zero: bool = False
) -> Tensor:
    """Threshold, clip and min-max scale each sign of a (B, H, W) float32 log-difference.

    Zero where |diff| <= threshold; the positive part clipped to [0, clip] and scaled to [0, 1],
    the negative part clipped to [-clip, 0] and scaled to [-1, 0], per image; their sum. Follows
    the release's operations in order (``get_ic``), quirks included (module docstring);
    ``empty_as_zero`` keeps a sign that has no non-zero pixel at 0 instead of the release's -1.
    """
    d = diff.masked_fill(diff.abs() <= threshold, 0.0)
    pos = _minmax(d.clamp_min(0.0).clamp(0.0, clip), 0.0, 1.0)
    neg = _minmax(d.clamp_max(0.0).clamp(-clip, 0.0), -1.0, 0.0)
    if empty_as_zero:
        pos = torch.where((d > 0).any(dim=(-2, -1), keepdim=True), pos, torch.zeros_like(pos))
        neg = torch.where((d < 0).any(dim=(-2, -1), keepdim=True), neg, torch.zeros_like(neg))
    return pos + neg


# --------------------------------------------------------------------------- ISR


_LUT_CACHE: dict[tuple[float, float], np.ndarray] = {}


def _log_table(val_range: tuple[float, float]) -> np.ndarray:
    """float32 log(v / 255 * (b - a) + a), v = 0..255: NumPy float32 ops in the release's order."""
    key = (float(val_range[0]), float(val_range[1]))
    if key not in _LUT_CACHE:
        a, b = val_range
        v = np.arange(256, dtype=np.float32)
        _LUT_CACHE[key] = np.log(v / 255 * (b - a) + a)
    return _LUT_CACHE[key]


def _directions(direction: str | Sequence[str], batch: int) -> list[str]:
    dirs = [direction] * batch if isinstance(direction, str) else list(direction)
    if len(dirs) != batch:
        raise ValueError(f"got {len(dirs)} shift directions for a batch of {batch}")
    for d in dirs:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown shift direction {d!r}; known: {', '.join(DIRECTIONS)}")
    return dirs


@torch.no_grad()
def image_self_residual(
    images: Tensor,
    params: ISRParams | str,
    direction: str | Sequence[str] = "rightdown",
    *,
    empty_as_zero: bool = False,
) -> Tensor:
    """CMDA's image self-residual of RGB ``images`` (B, 3, H, W), values 0..255 (module docstring).

    Args:
        images: RGB on any device, integer grey levels 0..255 (uint8, or a float holding them).
        params: an :class:`ISRParams` or the name of a preset in :data:`ISR_PRESETS`.
        direction: one of :data:`DIRECTIONS` for the whole batch, or one per sample.
        empty_as_zero: see :func:`signed_minmax` (False = the release).

    Returns:
        (B, 1, H, W) float32 in [-1, 1] on ``images.device`` (CMDA replicates it to 3 channels
        before the events encoder).
    """
    if isinstance(params, str):
        try:
            params = ISR_PRESETS[params]
        except KeyError:
            known = ", ".join(ISR_PRESETS)
            raise ValueError(f"unknown ISR preset {params!r}; known: {known}") from None
    grey = pil_grey(images).long()  # (B, H, W)
    b = grey.shape[0]
    dirs = _directions(direction, b)
    lut = torch.from_numpy(_log_table(params.val_range)).to(images.device)
    log_g = lut[grey]
    span = np.log(params.val_range[1]) - np.log(params.val_range[0])  # float64, as the release
    thr, clip = float(span * params.threshold), float(span * params.clip)

    def residual(shifted: Tensor, logs: Tensor) -> Tensor:
        return signed_minmax(lut[shifted] - logs, thr, clip, empty_as_zero=empty_as_zero)

    out = torch.empty(grey.shape, dtype=torch.float32, device=images.device)
    for d in sorted(set(dirs)):
        idx = torch.tensor([i for i, di in enumerate(dirs) if di == d], device=images.device)
        g, lg = grey.index_select(0, idx), log_g.index_select(0, idx)
        s = params.shift
        if d == "all":  # the release's order: up, left, down, right
            terms = [residual(shift_copy(g, s, k), lg) / 4 for k in ("up", "left", "down", "right")]
            res = terms[0] + terms[1] + terms[2] + terms[3]
        else:
            row = "left" if "left" in d else "right"
            col = "up" if "up" in d else "down"
            res = residual(shift_copy(g, s, row), lg) / 2 + residual(shift_copy(g, s, col), lg) / 2
        out.index_copy_(0, idx, res)
    return out.unsqueeze(1)


_RANDOM_DIRECTIONS = (("leftdown", "leftup"), ("rightdown", "rightup"))


def crop_isr_direction(x_offset: int, second: int) -> str:
    """The release's direction for a loader's ISR under ``shift_type='random'``.

    Left/right from the parity of the crop's x offset; down/up from ``second``: the horizontal-flip
    flag (0/1) for the Cityscapes source (``cityscapes_ic.py``: ISR of the PIL image after the
    bilinear resize to 1024x512, the crop and the flip), the crop's y offset for the DSEC target
    (``dsec.py``: ISR of the cropped, flipped, resized 512x512 warp image).
    """
    return _RANDOM_DIRECTIONS[int(x_offset) % 2][int(second) % 2]


def mixed_isr_direction(jitter_u: float) -> str:
    """The release's direction for a mixed image's ISR under ``shift_type='random'``.

    ``jitter_u`` is the step's colour-jitter random number (uniform in [0, 1)); its first decimal
    digit's parity picks left/right and its second's picks down/up.
    """
    return _RANDOM_DIRECTIONS[int(jitter_u * 10) % 2][int(jitter_u * 100) % 2]


def release_uint8(
    images: Tensor,
    mean: Sequence[float] = (123.675, 116.28, 103.53),
    std: Sequence[float] = (58.395, 57.12, 57.375),
) -> Tensor:
    """Normalised (B, 3, H, W) float32 images -> uint8 as the release feeds PIL for the mixed ISR.

    ``clamp((x * std + mean) / 255, 0, 1) * 255`` then a truncating cast (``np.uint8``); ``mean``
    and ``std`` on the 0-255 scale (mmseg's ImageNet values, also udaseg's ``Normalize``).

    The release runs this on the GPU, where PyTorch divides a float32 tensor by a Python number
    by multiplying with the float32 reciprocal (``1.0f / 255.0f``); a CPU true division differs by
    one ulp on a few pixels, enough to move a truncated level. The reciprocal is written out here,
    so CPU and GPU give the release's CUDA values (checked on an H200: identical).
    """
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    x = torch.clamp(images.mul(s).add(m) * _INV_255_F32, 0, 1) * 255
    return x.to(torch.uint8)  # truncation toward zero, as np.uint8 of a float array


_INV_255_F32 = float(np.float32(1.0) / np.float32(255.0))


# --------------------------------------------------------------------------- IC (temporal)


@torch.no_grad()
def image_change(
    frame: Tensor,
    previous: Tensor,
    *,
    log_add: float = 50.0,
    threshold: float = 0.1,
    clip: float = 0.8,
    empty_as_zero: bool = False,
) -> Tensor:
    """CMDA's IC image of two consecutive frames (``create_cityscapes_image_change.py``).

    D = log(G_t + 50) - log(G_{t-1} + 50) on PIL greyscale (float32 logs, as the release), then
    :func:`signed_minmax` with threshold 0.1 and clip 0.8 (absolute, in log units).

    Args:
        frame, previous: frames t and t-1 (``leftImg8bit`` frame k and ``leftImg8bit_sequence``
            frame k-1), each (B, 3, H, W) RGB or (B, H, W) grey, whole values 0..255.

    Returns:
        (B, H, W) float32 in [-1, 1]; :func:`encode_ic_png` gives the ``leftImg8bit_IC1`` PNG
        values.
    """
    if frame.shape != previous.shape:
        raise ValueError(f"frames differ in shape: {tuple(frame.shape)} vs {tuple(previous.shape)}")
    g1 = pil_grey(frame) if frame.ndim == 4 else frame.to(torch.int32)
    g0 = pil_grey(previous) if previous.ndim == 4 else previous.to(torch.int32)
    if g1.ndim != 3:
        raise ValueError(f"expected (B, 3, H, W) or (B, H, W) frames, got {tuple(frame.shape)}")
    v = np.arange(256, dtype=np.float32)
    lut = torch.from_numpy(np.log(v + log_add)).to(frame.device)
    diff = lut[g1.long()] - lut[g0.long()]
    return signed_minmax(diff, threshold, clip, empty_as_zero=empty_as_zero)


def encode_ic_png(ic: Tensor) -> Tensor:
    """IC in [-1, 1] -> ``leftImg8bit_IC1`` uint8: ``round((ic + 1) / 2 * 255)``, half to even."""
    return torch.round((ic + 1) / 2 * 255).to(torch.uint8)


def decode_ic_png(values: Tensor) -> Tensor:
    """``leftImg8bit_IC1`` values 0..255 -> [-1, 1] as CMDA's loader: ``(v / 255 - 0.5) / 0.5``."""
    return (values.float() / 255 - 0.5) / 0.5
