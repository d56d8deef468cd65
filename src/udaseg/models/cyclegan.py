"""CycleGAN ResNet generator: CMDA's frozen IC-image -> event-image translator (spec 2.5).

Port of ``ResnetGenerator`` / ``ResnetBlock`` of junyanz/pytorch-CycleGAN-and-pix2pix
(``models/networks.py``, BSD licence), as copied into ``XiaRho/CMDA:mmseg/models/cyclegan/
cyclegan_model.py``, restricted to what ``define_G`` builds by default there:
``resnet_9blocks``, ``ngf`` 64, ``norm='instance'`` (``InstanceNorm2d(affine=False,
track_running_stats=False)``: no parameters, no buffers; hence every conv but the last has a
bias), reflection padding, no dropout. Layer order, and so the ``model.N.*`` state-dict names, are
the original's, so the released ``cityscapes_ICD_to_dsec_EN.pth`` loads as is
(:func:`load_cyclegan_generator`)::

    model.0  ReflectionPad2d(3)          model.10 .. model.18  ResnetBlock(256) x 9
    model.1  Conv2d(in, 64, 7)             conv_block.0 ReflectionPad2d(1)
    model.2  InstanceNorm2d(64)            conv_block.1 Conv2d(256, 256, 3)
    model.3  ReLU                          conv_block.2 InstanceNorm2d, .3 ReLU
    model.4  Conv2d(64, 128, 3, s2)        conv_block.4 ReflectionPad2d(1)
    model.5  InstanceNorm2d, model.6 ReLU  conv_block.5 Conv2d(256, 256, 3)
    model.7  Conv2d(128, 256, 3, s2)       conv_block.6 InstanceNorm2d; out = x + conv_block(x)
    model.8  InstanceNorm2d, model.9 ReLU
    model.19 ConvTranspose2d(256, 128, 3, s2, p1, output_padding 1), .20 IN, .21 ReLU
    model.22 ConvTranspose2d(128, 64, 3, s2, p1, output_padding 1), .23 IN, .24 ReLU
    model.25 ReflectionPad2d(3), model.26 Conv2d(64, out, 7), model.27 Tanh

How CMDA uses it (``XiaRho/CMDA:mmseg/models/uda/dacs.py``, ``cyclegan_itrd2en``): CMDA's
``define_G`` defaults to **1 input and 1 output channel** (the upstream default is 3 -> 3). The
input is the IC image (Image Motion-Extractor output, ``leftImg8bit_IC1``) mapped to [-1, 1]
(``(v / 255 - 0.5) / 0.5``; the loader replicates it to 3 channels and the UDA step averages them
back to 1); the output, in [-1, 1] (tanh), is the source "events" image, replicated to 3
channels for the events encoder. It runs under ``torch.no_grad()`` in eval mode, never trained
during UDA. Spatial sizes must be multiples of 4 for the output to match the input's size.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .weights import load_state_dict_file

__all__ = ["ResnetBlock", "ResnetGenerator", "generator_shape_of", "load_cyclegan_generator"]


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, IN, ReLU, pad, conv3x3, IN](x): upstream's ``ResnetBlock`` (reflect)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=True),
            nn.InstanceNorm2d(dim, affine=False, track_running_stats=False),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=True),
            nn.InstanceNorm2d(dim, affine=False, track_running_stats=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """The CycleGAN ResNet generator (module docstring); defaults = CMDA's ``define_G()``.

    Args:
        in_channels: input channels (CMDA: 1, the IC image).
        out_channels: output channels (CMDA: 1, the event image).
        base_channels: ``ngf``, width of the first and last convolutions (64).
        num_blocks: residual blocks at 1/4 resolution (9; upstream's ``resnet_6blocks`` has 6).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        num_blocks: int = 9,
    ):
        super().__init__()
        if min(in_channels, out_channels, base_channels) < 1 or num_blocks < 0:
            raise ValueError(
                "ResnetGenerator needs positive channels and num_blocks >= 0, got "
                f"in={in_channels}, out={out_channels}, base={base_channels}, blocks={num_blocks}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.num_blocks = base_channels, num_blocks
        c = base_channels

        def norm(ch: int) -> nn.Module:
            return nn.InstanceNorm2d(ch, affine=False, track_running_stats=False)

        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, c, kernel_size=7, padding=0, bias=True),
            norm(c),
            nn.ReLU(True),
        ]
        for i in range(2):  # downsampling: c -> 2c -> 4c
            m = 2**i
            layers += [
                nn.Conv2d(c * m, c * m * 2, kernel_size=3, stride=2, padding=1, bias=True),
                norm(c * m * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(c * 4) for _ in range(num_blocks)]
        for i in range(2):  # upsampling: 4c -> 2c -> c
            m = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(
                    c * m, c * m // 2, kernel_size=3, stride=2, padding=1, output_padding=1,
                    bias=True,
                ),
                norm(c * m // 2),
                nn.ReLU(True),
            ]
        layers += [
            nn.ReflectionPad2d(3),
            nn.Conv2d(c, out_channels, kernel_size=7, padding=0),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) in [-1, 1] -> (B, out_channels, H, W) in [-1, 1]; 4 | H, W."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResnetGenerator expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        return self.model(x)


def generator_shape_of(state_dict: dict[str, Tensor]) -> dict[str, int] | None:
    """in/out/base channels and block count a ResNet-generator state dict was made with (-1 when
    unknown), or None if it does not look like one; used to say what a mismatching file holds."""
    first, blocks = state_dict.get("model.1.weight"), set()
    if first is None or first.ndim != 4:
        return None
    for k in state_dict:
        if m := re.match(r"^model\.(\d+)\.conv_block\.", k):
            blocks.add(int(m.group(1)))
    last = state_dict.get(f"model.{17 + len(blocks)}.weight")  # model.26 with 9 blocks
    return {
        "in_channels": int(first.shape[1]),
        "out_channels": int(last.shape[0]) if last is not None and last.ndim == 4 else -1,
        "base_channels": int(first.shape[0]),
        "num_blocks": len(blocks),
    }


def load_cyclegan_generator(
    path: str | os.PathLike[str],
    *,
    in_channels: int = 1,
    out_channels: int = 1,
    base_channels: int = 64,
    num_blocks: int = 9,
    device: torch.device | str | None = None,
) -> ResnetGenerator:
    """A frozen (eval, ``requires_grad=False``) generator with the weights of a local file.

    The file (e.g. CMDA's ``cityscapes_ICD_to_dsec_EN.pth``, a plain state dict saved by the
    CycleGAN code) is read with ``torch.load(weights_only=True)`` and loaded **strictly**: every
    key present, none extra, every shape equal.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, missing/unexpected keys, or a shape mismatch; the message
            names the file, the key, both shapes and what the file seems to hold.
    """
    sd = load_state_dict_file(path)
    if any(k.startswith("module.") for k in sd):  # saved from a DataParallel wrapper
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    net = ResnetGenerator(in_channels, out_channels, base_channels, num_blocks)
    own = net.state_dict()
    built = f"in={in_channels}, out={out_channels}, ngf={base_channels}, blocks={num_blocks}"
    found = generator_shape_of(sd)
    if found is None:
        holds = "no CycleGAN ResNet generator (it has no model.1.weight)"
    else:
        holds = "in={in_channels}, out={out_channels}, ngf={base_channels}, blocks={num_blocks}"
        holds = "a generator with " + holds.format(**found)
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{str(path)!r}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs "
                f"model {tuple(own[key].shape)}. The file holds {holds}; the model was built "
                f"with {built}. Pass the matching in_channels/out_channels/base_channels/"
                "num_blocks, or use CMDA's cityscapes_ICD_to_dsec_EN.pth (1 -> 1, ngf 64, 9 "
                "blocks)."
            )
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        hint = ""
        if any(k.endswith(("running_mean", "running_var")) for k in unexpected):
            hint = (
                " The file has InstanceNorm running statistics (saved by PyTorch < 0.4); drop the "
                "*.running_mean / *.running_var / *.num_batches_tracked keys and save it again."
            )
        raise CheckpointError(
            f"{str(path)!r} does not match the CycleGAN ResNet generator ({built}; the file holds "
            f"{holds}): {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected "
            f"keys {unexpected[:5]}.{hint}"
        )
    net.load_state_dict(sd, strict=True)
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    return net
