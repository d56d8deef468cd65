"""Recognising a checkpoint's format from its keys."""

from __future__ import annotations

import re

from ...errors import CheckpointError
from .common import FORMATS, _has
from .reading import RawCheckpoint


def detect_format(raw: RawCheckpoint) -> str:
    """The :data:`FORMATS` name of a checkpoint, from its keys (and its container keys).

    Raises:
        CheckpointError: no known layout; the message shows the first keys.
    """
    keys = list(raw.tensors)
    if raw.metadata.get("udaseg_format") == "udaseg-uawarpc-v1":  # convert --what aligner output
        return "refign-uawarpc"
    if raw.metadata.get("udaseg_format") or (
        raw.metadata and {"backbone", "head", "num_classes"} <= set(raw.metadata)
    ):
        return "udaseg-weights"
    if _has(
        keys,
        "model.backbone_image.",
        "model.backbone_events.",
        "ema_model.backbone_image.",
        "backbone_image.",
        "backbone_events.",
    ):
        return "cmda-fusion"
    if _has(keys, "ema_model.", "imnet_model."):
        return "mmseg-uda"
    if _has(keys, "scale_attention_head."):  # a bare udaseg HRDASegmentor state dict
        return "udaseg-weights"
    lightning = "pytorch-lightning_version" in raw.top_keys or "hyper_parameters" in raw.top_keys
    if _has(
        keys, "algorithm.teacher.model.", "model.model.backbone.", "model.scale_attention_head."
    ) or (lightning and _has(keys, "model.")):
        return "udaseg-lightning"
    if _has(keys, "model.backbone.", "model.decode_head."):
        return "mmseg-uda"
    if _has(keys, "m_backbone.", "m_head.", "imnet_backbone.", "hrda_scale_attention.") or (
        _has(keys, "backbone.") and _has(keys, "head.")
    ):
        return "lightning-refign"
    if _has(keys, "alignment_head.", "alignment_backbone."):
        return "refign-uawarpc"
    if _has(keys, "backbone.", "decode_head."):
        return "mmseg-segmentor"
    sample = ", ".join(keys[:6])
    if any(re.match(r"^(patch_embed\d|block\d)\.", k) for k in keys) or _has(
        keys, "segformer.encoder.", "encoder.patch_embeddings."
    ):
        raise CheckpointError(
            f"{raw.path!r} holds only a MiT backbone (first keys: {sample}); it has no decode head "
            "to convert. Use it as ImageNet initialisation instead (model.pretrained)."
        )
    raise CheckpointError(
        f"{raw.path!r}: unknown checkpoint layout (first keys: {sample}). Known formats: "
        + "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    )

