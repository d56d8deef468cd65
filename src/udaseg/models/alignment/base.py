"""The aligner interface and the shared warp (spec ``refign_dsrnss_icda_spec.md`` 2.5, 2.8).

Convention. ``flow`` is a (B, 2, H, W) float tensor in **pixels of the target image**, defined on
the target grid, channel 0 = x (columns), channel 1 = y (rows): target pixel (x, y) matches
reference pixel (x + flow[0], y + flow[1]). ``certainty`` (B, 1, H, W) in [0, 1] is the
probability that the match is right (UAWarpC: P = 1 - exp(-R^2 / (2 sigma^2)), R = 1 px);
``valid`` (B, H, W) bool marks target pixels whose match lies inside the reference image.

Warping (Refign ``warp``): backward warping of a reference-frame tensor onto the target grid with
``grid_sample`` (bilinear, ``align_corners=True``, zero padding) in float32, at the normalised
coordinates u = 2 (x + F_x) / (W - 1) - 1, v = 2 (y + F_y) / (H - 1) - 1. A pixel is valid when
both u and v lie strictly inside (-1, 1). :func:`warp_nearest` is the nearest-neighbour variant for
label maps; out-of-image pixels get ``fill`` (the ignore index) instead of 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Alignment", "DenseAligner", "IdentityAligner", "sample_grid", "warp", "warp_nearest"]


@dataclass
class Alignment:
    """Output of a :class:`DenseAligner` (module docstring for the conventions).

    Attributes:
        flow: (B, 2, H, W) float32 pixels, target -> reference, channel 0 = x.
        certainty: (B, 1, H, W) float32 in [0, 1].
        valid: (B, H, W) bool.
    """

    flow: Tensor
    certainty: Tensor
    valid: Tensor


@runtime_checkable
class DenseAligner(Protocol):
    """``aligner(target, reference) -> Alignment``: both (B, 3, H, W) ImageNet-normalised images of
    the same size (H, W); the alignment is on the target grid at full resolution."""

    def __call__(self, target: Tensor, reference: Tensor) -> Alignment: ...


def sample_grid(flow: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised sampling grid (B, H, W, 2) (x, y order, ``align_corners=True``) of ``flow`` and
    the validity mask (B, H, W): both coordinates strictly inside (-1, 1)."""
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"warp: flow must be (B, 2, H, W), got {tuple(flow.shape)}")
    b, _, h, w = flow.shape
    flow = flow.float()
    ys = torch.arange(h, device=flow.device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=torch.float32).view(1, 1, w)
    u = 2.0 * (xs + flow[:, 0]) / max(w - 1, 1) - 1.0
    v = 2.0 * (ys + flow[:, 1]) / max(h - 1, 1) - 1.0
    grid = torch.stack((u, v), dim=-1)
    valid = (u > -1.0) & (u < 1.0) & (v > -1.0) & (v < 1.0)
    return grid, valid


def _check_sizes(x: Tensor, flow: Tensor) -> None:
    if x.shape[0] != flow.shape[0] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"warp: tensor {tuple(x.shape)} and flow {tuple(flow.shape)} differ in batch or size; "
            "resize the flow (and scale its values) to the tensor first"
        )


def warp(x: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear backward warp of a reference-frame (B, C, H, W) tensor onto the target grid.

    Returns ``(warped, valid)``: warped in float32 (Refign runs the warp outside autocast), zero
    outside the reference image; valid (B, H, W) bool.
    """
    _check_sizes(x, flow)
    grid, valid = sample_grid(flow)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
    return out, valid


def warp_nearest(labels: Tensor, flow: Tensor, fill: int = 255) -> tuple[Tensor, Tensor]:
    """Nearest-neighbour backward warp of (B, H, W) or (B, C, H, W) labels onto the target grid.

    Pixels whose match falls outside the reference get ``fill``. Returns ``(warped, valid)`` with
    the input's dtype.
    """
    squeeze = labels.ndim == 3
    x = labels[:, None] if squeeze else labels
    _check_sizes(x, flow)
    grid, valid = sample_grid(flow)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    out = torch.where(valid[:, None], out, torch.full_like(out, float(fill))).to(labels.dtype)
    return (out[:, 0] if squeeze else out), valid


class IdentityAligner(nn.Module):
    """Zero flow, certainty 0.5, valid everywhere: Refign's ablation row 1 ("no alignment"), for
    datasets without usable references and for tests. No weights."""

    def __init__(self, certainty: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= certainty <= 1.0:
            raise ValueError(f"IdentityAligner: certainty must be in [0, 1], got {certainty}")
        self.certainty = float(certainty)

    def forward(self, target: Tensor, reference: Tensor) -> Alignment:
        b, _, h, w = target.shape
        dev = target.device
        return Alignment(
            flow=torch.zeros(b, 2, h, w, device=dev),
            certainty=torch.full((b, 1, h, w), self.certainty, device=dev),
            valid=torch.ones(b, h, w, dtype=torch.bool, device=dev),
        )
