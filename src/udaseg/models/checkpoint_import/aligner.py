"""Refign's UAWarpC dense matcher: extract the aligner weights from a checkpoint.

Sources: a ``refign-uawarpc`` checkpoint (Refign's ``AlignmentModel``, e.g. the released
``uawarpc_megadepth.ckpt``: ``alignment_backbone.*`` + ``alignment_head.*``) or a full Refign /
DSRNSS / ICDA Lightning checkpoint (``lightning-refign``; its frozen aligner is a copy of the same
weights) with ``--what aligner``. The output (``.safetensors`` with metadata, or ``.pt``/``.pth``)
holds ``alignment_head.*`` (every key of :class:`~udaseg.models.alignment.uawarpc.UAWarpC`'s
``state_dict``, checked strictly by name and shape) and, when the source has them,
``alignment_backbone.features.*`` (the frozen ImageNet VGG16 up to pool4). It loads with
``UAWarpCAligner.from_files(out)`` (VGG from the file) or ``from_files(out, vgg=...)``. The released
Lightning-1.x checkpoint pickles hyper-parameters, so reading it needs ``--allow-unsafe``; the
converted file is tensors only and loads with ``weights_only=True``.

The alignment module is imported lazily (only when an aligner is converted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ...errors import CheckpointError
from .common import ImportReport, _has, start_report
from .detection import detect_format
from .reading import RawCheckpoint, read_checkpoint

ALIGNER_FORMAT = "udaseg-uawarpc-v1"
"""Value of the ``udaseg_format`` metadata entry of converted aligner files."""

HEAD_PREFIX = "alignment_head."
VGG_PREFIX = "alignment_backbone."


@dataclass
class ImportedAligner:
    """Converted aligner weights in memory: the state dict (``alignment_head.*`` [+
    ``alignment_backbone.features.*``]), the metadata and the report."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, str]
    report: ImportReport

    def build_aligner(self):
        """A :class:`~udaseg.models.alignment.uawarpc.UAWarpCAligner` with these weights (the
        VGG16 stays random when the file has none)."""
        from ..alignment.uawarpc import UAWarpCAligner, load_uawarpc_state_dict
        from ..alignment.vgg import load_vgg16_state_dict, vgg16_state_dict

        aligner = UAWarpCAligner()
        n = len(HEAD_PREFIX)
        head = {k[n:]: v for k, v in self.state_dict.items() if k.startswith(HEAD_PREFIX)}
        load_uawarpc_state_dict(aligner.alignment_head, head, source=self.report.source)
        if _has(list(self.state_dict), VGG_PREFIX):
            load_vgg16_state_dict(
                aligner.alignment_backbone,
                vgg16_state_dict(self.state_dict, source=self.report.source),
                source=self.report.source,
            )
        return aligner


def aligner_from_raw(raw: RawCheckpoint, fmt: str, report: ImportReport) -> ImportedAligner:
    """The UAWarpC weights of an already read checkpoint (``refign-uawarpc`` or
    ``lightning-refign``), validated against ``UAWarpC().state_dict()``."""
    from ..alignment.uawarpc import UAWarpC, load_uawarpc_state_dict
    from ..alignment.vgg import VGG16Features, load_vgg16_state_dict, vgg16_state_dict

    if fmt not in ("refign-uawarpc", "lightning-refign"):
        raise CheckpointError(
            f"{raw.path!r}: a {fmt} checkpoint has no UAWarpC aligner; --what aligner needs "
            "Refign's uawarpc_megadepth.ckpt (alignment_head.*) or a Refign / DSRNSS / ICDA "
            "Lightning checkpoint"
        )
    t = raw.tensors
    n = len(HEAD_PREFIX)
    head = {k[n:]: v for k, v in t.items() if k.startswith(HEAD_PREFIX)}
    if not head:
        raise CheckpointError(
            f"{raw.path!r}: no {HEAD_PREFIX}* tensors, so there is no UAWarpC aligner to convert "
            f"(prefixes present: {', '.join(sorted({k.split('.')[0] for k in t}))})"
        )
    # strict: every UAWarpC tensor present with its shape, nothing else under alignment_head.
    net = UAWarpC()
    load_uawarpc_state_dict(net, head, source=repr(raw.path))
    state = {HEAD_PREFIX + k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    for k in net.state_dict():
        report.mapping[HEAD_PREFIX + k] = HEAD_PREFIX + k if k in head else "(default: absent)"
    used = {k for k in t if k.startswith(HEAD_PREFIX)}
    absent = sorted(k for k in net.state_dict() if k not in head)
    if absent:
        report.notes.append(
            f"{len(absent)} BatchNorm num_batches_tracked buffers absent from the file were "
            "written as 0 (they do not affect the frozen, eval-mode matcher)"
        )
    casts = sum(1 for k, v in head.items() if v.dtype != net.state_dict()[k].dtype)
    if casts:
        report.notes.append(f"{casts} tensors cast to the model's dtypes")

    vgg_keys = [k for k in t if k.startswith(VGG_PREFIX)]
    if vgg_keys:
        vgg = VGG16Features()
        vgg_sd = vgg16_state_dict({k: t[k] for k in vgg_keys}, source=repr(raw.path))
        load_vgg16_state_dict(vgg, vgg_sd, source=repr(raw.path))
        for k, v in vgg.state_dict().items():
            state[VGG_PREFIX + k] = v.detach().clone().contiguous()
            report.mapping[VGG_PREFIX + k] = VGG_PREFIX + k
        used.update(VGG_PREFIX + k for k in vgg_sd)
        report.drop(
            "alignment_backbone.features.N (N >= 24)",
            "VGG16 layers after pool4, unused by UAWarpC",
            sorted(k for k in vgg_keys if k not in used),
        )
        used.update(vgg_keys)
    else:
        report.notes.append(
            "the file has no alignment_backbone.* (VGG16) weights: load the output with "
            "UAWarpCAligner.from_files(OUT, vgg='vgg16-397923af.pth')"
        )
    if fmt == "lightning-refign":
        report.drop(
            "segmentation networks",
            "the Refign segmentor (student, teacher, FD copy); convert it without --what aligner",
            sorted(k for k in t if k not in used),
        )
        used.update(t)
    report.unexpected.extend(sorted(k for k in t if k not in used))
    report.target = "UAWarpCAligner"
    report.config = {
        "kind": "aligner",
        "description": "Refign's UAWarpC matcher head"
        + (" + VGG16 up to pool4" if vgg_keys else ", no VGG16 in the file"),
        "results_family": "refign-uawarpc/single",
    }
    metadata = {
        "udaseg_format": ALIGNER_FORMAT,
        "network": "uawarpc",
        "vgg": "1" if vgg_keys else "0",
        "source_format": fmt,
        "source_file": Path(raw.path).name,
    }
    return ImportedAligner(state, metadata, report)


def import_aligner(
    src: str | os.PathLike[str], allow_unsafe: bool = False, strict: bool = False
) -> ImportedAligner:
    """Read ``src`` and extract Refign's UAWarpC weights (module doc).

    Raises:
        CheckpointError: unreadable file, no ``alignment_head.*``, keys or shapes that do not fit
            ``UAWarpC()`` (named), or (``strict``) unmapped source keys.
    """
    raw = read_checkpoint(src, allow_unsafe=allow_unsafe)
    return aligner_import_from_raw(raw, detect_format(raw), str(src), strict)


def aligner_import_from_raw(
    raw: RawCheckpoint, fmt: str, src: str, strict: bool = False
) -> ImportedAligner:
    """:func:`import_aligner` on an already read checkpoint of format ``fmt``."""
    report = start_report(raw, src, fmt, "aligner")
    imported = aligner_from_raw(raw, fmt, report)
    report.unexpected = sorted(set(report.unexpected))
    if strict and report.unexpected:
        raise CheckpointError(
            f"{report.source!r}: {len(report.unexpected)} source tensors were not mapped (strict): "
            + ", ".join(report.unexpected[:20])
        )
    return imported


def save_aligner(imported: ImportedAligner, dst: str | os.PathLike[str]) -> Path:
    """Write converted aligner weights: ``.safetensors`` (with metadata) or ``.pt`` / ``.pth``
    (a plain state dict, ``torch.save``), atomically."""
    dst = check_aligner_output(dst)
    if dst.suffix == ".safetensors":
        from ..weights import save_segmentor_weights

        return save_segmentor_weights(imported.state_dict, dst, imported.metadata)
    import torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(imported.state_dict, tmp)
    os.replace(tmp, dst)
    return dst


def check_aligner_output(dst: str | os.PathLike[str]) -> Path:
    dst = Path(dst)
    if dst.suffix not in (".safetensors", ".pt", ".pth"):
        raise CheckpointError(
            f"{str(dst)!r}: the aligner output must be a .safetensors, .pt or .pth file"
        )
    return dst


def convert_aligner(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    allow_unsafe: bool = False,
    strict: bool = False,
) -> ImportReport:
    """Write Refign's UAWarpC weights from ``src`` to ``dst`` (``.safetensors`` with metadata,
    or ``.pt`` / ``.pth``: a plain state dict), loadable by ``UAWarpCAligner.from_files``."""
    check_aligner_output(dst)
    imported = import_aligner(src, allow_unsafe, strict)
    save_aligner(imported, dst)
    return imported.report
