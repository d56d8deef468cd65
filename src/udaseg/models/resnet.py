"""ResNet v1c / v1 with DeepLab dilation: the CNN encoder of the DeepLabV2 baselines.

Papers: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385; T. He et al., "Bag of Tricks for Image Classification with
Convolutional Neural Networks", CVPR 2019, https://arxiv.org/abs/1812.01187 (the deep "C" stem);
L.-C. Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
Convolution, and Fully Connected CRFs", TPAMI 2018, https://arxiv.org/abs/1606.00915 (dilation).

Reference: open-mmlab mmseg 0.16 ``ResNetV1c`` as used by lhoyer/DAFormer (``deeplabv2_r50-d8``:
strides 1,2,1,1, dilations 1,1,2,4, ``contract_dilation=True``, BN trainable, ``norm_eval=False``)
and brdav/refign ``models/backbones/resnet.py`` (same network, ``contract_dilation=False``). Written
from the udaseg spec (``refign_dsrnss_icda_spec.md`` 1.3, "DeepLabV2 variant"), not copied; no
torchvision. Module names are those of the checkpoints so both ImageNet layouts load without
renaming:

* open-mmlab ``resnet{50,101}_v1c`` (deep stem): ``stem.{0,3,6}`` convs and ``stem.{1,4,7}`` BNs,
  ``layer{i}.{j}.conv1/bn1/conv2/bn2/conv3/bn3``, ``layer{i}.0.downsample.{0,1}``;
* torchvision ``resnet{50,101}`` (plain stem): ``conv1``, ``bn1`` and the same ``layer*`` names.

The ImageNet classifier ``fc.*`` of either file is ignored.

Architecture. Stem: deep (v1c) ``3x[Conv3x3-BN-ReLU]`` with widths ``3 -> s/2 -> s/2 -> s``
(first conv stride 2) or plain (v1) ``Conv7x7/2-BN-ReLU``; then ``MaxPool3x3/2`` (stride 4 in
total). Stage ``i`` stacks bottleneck blocks
``y = ReLU(x + BN3(Conv1x1(ReLU(BN2(Conv3x3_{s,d}(ReLU(BN1(Conv1x1(x)))))))))`` of width
``w_i`` and output ``4 w_i``; the stride sits on the 3x3 conv ("pytorch" style) and the
shortcut of the first block is ``BN(Conv1x1/s)`` when the shape changes.
With the DeepLab settings (strides 1,2,1,1; dilations 1,1,2,4) the outputs are at strides 4, 8, 8,
8 (output stride 8). ``contract_dilation`` gives the first block of a dilated stage dilation
``d // 2`` (mmseg/DAFormer); Refign/DSRNSS keep ``d`` in every block.

Parameter counts (computed from the architecture, checked in ``tests/models/test_resnet.py``):
ResNet-101 v1 without ``fc`` 42,500,160 (torchvision's 44,549,160 minus the 2,049,000 of ``fc``);
ResNet-101 v1c 42,519,392 (the deep stem has 19,232 more parameters than the 7x7 one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from udaseg.errors import CheckpointError

__all__ = [
    "RESNET_VARIANTS",
    "Bottleneck",
    "ResNet",
    "ResNetConfig",
    "load_resnet_weights",
    "resnet_config",
]


@dataclass(frozen=True)
class ResNetConfig:
    """Hyper-parameters of one ResNet variant."""

    depths: tuple[int, int, int, int]
    """Bottleneck blocks per stage (ResNet-50: 3,4,6,3; ResNet-101: 3,4,23,3)."""
    deep_stem: bool = True
    """v1c deep stem (three 3x3 convs) if True, else the v1 7x7 stem."""
    stem_channels: int = 64
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    """Bottleneck widths ``w_i``; stage ``i`` outputs ``4 w_i`` channels."""
    strides: tuple[int, int, int, int] = (1, 2, 1, 1)
    dilations: tuple[int, int, int, int] = (1, 1, 2, 4)
    contract_dilation: bool = True
    """First block of a dilated stage uses ``d // 2`` (mmseg/DAFormer); False: Refign/DSRNSS."""

    def __post_init__(self) -> None:
        for name in ("depths", "widths", "strides", "dilations"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"ResNetConfig.{name} needs 4 entries, got {getattr(self, name)}")
        if self.deep_stem and self.stem_channels % 2:
            raise ValueError(
                f"ResNetConfig: deep stem needs an even stem_channels, got {self.stem_channels}"
            )


_R50 = (3, 4, 6, 3)
_R101 = (3, 4, 23, 3)

RESNET_VARIANTS: dict[str, ResNetConfig] = {
    # DAFormer / mmseg DeepLab setting (contract_dilation=True), open-mmlab ImageNet weights
    "resnet101_v1c": ResNetConfig(_R101),
    "resnet50_v1c": ResNetConfig(_R50),
    # the same network as built by Refign / DSRNSS (dilation not contracted in the first block)
    "resnet101_v1c_refign": ResNetConfig(_R101, contract_dilation=False),
    # plain 7x7 stem, torchvision ImageNet weights
    "resnet101": ResNetConfig(_R101, deep_stem=False),
    "resnet50": ResNetConfig(_R50, deep_stem=False),
    # NOT a paper variant: a small v1c-style encoder (0.13M parameters) for CPU demos and tests;
    # same strides/dilations (output stride 8), no released weights.
    "resnet_tiny": ResNetConfig((1, 1, 1, 1), stem_channels=16, widths=(8, 16, 32, 64)),
}
"""Variant name -> config. ``resnet_tiny`` is udaseg-only."""


def resnet_config(variant: str) -> ResNetConfig:
    """Return the config of ``variant`` or raise a ValueError listing the known variants."""
    try:
        return RESNET_VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unknown ResNet variant {variant!r}; known variants: {', '.join(RESNET_VARIANTS)}"
        ) from None


class Bottleneck(nn.Module):
    """``ReLU(x + BN3(Conv1x1(ReLU(BN2(Conv3x3_{s,d}(ReLU(BN1(Conv1x1(x)))))))))``.

    Shapes: ``(B, C_in, H, W) -> (B, 4 w, ceil(H / s), ceil(W / s))``; the 3x3 conv has padding
    ``d`` so only the stride changes the size. ``downsample`` (``Conv1x1/s -> BN``) is the shortcut
    when the shape changes.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class ResNet(nn.Module):
    """ResNet encoder returning the four stage maps (strides 4, 8, 8, 8 with the DeepLab settings).

    Args:
        variant: a key of :data:`RESNET_VARIANTS`.
        in_chans: input image channels.
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) while the model
            trains (mmseg ``norm_eval``). The references train BN (``norm_eval=False``).
        freeze_norm: additionally make the BN affine parameters non-trainable.
        zero_init_residual: start ``bn3`` of every block at 0 (each block begins as the identity),
            as mmseg does; pretrained weights overwrite it.

    Attributes:
        variant, config; ``out_channels`` ``(4 w_1, .., 4 w_4)`` (256, 512, 1024, 2048 for
        ResNet-50/101); ``feature_info``: ``num_chs``, ``reduction`` (the true stride of each
        level) and ``module`` (``layer{i}``), the backbone interface shared by udaseg backbones.
    """

    def __init__(
        self, variant: str = "resnet101_v1c", in_chans: int = 3, *, norm_eval: bool = False,
        freeze_norm: bool = False, zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        cfg = resnet_config(variant)
        self.variant = variant
        self.config = cfg
        self.in_chans = in_chans
        self.norm_eval = norm_eval
        s = cfg.stem_channels
        if cfg.deep_stem:
            self.stem = nn.Sequential(
                *_conv_bn_relu(in_chans, s // 2, 2), *_conv_bn_relu(s // 2, s // 2, 1),
                *_conv_bn_relu(s // 2, s, 1),
            )
        else:
            self.conv1 = nn.Conv2d(in_chans, s, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(s)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        prev = s
        reduction = 4
        info: list[dict[str, int | str]] = []
        for i in range(4):
            width, stride, dilation = cfg.widths[i], cfg.strides[i], cfg.dilations[i]
            out = width * Bottleneck.expansion
            downsample = None
            if stride != 1 or prev != out:
                downsample = nn.Sequential(
                    nn.Conv2d(prev, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
                )
            first = dilation // 2 if (dilation > 1 and cfg.contract_dilation) else dilation
            blocks = [Bottleneck(prev, width, stride, first, downsample)]
            blocks += [Bottleneck(out, width, 1, dilation) for _ in range(1, cfg.depths[i])]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            reduction *= stride
            info.append({"num_chs": out, "reduction": reduction, "module": f"layer{i + 1}"})
            prev = out
        self.out_channels: tuple[int, ...] = tuple(int(d["num_chs"]) for d in info)
        self.feature_info: list[dict[str, int | str]] = info

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
        if freeze_norm:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Same as :meth:`forward` (alias for the shared backbone API)."""
        return self.forward(x)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images ``(B, in_chans, H, W)`` -> ``[F_1, .., F_4]``, ``F_i`` is ``(B, C_i, H_i, W_i)``
        with ``H_i = ceil(H / reduction_i)`` (DeepLab settings: 512 -> 128, 64, 64, 64)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"ResNet({self.variant}) expects images of shape (B, {self.in_chans}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if self.config.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs: list[Tensor] = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


_LAYER3 = re.compile(r"^layer3\.(\d+)\.")


def _guess_resnet(sd: Mapping[str, Tensor]) -> str:
    """A short description of the network a state dict was made for (stem kind and depth)."""
    blocks = {int(m.group(1)) for k in sd if (m := _LAYER3.match(k))}
    names = {6: "ResNet-50", 23: "ResNet-101", 36: "ResNet-152"}
    depth = names.get(len(blocks), f"{len(blocks)} layer3 blocks")
    stem = "no stem"
    if "stem.0.weight" in sd:
        stem = "deep v1c stem"
    elif "conv1.weight" in sd:
        stem = "plain 7x7 stem"
    return f"{depth}, {stem}"


def load_resnet_weights(
    backbone: ResNet,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    strict: bool = True,
):
    """Load ImageNet ResNet weights into ``backbone`` from a local file or a state dict.

    Accepted layouts (detected from the keys; ``state_dict``/``model`` containers unwrapped and a
    ``backbone.`` prefix stripped, other prefixed keys ignored): open-mmlab ``resnet*_v1c`` (deep
    stem ``stem.*``) for the ``*_v1c`` variants and torchvision ``resnet*`` (``conv1``, ``bn1``) for
    the plain-stem ones. The classifier ``fc.*`` is always ignored; BN ``num_batches_tracked``
    counters may be absent (they restart at 0).

    Returns:
        a :class:`udaseg.models.weights.LoadReport`.

    Raises:
        CheckpointError: the file's stem does not match the variant's, a tensor's shape differs
            from the model's (key and both shapes named), or, with ``strict``, keys are missing or
            left over (the first ones named).
        FileNotFoundError: a path that does not exist.
    """
    from udaseg.models.weights import LoadReport, _unwrap, load_state_dict_file

    where = "state dict" if isinstance(source, Mapping) else repr(str(source))
    raw = _unwrap(source) if isinstance(source, Mapping) else load_state_dict_file(source)
    ignored: list[str] = []
    if any(k.startswith("backbone.") for k in raw):
        sd = {}
        for k, v in raw.items():
            if k.startswith("backbone."):
                sd[k[len("backbone."):]] = v
            else:
                ignored.append(k)
    else:
        sd = dict(raw)
    for k in [k for k in sd if k.startswith("fc.")]:
        ignored.append(k)
        del sd[k]
    layout = "open-mmlab v1c" if "stem.0.weight" in sd else "torchvision"
    deep = backbone.config.deep_stem
    if ("stem.0.weight" in sd) != deep and ("stem.0.weight" in sd or "conv1.weight" in sd):
        want = "the deep v1c stem (open-mmlab resnet*_v1c layout: stem.0.weight ...)" if deep else (
            "the plain 7x7 stem (torchvision resnet* layout: conv1.weight, bn1.*)")
        other = "resnet101 / resnet50" if deep else "resnet101_v1c / resnet50_v1c"
        raise CheckpointError(
            f"{where}: the checkpoint is a {_guess_resnet(sd)} network but backbone "
            f"{backbone.variant} has {want}; use backbone {other} for this file"
        )
    own = backbone.state_dict()
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{where}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model "
                f"{tuple(own[key].shape)}. The checkpoint looks like {_guess_resnet(sd)}; the "
                f"model is {backbone.variant}."
            )
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in own)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{where} ({layout} layout) does not match the {backbone.variant} backbone: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}. The checkpoint looks like {_guess_resnet(sd)}."
        )
    backbone.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport(
        path=where, layout=layout, loaded=len(sd) - len(unexpected), missing=missing,
        unexpected=unexpected, ignored=sorted(ignored),
    )
