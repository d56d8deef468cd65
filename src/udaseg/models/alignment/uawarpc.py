"""UAWarpC dense matcher (Refign), forward only and frozen, weight-compatible with Refign's
released checkpoint ``uawarpc_megadepth.ckpt`` (spec ``refign_dsrnss_icda_spec.md`` 2.1-2.3, 2.5).

Reference: Bruggemann et al., "Refign: Align and Refine for Adaptation of Semantic Segmentation to
Adverse Conditions", WACV 2023; code ``brdav/refign`` (MIT licence), files
``models/heads/uawarpc.py``, ``models/modules.py``, ``helpers/matching_utils.py``,
``models/alignment_model.py`` (derived from PruneTruong/DenseMatching: GLU-Net + WarpC, with a
PDC-Net-style single-Gaussian uncertainty). Re-implemented here; no upstream code is copied.

Architecture (target T, reference R, both H x W, H and W multiples of 8)
------------------------------------------------------------------------
Features (frozen VGG16, :mod:`.vgg`), all L2-normalised over channels: ``c1`` = pool2 of the
image (H/4), ``c2`` = pool3 of the image (H/8), ``c3`` = pool3 of a 256x256 ``area`` copy (32^2),
``c4`` = pool4 of that copy (16^2).

Level 4 (16^2, global)::

    C4 = normalize(relu(MNN(<c4_R[:, k], c4_T[:, i, j]>)))       k = y * 16 + x (row-major)
    MNN(C) = C * (C / (max_k C + 1e-5)) * (C / (max_ij C + 1e-5))
    m4, x4 = decoder4(C4)                  m4: mapping in [-1, 1] (align_corners=True convention)
    F4_256 = ((m4 + 1) (S - 1) / 2 - grid) * 256 / 16              (S = 16; 256-space pixels)
    lv4_256 = unc4(C4, x4) + 2 log(256 / 16)

Level 3 (32^2, local)::

    F, lv = up(F4_256), up(lv4_256)                  (bilinear, align_corners=False, to 32^2)
    C3 = normalize(relu(corr9(c3_T, warp(c3_R, F * 32 / 256))))
    r, x3 = decoder3([C3, F, lv]);  F3 = F + r + refinement_module_adaptive(x3)
    lv3 = unc3(C3, x3, lv, F)
    F3 *= (W / 256, H / 256);  lv3 += 2 log(diag(H, W) / diag(256, 256))

Level 2 (H/8) and level 1 (H/4), with (h, w) the level's size::

    F, lv = up(F_prev), up(lv_prev)                  (values already in H x W pixels)
    C = normalize(relu(corr9(c_T, warp(c_R, F * (w / W, h / H)))))
    level 2: r, x2 = decoder2([C, F, lv]);                    F2 = F + r
    level 1: r, x = decoder1([C, F, reduce(up(x2)), lv]);
             F1 = F + r + refinement_module_finest(x)
    lv_l = unc_l(C, x_l, lv, F)

``corr9(t, r)[b, dy * 9 + dx, h, w] = sum_c t[c, h, w] r[c, h + dy - 4, w + dx - 4]`` (zero
outside, no division by C; :mod:`.correlation`). Finally F4 = F4_256 * (W / 256, H / 256) and
lv4 = lv4_256 + 2 log(diag(H, W) / diag(256, 256)). Flows are target -> reference in pixels of the
H x W image (channel 0 = x), ``lv`` = log sigma^2 of an isotropic Gaussian error in those pixels.

Blocks (every conv followed by BN has no bias; act = LeakyReLU(0.1)):

* decoder (``OpticalFlowEstimatorResidualConnection``): ``conv_0`` 3x3 in->128 (no act),
  ``conv_1`` 3x3 128->128 + act, ``conv_2`` 3x3 128->96, ``conv0_skip`` 1x1 128->96, ``conv_3``
  3x3 96->64 + act, ``conv_4`` 3x3 64->32, ``conv2_skip`` 1x1 96->32, ``predict_mapping`` 3x3
  32->2 (bias): ``x0 = conv_0(x); s = conv_2(conv_1(act(x0))) + conv0_skip(x0);
  x = act(conv_4(conv_3(act(s))) + conv2_skip(s)); return predict_mapping(x), x``.
* refinement (``RefinementModule``): ``dc_convs`` = 3x3 convs 32->128->128->128->96->64->32 with
  dilations 1, 2, 4, 8, 16, 1 (BN + act), then 3x3 32->2 (bias).
* uncertainty (``UncertaintyModule``): each pixel's correlation (9x9, or 16x16 at level 4) as a
  1-channel image; unpadded 3x3 ``conv_0`` 1->32 (+ 2x2 ``maxpool`` at level 4), ``conv_1``
  32->32, ``conv_2`` 32->16 (BN + act), ``predict_uncertainty`` 3x3 16->6 (bias) -> 6 numbers per
  pixel; concatenated with the decoder features (32) and, levels 3-1, the upsampled previous
  log-variance (1) and flow (2); ``pred_conv_0`` 3x3 -> 32, ``pred_conv_1`` 3x3 32->16 (BN +
  act, padded), ``predict_uncertainty_final`` 3x3 16->1 (bias).

Use in Refign (:class:`UAWarpCAligner`): the level-1 flow and log-variance are upsampled
bilinearly (align_corners=False) to H x W; certainty P = 1 - exp(-R^2 / (2 sigma^2)), R = 1 px,
sigma^2 = exp(lv); ``valid`` = the match lies strictly inside the reference
(:func:`~udaseg.models.alignment.base.sample_grid`).

Defaults (Refign configs): batch_norm, refinement at the adaptive (32^2) and finest levels,
uncertainty estimation on, iterative refinement off, patch 9, mutual matching on.

Differences from the reference
------------------------------
* Local correlation in plain PyTorch (:func:`.correlation.local_correlation`) instead of the
  compiled ``spatial_correlation_sample`` extension; same values up to float summation order.
* Features are warped with the shared :func:`~udaseg.models.alignment.base.warp` (float32,
  bilinear, zero padding, align_corners=True), which is the upstream ``warp``; upstream returns
  the input unchanged when the flow is exactly zero, we always sample (identical up to ~1e-7, and
  no device synchronisation).
* :class:`UAWarpCAligner` accepts any image size: a size that is not a multiple of 8 is resized
  (bilinear, align_corners=False) to the nearest multiple of 8 (at least 8) per side, the matcher
  runs there, and the full-resolution flow is rescaled by (W / W8, H / H8) and the log-variance
  shifted by 2 log(diag(H, W) / diag(H8, W8)) (upstream requires multiples of 8).
* ``iterative_refinement`` (used upstream only to evaluate on MegaDepth at >= 1086 px) and the
  ``uncertainty_mixture`` / no-uncertainty / no-BN variants are not implemented: the released
  checkpoint and every Refign config use the defaults above.
* Parameter loading: only the head's weights come from the UAWarpC checkpoint (keys
  ``alignment_head.*`` stripped, strict); the VGG16 weights come from torchvision's ImageNet file
  or, when no VGG file is given, from the checkpoint's ``alignment_backbone.features.*`` entries
  (the frozen ImageNet weights the matcher was trained with). A missing BN
  ``num_batches_tracked`` buffer is tolerated (it does not affect eval-mode outputs).
* The aligner is always in eval mode (its ``train()`` is a no-op) and runs under
  ``torch.no_grad``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import CheckpointError
from .base import Alignment, sample_grid, warp
from .correlation import global_correlation_layer, local_correlation_layer
from .vgg import VGG16Features, load_vgg16_state_dict, load_vgg16_weights, vgg16_state_dict

__all__ = [
    "CHECKPOINT_PREFIX",
    "ConvBNAct",
    "FlowDecoder",
    "RefinementModule",
    "UAWarpC",
    "UAWarpCAligner",
    "UncertaintyModule",
    "certainty_from_log_var",
    "diag_log_var_offset",
    "load_uawarpc_state_dict",
    "mapping_to_flow",
    "scale_flow",
    "uawarpc_state_dict_from_checkpoint",
]

CHECKPOINT_PREFIX = "alignment_head."
COARSE_SIZE = 256  # the global levels run on a 256x256 copy of the images
PATCH_SIZE = 9
LEAKY_SLOPE = 0.1


# ---------------------------------------------------------------------------------- helpers
def mapping_to_flow(mapping: Tensor) -> Tensor:
    """(B, 2, h, w) mapping in normalised coordinates [-1, 1] (align_corners=True convention)
    -> flow in pixels of the h x w grid: ``(m + 1) (size - 1) / 2 - grid``, channel 0 = x."""
    b, _, h, w = mapping.shape
    xs = torch.arange(w, device=mapping.device, dtype=mapping.dtype).view(1, w)
    ys = torch.arange(h, device=mapping.device, dtype=mapping.dtype).view(h, 1)
    fx = (mapping[:, 0] + 1.0) * (w - 1) / 2.0 - xs
    fy = (mapping[:, 1] + 1.0) * (h - 1) / 2.0 - ys
    return torch.stack((fx, fy), dim=1)


def scale_flow(flow: Tensor, sx: float, sy: float) -> Tensor:
    """Flow with its x channel times ``sx`` and y channel times ``sy`` (a new tensor)."""
    return flow * flow.new_tensor([sx, sy]).view(1, 2, 1, 1)


def diag_log_var_offset(to_hw: Sequence[int], from_hw: Sequence[int]) -> float:
    """What a log-variance gains when pixels of a ``from_hw`` image are expressed in pixels of a
    ``to_hw`` image, with Refign's diagonal approximation: 2 log(diag(to) / diag(from))."""
    return 2.0 * math.log(math.hypot(*to_hw) / math.hypot(*from_hw))


def certainty_from_log_var(log_var: Tensor, radius: float = 1.0) -> Tensor:
    """P = 1 - exp(-R^2 / (2 sigma^2)), sigma^2 = exp(log_var), in float32 and [0, 1]."""
    p = -torch.expm1(-0.5 * radius**2 * torch.exp(-log_var.float()))
    return p.clamp_(0.0, 1.0)


def _up(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------- blocks
class ConvBNAct(nn.Module):
    """Conv (+ BN) (+ LeakyReLU 0.1); submodules ``conv``, ``bn`` as upstream ``ConvBNReLU``.
    Padding defaults to ``dilation * (k - 1) // 2``; the conv has a bias only without BN."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, dilation: int = 1,
                 padding: int | None = None, act: bool = True, batch_norm: bool = True) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(cin, cout, kernel_size, 1, padding, dilation=dilation,
                              bias=not batch_norm)
        self.bn = nn.BatchNorm2d(cout) if batch_norm else None
        self.activation = nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class FlowDecoder(nn.Module):
    """Upstream ``OpticalFlowEstimatorResidualConnection``; returns (2-ch output, 32-ch x)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.leaky_relu = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv_0 = ConvBNAct(in_channels, 128, 3, act=False)
        self.conv0_skip = ConvBNAct(128, 96, 1, act=False)
        self.conv_1 = ConvBNAct(128, 128, 3)
        self.conv_2 = ConvBNAct(128, 96, 3, act=False)
        self.conv2_skip = ConvBNAct(96, 32, 1, act=False)
        self.conv_3 = ConvBNAct(96, 64, 3)
        self.conv_4 = ConvBNAct(64, 32, 3, act=False)
        self.predict_mapping = nn.Conv2d(32, 2, 3, padding=1, bias=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x0 = self.conv_0(x)
        s = self.conv_2(self.conv_1(self.leaky_relu(x0))) + self.conv0_skip(x0)
        x = self.leaky_relu(self.conv_4(self.conv_3(self.leaky_relu(s))) + self.conv2_skip(s))
        return self.predict_mapping(x), x


class RefinementModule(nn.Module):
    """Dilated context network on the 32-ch decoder features -> residual flow (2 ch)."""

    def __init__(self, in_channels: int = 32) -> None:
        super().__init__()
        chans = (in_channels, 128, 128, 128, 96, 64, 32)
        dilations = (1, 2, 4, 8, 16, 1)
        layers: list[nn.Module] = [ConvBNAct(chans[i], chans[i + 1], 3, dilation=d)
                                   for i, d in enumerate(dilations)]
        layers.append(nn.Conv2d(32, 2, 3, padding=1, bias=True))
        self.dc_convs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.dc_convs(x)


class UncertaintyModule(nn.Module):
    """Log-variance head: correlation patch per pixel (search_size^2 channels) + decoder
    features (+ previous log-variance and flow) -> (B, 1, h, w)."""

    def __init__(self, search_size: int = PATCH_SIZE, feed_in_previous: bool = False) -> None:
        super().__init__()
        if search_size not in (9, 16):
            raise ValueError(f"UncertaintyModule: search_size must be 9 or 16, got {search_size}")
        self.search_size = search_size
        self.feed_in_previous = feed_in_previous
        self.conv_0 = ConvBNAct(1, 32, 3, padding=0)
        self.maxpool = nn.MaxPool2d(2) if search_size == 16 else None
        self.conv_1 = ConvBNAct(32, 32, 3, padding=0)
        self.conv_2 = ConvBNAct(32, 16, 3, padding=0)
        self.predict_uncertainty = nn.Conv2d(16, 6, 3, padding=0, bias=True)
        extra = 3 if feed_in_previous else 0
        self.pred_conv_0 = ConvBNAct(6 + 32 + extra, 32, 3)
        self.pred_conv_1 = ConvBNAct(32, 16, 3)
        self.predict_uncertainty_final = nn.Conv2d(16, 1, 3, padding=1, bias=True)

    def forward(self, corr: Tensor, feat: Tensor, prev_log_var: Tensor | None = None,
                prev_flow: Tensor | None = None) -> Tensor:
        b, k, h, w = corr.shape
        s = self.search_size
        if k != s * s:
            raise ValueError(f"UncertaintyModule: correlation has {k} channels, expected {s * s}")
        x = corr.permute(0, 2, 3, 1).reshape(b * h * w, 1, s, s)
        x = self.conv_0(x)
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.predict_uncertainty(self.conv_2(self.conv_1(x)))  # (bhw, 6, 1, 1)
        x = x.reshape(b, h, w, 6).permute(0, 3, 1, 2)
        parts = [x, feat]
        if self.feed_in_previous:
            if prev_log_var is None or prev_flow is None:
                raise ValueError("UncertaintyModule: previous log-variance and flow required")
            parts += [prev_log_var, prev_flow]
        x = self.pred_conv_1(self.pred_conv_0(torch.cat(parts, dim=1)))
        return self.predict_uncertainty_final(x)


# ---------------------------------------------------------------------------------- the head
class UAWarpC(nn.Module):
    """The UAWarpC head (upstream ``UAWarpCHead`` with Refign's defaults; parameter names equal
    the upstream module tree, so ``alignment_head.*`` of the released checkpoint load strictly).

    ``forward(target, reference, out_size=None)``: ``target`` / ``reference`` are each a
    sequence of 4 feature maps ``(pool2, pool3, pool3_256, pool4_256)`` (see the module doc; need
    not be normalised), ``out_size`` = (H, W) of the image (default 4 x the pool2 size).
    Returns ``[(flow4, lv4), (flow3, lv3), (flow2, lv2), (flow1, lv1)]`` at 16^2, 32^2, H/8,
    H/4, flows in pixels of H x W (target -> reference), lv = log sigma^2 in those pixels.
    """

    def __init__(self) -> None:
        super().__init__()
        nd = PATCH_SIZE * PATCH_SIZE
        self.decoder4 = FlowDecoder(16 * 16)
        self.decoder3 = FlowDecoder(nd + 2 + 1)
        self.refinement_module_adaptive = RefinementModule(32)
        self.decoder2 = FlowDecoder(nd + 2 + 1)
        self.reduce = nn.Conv2d(32, 2, kernel_size=1, bias=True)
        self.decoder1 = FlowDecoder(nd + 2 + 2 + 1)
        self.refinement_module_finest = RefinementModule(32)
        self.estimate_uncertainty_components4 = UncertaintyModule(16)
        self.estimate_uncertainty_components3 = UncertaintyModule(9, feed_in_previous=True)
        self.estimate_uncertainty_components2 = UncertaintyModule(9, feed_in_previous=True)
        self.estimate_uncertainty_components1 = UncertaintyModule(9, feed_in_previous=True)

    def forward(self, target: Sequence[Tensor], reference: Sequence[Tensor],
                out_size: Sequence[int] | None = None) -> list[tuple[Tensor, Tensor]]:
        if len(target) != 4 or len(reference) != 4:
            raise ValueError("UAWarpC: target and reference must each be 4 feature maps "
                             "(pool2, pool3, pool3_256, pool4_256)")
        t1, t2, t3, t4 = (F.normalize(x, p=2, dim=1) for x in target)
        r1, r2, r3, r4 = (F.normalize(x, p=2, dim=1) for x in reference)
        if tuple(t4.shape[-2:]) != (16, 16) or tuple(t3.shape[-2:]) != (32, 32):
            raise ValueError(f"UAWarpC: the 256x256 features must be 32x32 (pool3) and 16x16 "
                             f"(pool4), got {tuple(t3.shape[-2:])} and {tuple(t4.shape[-2:])}")
        h1, w1 = t1.shape[-2:]
        hh, ww = (4 * h1, 4 * w1) if out_size is None else (int(out_size[0]), int(out_size[1]))
        c = COARSE_SIZE
        lv_to_full = diag_log_var_offset((hh, ww), (c, c))

        # level 4: 16x16 global correlation
        corr4 = global_correlation_layer(t4, r4)
        map4, x4 = self.decoder4(corr4)
        flow4_c = mapping_to_flow(map4) * (c / 16.0)
        lv4_c = self.estimate_uncertainty_components4(corr4, x4) + 2.0 * math.log(c / 16.0)

        # level 3: 32x32 local correlation (256-space pixels)
        up_flow, up_lv = _up(flow4_c, (32, 32)), _up(lv4_c, (32, 32))
        corr3 = local_correlation_layer(t3, warp(r3, up_flow * (32.0 / c))[0], PATCH_SIZE)
        res, x3 = self.decoder3(torch.cat((corr3, up_flow, up_lv), 1))
        flow3 = up_flow + res + self.refinement_module_adaptive(x3)
        lv3 = self.estimate_uncertainty_components3(corr3, x3, up_lv, up_flow)
        flow3 = scale_flow(flow3, ww / c, hh / c)
        lv3 = lv3 + lv_to_full

        # level 2: H/8
        h2, w2 = t2.shape[-2:]
        up_flow, up_lv = _up(flow3, (h2, w2)), _up(lv3, (h2, w2))
        warped = warp(r2, scale_flow(up_flow, w2 / ww, h2 / hh))[0]
        corr2 = local_correlation_layer(t2, warped, PATCH_SIZE)
        res, x2 = self.decoder2(torch.cat((corr2, up_flow, up_lv), 1))
        flow2 = up_flow + res
        lv2 = self.estimate_uncertainty_components2(corr2, x2, up_lv, up_flow)

        # level 1: H/4
        up_flow, up_lv = _up(flow2, (h1, w1)), _up(lv2, (h1, w1))
        up_feat = self.reduce(_up(x2, (h1, w1)))
        warped = warp(r1, scale_flow(up_flow, w1 / ww, h1 / hh))[0]
        corr1 = local_correlation_layer(t1, warped, PATCH_SIZE)
        res, x1 = self.decoder1(torch.cat((corr1, up_flow, up_feat, up_lv), 1))
        flow1 = up_flow + res + self.refinement_module_finest(x1)
        lv1 = self.estimate_uncertainty_components1(corr1, x1, up_lv, up_flow)

        flow4 = scale_flow(flow4_c, ww / c, hh / c)
        lv4 = lv4_c + lv_to_full
        return [(flow4, lv4), (flow3, lv3), (flow2, lv2), (flow1, lv1)]


# ---------------------------------------------------------------------------------- weights
def _flat_state_dict(obj: object) -> dict[str, Tensor]:
    """Unwrap ``{'state_dict': ...}`` (Lightning) / ``{'model': ...}`` and keep tensor entries."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model")
                          if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def uawarpc_state_dict_from_checkpoint(obj: object) -> dict[str, Tensor]:
    """The UAWarpC head's state dict from a Refign/UAWarpC checkpoint object.

    Accepts a Lightning checkpoint (``{'state_dict': {...}}``) or a flat state dict. When any key
    starts with ``alignment_head.``, exactly those keys are kept with the prefix stripped (the rest,
    e.g. ``alignment_backbone.*``, is dropped, as upstream does); otherwise the dict is taken to
    be the head's own state dict already. Keys are not checked here (see
    :func:`load_uawarpc_state_dict`).
    """
    flat = _flat_state_dict(obj)
    if any(k.startswith(CHECKPOINT_PREFIX) for k in flat):
        n = len(CHECKPOINT_PREFIX)
        return {k[n:]: v for k, v in flat.items() if k.startswith(CHECKPOINT_PREFIX)}
    return dict(flat)


def load_uawarpc_state_dict(head: UAWarpC, sd: Mapping[str, Tensor],
                            source: str = "state dict") -> None:
    """Strict load of a (prefix-stripped) head state dict, errors listing the first missing /
    unexpected keys and shape mismatches. Missing BN ``num_batches_tracked`` are tolerated."""
    own = head.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:5])})")
        raise CheckpointError(
            f"{source}: does not fit the UAWarpC head: {'; '.join(parts)}. Expected Refign's "
            f"UAWarpC Lightning checkpoint (uawarpc_megadepth.ckpt) with the head's keys under "
            f"'state_dict' prefixed {CHECKPOINT_PREFIX!r} (e.g. "
            f"'{CHECKPOINT_PREFIX}decoder4.conv_0.conv.weight'), or the head's state dict without "
            "the prefix")
    with torch.no_grad():
        for k, v in own.items():
            if k in sd:
                v.copy_(sd[k])


# ---------------------------------------------------------------------------------- aligner
def _multiple_of_8(n: int) -> int:
    return max(8, int(n / 8.0 + 0.5) * 8)


class UAWarpCAligner(nn.Module):
    """Frozen VGG16 + :class:`UAWarpC`, a :class:`~udaseg.models.alignment.base.DenseAligner`.

    ``aligner(target, reference) -> Alignment`` for (B, 3, H, W) ImageNet-normalised images of the
    same size; flow and certainty at full resolution on the target grid (module doc). Build with
    :meth:`from_files` for the released weights; ``UAWarpCAligner()`` has random weights.

    Submodules are named ``alignment_backbone`` and ``alignment_head`` as in Refign, so
    ``state_dict()`` keys of the head equal the Lightning checkpoint's.
    """

    def __init__(self, head: UAWarpC | None = None, backbone: VGG16Features | None = None,
                 radius: float = 1.0) -> None:
        super().__init__()
        self.alignment_backbone = backbone if backbone is not None else VGG16Features()
        self.alignment_head = head if head is not None else UAWarpC()
        self.radius = float(radius)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> UAWarpCAligner:
        """Always eval (frozen matcher: BN running statistics, no dropout)."""
        return super().train(False)

    @classmethod
    def from_files(cls, weights: str | os.PathLike[str],
                   vgg: str | os.PathLike[str] | None = None) -> UAWarpCAligner:
        """Aligner with the head from ``weights`` (Refign's ``uawarpc_megadepth.ckpt``, a
        converted ``.safetensors``/``.pth``, or the head's plain state dict) and VGG16 from
        ``vgg`` (torchvision's ``vgg16-397923af.pth``) or, when ``vgg`` is None, from the
        checkpoint's ``alignment_backbone.features.*`` entries. Local files only; strict."""
        from ..weights import load_state_dict_file

        src = repr(str(weights))
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"UAWarpC weights file not found: {src}; expected Refign's uawarpc_megadepth.ckpt "
                f"(keys {CHECKPOINT_PREFIX!r}* under 'state_dict'), see the Refign README")
        flat = load_state_dict_file(weights)
        aligner = cls()
        load_uawarpc_state_dict(aligner.alignment_head, uawarpc_state_dict_from_checkpoint(flat),
                                source=src)
        if vgg is not None:
            load_vgg16_weights(aligner.alignment_backbone, vgg)
        else:
            if not any(k.startswith("alignment_backbone.features.") for k in flat):
                raise CheckpointError(
                    f"{src} holds no 'alignment_backbone.features.*' (VGG16) weights; pass "
                    "vgg=<path to torchvision's vgg16-397923af.pth>")
            load_vgg16_state_dict(aligner.alignment_backbone,
                                  vgg16_state_dict(flat, source=src), source=src)
        return aligner

    def _features(self, x: Tensor, b: int) -> tuple[list[Tensor], list[Tensor]]:
        """VGG pyramids (pool2, pool3, pool3_256, pool4_256) of [target; reference] stacked."""
        full = self.alignment_backbone(x, first=2, last=3)
        small = self.alignment_backbone(
            F.interpolate(x, size=(COARSE_SIZE, COARSE_SIZE), mode="area"), first=3, last=4)
        feats = full + small
        return [f[:b] for f in feats], [f[b:] for f in feats]

    def forward_levels(self, target: Tensor, reference: Tensor
                       ) -> tuple[list[tuple[Tensor, Tensor]], tuple[int, int]]:
        """The head's 4 levels for images resized to multiples of 8; returns (levels, (H8, W8)),
        the flows in pixels of the H8 x W8 image."""
        if target.ndim != 4 or target.shape[1] != 3 or target.shape != reference.shape:
            raise ValueError(f"UAWarpCAligner: target and reference must be (B, 3, H, W) of the "
                             f"same shape, got {tuple(target.shape)} and {tuple(reference.shape)}")
        h, w = target.shape[-2:]
        h8, w8 = _multiple_of_8(h), _multiple_of_8(w)
        x = torch.cat((target, reference), 0)
        if (h8, w8) != (h, w):
            x = F.interpolate(x, size=(h8, w8), mode="bilinear", align_corners=False)
        with torch.no_grad():
            trg, ref = self._features(x, target.shape[0])
            levels = self.alignment_head(trg, ref, out_size=(h8, w8))
        return levels, (h8, w8)

    def estimate(self, target: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """Full-resolution (flow (B, 2, H, W), log_var (B, 1, H, W)), float32, H x W pixels."""
        h, w = target.shape[-2:]
        levels, (h8, w8) = self.forward_levels(target, reference)
        flow1, lv1 = levels[-1]
        with torch.no_grad():
            flow = scale_flow(_up(flow1.float(), (h, w)), w / w8, h / h8)
            lv = _up(lv1.float(), (h, w))
            if (h8, w8) != (h, w):
                lv = lv + diag_log_var_offset((h, w), (h8, w8))
        return flow, lv

    def forward(self, target: Tensor, reference: Tensor) -> Alignment:
        flow, lv = self.estimate(target, reference)
        _, valid = sample_grid(flow)
        return Alignment(flow=flow, certainty=certainty_from_log_var(lv, self.radius), valid=valid)
