"""Import the seed repositories' released checkpoints into udaseg's segmentors.

``udaseg convert SRC DST.safetensors`` (:func:`convert_main`, :func:`convert_checkpoint`) reads a
checkpoint of one of the formats below, picks the student (default: the papers evaluate the
student) or the EMA teacher, maps every tensor onto our :class:`~udaseg.models.segmentor.
EncoderDecoder` or :class:`~udaseg.models.hrda.HRDASegmentor` names, checks that every target
tensor is filled with the right shape, and writes our weights format: a ``.safetensors`` file of
the segmentor's ``state_dict`` plus string metadata (``udaseg_format``, ``backbone``, ``head``,
``head_channels``, ``num_classes``, ``hrda``, ``hrda_attention_classwise``, ``source_format``,
``source_model``, ``source_file``). :func:`load_converted` loads such a file into a model (or builds
the model from the metadata); :func:`import_checkpoint` does the same conversion in memory (for
loading a foreign file directly, e.g. by ``--ckpt_path``).

Every file is read with ``torch.load(weights_only=True)``. Checkpoints that pickle Python objects
besides tensors (mmcv ``meta`` with config objects, Lightning-1.x hyper-parameters) fail that
check; the error then names the offending globals and tells the user about ``--allow-unsafe``
(``allow_unsafe=True``), which loads with ``weights_only=False`` and therefore *executes code
pickled in the file*. Only then are missing classes (mmcv, pytorch_lightning 1.x, the seeds' own
packages) replaced by inert placeholders, so the tensors can be read without installing them.

Formats (the key layouts are those of the udaseg specs; "spec X" = ``daformer_hrda_mic_spec.md``,
"ciss/cmda X" = ``ciss_cmda_spec.md``, "refign X" = ``refign_dsrnss_icda_spec.md``):

=====================  ======================================================  ===================
format                 what is mapped                                          target
=====================  ======================================================  ===================
``mmseg-uda``          DACS checkpoints of DAFormer, MIC, CDDA (single scale)  EncoderDecoder
                       and HRDA, MIC(HRDA), CISS, CDDA(HRDA/MIC) (HRDA):
                       ``state_dict`` with ``model.*`` (student, default) /
                       ``ema_model.*`` (teacher); ``imnet_model.*`` (FD's
                       frozen ImageNet model) is dropped as info.
                       ``backbone.*`` (MiT, spec 1.7) -> ``backbone.*``;
                       DAFormer head ``decode_head.*`` (spec 2.2) or the
                       DAFormer-repo SegFormer head ``decode_head.linear_c.N``
                       (spec 2.3) -> ``decode_head.*``; HRDA (spec 7.2):
                       ``decode_head.head.*`` -> ``model.decode_head.*``,      HRDASegmentor
                       ``decode_head.scale_attention.*`` ->
                       ``scale_attention_head.*``, ``backbone.*`` ->
                       ``model.backbone.*``.
``mmseg-segmentor``    a bare mmseg segmentor dict (``backbone.*`` /           EncoderDecoder /
                       ``decode_head.*``, optionally under ``state_dict``),    HRDASegmentor
                       same head layouts, plus the NVlabs SegFormer head
                       (``linear_c{1..4}``, [c4..c1] concatenation: renamed
                       and ``linear_fuse`` input channels permuted to our
                       [c1..c4] order, spec 2.3).
``lightning-refign``   Lightning checkpoints of Refign / DSRNSS / ICDA with a  EncoderDecoder
                       MiT + DAFormer head (refign 1.3): ``backbone.*`` /
                       ``head.*`` (student) or ``m_backbone.*`` / ``m_head.*``
                       (teacher) -> ``backbone.*`` / ``decode_head.*``;
                       ``imnet_backbone.*``, ``alignment_backbone.*``,
                       ``alignment_head.*`` (UAWarpC, training only) dropped.
``udaseg-lightning``   our own Lightning checkpoints (``model.*`` student,     as saved
                       ``algorithm.teacher.model.*`` teacher).
``udaseg-weights``     a file written by this module or ``export-weights``.    as saved
``cmda-fusion``        detected, **not yet supported**: needs the CMDA         --
                       two-encoder fusion model (cmda 2.7).
``refign-uawarpc``     detected, **not yet supported**: needs the UAWarpC      --
                       alignment network (refign 2.2, 2.3).
Refign/DSRNSS HRDA*    detected (``hrda_scale_attention.*``), **not yet        --
                       supported**: their scale attention is a SegFormer MLP
                       head whose key names and concatenation order are not in
                       the specs, and udaseg's HRDA builds a DAFormer-style
                       attention head.
=====================  ======================================================  ===================

Numbers a user should then see with our evaluation (from the specs; "val" numbers can be checked
locally with ``udaseg test``, "test" numbers need the benchmark server; evaluate with the seeds'
protocol: DAFormer-type models whole-image at 1024x512 on Cityscapes and 960x540 on ACDC/DZ, HRDA-type
models at full resolution with 1024x1024 slide windows, stride 512, spec 4.4 and 7.5):

=========================================  ==========================================================
checkpoint                                 expected mIoU (%)
=========================================  ==========================================================
DAFormer GTA->CS (released, mmseg-uda)     **68.85** CS val (paper mean of 3 seeds 68.3; Synthia->CS
                                           60.9 mIoU16, CS->ACDC test 55.4, CS->DZ test 53.8)
HRDA GTA->CS (released, mmseg-uda, HRDA)   **73.79** CS val (paper mean 73.8; Synthia->CS 65.8,
                                           CS->ACDC test 68.0, CS->DZ test 55.9)
MIC(HRDA) (mmseg-uda, HRDA)                GTA->CS 75.9 (README: mean of 3 seeds; the spec gives no
                                           number for the single released checkpoint), Synthia->CS
                                           67.3, CS->ACDC test 70.4, CS->DZ test 60.2;
                                           MIC(DAFormer) GTA->CS 70.6 [paper]
CISS (mmseg-uda, HRDA)                     ``csHR2acdcHR_ciss_9fcab``: **68.67 ACDC val**, 69.6 ACDC
                                           test; ``csHR2dzurHR_ciss_1d68e``: 60.7 DZ test;
                                           ``csHR2acdcrefHR_ciss_5b929``: 78.1 ACDC-normal test
CDDA (mmseg-uda, DAFormer/HRDA/MIC)        GTA->CS 69.6 / 75.1 / 76.9, Synthia->CS 63.2 / 67.3 /
                                           68.7 (best-on-val single-seed checkpoints; the spec does
                                           not say that checkpoints are released)
Refign-DAFormer (lightning-refign)         ACDC test 65.5, DZ test 56.2, RobotCar test 60.5 (eval
                                           inputs resized to 540x960, refign 2.7)
ICDA (lightning-refign)                    DZ test 58.2
DSRNSS DAFormer (lightning-refign)         no number in the spec (tables unverified)
CMDA (not supported)                       DSEC-Night test 60.05 mIoU18 (56.89 mIoU19)
Refign-HRDA* (not supported)               ACDC test 72.1, DZ test 63.9
=========================================  ==========================================================

Layouts the specs do not document (the importer reports them by name instead of guessing):

* the sub-module names inside Refign/DSRNSS/ICDA's ``head.*`` (assumed equal to the mmseg DAFormer
  head names and verified tensor by tensor: any difference fails with the names), the prefix of
  ICDA's DAR/DAT module (reported as leftover keys; it is training-only, refign 4.3), and
  Refign's HRDA ``hrda_scale_attention`` SegFormer head (names and concat order);
* the exact names inside HRDA's ``decode_head.scale_attention.*``: spec 7.2 gives the prefix and
  the architecture; the ``fuse_layer.conv`` / ``fuse_layer.bn`` names follow from the
  ``daformer_conv1`` fusion (a ConvModule, spec 2.1/2.2) and are checked by shape;
* the unused ``conv_seg.*`` that mmseg's BaseDecodeHead gives the HRDA wrapper head and the
  SegFormer heads: dropped as info when present (not in the spec);
* CMDA's fusion modules and ``DAFormerHeadFusion`` names (cmda 2.7 gives only ``backbone_image``
  and ``backbone_events``), UAWarpC's full tree (refign 2.3: ``alignment_head.*`` only), and the
  MIC masking module's extra teacher (only built in ablations, spec 8.2).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

__all__ = [
    "CONVERTED_FORMAT",
    "FORMATS",
    "SEED_RESULTS",
    "ImportReport",
    "ImportedCheckpoint",
    "RawCheckpoint",
    "UnsupportedCheckpointError",
    "build_from_metadata",
    "convert_checkpoint",
    "convert_main",
    "detect_format",
    "import_checkpoint",
    "lightning_state_dict",
    "load_converted",
    "read_checkpoint",
]

CONVERTED_FORMAT = "udaseg-segmentor-v1"
"""Value of the ``udaseg_format`` metadata entry of the files this module writes."""

Which = Literal["student", "teacher"]

FORMATS: dict[str, str] = {
    "mmseg-uda": "mmseg-0.16 UDA checkpoint (DAFormer / HRDA / MIC / CISS / CDDA: DACS with "
    "model.* student, ema_model.* teacher, imnet_model.* FD model)",
    "mmseg-segmentor": "mmseg-0.16 segmentor state dict (backbone.* / decode_head.*)",
    "lightning-refign": "Lightning checkpoint of Refign / DSRNSS / ICDA "
    "(DomainAdaptationSegmentationModel: backbone.*, head.*, m_backbone.*, m_head.* ...)",
    "udaseg-lightning": "udaseg Lightning checkpoint (model.*, algorithm.teacher.model.*)",
    "udaseg-weights": "udaseg segmentor weights (.safetensors from convert / export-weights)",
    "cmda-fusion": "CMDA two-encoder fusion checkpoint (backbone_image.* / backbone_events.*)",
    "refign-uawarpc": "Refign UAWarpC alignment-network checkpoint (alignment_head.*)",
}
"""Format name -> description (:func:`detect_format` returns one of these names)."""

SEED_RESULTS: dict[str, tuple[str, ...]] = {
    "mmseg-uda/single": (
        (
            "DAFormer GTA->CS released checkpoint: 68.85 mIoU on Cityscapes val (paper: 68.3, "
            "mean of 3 seeds); eval whole image at 1024x512"
        ),
        "DAFormer Synthia->CS 60.9 (mIoU16), CS->ACDC test 55.4, CS->DZ test 53.8",
        "MIC(DAFormer) GTA->CS 70.6 [paper]; CDDA(DAFormer) GTA->CS 69.6, Synthia->CS 63.2",
    ),
    "mmseg-uda/hrda": (
        (
            "HRDA GTA->CS released checkpoint: 73.79 mIoU on Cityscapes val (paper: 73.8); eval "
            "at full resolution, slide 1024x1024 stride 512"
        ),
        "HRDA Synthia->CS 65.8 (mIoU16), CS->ACDC test 68.0, CS->DZ test 55.9",
        (
            "MIC(HRDA) GTA->CS 75.9 (mean of 3 seeds), Synthia->CS 67.3, CS->ACDC test 70.4, "
            "CS->DZ test 60.2"
        ),
        (
            "CISS csHR2acdcHR_ciss_9fcab: 68.67 on ACDC val (69.6 ACDC test); "
            "csHR2dzurHR_ciss_1d68e: 60.7 DZ test; csHR2acdcrefHR_ciss_5b929: 78.1 ACDC-normal test"
        ),
        "CDDA(HRDA) GTA->CS 75.1, CDDA(MIC) 76.9 (best-on-val single-seed checkpoints)",
    ),
    "lightning-refign/single": (
        (
            "Refign-DAFormer: ACDC test 65.5, DZ test 56.2, RobotCar test 60.5 (eval inputs "
            "resized to 540x960)"
        ),
        "ICDA: DZ test 58.2; DSRNSS: no number in the spec",
    ),
    "mmseg-segmentor/single": ("no reference number in the specs for bare segmentor files",),
}
"""Format family -> the seed numbers a user should see after converting (spec sections 10.1,
ciss 1.13, cmda 2.13, refign 1.7 / 3.5 / 4.6, cdda 12)."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint format was recognised but udaseg has no module it maps onto yet."""


# --------------------------------------------------------------------------------------- reading
@dataclass
class RawCheckpoint:
    """A checkpoint file as read: the flat tensor dict plus what surrounded it.

    Attributes:
        path: the file.
        tensors: ``{name: tensor}`` of the state dict (unwrapped from ``state_dict``/``model``).
        top_keys: the non-state-dict entries of the top-level container (``meta``,
            ``optimizer``, ``hyper_parameters``, ``pytorch-lightning_version`` ...).
        metadata: the ``.safetensors`` header metadata (empty for pickled files).
        unsafe: True when the file was loaded with ``weights_only=False``.
        placeholders: globals that were missing on unsafe loading and replaced by placeholders.
        skipped: names of non-tensor entries inside the state dict (ignored).
    """

    path: str
    tensors: dict[str, Tensor]
    top_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    unsafe: bool = False
    placeholders: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Placeholder:
    """Stands in for a class or function whose module is not installed (unsafe loading only).

    Accepts any construction protocol of pickle (call, ``__new__``, ``__setstate__``, item and
    list appends) and keeps what it got, so containers holding such objects still load.
    """

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key, value) -> None:
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value) -> None:
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values) -> None:
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self._qualname}>"


def _lenient_pickle_module(missing: list[str]) -> types.ModuleType:
    """A ``pickle``-like module whose Unpickler replaces unimportable globals by placeholders."""

    class LenientUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                qual = f"{module}.{name}"
                if qual not in missing:
                    missing.append(qual)
                return type(name, (_Placeholder,), {"_qualname": qual})

    mod = types.ModuleType("udaseg_lenient_pickle")
    mod.Unpickler = LenientUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return mod


def _unsafe_globals(path: Path) -> list[str]:
    fn = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if fn is None:
        return []
    try:
        return list(fn(str(path)))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files are not supported by the scan
        return []


_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_torch_file(path: Path) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a legacy pickle that starts with
    torch's magic number."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(64)
    return _LEGACY_MAGIC in head


def read_checkpoint(path: str | os.PathLike[str], allow_unsafe: bool = False) -> RawCheckpoint:
    """Read a checkpoint file without interpreting its keys.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``. If that refuses the file because it
    pickles Python objects other than tensors, a :class:`CheckpointError` names them and explains
    ``--allow-unsafe``; with ``allow_unsafe=True`` the file is then loaded with
    ``weights_only=False`` (this executes code pickled in the file: only for trusted files).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, pickled objects without ``allow_unsafe``, or no tensors.
    """
    from .weights import read_safetensors, require_weights_file

    p = require_weights_file(path)
    if p.suffix == ".safetensors":
        tensors, metadata = read_safetensors(p)
        return RawCheckpoint(str(p), tensors, metadata=metadata)

    unsafe, placeholders = False, []
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _is_torch_file(p):
            raise CheckpointError(
                f"{str(p)!r}: not a PyTorch checkpoint (neither a torch zip archive nor a legacy "
                "torch.save file); it is corrupt or of another type"
            ) from e
        globs = _unsafe_globals(p)
        what = (
            f"Python objects other than tensors ({', '.join(globs[:8])}"
            f"{', ...' if len(globs) > 8 else ''})"
            if globs
            else "Python objects other than tensors"
        )
        if not allow_unsafe:
            raise CheckpointError(
                f"{str(p)!r} pickles {what}, so torch.load(weights_only=True) refuses it. This is "
                "normal for legacy checkpoints of the seed repositories (mmcv meta, Lightning-1.x "
                "hyper-parameters). If you trust the file's source, re-run with --allow-unsafe "
                "(convert_checkpoint(..., allow_unsafe=True)): it loads the file with "
                "weights_only=False, which EXECUTES code pickled in the file. The converted "
                ".safetensors file then holds tensors only."
            ) from None
        missing: list[str] = []
        try:
            obj = torch.load(
                p,
                map_location="cpu",
                weights_only=False,
                pickle_module=_lenient_pickle_module(missing),
            )
        except Exception as e2:
            raise CheckpointError(
                f"{str(p)!r}: could not be read even with weights_only=False: {e2}"
            ) from e2
        unsafe, placeholders = True, missing
    except Exception as e:  # corrupt archive, wrong file type, ...
        raise CheckpointError(
            f"{str(p)!r}: torch.load(weights_only=True) could not read this file: {e}. It is "
            "corrupt or not a PyTorch checkpoint."
        ) from e

    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{str(p)!r}: expected a checkpoint dict, the file holds a {type(obj).__name__}"
        )
    top_keys: list[str] = []
    sd: Mapping = obj
    for container in ("state_dict", "model"):
        inner = obj.get(container)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            sd = inner
            top_keys = [str(k) for k in obj if k != container]
            break
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, Tensor)}
    skipped = [str(k) for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{str(p)!r}: no tensors found (top-level keys: {keys})")
    return RawCheckpoint(str(p), tensors, top_keys, {}, unsafe, placeholders, skipped)


# -------------------------------------------------------------------------------------- detection
def _has(keys: Sequence[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def detect_format(raw: RawCheckpoint) -> str:
    """The :data:`FORMATS` name of a checkpoint, from its keys (and its container keys).

    Raises:
        CheckpointError: no known layout; the message shows the first keys.
    """
    keys = list(raw.tensors)
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


# ------------------------------------------------------------------------------------- reporting
@dataclass
class DroppedGroup:
    """Source keys left out on purpose, with the reason."""

    reason: str
    keys: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    """What :func:`import_checkpoint` did.

    Attributes:
        source: the input file.
        format: a :data:`FORMATS` name.
        which: ``student`` or ``teacher``.
        target: ``EncoderDecoder`` or ``HRDASegmentor``.
        config: the inferred model config (backbone, head, head_channels, num_classes, hrda ...).
        mapping: our key -> source key, for every tensor written.
        dropped: group label -> :class:`DroppedGroup` (expected leftovers: info, not errors).
        unexpected: source keys that were not mapped and are not known to be unused (warnings).
        notes: remarks (unsafe loading, dtype casts, undocumented layouts ...).
    """

    source: str
    format: str
    which: str
    target: str = ""
    config: dict[str, object] = field(default_factory=dict)
    mapping: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, DroppedGroup] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def drop(self, label: str, reason: str, keys: Sequence[str]) -> None:
        if keys:
            self.dropped.setdefault(label, DroppedGroup(reason)).keys.extend(keys)

    @property
    def dropped_keys(self) -> list[str]:
        return [k for g in self.dropped.values() for k in g.keys]

    @property
    def expected_results(self) -> tuple[str, ...]:
        family = f"{self.format}/{'hrda' if self.config.get('hrda') else 'single'}"
        return SEED_RESULTS.get(family, ())

    def format_text(self, max_names: int = 40) -> str:
        """A human-readable report (every unexpected key by name, up to ``max_names``)."""
        cfg = self.config
        lines = [
            f"source:   {self.source}",
            f"format:   {self.format}: {FORMATS.get(self.format, '')}",
            f"selected: {self.which}",
        ]
        if self.target:
            lines.append(
                f"target:   {self.target} ({cfg.get('backbone')} + {cfg.get('head')} head, "
                f"{cfg.get('head_channels')} channels, {cfg.get('num_classes')} classes"
                + (
                    f", HRDA attention {'class-wise' if cfg.get('hrda_attention_classwise') else 'single'}"
                    if cfg.get("hrda")
                    else ""
                )
                + ")"
            )
            lines.append(f"mapped:   {len(self.mapping)} tensors (every target tensor filled)")
        for label, group in self.dropped.items():
            lines.append(f"dropped:  {label} ({len(group.keys)} tensors): {group.reason}")
        if self.unexpected:
            lines.append(f"WARNING:  {len(self.unexpected)} source keys were not mapped:")
            lines += [f"            {k}" for k in self.unexpected[:max_names]]
            if len(self.unexpected) > max_names:
                lines.append(f"            ... and {len(self.unexpected) - max_names} more")
        lines += [f"note:     {n}" for n in self.notes]
        if self.expected_results:
            lines.append("expected results with udaseg's evaluation (seed numbers):")
            lines += [f"          - {r}" for r in self.expected_results]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_text()


@dataclass
class ImportedCheckpoint:
    """A converted checkpoint in memory: our ``state_dict``, the metadata and the report."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, str]
    report: ImportReport

    def build_model(self) -> nn.Module:
        """A fresh model of the right architecture, loaded with these weights (strict)."""
        model = build_from_metadata(self.metadata)
        _load_checked(model, self.state_dict, self.report.source)
        return model


# -------------------------------------------------------------------------------- model selection
Entry = tuple[str, Tensor]  # (source key, tensor)


def _take(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Entry]:
    n = len(prefix)
    return {k[n:]: (k, v) for k, v in tensors.items() if k.startswith(prefix)}


def _select(raw: RawCheckpoint, fmt: str, which: Which, report: ImportReport) -> dict[str, Entry]:
    """The selected model's tensors in mmseg segmentor naming (``backbone.*``, ``decode_head.*``,
    HRDA: ``decode_head.head.*`` / ``decode_head.scale_attention.*``)."""
    t = raw.tensors
    used: set[str] = set()

    def claim(entries: Mapping[str, Entry]) -> None:
        used.update(src for src, _ in entries.values())

    if fmt == "mmseg-uda":
        sel, other = ("model.", "ema_model.") if which == "student" else ("ema_model.", "model.")
        seg = _take(t, sel)
        if not seg:
            raise CheckpointError(
                f"{raw.path!r}: no {sel}* tensors, so there is no {which} to convert; the file "
                f"has: {', '.join(sorted({k.split('.')[0] + '.*' for k in t}))}"
            )
        claim(seg)
        report.drop(
            f"{other}*",
            (
                "the EMA teacher, not selected (--which teacher picks it)"
                if which == "student"
                else "the student, not selected (the papers evaluate the student)"
            ),
            sorted(k for k in t if k.startswith(other)),
        )
        report.drop(
            "imnet_model.*",
            "FD's frozen ImageNet model, used only for the training loss (expected)",
            sorted(k for k in t if k.startswith("imnet_model.")),
        )
        used.update(report.dropped_keys)
    elif fmt == "lightning-refign":
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
        claim(seg)
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
    elif fmt == "udaseg-lightning":
        sel = "model." if which == "student" else "algorithm.teacher.model."
        ours = _take(t, sel)
        if not ours:
            raise CheckpointError(
                f"{raw.path!r}: no {sel}* tensors, so there is no {which} to convert"
                + (" (the run had no EMA teacher: source-only?)" if which == "teacher" else "")
            )
        seg = _from_udaseg_names(ours)
        claim(seg)
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
        claim(seg)
    elif fmt == "mmseg-segmentor":
        if which == "teacher":
            raise CheckpointError(
                f"{raw.path!r} is a bare segmentor checkpoint (one model, no EMA teacher); "
                "--which teacher does not apply"
            )
        seg = {k: e for k, e in _take(t, "").items() if k.startswith(("backbone.", "decode_head."))}
        claim(seg)
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
            f"{raw.path!r}: Refign UAWarpC alignment checkpoint (alignment_head.* keys): not yet "
            "supported: needs the UAWarpC dense-matching network (refign spec 2.2), which udaseg "
            "does not implement yet. It is used only during Refign training, not for evaluation."
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


# ------------------------------------------------------------------------------ key mapping core
def _permute_nvlabs_fuse(w: Tensor, levels: int) -> Tensor:
    """``linear_fuse`` weight for [cL..c1] input blocks -> the same map for [c1..cL] blocks."""
    blocks = w.chunk(levels, dim=1)
    return torch.cat(blocks[::-1], dim=1).contiguous()


def _map_head(
    head: Mapping[str, Entry], where: str, report: ImportReport, dropped_label: str
) -> tuple[dict[str, Entry], dict[str, object]]:
    """One decode head in mmseg names -> our names, plus its inferred type and widths."""
    keys = list(head)

    def shape(name: str) -> tuple[int, ...]:
        if name not in head:
            raise CheckpointError(
                f"{report.source!r}: {where} has no {name!r} (its keys start with: "
                f"{', '.join(sorted(keys)[:6])})"
            )
        return tuple(head[name][1].shape)

    if _has(keys, "embed_layers."):
        if _has(keys, "fuse_layer.aspp_modules."):
            idx = {
                int(m.group(1))
                for k in keys
                if (m := re.match(r"fuse_layer\.aspp_modules\.(\d+)\.", k))
            }
            if any(k.startswith("fuse_layer.aspp_modules.1.conv.") for k in keys):
                raise UnsupportedCheckpointError(
                    f"{report.source!r}: {where} is the non-separable ASPP decoder "
                    "(daformer_aspp ablation); udaseg implements only the separable (sepaspp) "
                    "DAFormer head"
                )
            if len(idx) != 4:
                raise UnsupportedCheckpointError(
                    f"{report.source!r}: {where} has {len(idx)} ASPP branches; udaseg's DAFormer "
                    "head has 4 (dilations 1, 6, 12, 18)"
                )
            kind = "daformer"
        elif "fuse_layer.conv.weight" in head:
            kind = "daformer_conv1"
        else:
            raise UnsupportedCheckpointError(
                f"{report.source!r}: {where}: DAFormer-style embeddings with an unknown fusion "
                f"(keys: {', '.join(sorted(k for k in keys if k.startswith('fuse_layer'))[:6])}); "
                "only the sepaspp head (and conv1 for HRDA attention) are supported"
            )
        embed = shape("embed_layers.0.proj.weight")[0]
        classes, channels = shape("conv_seg.weight")[:2]
        return dict(head), {
            "head": kind,
            "embed_dim": embed,
            "channels": channels,
            "num_classes": classes,
        }
    if _has(keys, "linear_c.0.", "linear_c1."):
        nvlabs = _has(keys, "linear_c1.")
        out: dict[str, Entry] = {}
        unused = sorted(src for k, (src, _) in head.items() if k.startswith("conv_seg."))
        report.drop(
            dropped_label,
            "unused conv_seg of mmseg's BaseDecodeHead (the SegFormer head "
            "predicts with linear_pred)",
            unused,
        )
        levels = 0
        for k, (src, v) in head.items():
            if k.startswith("conv_seg."):
                continue
            if nvlabs and (m := re.match(r"^linear_c(\d)\.(.+)$", k)):
                levels = max(levels, int(m.group(1)))
                out[f"linear_c.{int(m.group(1)) - 1}.{m.group(2)}"] = (src, v)
            else:
                out[k] = (src, v)
        if nvlabs:
            src, w = out.get("linear_fuse.conv.weight", (None, None))
            if w is None:
                raise CheckpointError(f"{report.source!r}: {where} has no linear_fuse.conv.weight")
            out["linear_fuse.conv.weight"] = (src, _permute_nvlabs_fuse(w, levels))
            report.notes.append(
                f"{where}: NVlabs SegFormer head: linear_c{{1..{levels}}} renamed to "
                f"linear_c.{{0..{levels - 1}}} and linear_fuse input channels permuted from the "
                "[c4..c1] to udaseg's [c1..c4] concatenation order"
            )
        embed = (
            int(out["linear_c.0.proj.weight"][1].shape[0]) if "linear_c.0.proj.weight" in out else 0
        )
        classes = int(out["linear_pred.weight"][1].shape[0]) if "linear_pred.weight" in out else 0
        return out, {
            "head": "segformer",
            "embed_dim": embed,
            "channels": embed,
            "num_classes": classes,
        }
    raise UnsupportedCheckpointError(
        f"{report.source!r}: {where}: unknown decode head (keys: {', '.join(sorted(keys)[:8])}); "
        "udaseg maps the DAFormer (sepaspp) and SegFormer heads"
    )


def _to_udaseg(seg: Mapping[str, Entry], report: ImportReport) -> tuple[dict[str, Entry], dict]:
    """mmseg segmentor names -> our EncoderDecoder / HRDASegmentor names + the model config."""
    from .weights import guess_mit_variant

    report.unexpected.extend(
        src for k, (src, _) in seg.items() if not k.startswith(("backbone.", "decode_head."))
    )
    backbone = {k[len("backbone.") :]: e for k, e in seg.items() if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointError(f"{report.source!r}: the selected model has no backbone.* tensors")
    if "patch_embed1.proj.weight" not in backbone:
        raise UnsupportedCheckpointError(
            f"{report.source!r}: the backbone is not a MiT (SegFormer) encoder (its keys start "
            f"with {', '.join(sorted(backbone)[:4])}); udaseg has only MiT backbones, so e.g. the "
            "DeepLabV2/ResNet-101 variants cannot be imported yet"
        )
    classifier = sorted(src for k, (src, _) in backbone.items() if k.startswith("head."))
    report.drop("backbone.head.*", "the MiT ImageNet classifier (unused by segmentors)", classifier)
    backbone = {k: e for k, e in backbone.items() if not k.startswith("head.")}
    variant = guess_mit_variant({k: v for k, (_, v) in backbone.items()})
    if variant is None:
        dims = [
            tuple(backbone[f"patch_embed{i}.proj.weight"][1].shape)
            for i in range(1, 5)
            if f"patch_embed{i}.proj.weight" in backbone
        ]
        depths = [
            1
            + max(
                (int(m.group(1)) for k in backbone if (m := re.match(rf"^block{i}\.(\d+)\.", k))),
                default=-1,
            )
            for i in range(1, 5)
        ]
        from .mit import MIT_VARIANTS

        raise CheckpointError(
            f"{report.source!r}: the backbone matches no MiT variant: patch_embed{{1..4}}.proj."
            f"weight shapes {dims}, block depths {depths}; known variants: "
            + ", ".join(
                f"{n} (dims {c.embed_dims}, depths {c.depths})" for n, c in MIT_VARIANTS.items()
            )
        )

    decode = {k[len("decode_head.") :]: e for k, e in seg.items() if k.startswith("decode_head.")}
    if not decode:
        raise CheckpointError(f"{report.source!r}: the selected model has no decode_head.* tensors")
    hrda = _has(list(decode), "head.", "scale_attention.")
    out: dict[str, Entry] = {}
    config: dict[str, object] = {"backbone": variant, "hrda": hrda}
    if hrda:
        main = {k[len("head.") :]: e for k, e in decode.items() if k.startswith("head.")}
        att = {
            k[len("scale_attention.") :]: e
            for k, e in decode.items()
            if k.startswith("scale_attention.")
        }
        if not main or not att:
            raise UnsupportedCheckpointError(
                f"{report.source!r}: HRDA decode head with "
                f"{'no decode_head.scale_attention.*' if not att else 'no decode_head.head.*'} "
                "tensors (fixed-attention ablation or incomplete file); udaseg needs both"
            )
        wrapper = sorted(
            src for k, (src, _) in decode.items() if not k.startswith(("head.", "scale_attention."))
        )
        unused = [s for s in wrapper if s.split("decode_head.", 1)[-1].startswith("conv_seg.")]
        report.drop(
            "decode_head.conv_seg.* (HRDA wrapper)",
            "unused classifier that mmseg's BaseDecodeHead gives the HRDA wrapper head",
            unused,
        )
        report.unexpected.extend(s for s in wrapper if s not in unused)
        main_mapped, head_cfg = _map_head(
            main, "decode_head.head", report, "decode_head.head.conv_seg.*"
        )
        att_mapped, att_cfg = _map_head(
            att, "decode_head.scale_attention", report, "decode_head.scale_attention.conv_seg.*"
        )
        if head_cfg["head"] == "daformer_conv1":
            raise UnsupportedCheckpointError(
                f"{report.source!r}: the HRDA main head is the daformer_conv1 ablation decoder; "
                "udaseg implements the sepaspp DAFormer head"
            )
        k_att = int(att_cfg["num_classes"])
        if k_att not in (1, int(head_cfg["num_classes"])):
            raise CheckpointError(
                f"{report.source!r}: decode_head.scale_attention predicts {k_att} channels; "
                f"expected {head_cfg['num_classes']} (class-wise) or 1"
            )
        config["hrda_attention_classwise"] = k_att != 1
        out.update({f"model.backbone.{k}": e for k, e in backbone.items()})
        out.update({f"model.decode_head.{k}": e for k, e in main_mapped.items()})
        out.update({f"scale_attention_head.{k}": e for k, e in att_mapped.items()})
        report.notes.append(
            "HRDA: decode_head.head.* -> model.decode_head.*, decode_head.scale_attention.* -> "
            "scale_attention_head.*, backbone.* -> model.backbone.*"
        )
    else:
        main_mapped, head_cfg = _map_head(decode, "decode_head", report, "decode_head.conv_seg.*")
        if head_cfg["head"] == "daformer_conv1":
            raise UnsupportedCheckpointError(
                f"{report.source!r}: the decode head is the daformer_conv1 ablation decoder; "
                "udaseg implements the sepaspp DAFormer head"
            )
        out.update({f"backbone.{k}": e for k, e in backbone.items()})
        out.update({f"decode_head.{k}": e for k, e in main_mapped.items()})
    if head_cfg["head"] == "daformer" and head_cfg["embed_dim"] != head_cfg["channels"]:
        raise UnsupportedCheckpointError(
            f"{report.source!r}: DAFormer head with embedding width {head_cfg['embed_dim']} != "
            f"channels {head_cfg['channels']}; udaseg builds both at the same width"
        )
    config.update(
        head=head_cfg["head"],
        head_channels=int(head_cfg["channels"]),
        num_classes=int(head_cfg["num_classes"]),
    )
    return out, config


# ----------------------------------------------------------------------------- model + checking
def _metadata(config: Mapping[str, object], report: ImportReport | None = None) -> dict[str, str]:
    meta = {
        "udaseg_format": CONVERTED_FORMAT,
        "backbone": str(config["backbone"]),
        "head": str(config["head"]),
        "head_channels": str(config["head_channels"]),
        "num_classes": str(config["num_classes"]),
        "hrda": "1" if config.get("hrda") else "0",
    }
    if config.get("hrda"):
        meta["hrda_attention_classwise"] = (
            "1" if config.get("hrda_attention_classwise", True) else "0"
        )
    if report is not None:
        meta.update(
            source_format=report.format,
            source_model=report.which,
            source_file=Path(report.source).name,
        )
    return meta


def build_from_metadata(metadata: Mapping[str, str]) -> nn.Module:
    """The (randomly initialised) model a converted file was made for.

    ``EncoderDecoder`` from ``build_segmentor(backbone, head, num_classes, head_channels)``; wrapped
    in ``HRDASegmentor`` (paper-default :class:`~udaseg.models.hrda.HRDAConfig`, with
    ``attention_classwise`` from the metadata) when ``hrda == "1"``.
    """
    from .hrda import HRDAConfig, HRDASegmentor
    from .segmentor import build_segmentor

    try:
        model = build_segmentor(
            backbone=metadata["backbone"],
            head=metadata["head"],
            num_classes=int(metadata["num_classes"]),
            head_channels=(
                None
                if metadata.get("head_channels", "None") in ("None", "")
                else int(metadata["head_channels"])
            ),
        )
    except KeyError as e:
        raise CheckpointError(
            f"converted-weights metadata lacks {e.args[0]!r}: {dict(metadata)}"
        ) from None
    if str(metadata.get("hrda", "0")) in ("1", "True", "true"):
        classwise = metadata.get("hrda_attention_classwise", "1") == "1"
        model = HRDASegmentor(model, HRDAConfig(attention_classwise=classwise))
    return model


def _describe(model: nn.Module) -> str:
    from .hrda import HRDASegmentor

    backbone = getattr(model, "backbone", None)
    variant = getattr(backbone, "variant", "?")
    return f"{type(model).__name__} ({variant}){' with HRDA' if isinstance(model, HRDASegmentor) else ''}"


def _check_fit(
    own: Mapping[str, Tensor],
    mapped: Mapping[str, Entry],
    source: str,
    what: str,
    ckpt_variant: str | None = None,
) -> list[str]:
    """Raise a CheckpointError naming keys and shapes when ``mapped`` does not fill ``own``.

    Returns the mapped keys the model does not have (leftovers, reported by the caller).
    """
    order = {k: i for i, k in enumerate(own)}  # report in model order (patch_embed1 first)
    mismatched = sorted(
        (
            (k, src, tuple(v.shape), tuple(own[k].shape))
            for k, (src, v) in mapped.items()
            if k in own and tuple(own[k].shape) != tuple(v.shape)
        ),
        key=lambda m: order[m[0]],
    )
    missing = sorted(k for k in own if k not in mapped)
    extra = sorted(k for k in mapped if k not in own)
    if mismatched or missing:
        parts = []
        if mismatched:
            shown = "; ".join(
                f"{src!r} -> {k!r}: checkpoint {cs} vs model {ms}"
                for k, src, cs, ms in mismatched[:8]
            )
            more = f" (and {len(mismatched) - 8} more)" if len(mismatched) > 8 else ""
            parts.append(f"{len(mismatched)} shape mismatches: {shown}{more}")
        if missing:
            more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
            parts.append(
                f"{len(missing)} model tensors not in the checkpoint: {', '.join(missing[:20])}{more}"
            )
        if extra:
            more = f" (and {len(extra) - 10} more)" if len(extra) > 10 else ""
            parts.append(
                f"{len(extra)} checkpoint tensors the model lacks: {', '.join(extra[:10])}{more}"
            )
        hint = ""
        if ckpt_variant:
            hint = f" The checkpoint's backbone looks like {ckpt_variant}."
        raise CheckpointError(f"{source!r} does not fit {what}: " + "; ".join(parts) + "." + hint)
    return extra


def _load_checked(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    from .weights import guess_mit_variant

    bb = {
        k.split("backbone.", 1)[1]: v
        for k, v in state.items()
        if k.startswith(("backbone.", "model.backbone."))
    }
    extra = _check_fit(
        model.state_dict(),
        {k: (k, v) for k, v in state.items()},
        source,
        _describe(model),
        guess_mit_variant(bb),
    )
    if extra:
        raise CheckpointError(
            f"{source!r} does not fit {_describe(model)}: {len(extra)} checkpoint tensors the model "
            f"lacks: {', '.join(extra[:10])}"
            + (
                " (an HRDA file: build the model with HRDA)"
                if _has(extra, "scale_attention_head.")
                else ""
            )
        )
    model.load_state_dict(dict(state), strict=True)


# ----------------------------------------------------------------------------------- public API
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
            Refign HRDA*, non-MiT backbones, ablation decoders).
        CheckpointError: unreadable file, legacy pickle without ``allow_unsafe``, missing
            tensors, shape mismatches (naming keys and shapes), no teacher in the file, ...
    """
    if which not in ("student", "teacher"):
        raise CheckpointError(f"which must be 'student' or 'teacher', got {which!r}")
    raw = read_checkpoint(src, allow_unsafe=allow_unsafe)
    fmt = detect_format(raw)
    report = ImportReport(source=str(src), format=fmt, which=which)
    if raw.unsafe:
        report.notes.append(
            "loaded with weights_only=False (--allow-unsafe): code pickled in the file was run"
        )
    if raw.placeholders:
        report.notes.append(
            "classes not installed here were replaced by placeholders while unpickling: "
            + ", ".join(raw.placeholders)
        )
    if raw.skipped:
        report.notes.append(f"non-tensor state-dict entries ignored: {', '.join(raw.skipped[:10])}")
    seg = _select(raw, fmt, which, report)
    mapped, config = _to_udaseg(seg, report)
    if backbone is not None:
        from .mit import MIT_VARIANTS

        if backbone not in MIT_VARIANTS:
            raise CheckpointError(
                f"unknown backbone {backbone!r}; known variants: {', '.join(MIT_VARIANTS)}"
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
    report.config = dict(config)
    if report.unexpected and fmt == "lightning-refign":
        report.notes.append(
            "unmapped keys of a Refign-family checkpoint: ICDA's DAR (DAT) module is training-only "
            "(refign spec 4.3) but its key prefix is not documented; check the names above"
        )
    metadata = _metadata(config, report)
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
    from .weights import save_segmentor_weights

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
    from .hrda import HRDASegmentor

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


# ----------------------------------------------------------------------------------------- CLI
def convert_main(argv: Sequence[str] | None = None) -> int:
    """``udaseg convert SRC DST`` -> exit status (0 converted, 1 unusable file, 2 bad usage)."""
    p = argparse.ArgumentParser(
        prog="udaseg convert",
        description="Convert a released checkpoint of DAFormer / HRDA / MIC / CISS / CDDA (mmseg "
        "0.16) or Refign / DSRNSS / ICDA (Lightning) to udaseg segmentor weights (.safetensors "
        "with metadata, loadable by model.init_weights). Prints what was mapped, what was "
        "dropped and which numbers the seed papers report for such checkpoints.",
    )
    p.add_argument("src", help="the checkpoint to convert (.pth / .ckpt / .safetensors)")
    p.add_argument("dst", nargs="?", help="output .safetensors file (omit with --dry-run)")
    p.add_argument(
        "--which",
        choices=("student", "teacher"),
        default="student",
        help="which network to convert: the student (default; the papers evaluate "
        "it) or the EMA teacher",
    )
    p.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="load legacy files that pickle Python objects with weights_only=False. "
        "This EXECUTES code pickled in the file: use only for files you trust",
    )
    p.add_argument(
        "--backbone",
        default=None,
        help="expected MiT variant (e.g. mit_b5); fail if the file is another one",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail when source tensors are left unmapped (default: report them)",
    )
    p.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    p.add_argument("--verbose", action="store_true", help="list every unmapped key")
    try:
        a = p.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0)
    if a.dst is None and not a.dry_run:
        print("udaseg convert: error: DST is required (or use --dry-run)", file=sys.stderr)
        return 2
    try:
        if a.dry_run:
            report = import_checkpoint(a.src, a.which, a.allow_unsafe, a.backbone, a.strict).report
        else:
            report = convert_checkpoint(a.src, a.dst, a.which, a.allow_unsafe, a.backbone, a.strict)
    except (CheckpointError, FileNotFoundError) as exc:
        if os.environ.get("UDASEG_DEBUG"):
            raise
        print(f"udaseg convert: error: {exc}", file=sys.stderr)
        return 1
    print(report.format_text(max_names=10**9 if a.verbose else 40))
    if not a.dry_run:
        print(f"wrote:    {a.dst}")
    return 0
