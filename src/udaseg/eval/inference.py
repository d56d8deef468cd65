"""Test-time inference: whole-image and sliding-window (mmseg semantics).

Both functions take a ``forward_fn(images) -> logits`` and never call ``model.eval()`` or
``torch.no_grad()`` themselves (:func:`predict` does the latter); the caller owns the model's
mode. ``forward_fn`` may return logits at any output stride (e.g. ``(B, K, H/4, W/4)``), or an
object with a ``.logits`` tensor (``SegOutput``), or a mapping with a ``"logits"`` key.

Sliding window (spec 7.5, mmseg ``EncoderDecoder.slide_inference``): windows of ``crop_size`` on
a grid of ``stride``; the last row/column is shifted back so that it ends at the image border;
each window's logits are resized bilinearly to the window size, summed into a full-size map and
divided by the number of windows covering each pixel. With HRDA, ``forward_fn`` is the HRDA
segmentor (LR window + overlapping HR crops, fused) applied to a batch of 1024x1024 windows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.windows import Window, pair as _pair, slide_windows

__all__ = [
    "ForwardFn",
    "Window",
    "predict",
    "resize_logits",
    "slide_inference",
    "slide_windows",
    "whole_inference",
]

ForwardFn = Callable[[Tensor], Any]
"""``images (B, C, H, W) -> logits (B, K, h, w)`` (or an object/mapping holding ``logits``)."""


def _as_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"forward_fn returned {type(out).__name__}; expected a (B, K, h, w) tensor, an object "
        "with a .logits tensor, or a mapping with a 'logits' key"
    )


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of ``(B, K, h, w)`` logits to ``size = (H, W)``.

    Returns the input unchanged when it already has that size.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")


def whole_inference(
    forward_fn: ForwardFn, images: Tensor, out_size: Sequence[int] | None = None
) -> Tensor:
    """Run ``forward_fn`` on the whole images and resize the logits.

    Args:
        forward_fn: ``(B, C, H, W) -> (B, K, h, w)`` logits at any stride.
        images: ``(B, C, H, W)`` normalised images.
        out_size: ``(H_out, W_out)``; default the input size ``(H, W)``. Use the label size
            (``ori_shape``) for evaluation.

    Returns:
        ``(B, K, H_out, W_out)`` logits (dtype of ``forward_fn``'s output), resized bilinearly
        with ``align_corners=False`` in two steps, as mmseg: first to the network input size
        ``(H, W)`` (``encode_decode``), then to ``out_size`` (``rescale`` to ``ori_shape``).
        Straight from stride 4 to ``out_size`` would flip the argmax of some pixels.
    """
    _check_images(images)
    logits = _as_logits(forward_fn(images))
    if logits.ndim != 4 or logits.shape[0] != images.shape[0]:
        raise ValueError(
            f"forward_fn returned shape {tuple(logits.shape)} for images "
            f"{tuple(images.shape)}; expected (B, K, h, w) with B={images.shape[0]}"
        )
    logits = resize_logits(logits, images.shape[-2:])
    return resize_logits(logits, out_size) if out_size is not None else logits


def slide_inference(
    forward_fn: ForwardFn,
    images: Tensor,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
    out_size: Sequence[int] | None = None,
    batch_windows: int | None = 1,
    pad_to_crop: bool = False,
) -> Tensor:
    """Sliding-window inference with overlap averaging (mmseg ``slide_inference``).

    Args:
        forward_fn: ``(N, C, h, w) -> (N, K, h', w')`` logits at any stride.
        images: ``(B, C, H, W)`` normalised images.
        crop_size: window size ``(crop_h, crop_w)`` (or an int).
        stride: window step ``(stride_h, stride_w)`` (or an int), at most ``crop_size``.
        num_classes: K, checked against ``forward_fn``'s output channels.
        out_size: ``(H_out, W_out)`` of the returned logits; default ``(H, W)``.
        batch_windows: number of windows stacked into one ``forward_fn`` call (each holding all
            B images, so the call sees ``batch_windows * B`` crops); ``None`` runs all windows in
            one call (HRDA ``batched_slide=True``); 1 is the memory-saving
            ``batched_slide=False``.
        pad_to_crop: images smaller than ``crop_size`` get, by default, a single window of the
            image's own size (mmseg behaviour, no padding). With ``pad_to_crop=True`` such
            windows are instead zero-padded at the bottom/right to ``crop_size`` (0 = the mean
            after normalisation) and the logits of the padding are cropped away, for models
            that need a fixed input size.

    Returns:
        ``(B, K, H_out, W_out)`` float32 logits: the average over windows of each window's
        logits resized (bilinear, ``align_corners=False``) to the window size, then resized to
        ``out_size``.
    """
    _check_images(images)
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if batch_windows is not None and batch_windows <= 0:
        raise ValueError(f"batch_windows must be positive or None, got {batch_windows}")
    crop_h, crop_w = _pair(crop_size, "crop_size")
    b, _, height, width = images.shape
    windows = slide_windows(height, width, (crop_h, crop_w), stride)
    win_h, win_w = min(crop_h, height), min(crop_w, width)
    pad_h, pad_w = (crop_h - win_h, crop_w - win_w) if pad_to_crop else (0, 0)

    logit_sum = images.new_zeros((b, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    per_call = len(windows) if batch_windows is None else batch_windows
    for start in range(0, len(windows), per_call):
        chunk = windows[start : start + per_call]
        crops = torch.cat([images[:, :, w.y1 : w.y2, w.x1 : w.x2] for w in chunk], dim=0)
        if pad_h or pad_w:
            crops = F.pad(crops, (0, pad_w, 0, pad_h), value=0.0)
        out = _as_logits(forward_fn(crops))
        if out.ndim != 4 or out.shape[0] != crops.shape[0] or out.shape[1] != num_classes:
            raise ValueError(
                f"forward_fn returned shape {tuple(out.shape)} for {crops.shape[0]} crops; "
                f"expected ({crops.shape[0]}, {num_classes}, h, w)"
            )
        out = resize_logits(out, crops.shape[-2:])[:, :, :win_h, :win_w].float()
        for i, w in enumerate(chunk):
            logit_sum[:, :, w.y1 : w.y2, w.x1 : w.x2] += out[i * b : (i + 1) * b]
            count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
    # Every pixel is covered: stride <= crop and the last window is flush with the border.
    logits = logit_sum / count
    return resize_logits(logits, out_size if out_size is not None else (height, width))


def predict(
    forward_fn: ForwardFn,
    images: Tensor,
    mode: Literal["whole", "slide"] = "whole",
    *,
    out_size: Sequence[int] | None = None,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    batch_windows: int | None = 1,
    pad_to_crop: bool = False,
    output: Literal["logits", "probs", "labels"] = "logits",
) -> Tensor:
    """Inference under ``torch.no_grad()`` in ``mode`` ``"whole"`` or ``"slide"``.

    Args:
        forward_fn, images, out_size: see :func:`whole_inference`.
        mode: ``"whole"`` or ``"slide"``; ``"slide"`` needs ``crop_size``, ``stride`` and
            ``num_classes`` (see :func:`slide_inference`).
        output: ``"logits"`` -> ``(B, K, H_out, W_out)`` logits; ``"probs"`` -> softmax over K
            (float32); ``"labels"`` -> ``(B, H_out, W_out)`` int64 argmax.

    Returns:
        A tensor as described by ``output``.
    """
    if output not in ("logits", "probs", "labels"):
        raise ValueError(f"output must be 'logits', 'probs' or 'labels', got {output!r}")
    with torch.no_grad():
        if mode == "whole":
            logits = whole_inference(forward_fn, images, out_size=out_size)
        elif mode == "slide":
            missing = [
                k
                for k, v in (("crop_size", crop_size), ("stride", stride), ("num_classes", num_classes))
                if v is None
            ]
            if missing:
                raise ValueError(f"predict(mode='slide') needs {', '.join(missing)}")
            logits = slide_inference(
                forward_fn,
                images,
                crop_size=crop_size,  # type: ignore[arg-type]
                stride=stride,  # type: ignore[arg-type]
                num_classes=num_classes,  # type: ignore[arg-type]
                out_size=out_size,
                batch_windows=batch_windows,
                pad_to_crop=pad_to_crop,
            )
        else:
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if output == "probs":
            return logits.float().softmax(dim=1)
        if output == "labels":
            return logits.argmax(dim=1)
        return logits
