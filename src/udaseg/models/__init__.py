"""Networks: MiT backbones, DAFormer/SegFormer decode heads, the encoder-decoder segmentor.

Plain PyTorch only (no training logic, no lightning). Importing this package builds nothing and
touches no file; weights are read only when :func:`load_backbone_weights` or
``build_segmentor(pretrained=...)`` is called.
"""

from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.mit import MIT_VARIANTS, MiTConfig, MixTransformer
from udaseg.models.optim_groups import param_groups
from udaseg.models.segformer_head import SegFormerHead
from udaseg.models.segmentor import BACKBONES, HEADS, EncoderDecoder, SegOutput, build_segmentor
from udaseg.models.weights import LoadReport, load_backbone_weights

__all__ = [
    "BACKBONES",
    "HEADS",
    "MIT_VARIANTS",
    "DAFormerHead",
    "EncoderDecoder",
    "LoadReport",
    "MiTConfig",
    "MixTransformer",
    "SegFormerHead",
    "SegOutput",
    "build_segmentor",
    "load_backbone_weights",
    "param_groups",
]
