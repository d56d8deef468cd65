"""HRDA: multi-resolution training with a learned scale attention.

Paper: L. Hoyer, D. Dai, L. Van Gool, "HRDA: Context-Aware High-Resolution Domain-Adaptive Semantic
Segmentation", ECCV 2022, https://arxiv.org/abs/2204.13132 (Sec. 3).

A single segmentor (shared backbone + decode head) sees every image at two scales: a
low-resolution *context* view of the whole input, ``x_c = resize(x, s_c)`` with ``s_c = 0.5``, and a
high-resolution *detail* crop at full resolution, ``x_d = x[b]`` for a crop box ``b``. A second
head of the same type, the scale attention, predicts from the context features how much each
(class, pixel) should trust the detail prediction. With ``os = 4`` the head output stride and
``up`` the bilinear resize (align_corners=False) from the context-logit to the detail-logit grid
(x ``1 / s_c`` = x2), the fused logits at stride 4 of the full input are (spec 7.3)::

    y_c = head(F(x_c)),   a = sigmoid(att_head(F(x_c))),   y_d = head(F(x_d))
    a  <- a * 1[b / (os / s_c)]                       (training: a = 0 outside the detail box)
    y_d_ins = zeros, with y_d pasted at b / os        (training: one crop; inference: stitched
                                                       overlapping HR windows, no mask)
    y_f = up(a) * y_d_ins + up((1 - a) * y_c)

In the paper's notation ``y_F = zeta(a_c, 1/s_c) * y_D + zeta((1 - a_c) * y_C, 1/s_c)``. Away from
the box, ``y_f = up(y_c)``; in the one-cell ring of the stride-4 grid just outside the box the
bilinear upsampling still mixes in attention-scaled context values (same as the reference).

Loss (computed by :func:`udaseg.adapt.losses.segmentation_loss` on this module's training output,
``detail_weight = HRDAConfig.detail_loss_weight``)::

    L = (1 - lambda_d) * CE(y_f, y) + lambda_d * CE(y_d, crop(y, b)),   lambda_d = 0.1

i.e. 0.9 on the fused logits and 0.1 on the detail-crop logits.

Hyperparameters (final config, spec 7.1):

* scales (0.5, 1.0): context = the 1024x1024 training crop resized to 512x512, detail at full res;
* detail crop 512x512 for a 1024 crop, i.e. half of the input side (``detail_crop_ratio = 0.5``);
* crop offsets are multiples of 8 (``crop_divisor`` = os / s_c = 4 / 0.5) so the box maps exactly
  onto the context-logit grid; one box per batch, redrawn at every training forward (torch RNG);
* classwise attention (K channels; 1 channel if ``attention_classwise=False``);
* attention head = a head of the same type as the decode head with K outputs, followed by a sigmoid;
  for the DAFormer head its ASPP fusion is replaced by a 1x1 ConvBNReLU (0.53 M parameters on
  MiT-B5, 530,707 exactly), it reads the context features;
* pseudo-labels (teacher, spec 7.4): context pass on the whole crop + HR slide with window = detail
  crop and stride = crop / 2 (``hr_slide_overlapping``): 3 x 3 = 9 windows on a 1024 crop, run as
  one batch, logits stitched at stride 4 by summing and dividing by the per-cell window count, fused
  with the *unmasked* attention;
* test (spec 7.5): an outer slide of 1024x1024 windows with stride 512 over the full image
  (:func:`udaseg.eval.inference.slide_inference` with this module in eval mode as ``forward_fn``,
  ``batch_windows=None`` for ``batched_slide``), each window going through the same procedure.
* FD (spec 7.6, ``feature_scale=0.5``): ``SegOutput.features`` are the context-branch features;
  :meth:`HRDASegmentor.extract_features` gives the same for the ImageNet model.

Reference: lhoyer/HRDA ``mmseg/models/segmentors/hrda_encoder_decoder.py`` and
``mmseg/models/decode_heads/hrda_head.py`` (final config ``configs/hrda/gtaHR2csHR_hrda.py``),
re-implemented from the udaseg spec (section 7), not copied.

Differences from the reference:

* Module layout: the shared segmentor is ``model`` (keys ``model.backbone.*``,
  ``model.decode_head.*``) and the attention head ``scale_attention_head.*``; the reference uses
  ``backbone.*``, ``decode_head.head.*`` and ``decode_head.scale_attention.*``. Both attention names
  contain ``"head"`` so the attention head gets the x10 head learning rate in both.
* The detail crop is given as a ratio of the input side (rounded down to a multiple of
  ``crop_divisor``), not as an absolute ``hr_crop_size``; the forward must therefore be fed
  inputs of the training-crop size (the outer test slide does that).
* Training vs. inference behaviour follows ``self.training`` (or an explicit ``mode``), whereas the
  reference distinguishes ``forward_train`` from ``encode_decode``. A teacher that keeps its BN in
  train mode must leave the top-level module in eval mode or pass ``mode="inference"``.
* Detail-crop offsets where the margin ``H - h`` is below ``crop_divisor - 1``: the reference's
  ``np.random.randint(0, 0)`` raises, here the offset is 0 (a box that fits exactly); elsewhere
  the offsets are the reference's, ``randint(0, (H - h + 1) // d) * d``, drawn with torch's RNG.
* Only two scales ``(context_scale, 1.0)``; the ablation-only ``lr_loss_weight``, ``blur_hr_crop``
  and ``feature_scale='all'`` options are not implemented. The loss lives in
  :mod:`udaseg.adapt.losses`, not in the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from udaseg.data.classes import NUM_CLASSES
from udaseg.models.windows import Window, slide_windows
from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.deeplabv2_head import DeepLabV2Head
from udaseg.models.layers import ConvBNReLU, resize
from udaseg.models.segformer_head import SegFormerHead
from udaseg.models.segmentor import EncoderDecoder, SegOutput, build_segmentor

__all__ = ["HRDAConfig", "HRDASegmentor", "build_hrda", "make_attention_head"]

CropBox = tuple[int, int, int, int]
"""``(y1, y2, x1, x2)``, half-open, in input-pixel coordinates."""


@dataclass
class HRDAConfig:
    """HRDA settings (spec 7.1; defaults = the paper's final configuration).

    Attributes:
        context_scale: s_c, resize factor of the context (LR) view; the detail view is at scale 1.
        detail_crop_ratio: detail crop side / input side (512 / 1024 = 0.5); the crop side is
            rounded down to a multiple of ``crop_divisor``.
        crop_divisor: detail-crop offsets (and sides) are multiples of it; must be a multiple of
            ``os / context_scale`` (4 / 0.5 = 8) so the box maps exactly onto the context logits.
        detail_loss_weight: lambda_d, weight of the detail-crop CE (``hr_loss_weight`` 0.1); pass it
            as ``detail_weight`` to :func:`udaseg.adapt.losses.segmentation_loss`.
        hr_slide_overlapping: inference HR slide with stride = crop / 2 (True) or = crop (False).
        attention_classwise: K attention channels (True) or a single one (False).
        fixed_attention: if set, a constant attention value in [0, 1] replaces the learned one
            (ablation "fixedatt"; the attention head is then unused).
        attention_head: ``"same"`` (HRDA: a head of the decode head's type,
            :func:`make_attention_head`) or ``"segformer"`` (Refign's HRDA*: a SegFormer MLP head,
            256 channels, dropout 0.1, ``[c4, c3, c2, c1]`` concatenation, whatever the decode
            head).
    """

    context_scale: float = 0.5
    detail_crop_ratio: float = 0.5
    crop_divisor: int = 8
    detail_loss_weight: float = 0.1
    hr_slide_overlapping: bool = True
    attention_classwise: bool = True
    fixed_attention: float | None = None
    attention_head: str = "same"

    def __post_init__(self) -> None:
        if self.attention_head not in ("same", "segformer"):
            raise ValueError(
                f"HRDAConfig: attention_head must be 'same' or 'segformer', got {self.attention_head!r}"
            )
        if not 0.0 < self.context_scale <= 1.0:
            raise ValueError(
                f"HRDAConfig: context_scale must be in (0, 1], got {self.context_scale}"
            )
        if not 0.0 < self.detail_crop_ratio <= 1.0:
            raise ValueError(
                f"HRDAConfig: detail_crop_ratio must be in (0, 1], got {self.detail_crop_ratio}"
            )
        if int(self.crop_divisor) != self.crop_divisor or self.crop_divisor < 1:
            raise ValueError(
                f"HRDAConfig: crop_divisor must be a positive int, got {self.crop_divisor}"
            )
        if not 0.0 <= self.detail_loss_weight <= 1.0:
            raise ValueError(
                f"HRDAConfig: detail_loss_weight must be in [0, 1], got {self.detail_loss_weight}"
            )
        if self.fixed_attention is not None and not 0.0 <= self.fixed_attention <= 1.0:
            raise ValueError(
                f"HRDAConfig: fixed_attention must be None or in [0, 1], got {self.fixed_attention}"
            )


def make_attention_head(decode_head: nn.Module, out_channels: int, kind: str = "same") -> nn.Module:
    """A fresh scale-attention head of the same type as ``decode_head`` (spec 7.2).

    * :class:`DAFormerHead`: same widths, embeddings and dropout, but the separable-ASPP fusion is
      replaced by a 1x1 ConvBNReLU (``len(in_channels) * embed_dim -> channels``), as in the
      reference's ``daformer_conv1`` attention config. Keys: ``embed_layers.*``,
      ``fuse_layer.conv.weight``, ``fuse_layer.bn.*``, ``conv_seg.*``.
    * :class:`SegFormerHead`: an identical head with ``out_channels`` outputs.
    * :class:`DeepLabV2Head`: the same dilated branches with ``out_channels`` outputs (HRDA's
      ``DLV2Head`` attention; stride 8 like the logits).

    The returned head outputs attention *logits*; :class:`HRDASegmentor` applies the sigmoid.

    Raises:
        TypeError: another head type; build the attention head yourself and pass it to
            :class:`HRDASegmentor`.
    """
    if kind == "segformer":  # Refign's HRDA* scale attention (models/heads/segformer.py)
        return SegFormerHead(decode_head.in_channels, num_classes=out_channels, embed_dim=256,
                             dropout_ratio=0.1, concat_order="nvlabs")
    dropout = getattr(decode_head, "dropout", None)
    p = float(dropout.p) if isinstance(dropout, nn.Dropout2d) else 0.0
    if isinstance(decode_head, DAFormerHead):
        head = DAFormerHead(
            decode_head.in_channels,
            num_classes=out_channels,
            channels=decode_head.channels,
            embed_dim=decode_head.embed_dim,
            dilations=(1,),
            dropout_ratio=p,
        )
        head.fuse_layer = ConvBNReLU(
            len(decode_head.in_channels) * decode_head.embed_dim, decode_head.channels, 1
        )
        return head
    if isinstance(decode_head, SegFormerHead):
        return SegFormerHead(
            decode_head.in_channels,
            num_classes=out_channels,
            embed_dim=decode_head.embed_dim,
            dropout_ratio=p,
            concat_order=decode_head.concat_order,
        )
    if isinstance(decode_head, DeepLabV2Head):
        return DeepLabV2Head(
            decode_head.in_channels, num_classes=out_channels, dilations=decode_head.dilations
        )
    raise TypeError(
        f"make_attention_head: no attention-head recipe for {type(decode_head).__name__}; "
        "pass attention_head= to HRDASegmentor"
    )


def _exact_ratio(num: int, den: int, what: str) -> int:
    """``num / den`` as an int, or a ValueError explaining the shape mismatch."""
    if den <= 0 or num % den:
        raise ValueError(f"HRDA: {what}: {num} is not a multiple of {den}")
    return num // den


class HRDASegmentor(nn.Module):
    """Multi-resolution segmentor with learned scale attention (HRDA).

    Args:
        model: the shared single-scale :class:`EncoderDecoder` (backbone + decode head), used for
            both the context and the detail branch.
        cfg: :class:`HRDAConfig`; None uses the paper defaults.
        attention_head: the scale-attention head (maps the context feature list to attention
            logits ``(B, K or 1, h, w)``); None builds one with :func:`make_attention_head`.

    ``forward(x) -> SegOutput`` on ``(B, 3, H, W)`` images (see :meth:`forward_train` and
    :meth:`forward_inference`). ``@torch.no_grad`` is never applied here: callers choose.
    Parameter names: ``model.backbone.*``, ``model.decode_head.*``, ``scale_attention_head.*``
    (the last two contain ``"head"`` -> head learning rate in :func:`param_groups`).
    """

    def __init__(
        self,
        model: EncoderDecoder,
        cfg: HRDAConfig | None = None,
        attention_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else HRDAConfig()
        self.model = model
        if attention_head is None:
            out = model.num_classes if self.cfg.attention_classwise else 1
            attention_head = make_attention_head(model.decode_head, out, self.cfg.attention_head)
        self.scale_attention_head = attention_head

    # ------------------------------------------------------------------ delegation
    @property
    def backbone(self) -> nn.Module:
        """The shared backbone (``model.backbone``)."""
        return self.model.backbone

    @property
    def decode_head(self) -> nn.Module:
        """The shared decode head (``model.decode_head``)."""
        return self.model.decode_head

    @property
    def scale_attention(self) -> nn.Module:
        """Alias of ``scale_attention_head`` (the reference's name)."""
        return self.scale_attention_head

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return self.model.num_classes

    # ------------------------------------------------------------------ geometry
    def context_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of the context view: ``round(side * context_scale)``."""
        s = self.cfg.context_scale
        return max(1, round(height * s)), max(1, round(width * s))

    def detail_crop_size(self, height: int, width: int) -> tuple[int, int]:
        """Detail crop ``(h_d, w_d)``: ``side * detail_crop_ratio`` rounded down to a multiple of
        ``crop_divisor`` (at least ``crop_divisor``, at most the side)."""
        d = int(self.cfg.crop_divisor)
        sides = []
        for side in (height, width):
            crop = max(d, int(math.floor(side * self.cfg.detail_crop_ratio / d)) * d)
            if crop > side:
                raise ValueError(
                    f"HRDA: input side {side} is smaller than the minimum detail crop {crop} "
                    f"(crop_divisor={d})"
                )
            sides.append(crop)
        return sides[0], sides[1]

    def random_crop_box(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> CropBox:
        """A random detail box ``(y1, y2, x1, x2)`` with offsets that are multiples of
        ``crop_divisor`` (torch RNG), drawn as the reference's ``get_crop_bbox``::

            offset = randint(0, (max(H - h, 0) + 1) // d) * d

        (a 512 crop of 1024 with d = 8: 0..504, 64 positions; the last multiple of d that
        still fits, 512, is never drawn). Where the margin is smaller than ``d - 1`` the
        reference's ``randint(0, 0)`` raises; here the offset is then 0."""
        ch, cw = self.detail_crop_size(height, width)
        d = int(self.cfg.crop_divisor)
        n_y = max((max(height - ch, 0) + 1) // d, 1)
        n_x = max((max(width - cw, 0) + 1) // d, 1)
        y1 = int(torch.randint(n_y, (1,), generator=generator).item()) * d
        x1 = int(torch.randint(n_x, (1,), generator=generator).item()) * d
        return y1, y1 + ch, x1, x1 + cw

    def hr_windows(self, height: int, width: int) -> list[Window]:
        """Inference HR slide windows: window = detail crop, stride = crop / 2 if
        ``hr_slide_overlapping`` else crop (9 windows when the crop is half of the input side)."""
        ch, cw = self.detail_crop_size(height, width)
        stride = (max(1, ch // 2), max(1, cw // 2)) if self.cfg.hr_slide_overlapping else (ch, cw)
        return slide_windows(height, width, (ch, cw), stride)

    # ------------------------------------------------------------------ branches
    def _context(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Context branch: features, logits y_c and attention a (after sigmoid) at LR stride 4."""
        xc = resize(x, self.context_size(*x.shape[-2:]))
        features = self.model.extract_features(xc)
        y_c = self.model.decode_head(features)
        if self.cfg.fixed_attention is not None:
            a = y_c.new_full((y_c.shape[0], 1, *y_c.shape[-2:]), float(self.cfg.fixed_attention))
        else:
            a = torch.sigmoid(self.scale_attention_head(features))
        if a.shape[-2:] != y_c.shape[-2:]:
            raise ValueError(
                f"HRDA: attention size {tuple(a.shape[-2:])} != context logits size "
                f"{tuple(y_c.shape[-2:])}"
            )
        return features, y_c, a

    def _detail(self, crops: Tensor) -> Tensor:
        return self.model.decode_head(self.model.extract_features(crops))

    @staticmethod
    def fuse(y_c: Tensor, a: Tensor, y_d: Tensor) -> Tensor:
        """``y_f = up(a) * y_d + up((1 - a) * y_c)`` with ``up`` the bilinear resize to ``y_d``'s
        size; ``y_d`` is the detail logits already placed on the full-input stride-4 grid."""
        size = y_d.shape[-2:]
        return resize(a, size) * y_d + resize((1.0 - a) * y_c, size)

    def _strides(
        self, height: int, width: int, y_c: Tensor, crop: tuple[int, int], y_d: Tensor
    ) -> tuple[int, int]:
        """(LR-logit stride, HR-logit stride) in input pixels, checked to be exact."""
        lr_h = _exact_ratio(height, y_c.shape[-2], "input height / context-logit height")
        lr_w = _exact_ratio(width, y_c.shape[-1], "input width / context-logit width")
        hr_h = _exact_ratio(crop[0], y_d.shape[-2], "detail crop height / detail-logit height")
        hr_w = _exact_ratio(crop[1], y_d.shape[-1], "detail crop width / detail-logit width")
        if lr_h != lr_w or hr_h != hr_w:
            raise ValueError(f"HRDA: anisotropic output strides {(lr_h, lr_w)}, {(hr_h, hr_w)}")
        _exact_ratio(height, hr_h, "input height / detail-logit stride")
        _exact_ratio(width, hr_h, "input width / detail-logit stride")
        return lr_h, hr_h

    # ------------------------------------------------------------------ forward
    def forward_train(self, x: Tensor, crop_box: CropBox | None = None) -> SegOutput:
        """Training forward (spec 7.3): context on ``resize(x, s_c)``, detail on one random crop.

        Returns ``SegOutput(logits=y_f (B, K, H/4, W/4), features=context features,
        detail_logits=y_d (B, K, h_d/4, w_d/4), crop_box=(y1, y2, x1, x2))``.
        """
        _, _, height, width = x.shape
        features, y_c, a = self._context(x)
        if crop_box is None:
            crop_box = self.random_crop_box(height, width)
        y1, y2, x1, x2 = (int(v) for v in crop_box)
        if not (0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width):
            raise ValueError(f"HRDA: crop box {crop_box} is not inside the {height}x{width} input")
        y_d = self._detail(x[:, :, y1:y2, x1:x2])
        lr, hr = self._strides(height, width, y_c, (y2 - y1, x2 - x1), y_d)
        for v in (y1, y2, x1, x2):
            _exact_ratio(v, lr, f"crop box coordinate (crop_divisor must be a multiple of {lr})")
        mask = torch.zeros_like(a[:, :1])
        mask[:, :, y1 // lr : y2 // lr, x1 // lr : x2 // lr].fill_(1.0)
        a = a * mask
        h_out, w_out = height // hr, width // hr
        y_d_ins = F.pad(y_d, (x1 // hr, w_out - x2 // hr, y1 // hr, h_out - y2 // hr))
        fused = self.fuse(y_c, a, y_d_ins)
        return SegOutput(
            logits=fused, features=features, detail_logits=y_d, crop_box=(y1, y2, x1, x2),
            extras={"context_logits": (1.0 - a) * y_c},
        )

    def forward_inference(self, x: Tensor) -> SegOutput:
        """Teacher / test forward (spec 7.4): whole context pass + batched overlapping HR slide
        stitched at stride 4 (sum / window count), fused with the unmasked attention.

        Returns ``SegOutput(logits=y_f (B, K, H/4, W/4), features=context features)``.
        """
        b, _, height, width = x.shape
        features, y_c, a = self._context(x)
        windows = self.hr_windows(height, width)
        crops = torch.cat([x[:, :, w.y1 : w.y2, w.x1 : w.x2] for w in windows], dim=0)
        y_w = self._detail(crops)
        crop = (windows[0].y2 - windows[0].y1, windows[0].x2 - windows[0].x1)
        _, hr = self._strides(height, width, y_c, crop, y_w)
        h_out, w_out = height // hr, width // hr
        y_sum = y_w.new_zeros((b, y_w.shape[1], h_out, w_out))
        count = y_w.new_zeros((1, 1, h_out, w_out))
        for i, w in enumerate(windows):
            for v in w:
                _exact_ratio(v, hr, "HR slide window coordinate / detail-logit stride")
            ys, xs = slice(w.y1 // hr, w.y2 // hr), slice(w.x1 // hr, w.x2 // hr)
            y_sum[:, :, ys, xs] += y_w[i * b : (i + 1) * b]
            count[:, :, ys, xs] += 1.0
        fused = self.fuse(y_c, a, y_sum / count)
        return SegOutput(logits=fused, features=features)

    def forward(
        self,
        x: Tensor,
        *,
        mode: Literal["train", "inference"] | None = None,
        crop_box: CropBox | None = None,
    ) -> SegOutput:
        """``mode=None`` picks :meth:`forward_train` if ``self.training`` else
        :meth:`forward_inference`; ``crop_box`` (training only) fixes the detail box."""
        if mode is None:
            mode = "train" if self.training else "inference"
        if mode == "train":
            return self.forward_train(x, crop_box=crop_box)
        if mode == "inference":
            if crop_box is not None:
                raise ValueError("HRDA: crop_box is only used by the training forward")
            return self.forward_inference(x)
        raise ValueError(f"HRDA: mode must be 'train', 'inference' or None, got {mode!r}")

    def extract_features(self, x: Tensor) -> list[Tensor]:
        """Context-branch backbone features of ``resize(x, s_c)`` (FD with feature_scale=0.5)."""
        return self.model.extract_features(resize(x, self.context_size(*x.shape[-2:])))


def build_hrda(
    backbone: str = "mit_b5",
    head: str = "daformer",
    num_classes: int = NUM_CLASSES,
    cfg: HRDAConfig | None = None,
    **segmentor_kwargs: Any,
) -> HRDASegmentor:
    """Build an HRDA segmentor around :func:`build_segmentor` (``backbone``, ``head``,
    ``num_classes`` and ``segmentor_kwargs`` such as ``head_channels``, ``drop_path_rate``,
    ``pretrained`` are passed through); the attention head comes from
    :func:`make_attention_head`."""
    model = build_segmentor(backbone, head, num_classes=num_classes, **segmentor_kwargs)
    return HRDASegmentor(model, cfg)
