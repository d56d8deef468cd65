"""Lightning checkpoints of Refign / DSRNSS / ICDA (``DomainAdaptationSegmentationModel``)."""

from __future__ import annotations

from ...errors import CheckpointError
from .common import (
    Entry,
    ImportReport,
    Which,
    _has,
    _take,
    claim,
)
from .reading import RawCheckpoint


def select_lightning_refign(
    raw: RawCheckpoint, which: Which, report: ImportReport, used: set[str]
) -> dict[str, Entry]:
    """The student (``backbone.*`` / ``head.*`` [/ ``hrda_scale_attention.*``]) or EMA teacher
    (``m_backbone.*`` / ``m_head.*`` [/ ``m_hrda_scale_attention.*``]) in mmseg segmentor names
    (HRDA*: ``decode_head.head.*`` / ``decode_head.scale_attention.*``)."""
    t = raw.tensors
    pre = "" if which == "student" else "m_"
    hrda = _has(list(t), "hrda_scale_attention.", "m_hrda_scale_attention.")
    backbone, head = _take(t, f"{pre}backbone."), _take(t, f"{pre}head.")
    attention = _take(t, f"{pre}hrda_scale_attention.") if hrda else {}
    if not backbone or not head or (hrda and not attention):
        wanted = f"{pre}backbone.* / {pre}head.*" + (
            f" / {pre}hrda_scale_attention.*" if hrda else ""
        )
        raise CheckpointError(
            f"{raw.path!r}: no {wanted} tensors, so there is no {which} "
            f"to convert (prefixes present: {', '.join(sorted({k.split('.')[0] for k in t}))})"
        )
    if hrda:
        # HRDA* (refign 1.3 / 2.7): the DAFormer head is wrapped by HRDA, the scale attention is
        # a separate SegFormerHead (linear_c4..linear_c1, [c4, c3, c2, c1] concatenation).
        # In mmseg HRDA names, so that the shared mapping builds an HRDASegmentor.
        seg = {f"backbone.{k}": e for k, e in backbone.items()}
        seg.update({f"decode_head.head.{k}": e for k, e in head.items()})
        seg.update({f"decode_head.scale_attention.{k}": e for k, e in attention.items()})
    else:
        seg = {f"backbone.{k}": e for k, e in backbone.items()}
        seg.update({f"decode_head.{k}": e for k, e in head.items()})
    claim(used, seg)
    nets = ("backbone.", "head.", "hrda_scale_attention.") if hrda else ("backbone.", "head.")
    others = tuple(("m_" + n) if which == "student" else n for n in nets)
    report.drop(
        ", ".join(f"{n}*" for n in others),
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
        "the frozen UAWarpC aligner (training only; `udaseg convert --what aligner` "
        "extracts it)",
        sorted(k for k in t if k.startswith(("alignment_backbone.", "alignment_head."))),
    )
    used.update(report.dropped_keys)
    report.notes.append(
        "the names inside Refign's head.* are not documented in the specs; they are taken to "
        "be the mmseg DAFormer-head names and every tensor was checked by name and shape"
    )
    if hrda:
        report.notes.append(
            f"HRDA*: {pre}hrda_scale_attention.* is Refign's SegFormerHead (models/heads/"
            "segformer.py: linear_c1..4, linear_fuse, linear_pred; sigmoid applied by HRDA); it "
            "becomes udaseg's SegFormer attention head (HRDAConfig attention_head='segformer', "
            "[c4..c1] concatenation kept, no channel permutation)"
        )
    return seg
