"""CMDA's image + events segmentor: two MiT encoders, per-stage fusion, one shared DAFormer decoder.

Paper: R. Xia, C. Zhao, M. Zheng, Z. Wu, Q. Sun, Y. Tang, "CMDA: Cross-Modality Domain Adaptation
for Nighttime Semantic Segmentation", ICCV 2023, https://arxiv.org/abs/2307.15942.

Reference: ``XiaRho/CMDA`` (no licence file: all rights reserved), ``FusionEncoderDecoder`` in
``mmseg/models/segmentors/encoder_decoder.py``, ``mmseg/models/fusion/attention_avg_fusion.py``,
``mmseg/models/fusion/attention_fusion.py`` and ``DAFormerHeadFusion`` /
``BaseDecodeHeadFusion`` in ``mmseg/models/decode_heads/``. Written from the udaseg spec
(``ciss_cmda_spec.md`` sections 2.7, 2.8, 2.10, 2.12, 2.14), not copied.

Structure (spec 2.7). Inputs are detached (no gradient reaches the images):

* two separate MiT encoders of the same variant, both initialised from ImageNet ``mit_b*.pth``:
  ``f_img = E_img(x)`` (RGB) and ``f_evt = E_evt(e)`` (event image, 1-bin voxel grid replicated to
  3 channels). The events encoder is **shared**: the image self-residual (ISR, spec 2.6) goes
  through it too, ``f_isr = E_evt(r)``;
* per stage ``i`` (widths ``C_i``, spatial-reduction ratios ``R_i = [8, 4, 2, 1]``) a fusion of
  ``f_img^i`` and ``f_evt^i`` (only when events are given):

  - :class:`AttentionAvgFusion` (DSEC): with ``T(.)`` = flatten to ``(B, H_i W_i, C_i)`` tokens and
    ``Blk`` = one MiT block (efficient self-attention with 1 head and SR ratio ``R_i``, Mix-FFN
    with ratio 4 and a depthwise 3x3 conv, qkv bias, pre-norm LayerNorm eps 1e-6, drop-path 0.05),
    ``f_fus^i = NCHW( (Blk_{2i}(T(f_img^i)) + Blk_{2i+1}(T(f_evt^i))) / 2 )``: 8 blocks in total,
    even ones for the image, odd ones for the events;
  - :class:`AttentionFusion` (Dark Zurich): ``z = T(concat_c[f_img^i, f_evt^i])`` (``2 C_i``
    channels), ``f_fus^i = NCHW( MLP_i( Blk_i(z) ) )`` with ``Blk_i`` one MiT block at width
    ``2 C_i`` (1 head, SR ``R_i``) and ``MLP_i`` a Mix-FFN ``2C_i -> C_i -> C_i`` **without**
    residual: ``fc2(GELU(DWConv_3x3(fc1(z))))``;

* **one** DAFormer decoder (MLP embeddings, separable ASPP, bottleneck; ``share_decoder=True``)
  and **one** 1x1 classifier ``conv_seg`` for every branch: with ``D`` = the decoder up to the
  bottleneck output, ``image = conv_seg(Dropout2d_{0.1}(D(f_img)))`` and, without the dropout,
  ``events = conv_seg(D(f_evt))``, ``fusion = conv_seg(D(f_fus))``, ``isr = conv_seg(D(f_isr))``
  (stride-4 logits; the losses upsample them). ``D`` is called once per branch, so the decoder's
  BatchNorm sees each branch as its own batch in training, as in the release.

Losses per branch (spec 2.8; applied by the training step, not here), with CE terms
``L_f, L_i, L_e, L_isr`` against the same label and pixel weights:

* DSEC (``cs2dsec_image+events_together``, weights fusion 0.5, image 0.5, events 0.5, ISR 0.25):
  ``L = 0.5 L_f + 0.5 L_i + 0.25 L_isr + (0.5 / 2) L_e`` when an ISR input is present (the events
  weight is halved), ``0.5 L_f + 0.5 L_i + 0.5 L_e`` otherwise;
* Dark Zurich (``cs2dz_image+raw-isr``, 0.7 each): the ISR is fed **as the events input** (no
  separate ISR branch): ``L = 0.7 L_f + 0.7 L_i + 0.7 L_e``.

Release defaults (spec 2.12): MiT-B5 encoders (drop-path 0.1), AttentionAvgFusion (1 head, SR
[8, 4, 2, 1], MLP ratio 4, drop-path 0.05 in every fusion block), DAFormer sep-ASPP head (256
channels, dropout 0.1), prediction = the fusion branch with real events on DSEC and the image
branch only on Dark Zurich (``test_output_type = 'image'``). For MiT-B5 the AttentionAvgFusion has
11,219,968 parameters (``sum_i 2 Blk(C_i, R_i)``, ``Blk(C, R) = 12 C^2 + 53 C + [R > 1](R^2 C^2 +
3 C)``) and the AttentionFusion 23,495,680 (``sum_i Blk(2 C_i, R_i) + 3 C_i^2 + 12 C_i``).

Checkpoint names, release -> ours (for a later ``udaseg convert``; module names were kept so the
mapping is a rename): ``backbone_image.*``, ``backbone_events.*``,
``fusion_module.basic_block.{k}.*`` and
``fusion_module.linear_block.{i}.{fc1,dwconv.dwconv,fc2}.*`` unchanged;
``decode_head.embed_layers_image.*`` -> ``decode_head.embed_layers.*``,
``decode_head.fuse_layer_image.*`` -> ``decode_head.fuse_layer.*``, ``decode_head.conv_seg.*``
unchanged; ``decode_head.{embed_layers,fuse_layer}_{events,fusion}.*`` are aliases of the image
decoder under ``share_decoder`` (same tensors: drop them after checking equality);
``fusion_isr_module.*`` (built but never used in the released DSEC config, spec 2.14) is dropped.
See :func:`remap_cmda_keys`.

How configs select it: this module is standalone (it is not in ``BACKBONE_REGISTRY``). The engine
is meant to call :func:`build_fusion_segmentor` instead of ``build_segmentor`` when a
``model.fusion`` block (:class:`FusionConfig`: ``fusion``, ``predict``, ``events_channels``,
``fusion_drop_path``) is present, the way ``model.hrda`` selects the HRDA wrapper.

Differences from the reference:

* one model class with the inputs as keyword arguments (``forward(image, events=None, isr=None)``)
  instead of the ``train_type`` strings and ``cfg`` dictionaries; the release's ablation branches
  (``fusion_isr_module``, ``fuse_both_ice_and_e``, ``no_fusion``, split classifiers,
  ``half_share_decoder``) are not built;
* the decoder is ours (:class:`~udaseg.models.daformer_head.DAFormerHead`, one set of modules);
  the release registers the shared modules under three names;
* ``events_channels`` other than 3 is allowed: the ImageNet first conv is then summed over its
  input channels and spread evenly over the new ones (``w' = sum_c w_c / events_channels``), so
  a 1-channel events encoder gives exactly the features the release gets from the single event
  channel replicated 3 times (and saves the replication);
* an image-only call (``model(x)``) returns the image branch (the release's ``events is None``
  path), so whole/slide inference, export and the DACS loop work unchanged; the fusion branch
  needs the events passed explicitly;
* the output is a :class:`FusionOutput` (a :class:`~udaseg.models.segmentor.SegOutput`) carrying
  every branch's logits in ``extras`` and every branch's encoder features in
  ``branch_features`` (the L2 study's ``f_image``/``f_events``/``f_fusion``/``f_img_self_res``).

Under DDP, a forward without events or ISR leaves the events encoder and the fusion module without
gradient (``find_unused_parameters=True`` or always pass both modalities).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from udaseg.data.classes import NUM_CLASSES
from udaseg.errors import CheckpointError, ConfigError
from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.layers import init_transformer_weights, memory_format_of, resize
from udaseg.models.mit import MIT_VARIANTS, Block, DWConv, MixTransformer
from udaseg.models.segmentor import SegOutput

__all__ = [
    "AttentionAvgFusion",
    "AttentionFusion",
    "BRANCHES",
    "FUSIONS",
    "FusionConfig",
    "FusionOutput",
    "FusionSegmentor",
    "build_fusion_segmentor",
    "remap_cmda_keys",
]

BRANCHES: tuple[str, ...] = ("image", "events", "fusion", "isr")
"""Names of the branch outputs (keys of ``FusionOutput.extras`` and ``branch_features``)."""

_PREDICT = ("fusion", "image", "events")


def _tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H W, C)``."""
    return x.flatten(2).transpose(1, 2)


def _to_map(tokens: Tensor, h: int, w: int, like: Tensor) -> Tensor:
    """``(B, H W, C)`` -> ``(B, C, H, W)`` in the memory format of ``like``."""
    x = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=memory_format_of(like))


def _check_pair(name: str, image: Sequence[Tensor], events: Sequence[Tensor], n: int) -> None:
    if len(image) != n or len(events) != n:
        raise ValueError(
            f"{name}: expected {n} feature levels per modality, got {len(image)} (image) and "
            f"{len(events)} (events)"
        )
    for i, (a, b) in enumerate(zip(image, events, strict=True)):
        if a.shape != b.shape:
            raise ValueError(
                f"{name}: level {i} image features {tuple(a.shape)} and events features "
                f"{tuple(b.shape)} differ; both encoders must see inputs of the same size"
            )


def _stage_settings(
    name: str, in_channels: Sequence[int], sr_ratios: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-stage widths and reduction ratios of a fusion module (same length, as ints)."""
    if len(in_channels) != len(sr_ratios):
        raise ValueError(f"{name}: {len(in_channels)} in_channels but {len(sr_ratios)} sr_ratios")
    return tuple(int(c) for c in in_channels), tuple(int(r) for r in sr_ratios)


class AttentionAvgFusion(nn.Module):
    """Per stage: one MiT block per modality, then the average (CMDA's DSEC fusion, spec 2.7).

    ``out_i = NCHW((basic_block[2i](T(f_img_i)) + basic_block[2i+1](T(f_evt_i))) / 2)``.

    Args:
        in_channels: stage widths ``C_i`` (the encoder's ``out_channels``).
        sr_ratios: spatial-reduction ratio of each stage's attention.
        num_heads: attention heads of every block (1 in the release).
        mlp_ratio: Mix-FFN hidden width / ``C_i`` (4).
        drop_path: stochastic depth of every block (0.05, not a linear ramp).

    Shapes: two lists of ``(B, C_i, H_i, W_i)`` -> a list of ``(B, C_i, H_i, W_i)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (64, 128, 320, 512),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        num_heads: int = 1,
        mlp_ratio: int = 4,
        drop_path: float = 0.05,
    ) -> None:
        super().__init__()
        self.in_channels, self.sr_ratios = _stage_settings(
            "AttentionAvgFusion", in_channels, sr_ratios)
        # block 2i: image stage i, block 2i + 1: events stage i (the release's order)
        self.basic_block = nn.ModuleList(
            Block(c, num_heads, mlp_ratio, r, drop_path)
            for c, r in zip(self.in_channels, self.sr_ratios, strict=True)
            for _ in range(2)
        )
        self.apply(init_transformer_weights)

    def forward(self, image: Sequence[Tensor], events: Sequence[Tensor]) -> list[Tensor]:
        _check_pair("AttentionAvgFusion", image, events, len(self.in_channels))
        out = []
        for i, (f_i, f_e) in enumerate(zip(image, events, strict=True)):
            h, w = f_i.shape[-2:]
            t_i = self.basic_block[2 * i](_tokens(f_i), h, w)
            t_e = self.basic_block[2 * i + 1](_tokens(f_e), h, w)
            out.append(_to_map((t_i + t_e) / 2, h, w, f_i))
        return out


class MixFFNProjection(nn.Module):
    """Mix-FFN with its own output width and no residual: ``fc2(GELU(DWConv_3x3(fc1(x))))``.

    Names ``fc1``, ``dwconv.dwconv``, ``fc2`` as the SegFormer ``Mlp``. Shapes:
    ``(B, N, C_in) -> (B, N, C_out)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class AttentionFusion(nn.Module):
    """Per stage: concatenate, one MiT block at ``2 C_i``, Mix-FFN to ``C_i`` (CMDA's Dark Zurich
    fusion, spec 2.7).

    ``out_i = NCHW(linear_block[i](basic_block[i](T(concat_c[f_img_i, f_evt_i]))))`` with
    ``linear_block[i]`` = :class:`MixFFNProjection` ``2C_i -> C_i -> C_i``.

    Args: as :class:`AttentionAvgFusion`.

    Shapes: two lists of ``(B, C_i, H_i, W_i)`` -> a list of ``(B, C_i, H_i, W_i)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (64, 128, 320, 512),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        num_heads: int = 1,
        mlp_ratio: int = 4,
        drop_path: float = 0.05,
    ) -> None:
        super().__init__()
        self.in_channels, self.sr_ratios = _stage_settings(
            "AttentionFusion", in_channels, sr_ratios)
        self.basic_block = nn.ModuleList(
            Block(2 * c, num_heads, mlp_ratio, r, drop_path)
            for c, r in zip(self.in_channels, self.sr_ratios, strict=True)
        )
        self.linear_block = nn.ModuleList(MixFFNProjection(2 * c, c, c) for c in self.in_channels)
        self.apply(init_transformer_weights)

    def forward(self, image: Sequence[Tensor], events: Sequence[Tensor]) -> list[Tensor]:
        _check_pair("AttentionFusion", image, events, len(self.in_channels))
        out = []
        for i, (f_i, f_e) in enumerate(zip(image, events, strict=True)):
            h, w = f_i.shape[-2:]
            z = self.basic_block[i](_tokens(torch.cat([f_i, f_e], dim=1)), h, w)
            out.append(_to_map(self.linear_block[i](z, h, w), h, w, f_i))
        return out


FUSIONS: dict[str, type[nn.Module]] = {
    "attention_avg": AttentionAvgFusion,
    "attention": AttentionFusion,
}
"""Fusion name -> module class: ``attention_avg`` (DSEC) and ``attention`` (Dark Zurich)."""


@dataclass
class FusionOutput(SegOutput):
    """A :class:`SegOutput` with the branch features.

    ``logits``/``features`` are those of the prediction branch; ``extras[b]`` holds the logits of
    every branch ``b`` computed in this call (``"image"`` always; ``"events"`` and ``"fusion"``
    with events; ``"isr"`` with an ISR input); ``branch_features[b]`` the matching encoder (or
    fused) feature lists; ``predicted`` names the branch in ``logits``.
    """

    branch_features: dict[str, list[Tensor]] = field(default_factory=dict)
    predicted: str = "image"


@dataclass(frozen=True)
class FusionConfig:
    """The ``model.fusion`` settings (defaults = the release's DSEC configuration).

    Attributes:
        fusion: a key of :data:`FUSIONS` (``"attention_avg"`` DSEC, ``"attention"`` Dark Zurich).
        predict: the branch returned as ``logits`` when its inputs are given: ``"fusion"`` (DSEC),
            ``"image"`` (Dark Zurich) or ``"events"``.
        events_channels: input channels of the events encoder (3: the event image replicated).
        fusion_drop_path: stochastic depth of every fusion block.
    """

    fusion: str = "attention_avg"
    predict: str = "fusion"
    events_channels: int = 3
    fusion_drop_path: float = 0.05

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(
                f"model.fusion.fusion: unknown fusion {self.fusion!r}; valid: {', '.join(FUSIONS)}"
            )
        if self.predict not in _PREDICT:
            raise ConfigError(
                f"model.fusion.predict must be one of {', '.join(_PREDICT)}, got {self.predict!r}"
            )
        if self.events_channels < 1:
            raise ConfigError(
                f"model.fusion.events_channels must be >= 1, got {self.events_channels}"
            )
        if not 0.0 <= self.fusion_drop_path < 1.0:
            raise ConfigError(
                f"model.fusion.fusion_drop_path must be in [0, 1), got {self.fusion_drop_path}"
            )


class FusionSegmentor(nn.Module):
    """Two MiT encoders + per-stage fusion + one shared DAFormer decoder (CMDA, spec 2.7).

    Args:
        backbone_image: the RGB encoder.
        backbone_events: the events encoder (also applied to the ISR), same widths.
        fusion_module: :class:`AttentionAvgFusion` or :class:`AttentionFusion` (or any module
            mapping two feature lists to one).
        decode_head: a :class:`~udaseg.models.daformer_head.DAFormerHead` shared by all branches;
            its dropout is applied to the image branch only.
        predict: the prediction branch, ``"fusion"`` (DSEC), ``"image"`` (Dark Zurich) or
            ``"events"``.
    """

    def __init__(
        self,
        backbone_image: nn.Module,
        backbone_events: nn.Module,
        fusion_module: nn.Module,
        decode_head: DAFormerHead,
        predict: str = "fusion",
    ) -> None:
        super().__init__()
        if predict not in _PREDICT:
            raise ConfigError(
                f"FusionSegmentor: predict must be one of {', '.join(_PREDICT)}, got {predict!r}"
            )
        if tuple(backbone_image.out_channels) != tuple(backbone_events.out_channels):
            raise ValueError(
                f"FusionSegmentor: encoder widths differ: image {backbone_image.out_channels}, "
                f"events {backbone_events.out_channels}"
            )
        if not isinstance(decode_head, DAFormerHead):
            raise TypeError(
                f"FusionSegmentor needs a DAFormerHead decoder, got {type(decode_head).__name__}"
            )
        self.backbone_image = backbone_image
        self.backbone_events = backbone_events
        self.fusion_module = fusion_module
        self.decode_head = decode_head
        self.predict = predict

    @property
    def num_classes(self) -> int:
        """K, the number of classes of the shared classifier."""
        return int(self.decode_head.num_classes)

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Widths of the (image, events and fused) feature levels."""
        return tuple(self.backbone_image.out_channels)

    def extract_features(self, x: Tensor) -> list[Tensor]:
        """Images ``(B, 3, H, W)`` -> image-encoder levels (the image-only path)."""
        return self.backbone_image(x.detach())

    def decode(self, features: Sequence[Tensor], dropout: bool = False) -> Tensor:
        """Shared decoder + classifier on one branch's levels -> ``(B, K, H_1, W_1)`` logits;
        ``dropout`` applies the head's Dropout2d before the classifier (image branch only)."""
        head = self.decode_head
        if len(features) != len(head.in_channels):
            raise ValueError(
                f"FusionSegmentor.decode: expected {len(head.in_channels)} feature levels, "
                f"got {len(features)}"
            )
        size = features[0].shape[-2:]
        embedded = [resize(head.embed_layers[str(i)](f), size) for i, f in enumerate(features)]
        x = head.fuse_layer(torch.cat(embedded, dim=1))
        if dropout:
            x = head.dropout(x)
        return head.conv_seg(x)

    def forward(
        self, image: Tensor, events: Tensor | None = None, isr: Tensor | None = None
    ) -> FusionOutput:
        """Run every branch the inputs allow.

        Args:
            image: normalised RGB ``(B, 3, H, W)``.
            events: event image ``(B, events_channels, H, W)`` (or, on Dark Zurich, the ISR used
                as the second modality); enables the ``events`` and ``fusion`` branches.
            isr: image self-residual ``(B, events_channels, H, W)`` through the events encoder;
                enables the ``isr`` branch (DSEC's extra branch; it is not fused).

        Returns:
            :class:`FusionOutput`: ``logits``/``features`` of ``self.predict`` when its inputs
            were given, otherwise of the image branch (an image-only call ``model(x)`` behaves as
            a plain image segmentor: that is what evaluation, slide inference and export see
            unless they pass the events).
        """
        feats: dict[str, list[Tensor]] = {"image": self.backbone_image(image.detach())}
        if events is not None:
            feats["events"] = self.backbone_events(events.detach())
            feats["fusion"] = self.fusion_module(feats["image"], feats["events"])
        if isr is not None:
            feats["isr"] = self.backbone_events(isr.detach())
        logits = {b: self.decode(f, dropout=(b == "image")) for b, f in feats.items()}
        branch = self.predict if self.predict in feats else "image"
        return FusionOutput(
            logits=logits[branch],
            features=feats[branch],
            extras=logits,
            branch_features=feats,
            predicted=branch,
        )


def _spread_first_conv(src: MixTransformer, dst: MixTransformer) -> None:
    """Copy ``src`` into ``dst`` whose first conv has other input channels:
    ``w'[:, j] = sum_c w[:, c] / C_in'`` (same response to a channel-replicated input)."""
    state = src.state_dict()
    key = "patch_embed1.proj.weight"
    w = state[key]
    state[key] = (w.sum(dim=1, keepdim=True) / dst.in_chans).repeat(1, dst.in_chans, 1, 1)
    dst.load_state_dict(state, strict=True)


def build_fusion_segmentor(
    backbone: str = "mit_b5",
    fusion: str = "attention_avg",
    predict: str = "fusion",
    events_channels: int = 3,
    head_channels: int | None = None,
    pretrained: str | None = None,
    num_classes: int = NUM_CLASSES,
    drop_path_rate: float = 0.1,
    fusion_drop_path: float = 0.05,
) -> FusionSegmentor:
    """Build CMDA's two-encoder fusion segmentor (release defaults: the DSEC model).

    Args:
        backbone: a MiT variant (``mit_b0`` .. ``mit_b5``, ``mit_tiny``) for both encoders.
        fusion: ``"attention_avg"`` (DSEC) or ``"attention"`` (Dark Zurich), see :data:`FUSIONS`.
        predict: ``"fusion"`` (DSEC), ``"image"`` (Dark Zurich) or ``"events"``.
        events_channels: input channels of the events encoder (3 in the release).
        head_channels: DAFormer head width (None: 256).
        pretrained: local ``mit_b*.pth`` (NVlabs or HF layout) loaded strictly into both
            encoders; for ``events_channels != 3`` the events encoder's first conv is summed over
            RGB and spread over its channels.
        num_classes: K.
        drop_path_rate: stochastic depth of the encoders' last block (0.1).
        fusion_drop_path: stochastic depth of every fusion block (0.05).

    Raises:
        ConfigError: a non-MiT backbone, an unknown fusion or prediction branch.
        CheckpointError / FileNotFoundError: a ``pretrained`` file that is missing or does not fit.
    """
    if backbone not in MIT_VARIANTS:
        raise ConfigError(
            f"build_fusion_segmentor: backbone must be a MiT variant ({', '.join(MIT_VARIANTS)}), "
            f"got {backbone!r}"
        )
    cfg = FusionConfig(fusion, predict, events_channels, fusion_drop_path)
    enc_image = MixTransformer(backbone, in_chans=3, drop_path_rate=drop_path_rate)
    enc_events = MixTransformer(backbone, in_chans=events_channels, drop_path_rate=drop_path_rate)
    if pretrained is not None:
        from udaseg.models.weights import load_backbone_weights

        load_backbone_weights(enc_image, pretrained, strict=True)
        if events_channels == 3:
            load_backbone_weights(enc_events, pretrained, strict=True)
        else:
            _spread_first_conv(enc_image, enc_events)
    fusion_module = FUSIONS[cfg.fusion](
        enc_image.out_channels, enc_image.config.sr_ratios, drop_path=cfg.fusion_drop_path
    )
    width = 256 if head_channels is None else head_channels
    head = DAFormerHead(enc_image.out_channels, num_classes, channels=width, embed_dim=width)
    return FusionSegmentor(enc_image, enc_events, fusion_module, head, predict=cfg.predict)


_ALIASES = ("embed_layers", "fuse_layer")


def remap_cmda_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A released CMDA ``FusionEncoderDecoder`` state dict (``share_decoder=True``) -> our names.

    ``decode_head.{embed_layers,fuse_layer}_image.*`` lose the ``_image`` suffix; their
    ``_events``/``_fusion`` aliases are dropped after checking that they hold the same tensors;
    ``fusion_isr_module.*`` is dropped; every other key is kept (``backbone_image.*``,
    ``backbone_events.*``, ``fusion_module.*``, ``decode_head.conv_seg.*``). Prefixes such as
    ``model.``/``ema_model.`` must be stripped by the caller.

    Raises:
        CheckpointError: an alias that differs from the image decoder (a checkpoint trained without
            ``share_decoder``, which this model cannot represent).
    """
    out: dict[str, Tensor] = {}
    aliases: list[tuple[str, str, Tensor]] = []  # (release key, our key, tensor)
    for key, value in state.items():
        if key.startswith("fusion_isr_module."):
            continue
        renamed = key
        for name in _ALIASES:
            stem = f"decode_head.{name}_"
            if key.startswith(stem):
                branch, rest = key[len(stem):].split(".", 1)
                if branch == "image":
                    renamed = f"decode_head.{name}.{rest}"
                else:
                    aliases.append((key, f"decode_head.{name}.{rest}", value))
                    renamed = ""
                break
        if renamed:
            out[renamed] = value
    for src, key, value in aliases:
        if key not in out or out[key].shape != value.shape or not torch.equal(out[key], value):
            raise CheckpointError(
                f"CMDA checkpoint: {src!r} differs from the image decoder's entry (or it is "
                "missing); only share_decoder=True checkpoints (the released ones) map onto "
                "FusionSegmentor"
            )
    return out
