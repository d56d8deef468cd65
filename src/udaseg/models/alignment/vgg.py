"""VGG16 (no batch norm) feature extractor up to pool4, torchvision-compatible parameter names.

UAWarpC (spec ``refign_dsrnss_icda_spec.md`` 2.2) reads frozen ImageNet VGG16 features: pool2
(128 ch, 1/4) and pool3 (256 ch, 1/8) of the full image, pool3 and pool4 (512 ch, 1/16) of a
256x256 copy. This module is our own and needs no torchvision: ``features`` is an
``nn.Sequential`` laid out as torchvision's ``vgg16().features`` up to index 23 (pool4), so
parameters are named ``features.{0,2,5,7,10,12,14,17,19,21}.{weight,bias}`` and torchvision's
ImageNet file ``vgg16-397923af.pth`` loads as is (its ``features.24``-``features.28`` (conv5) and
``classifier.*`` entries are not needed and are ignored).

Stage boundaries (Refign's ``VGG`` with ``out_indices=[2, 3, 4]``): ``features[0:10]`` ends with
pool2, ``features[10:17]`` with pool3, ``features[17:24]`` with pool4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ...errors import CheckpointError

__all__ = [
    "VGG16_STAGE_ENDS",
    "VGG16Features",
    "load_vgg16_state_dict",
    "load_vgg16_weights",
    "vgg16_state_dict",
]

# torchvision cfg "D" up to pool4: channels of the 3x3 convs, "M" = 2x2 max-pool
_CFG_TO_POOL4 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
# exclusive end index in ``features`` of pool2, pool3, pool4
VGG16_STAGE_ENDS = (10, 17, 24)
_LAYOUT_HINT = (
    "expected torchvision's VGG16 ImageNet layout (e.g. vgg16-397923af.pth): a state dict with "
    "'features.N.weight' / 'features.N.bias' for the convolutions N = 0, 2, 5, 7, 10, 12, 14, 17, "
    "19, 21 (conv1_1 .. conv4_3; 'features.24'-'features.28' and 'classifier.*' are ignored); a "
    "Refign/UAWarpC Lightning checkpoint with 'alignment_backbone.features.N.*' also works"
)


class VGG16Features(nn.Module):
    """Frozen-style VGG16 trunk to pool4; ``forward(x, upto)`` returns pool2..pool``upto``.

    Args (forward):
        x: (B, 3, H, W) ImageNet-normalised images.
        first: first stage returned, 2, 3 or 4 (pool2 / pool3 / pool4).
        last: last stage computed and returned (>= ``first``).

    Returns:
        list of feature maps ``[pool{first}, ..., pool{last}]``.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _CFG_TO_POOL4:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        assert len(self.features) == VGG16_STAGE_ENDS[-1]

    def forward(self, x: Tensor, first: int = 2, last: int = 4) -> list[Tensor]:
        if not 2 <= first <= last <= 4:
            raise ValueError(f"VGG16Features: need 2 <= first <= last <= 4, got {first}, {last}")
        outs: list[Tensor] = []
        start = 0
        for stage, end in zip((2, 3, 4), VGG16_STAGE_ENDS):
            if stage > last:
                break
            x = self.features[start:end](x)
            start = end
            if stage >= first:
                outs.append(x)
        return outs


def vgg16_state_dict(sd: Mapping[str, object], source: str = "state dict") -> dict[str, Tensor]:
    """The ``features.N.*`` entries (N < 24) of a torchvision VGG16 state dict (or of one with
    an ``alignment_backbone.`` prefix); CheckpointError naming ``source`` when they are missing."""
    flat = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, Tensor)}
    prefix = ""
    if not any(k.startswith("features.") for k in flat) and any(
            k.startswith("alignment_backbone.features.") for k in flat):
        prefix = "alignment_backbone."
    out: dict[str, Tensor] = {}
    for k, v in flat.items():
        if not k.startswith(prefix + "features."):
            continue
        name = k[len(prefix):]
        idx = name.split(".")[1]
        if idx.isdigit() and int(idx) < VGG16_STAGE_ENDS[-1]:
            out[name] = v
    if not out:
        some = ", ".join(list(flat)[:5]) or "(no tensors)"
        raise CheckpointError(f"{source}: no VGG16 'features.N.*' weights found (first keys: "
                              f"{some}); {_LAYOUT_HINT}")
    return out


def load_vgg16_weights(model: VGG16Features, path: str | os.PathLike[str]) -> None:
    """Load torchvision's ImageNet VGG16 file (local path) into ``model``, strictly for the
    layers up to pool4; errors name the file and the expected layout."""
    from ..weights import load_state_dict_file

    p = str(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"VGG16 weights file not found: {p!r}; {_LAYOUT_HINT}. Download "
                                "https://download.pytorch.org/models/vgg16-397923af.pth first")
    sd = vgg16_state_dict(load_state_dict_file(p), source=repr(p))
    load_vgg16_state_dict(model, sd, source=repr(p))


def load_vgg16_state_dict(model: VGG16Features, sd: Mapping[str, Tensor],
                          source: str = "state dict") -> None:
    """Strict load of ``features.N.*`` (N < 24) entries with a readable error."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (first: {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:5])}")
        raise CheckpointError(f"{source}: does not fit VGG16 up to pool4: {'; '.join(parts)}; "
                              f"{_LAYOUT_HINT}")
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
