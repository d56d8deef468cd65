"""Encoder-decoder segmentor: a multi-level backbone followed by a decode head.

``SegOutput = EncoderDecoder(x)`` with ``features = backbone(x)`` (a list of L maps, finest first)
and ``logits = decode_head(features)`` at the head's output resolution (the finest level, stride
4, for the DAFormer/SegFormer heads; the last level, stride 8, for DeepLabV2 on the dilated ResNet).
The attribute names ``backbone`` and ``decode_head`` match mmseg, so segmentor checkpoints keep
their ``backbone.*`` / ``decode_head.*`` keys. Logits are *not* upsampled here: the loss and the
inference code resize them to the label size (bilinear, ``align_corners=False``; spec 2.1).

Backbone contract (MiT, ResNet; DINOv2 later): an ``nn.Module`` whose ``forward(x)`` returns
``list[Tensor]`` of ``(B, C_i, H_i, W_i)`` maps and which exposes ``out_channels`` and
``feature_info`` (``num_chs``, ``reduction`` = the true stride, per level); see
:class:`FeatureBackbone`. Backbones and heads are looked up by name in :data:`BACKBONE_REGISTRY`
(name -> :class:`BackboneEntry`: a builder and a strict local-weights loader) and
:data:`HEAD_REGISTRY` (name -> builder from the backbone's ``out_channels``); a new model is one
entry in each, nothing else here names a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from udaseg.data.classes import NUM_CLASSES
from udaseg.errors import ConfigError
from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.deeplabv2_head import DLV2_DILATIONS, DLV2_RED_DILATIONS, DeepLabV2Head
from udaseg.models.mit import MIT_VARIANTS, MixTransformer
from udaseg.models.optim_groups import param_groups
from udaseg.models.dinov2 import DINOV2_VARIANTS
from udaseg.models.resnet import RESNET_VARIANTS, ResNet
from udaseg.models.segformer_head import SegFormerHead

__all__ = [
    "BACKBONES",
    "BACKBONE_REGISTRY",
    "BackboneEntry",
    "HEADS",
    "HEAD_REGISTRY",
    "EncoderDecoder",
    "FeatureBackbone",
    "SegOutput",
    "TRAINING_ONLY",
    "attach_training_module",
    "build_segmentor",
    "inference_state",
    "param_groups",
    "training_module",
]

@dataclass(frozen=True)
class BackboneEntry:
    """How :func:`build_segmentor` makes one named backbone.

    ``build(drop_path_rate)`` returns a :class:`FeatureBackbone` (CNNs ignore the rate);
    ``load_weights(backbone, path)`` fills it from a local ImageNet checkpoint, strictly (every
    backbone tensor from the file, only the classifier ignored), raising errors that name the
    key and shapes.
    """

    build: Callable[[float], nn.Module]
    load_weights: Callable[[nn.Module, str], object]


def _load_mit(backbone: nn.Module, path: str) -> object:
    from udaseg.models.weights import load_backbone_weights

    return load_backbone_weights(backbone, path, strict=True)


def _load_resnet(backbone: nn.Module, path: str) -> object:
    from udaseg.models.resnet import load_resnet_weights

    return load_resnet_weights(backbone, path, strict=True)  # type: ignore[arg-type]


def _load_dinov2(backbone: nn.Module, path: str) -> object:
    from udaseg.models.dinov2 import load_dinov2_weights

    return load_dinov2_weights(backbone, path, strict=True)  # type: ignore[arg-type]


def _build_dinov2(variant: str, drop_path_rate: float) -> nn.Module:
    from udaseg.models.dinov2 import DINOv2Backbone

    # "token16" (crop resized by 14/16: the token grid is crop/16, HRDA's 512 crops -> 32x32):
    # the spec's choice for speed and HRDA; the published VFM-UDA recipe resizes by ~1.09
    return DINOv2Backbone(variant, token_policy="token16", drop_path=drop_path_rate)


def _build_mit(variant: str, drop_path_rate: float) -> nn.Module:
    return MixTransformer(variant, drop_path_rate=drop_path_rate)


def _build_resnet(variant: str, drop_path_rate: float) -> nn.Module:
    return ResNet(variant)


BACKBONE_REGISTRY: dict[str, BackboneEntry] = {
    **{v: BackboneEntry(partial(_build_mit, v), _load_mit) for v in MIT_VARIANTS},
    **{v: BackboneEntry(partial(_build_resnet, v), _load_resnet) for v in RESNET_VARIANTS},
    **{v: BackboneEntry(partial(_build_dinov2, v), _load_dinov2) for v in DINOV2_VARIANTS},
}
"""Backbone name -> :class:`BackboneEntry`: MiT-B0..B5 (+ ``mit_tiny``) and the ResNets of
:data:`udaseg.models.resnet.RESNET_VARIANTS` (``resnet101_v1c``, ``resnet101_v1c_refign``,
``resnet101``, ``resnet50_v1c``, ``resnet50``, ``resnet_tiny``) and DINOv2 ViT-S/B/L/G/14 with
and without registers (:data:`udaseg.models.dinov2.DINOV2_VARIANTS`: ``dinov2_s`` ..
``dinov2_g_reg``, ``dinov2_tiny``), token policy "token16" and a simple feature pyramid."""


def _build_daformer(in_channels: Sequence[int], num_classes: int, width: int | None) -> nn.Module:
    width = 256 if width is None else width
    return DAFormerHead(in_channels, num_classes=num_classes, channels=width, embed_dim=width)


def _build_segformer(in_channels: Sequence[int], num_classes: int, width: int | None) -> nn.Module:
    width = 768 if width is None else width
    return SegFormerHead(in_channels, num_classes=num_classes, embed_dim=width)


def _build_deeplabv2(
    dilations: Sequence[int], in_channels: Sequence[int], num_classes: int, width: int | None
) -> nn.Module:
    return DeepLabV2Head(in_channels, num_classes=num_classes, dilations=dilations)  # no width


HEAD_REGISTRY: dict[str, Callable[[Sequence[int], int, int | None], nn.Module]] = {
    "daformer": _build_daformer,
    "segformer": _build_segformer,
    "deeplabv2": partial(_build_deeplabv2, DLV2_DILATIONS),
    "deeplabv2_red": partial(_build_deeplabv2, DLV2_RED_DILATIONS),
}
"""Head name -> ``builder(backbone.out_channels, num_classes, head_channels)``."""

BACKBONES: tuple[str, ...] = tuple(BACKBONE_REGISTRY)
"""Backbone names accepted by :func:`build_segmentor`."""
HEADS: tuple[str, ...] = tuple(HEAD_REGISTRY)
"""Decode-head names accepted by :func:`build_segmentor`."""


@runtime_checkable
class FeatureBackbone(Protocol):
    """The multi-level backbone interface shared by all udaseg backbones."""

    out_channels: tuple[int, ...]
    feature_info: list[dict[str, int | str]]

    def __call__(self, x: Tensor) -> list[Tensor]: ...


@dataclass
class SegOutput:
    """Output of a segmentor forward pass.

    Attributes:
        logits: ``(B, K, H/4, W/4)`` class scores at the head's output level (not upsampled;
            ``H/8`` for the DeepLabV2 head).
        features: the backbone levels ``[(B, C_i, H_i, W_i)]``, finest first (used e.g. by the
            ImageNet feature distance).
        detail_logits: multi-resolution segmentors (HRDA) only: ``(B, K, h_d, w_d)`` logits of the
            high-resolution detail crop; None otherwise.
        crop_box: the detail crop ``(y1, y2, x1, x2)`` in input-pixel coordinates, or None.
        extras: further named outputs of a segmentor (HRDA training: ``"context_logits"``, the
            context-branch logits already multiplied by ``1 - a``; multi-branch segmentors: their
            branch logits). Consumers look them up by name and must not require them.
    """

    logits: Tensor
    features: list[Tensor]
    detail_logits: Tensor | None = None
    crop_box: tuple[int, int, int, int] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class EncoderDecoder(nn.Module):
    """``backbone`` -> ``decode_head``; ``forward(x) -> SegOutput``.

    Args:
        backbone: a :class:`FeatureBackbone`.
        decode_head: a module mapping the feature list to ``(B, K, H_1, W_1)`` logits, with a
            ``num_classes`` attribute.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    @property
    def num_classes(self) -> int:
        """K, the number of classes predicted by the decode head."""
        return int(self.decode_head.num_classes)

    def extract_features(self, x: Tensor) -> list[Tensor]:
        """Images ``(B, 3, H, W)`` -> backbone levels ``[(B, C_i, H_i, W_i)]``."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> SegOutput:
        """Images ``(B, 3, H, W)`` -> :class:`SegOutput` with logits ``(B, K, H/4, W/4)``."""
        features = self.extract_features(x)
        return SegOutput(logits=self.decode_head(features), features=features)


def build_segmentor(
    backbone: str = "mit_b5",
    head: str = "daformer",
    num_classes: int = NUM_CLASSES,
    drop_path_rate: float = 0.1,
    head_channels: int | None = None,
    pretrained: str | None = None,
) -> EncoderDecoder:
    """Build a backbone + decode-head segmentor (MiT + DAFormer/SegFormer, ResNet + DeepLabV2, ...).

    Args:
        backbone: one of :data:`BACKBONES` (``mit_b0`` .. ``mit_b5``, ``mit_tiny``,
            ``resnet101_v1c``, ``resnet101_v1c_refign``, ``resnet101``, ``resnet50_v1c``,
            ``resnet50``, ``resnet_tiny``).
        head: one of :data:`HEADS`: ``"daformer"`` (separable-ASPP fusion, C_e = channels = 256),
            ``"segformer"`` (all-MLP, embed_dim 768), ``"deeplabv2"`` (summed dilated 3x3 convs,
            6/12/18/24, on the last level) or ``"deeplabv2_red"`` (the same with 6/12 only,
            DAFormer's DeepLabV2 rows).
        num_classes: K.
        drop_path_rate: stochastic-depth rate of the last backbone block (MiT; CNNs ignore it).
        head_channels: overrides the head width: ``channels`` and ``embed_dim`` of the DAFormer
            head, ``embed_dim`` of the SegFormer head (the DeepLabV2 head has no width). None
            keeps the paper values.
        pretrained: optional local path of an ImageNet checkpoint of the backbone (MiT: NVlabs
            ``mit_b*.pth`` or HF ``nvidia/mit-b*``; ResNet: open-mmlab ``resnet*_v1c`` or
            torchvision ``resnet*``; the layout is detected). Loading is strict: every backbone
            tensor must be in the file; only the classifier is ignored.

    Raises:
        ValueError: unknown ``backbone`` or ``head`` (the message lists the valid names), or a
            checkpoint that does not fit the backbone.
        FileNotFoundError: ``pretrained`` does not exist.
    """
    if backbone not in BACKBONE_REGISTRY:
        raise ConfigError(
            f"build_segmentor: unknown backbone {backbone!r}; "
            f"valid backbones: {', '.join(BACKBONE_REGISTRY)}"
        )
    if head not in HEAD_REGISTRY:
        raise ConfigError(
            f"build_segmentor: unknown head {head!r}; valid heads: {', '.join(HEAD_REGISTRY)}"
        )
    entry = BACKBONE_REGISTRY[backbone]
    encoder = entry.build(drop_path_rate)
    if pretrained is not None:
        entry.load_weights(encoder, pretrained)
    decode_head = HEAD_REGISTRY[head](tuple(encoder.out_channels), num_classes, head_channels)
    return EncoderDecoder(encoder, decode_head)


TRAINING_ONLY = "train_only"
"""Name of the :class:`~torch.nn.ModuleDict` under which a method attaches modules that train
with the segmentor but are not part of inference (ICDA's DAR). They are in the student's
parameters (optimiser), the EMA teacher and checkpoints (``model.train_only.<name>.*``);
:func:`inference_state` drops them, so exported weights, ONNX and ``init_weights`` see the plain
segmentor."""


def attach_training_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Register ``module`` as ``model.train_only[name]`` (kept when one is already there) and
    return the registered module; it follows ``model``'s device and dtype."""
    store = getattr(model, TRAINING_ONLY, None)
    if store is None:
        store = nn.ModuleDict()
        setattr(model, TRAINING_ONLY, store)
    if name in store:
        return store[name]
    ref = next(model.parameters(), None)
    if ref is not None:
        module = module.to(device=ref.device, dtype=ref.dtype)
    store[name] = module
    return module


def training_module(model: nn.Module, name: str) -> nn.Module | None:
    """``model.train_only[name]`` or ``None``."""
    store = getattr(model, TRAINING_ONLY, None)
    return store[name] if store is not None and name in store else None


def inference_state(state: dict) -> dict:
    """A segmentor state dict without the training-only modules (``train_only.*`` keys)."""
    prefix = TRAINING_ONLY + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}
