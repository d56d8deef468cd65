"""Lightning checkpoints of Refign / DSRNSS / ICDA (``DomainAdaptationSegmentationModel``)."""

from __future__ import annotations

from ...errors import CheckpointError
from .common import (
    Entry,
    ImportReport,
    UnsupportedCheckpointError,
    Which,
    _has,
    _take,
    claim,
)
from .reading import RawCheckpoint


def select_lightning_refign(
    raw: RawCheckpoint, which: Which, report: ImportReport, used: set[str]
) -> dict[str, Entry]:
    """The student (``backbone.*`` / ``head.*``) or EMA teacher (``m_backbone.*`` / ``m_head.*``)
    in mmseg segmentor names."""
    t = raw.tensors
    pre = "" if which == "student" else "m_"
    if _has(list(t), f"{pre}hrda_scale_attention."):
        raise UnsupportedCheckpointError(
            f"{raw.path!r}: Refign/DSRNSS HRDA* checkpoint ({pre}hrda_scale_attention.* keys): "
            "not yet supported: its scale attention is a SegFormer MLP head (refign spec 1.3) "
            "whose key names and concatenation order the specs do not document, and udaseg's "
            "HRDASegmentor builds a DAFormer-style attention head. The DAFormer variants of "
            "Refign, DSRNSS and ICDA are supported."
        )
    backbone, head = _take(t, f"{pre}backbone."), _take(t, f"{pre}head.")
    if not backbone or not head:
        raise CheckpointError(
            f"{raw.path!r}: no {pre}backbone.* / {pre}head.* tensors, so there is no {which} "
            f"to convert (prefixes present: {', '.join(sorted({k.split('.')[0] for k in t}))})"
        )
    seg = {f"backbone.{k}": e for k, e in backbone.items()}
    seg.update({f"decode_head.{k}": e for k, e in head.items()})
    claim(used, seg)
    others = ("m_backbone.", "m_head.") if which == "student" else ("backbone.", "head.")
    report.drop(
        "m_backbone.*, m_head.*" if which == "student" else "backbone.*, head.*",
        (
            "the EMA teacher, not selected (--which teacher picks it)"
            if which == "student"
            else "the student, not selected (Refign evaluates the student)"
        ),
        sorted(k for k in t if k.startswith(others)),
    )
    report.drop(
        "imnet_backbone.*",
        "FD's frozen ImageNet backbone, used only for the training loss (expected)",
        sorted(k for k in t if k.startswith("imnet_backbone.")),
    )
    report.drop(
        "alignment_backbone.*, alignment_head.*",
        "the frozen UAWarpC aligner (training only; udaseg has no UAWarpC module yet)",
        sorted(k for k in t if k.startswith(("alignment_backbone.", "alignment_head."))),
    )
    used.update(report.dropped_keys)
    report.notes.append(
        "the names inside Refign's head.* are not documented in the specs; they are taken to "
        "be the mmseg DAFormer-head names and every tensor was checked by name and shape"
    )
    return seg
