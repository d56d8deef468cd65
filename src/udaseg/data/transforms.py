"""Joint transforms over a sample dict: one random draw, applied to every spatial view.

A sample is a ``dict`` whose spatial entries are torch tensors:

* image-like views (``image``, ``ref`` (day reference), ...): float32 (C, H, W), RGB 0..255 before
  :class:`Normalize`; resized bilinearly and padded with 0;
* label-like views (``label``): int64 (H, W) train IDs, 255 = ignore; resized with nearest and
  padded with 255;
* dense maps (``depth``): float32 (1, H, W); resized bilinearly, padded with 0.

Non-tensor entries (``name``, ``ori_size``) pass through. A geometric transform draws its
random numbers once and applies them to every view, so a reference image, a depth map or an
event tensor stays aligned with the image (what later methods rely on).

The pipeline follows mmseg-0.16 as used by DAFormer (spec section 4.4): Resize (keep ratio)
-> RandomCrop (with ``cat_max_ratio``) -> RandomFlip -> Normalize -> Pad. CISS inserts a
:class:`CenterCrop` and the stylisation (view ``stylized``) after Resize, see
:meth:`PipelineConfig.train_stages` and :mod:`udaseg.data.paired`.
Randomness comes from torch's global generator, which Lightning seeds per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .classes import IGNORE_INDEX

Sample = dict

LABEL_KEYS: frozenset[str] = frozenset({"label", "invalid", "valid_pseudo"})
"""Views resized with nearest neighbour (labels and masks)."""

PAD_VALUES: dict[str, int] = {"label": IGNORE_INDEX, "invalid": 255, "valid_pseudo": 0}
"""Padding value per view (default 0): ignore for labels, "invalid" for masks, 0 = not valid."""

#: views resized to the test scale in the test pipeline (labels keep their full resolution)
TEST_RESIZE_KEYS: tuple[str, ...] = ("image", "ref", "depth", "events")

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _spatial_keys(sample: Sample) -> list[str]:
    return [k for k, v in sample.items() if isinstance(v, torch.Tensor) and v.ndim >= 2]


def _hw(sample: Sample) -> tuple[int, int]:
    t = sample["image"]
    return int(t.shape[-2]), int(t.shape[-1])


def resize_view(key: str, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize one view to ``size`` (H, W): nearest for labels, bilinear otherwise."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if key in LABEL_KEYS:
        out = F.interpolate(t[None, None].float(), size=size, mode="nearest")
        return out[0, 0].to(t.dtype)
    squeeze = t.ndim == 2
    x = t[None, None] if squeeze else t[None]
    out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    out = out[0, 0] if squeeze else out[0]
    return out.to(t.dtype) if t.is_floating_point() else out.round().to(t.dtype)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


@dataclass
class Resize:
    """Rescale keeping the aspect ratio so the image fits ``scale`` = (long_max, short_max).

    mmseg semantics: factor = min(long_max / long_side, short_max / short_side). With
    ``keep_ratio=False`` the image is resized to exactly ``scale`` = (W, H).
    ``keys``: restrict to these views (e.g. resize the image but keep the label at full
    resolution for evaluation); None = every spatial view.
    """

    scale: tuple[int, int]
    keep_ratio: bool = True
    keys: tuple[str, ...] | None = None

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if not self.keep_ratio:
            return int(self.scale[1]), int(self.scale[0])
        long_max, short_max = max(self.scale), min(self.scale)
        factor = min(long_max / max(h, w), short_max / min(h, w))
        return int(h * factor + 0.5), int(w * factor + 0.5)

    def __call__(self, sample: Sample) -> Sample:
        size = self.target_size(*_hw(sample))
        for k in _spatial_keys(sample):
            if self.keys is None or k in self.keys:
                sample[k] = resize_view(k, sample[k], size)
        return sample


@dataclass
class RandomCrop:
    """Random crop of ``size`` = (H, W); images smaller than the crop are cropped to their size.

    ``cat_max_ratio`` < 1 re-draws the crop (up to ``max_tries`` times) until the most frequent
    labelled class covers less than that fraction of the labelled pixels and at least two classes
    are present (mmseg RandomCrop, used by DAFormer for source crops with 0.75).
    """

    size: tuple[int, int]
    cat_max_ratio: float = 1.0
    max_tries: int = 10

    def _draw(self, h: int, w: int) -> tuple[int, int]:
        top = int(torch.randint(0, max(h - self.size[0], 0) + 1, ()).item())
        left = int(torch.randint(0, max(w - self.size[1], 0) + 1, ()).item())
        return top, left

    def _ok(self, label: torch.Tensor) -> bool:
        counts = torch.bincount(label[label != IGNORE_INDEX].flatten().long(), minlength=1)
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def __call__(self, sample: Sample) -> Sample:
        h, w = _hw(sample)
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top, left = self._draw(h, w)
        if self.cat_max_ratio < 1.0 and "label" in sample:
            for _ in range(self.max_tries):
                crop = sample["label"][top : top + ch, left : left + cw]
                if self._ok(crop):
                    break
                top, left = self._draw(h, w)
        for k in _spatial_keys(sample):
            sample[k] = sample[k][..., top : top + ch, left : left + cw]
        sample["crop_box"] = torch.tensor((top, left, top + ch, left + cw))
        return sample


@dataclass
class CenterCrop:
    """Central crop of every spatial view to ``size`` = (H, W) (each axis at most the image's).

    top = floor((H - h) / 2), left = floor((W - w) / 2) (CISS crops 1024x2048 Cityscapes and
    1080x1920 ACDC/Dark Zurich to 1024x1920 so the two FDA spectra have the same size).
    """

    size: tuple[int, int]

    def __call__(self, sample: Sample) -> Sample:
        h, w = _hw(sample)
        ch, cw = min(int(self.size[0]), h), min(int(self.size[1]), w)
        top, left = (h - ch) // 2, (w - cw) // 2
        if (ch, cw) != (h, w):
            for k in _spatial_keys(sample):
                sample[k] = sample[k][..., top : top + ch, left : left + cw]
        return sample


@dataclass
class RandomFlip:
    """Horizontal flip with probability ``p`` of every spatial view."""

    p: float = 0.5

    def __call__(self, sample: Sample) -> Sample:
        flip = bool(torch.rand(()).item() < self.p)
        if flip:
            for k in _spatial_keys(sample):
                sample[k] = sample[k].flip(-1)
        sample["flipped"] = torch.tensor(flip)
        return sample


@dataclass
class Normalize:
    """(x - mean) / std per channel on the image-like views listed in ``keys``.

    ``stylized`` (CISS, :mod:`udaseg.data.stylize`) is normalised exactly like ``image``.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    keys: tuple[str, ...] = ("image", "ref", "stylized")

    def __call__(self, sample: Sample) -> Sample:
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        for k in self.keys:
            if k in sample:
                sample[k] = (sample[k].float() - mean) / std
        return sample


@dataclass
class Pad:
    """Pad every spatial view at the bottom/right to ``size`` (H, W): labels with 255, others with 0."""

    size: tuple[int, int]

    def __call__(self, sample: Sample) -> Sample:
        h, w = _hw(sample)
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            for k in _spatial_keys(sample):
                sample[k] = F.pad(sample[k], (0, pw, 0, ph), value=PAD_VALUES.get(k, 0))
        return sample


def pl_crop_v2_mask(
    h: int,
    w: int,
    top: int = 30,
    bottom: int = 240,
    left: int = 30,
    right: int = 30,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Full-image PL-crop-v2 valid mask (h, w) float32: 1 inside, 0 in the margins (spec 7.7).

    Built at the full label size (1024x2048 Cityscapes), then resized/cropped/flipped with the
    label (nearest) so margins only appear when a crop touches the image border.
    """
    if min(top, bottom, left, right) < 0:
        raise ValueError("pl_crop_v2_mask: margins must be >= 0")
    m = torch.zeros(h, w, device=device)
    m[top : max(h - bottom, top), left : max(w - right, left)] = 1.0
    return m


@dataclass
class AddPseudoLabelCrop:
    """Add the ``valid_pseudo`` view: the PL-crop-v2 mask of the full image (HRDA/MIC with a
    Cityscapes target; margins top, bottom, left, right = 30, 240, 30, 30 at 1024x2048).

    Must run first (before any resize or crop), so the margins are those of the original image;
    the self-training loop multiplies the pseudo-label weight by the cropped mask.
    """

    margins: tuple[int, int, int, int] = (30, 240, 30, 30)

    def __call__(self, sample: Sample) -> Sample:
        h, w = _hw(sample)
        sample["valid_pseudo"] = pl_crop_v2_mask(h, w, *self.margins)
        return sample


@dataclass
class PipelineConfig:
    """The train/test pipeline of one domain, as plain values (so it lives in YAML).

    Defaults are DAFormer's Cityscapes source pipeline scaled by the caller
    (spec section 4.4: resize (1024, 512), crop 512x512, cat_max_ratio 0.75, flip 0.5).
    """

    scale: tuple[int, int] = (1024, 512)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pseudo_label_crop: tuple[int, int, int, int] | None = None
    """PL crop v2 margins (top, bottom, left, right) in original pixels, for a target pipeline:
    HRDA/MIC use (30, 240, 30, 30) when the target is Cityscapes, nothing for ACDC/Dark Zurich."""

    def train(self) -> Compose:
        before, after = self.train_stages()
        return Compose([*before.transforms, *after.transforms])

    def train_stages(self) -> tuple[Compose, Compose]:
        """The train pipeline split where stylisation goes (CISS, spec 1.3):
        ``before`` = [PL-crop mask,] Resize (un-normalised 0..255 images);
        ``after`` = RandomCrop -> RandomFlip -> Normalize -> Pad. ``train()`` is both in order."""
        first = [AddPseudoLabelCrop(tuple(self.pseudo_label_crop))] if self.pseudo_label_crop else []
        before = Compose([*first, Resize(self.scale)])
        after = Compose(
            [
                RandomCrop(self.crop_size, cat_max_ratio=self.cat_max_ratio),
                RandomFlip(self.flip_prob),
                Normalize(self.mean, self.std),
                Pad(self.crop_size),
            ]
        )
        return before, after

    def test(self) -> Compose:
        """Resize the image views only; labels stay at full resolution for scoring."""
        return Compose(
            [
                Resize(self.scale, keys=TEST_RESIZE_KEYS),
                Normalize(self.mean, self.std),
            ]
        )


def to_tensor_sample(image, label=None, **views) -> Sample:
    """Build a sample dict from numpy arrays: image (H,W,3) uint8, label (H,W) uint8."""
    sample: Sample = {"image": torch.from_numpy(image).permute(2, 0, 1).float().contiguous()}
    if label is not None:
        sample["label"] = torch.from_numpy(label.astype("int64"))
    for key, arr in views.items():
        t = torch.from_numpy(arr)
        if t.ndim == 3 and t.shape[-1] in (1, 3):
            t = t.permute(2, 0, 1)
        sample[key] = t.float().contiguous()
    return sample


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Inverse of :class:`Normalize`: (..., 3, H, W) normalised -> uint8 RGB."""
    m = torch.tensor(mean, device=image.device).view(-1, 1, 1)
    s = torch.tensor(std, device=image.device).view(-1, 1, 1)
    return (image * s + m).clamp(0, 255).round().to(torch.uint8)

