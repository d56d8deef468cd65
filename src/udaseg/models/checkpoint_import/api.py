"""The public conversion API: :func:`import_checkpoint`, :func:`convert_checkpoint`,
:func:`load_converted`, and the per-format selection dispatch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from ...errors import CheckpointError
from .common import (
    Entry,
    ImportedCheckpoint,
    ImportReport,
    UnsupportedCheckpointError,
    Which,
    _check_fit,
    _describe,
    _has,
    _load_checked,
    _metadata,
    _take,
    build_from_metadata,
    claim,
    start_report,
)
from .detection import detect_format
from .lightning_refign import select_lightning_refign
from .mmseg import _to_udaseg, select_mmseg_segmentor, select_mmseg_uda
from .reading import RawCheckpoint, read_checkpoint


def _select(raw: RawCheckpoint, fmt: str, which: Which, report: ImportReport) -> dict[str, Entry]:
    """The selected model's tensors in mmseg segmentor naming (``backbone.*``, ``decode_head.*``,
    HRDA: ``decode_head.head.*`` / ``decode_head.scale_attention.*``)."""
    t = raw.tensors
    used: set[str] = set()

    if fmt == "mmseg-uda":
        seg = select_mmseg_uda(raw, which, report, used)
    elif fmt == "lightning-refign":
        seg = select_lightning_refign(raw, which, report, used)
    elif fmt == "udaseg-lightning":
        sel = "model." if which == "student" else "algorithm.teacher.model."
        ours = _take(t, sel)
        if not ours:
            raise CheckpointError(
                f"{raw.path!r}: no {sel}* tensors, so there is no {which} to convert"
                + (" (the run had no EMA teacher: source-only?)" if which == "teacher" else "")
            )
        seg = _from_udaseg_names(ours)
        claim(used, seg)
        if which == "student":
            report.drop(
                "algorithm.teacher.model.*",
                "the EMA teacher, not selected",
                sorted(k for k in t if k.startswith("algorithm.teacher.model.")),
            )
        else:
            report.drop(
                "model.*",
                "the student, not selected",
                sorted(k for k in t if k.startswith("model.")),
            )
        report.drop(
            "algorithm.*",
            "training-only state of the adaptation methods (FD copy ...)",
            sorted(
                k
                for k in t
                if k.startswith("algorithm.")
                and k not in used
                and not k.startswith("algorithm.teacher.model.")
            ),
        )
        used.update(report.dropped_keys)
    elif fmt == "udaseg-weights":
        if which == "teacher":
            raise CheckpointError(
                f"{raw.path!r} holds a single udaseg segmentor; --which teacher does not apply"
            )
        seg = _from_udaseg_names(_take(t, ""))
        claim(used, seg)
    elif fmt == "mmseg-segmentor":
        seg = select_mmseg_segmentor(raw, which, report, used)
    elif fmt == "cmda-fusion":
        raise UnsupportedCheckpointError(
            f"{raw.path!r}: CMDA two-encoder fusion checkpoint (backbone_image.* / "
            "backbone_events.* keys): not yet supported: needs the CMDA fusion model (two MiT "
            "encoders, per-stage fusion blocks, shared DAFormer decoder; ciss_cmda spec 2.7), which "
            "udaseg does not implement yet. The specs also do not document the names of the "
            "fusion modules and of DAFormerHeadFusion."
        )
    elif fmt == "refign-uawarpc":
        raise UnsupportedCheckpointError(
            f"{raw.path!r}: Refign UAWarpC alignment checkpoint (alignment_head.* keys): it holds "
            "the UAWarpC dense matcher (refign spec 2.2), not a segmentor. Convert it with "
            "`udaseg convert SRC OUT.safetensors` (the aligner is picked automatically; "
            "import_aligner / convert_aligner in Python) and load the output with "
            "UAWarpCAligner.from_files."
        )
    else:
        raise CheckpointError(f"import_checkpoint: unknown format {fmt!r}")

    report.unexpected.extend(sorted(k for k in t if k not in used))
    return seg


def _from_udaseg_names(ours: Mapping[str, Entry]) -> dict[str, Entry]:
    """Our segmentor names -> mmseg names (HRDA: ``model.backbone`` -> ``backbone``,
    ``model.decode_head`` -> ``decode_head.head``, ``scale_attention_head`` ->
    ``decode_head.scale_attention``)."""
    if not _has(list(ours), "scale_attention_head.", "model."):
        return dict(ours)
    out: dict[str, Entry] = {}
    for k, e in ours.items():
        if k.startswith("model.backbone."):
            out[k[len("model.") :]] = e
        elif k.startswith("model.decode_head."):
            out["decode_head.head." + k[len("model.decode_head.") :]] = e
        elif k.startswith("scale_attention_head."):
            out["decode_head.scale_attention." + k[len("scale_attention_head.") :]] = e
        else:
            out[k] = e
    return out



def import_checkpoint(
    src: str | os.PathLike[str],
    which: Which = "student",
    allow_unsafe: bool = False,
    backbone: str | None = None,
    strict: bool = False,
) -> ImportedCheckpoint:
    """Read ``src`` (any :data:`FORMATS` entry), map it onto our segmentor names, check it.

    Args:
        src: the checkpoint file.
        which: ``"student"`` (default; what the papers evaluate) or ``"teacher"`` (EMA).
        allow_unsafe: permit ``weights_only=False`` for legacy files that pickle objects (executes
            pickled code: only for trusted files).
        backbone: expected MiT variant; a checkpoint of another variant fails naming the keys and
            shapes. None infers the variant from the shapes.
        strict: also fail when source keys are left unmapped (they are only reported otherwise).

    Returns:
        an :class:`ImportedCheckpoint` (``state_dict`` in our names, cast to the model's dtypes).

    Raises:
        UnsupportedCheckpointError: a recognised format without a udaseg module (CMDA, UAWarpC,
            non-MiT backbones, ablation decoders).
        CheckpointError: unreadable file, legacy pickle without ``allow_unsafe``, missing
            tensors, shape mismatches (naming keys and shapes), no teacher in the file, ...
    """
    if which not in ("student", "teacher"):
        raise CheckpointError(f"which must be 'student' or 'teacher', got {which!r}")
    raw = read_checkpoint(src, allow_unsafe=allow_unsafe)
    return import_from_raw(raw, detect_format(raw), str(src), which, backbone, strict)


def import_from_raw(
    raw: RawCheckpoint,
    fmt: str,
    src: str,
    which: Which = "student",
    backbone: str | None = None,
    strict: bool = False,
) -> ImportedCheckpoint:
    """:func:`import_checkpoint` on an already read checkpoint of format ``fmt``."""
    report = start_report(raw, src, fmt, which)
    seg = _select(raw, fmt, which, report)
    mapped, config = _to_udaseg(seg, report)
    if backbone is not None:
        from ..segmentor import BACKBONES

        if backbone not in BACKBONES:
            raise CheckpointError(
                f"unknown backbone {backbone!r}; known variants: {', '.join(BACKBONES)}"
            )
    ckpt_variant = str(config["backbone"])
    build_cfg = dict(config, backbone=backbone or ckpt_variant)
    model = build_from_metadata(_metadata(build_cfg))
    own = model.state_dict()
    extra = _check_fit(own, mapped, report.source, _describe(model), ckpt_variant)
    if extra:
        leftovers = sorted(mapped[k][0] for k in extra)
        report.unexpected.extend(leftovers)
        for k in extra:
            del mapped[k]
    report.unexpected = sorted(set(report.unexpected))
    if strict and report.unexpected:
        raise CheckpointError(
            f"{report.source!r}: {len(report.unexpected)} source tensors were not mapped (strict): "
            + ", ".join(report.unexpected[:20])
        )
    state: dict[str, Tensor] = {}
    casts = 0
    for k, (src_key, v) in mapped.items():
        target = own[k]
        t = v.detach()
        if t.dtype != target.dtype:
            t = t.to(target.dtype)
            casts += 1
        state[k] = t.clone().contiguous()
        report.mapping[k] = src_key
    if casts:
        report.notes.append(f"{casts} tensors cast to the model's dtypes (e.g. float16 -> float32)")
    report.target = type(model).__name__
    # the built (and checked) backbone: the file's, or --backbone when it fits the weights (for
    # ResNets this picks the flavour, e.g. resnet101_v1c_refign, which the weights cannot tell)
    report.config = dict(build_cfg)
    if report.unexpected and fmt == "lightning-refign":
        report.notes.append(
            "unmapped keys of a Refign-family checkpoint: ICDA's DAR (DAT) module is training-only "
            "(refign spec 4.3) but its key prefix is not documented; check the names above"
        )
    metadata = _metadata(build_cfg, report)
    return ImportedCheckpoint(state, metadata, report)


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    which: Which = "student",
    allow_unsafe: bool = False,
    backbone: str | None = None,
    strict: bool = False,
) -> ImportReport:
    """Convert ``src`` to udaseg segmentor weights at ``dst`` (``.safetensors`` + metadata).

    See :func:`import_checkpoint` for the arguments and errors. The output loads with
    :func:`load_converted` (and its state dict is that of :func:`build_from_metadata`'s model).
    """
    from ..weights import save_segmentor_weights

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{str(dst)!r}: the output must be a .safetensors file")
    imported = import_checkpoint(src, which, allow_unsafe, backbone, strict)
    save_segmentor_weights(imported.state_dict, dst, imported.metadata)
    return imported.report


def load_converted(
    model: nn.Module | None, path: str | os.PathLike[str] | ImportedCheckpoint
) -> nn.Module:
    """Load converted weights (a file from :func:`convert_checkpoint` or ``export-weights``, or an
    :class:`ImportedCheckpoint`) into ``model`` (strict), or into a model built from the file's
    metadata when ``model`` is None. Returns the model.

    Raises:
        CheckpointError: the weights do not fit (names the keys and both shapes, and the variant
            the file looks like), or an HRDA file given to a single-scale model and vice versa.
    """
    if isinstance(path, ImportedCheckpoint):
        state, meta, source = path.state_dict, dict(path.metadata), path.report.source
    else:
        raw = read_checkpoint(path)
        state, meta, source = raw.tensors, dict(raw.metadata), str(path)
    if model is None:
        if not {"backbone", "head", "num_classes"} <= set(meta):
            raise CheckpointError(
                f"{source!r} has no udaseg metadata (backbone, head, num_classes): pass the model "
                f"to load it into, or convert the file first (udaseg convert {source} "
                "OUT.safetensors)"
            )
        meta.setdefault("hrda", "1" if _has(list(state), "scale_attention_head.") else "0")
        model = build_from_metadata(meta)
    from ..hrda import HRDASegmentor

    file_hrda = _has(list(state), "scale_attention_head.")
    if file_hrda and not isinstance(model, HRDASegmentor):
        raise CheckpointError(
            f"{source!r} holds an HRDA segmentor (scale_attention_head.* tensors) but the model is "
            f"single-scale {_describe(model)}; configure HRDA (model hrda: {{}}) to load it"
        )
    if not file_hrda and isinstance(model, HRDASegmentor):
        raise CheckpointError(
            f"{source!r} holds a single-scale segmentor but the model is HRDA; load it into "
            "model.model (the attention head would stay random) or drop the hrda setting"
        )
    _load_checked(model, state, source)
    return model


def lightning_state_dict(imported: ImportedCheckpoint, prefix: str = "model.") -> dict[str, Tensor]:
    """The converted weights under ``prefix`` (``model.*``: the student of :class:`UDAModule`),
    e.g. to fill ``checkpoint["state_dict"]`` when a foreign file is given as ``--ckpt_path``."""
    return {prefix + k: v for k, v in imported.state_dict.items()}

