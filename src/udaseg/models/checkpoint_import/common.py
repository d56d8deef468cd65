"""Shared pieces of the checkpoint importers: format names and seed numbers, the report, the
key-entry helpers, and building / checking our segmentors from converted metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from ...errors import CheckpointError

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
    "lightning-refign/hrda": (
        (
            "Refign-HRDA*: ACDC test 72.1, DZ test 63.9 (full resolution, slide inference "
            "1080x1080 stride 420)"
        ),
        "DSRNSS HRDA*: no number in the spec",
    ),
    "refign-uawarpc/single": (
        (
            "UAWarpC: 36.8 PCK-5 on the RobotCar matching test (Refign README); used only by "
            "Refign's pseudo-label refinement during training"
        ),
    ),
    "mmseg-segmentor/single": ("no reference number in the specs for bare segmentor files",),
}
"""Format family -> the seed numbers a user should see after converting (spec sections 10.1,
ciss 1.13, cmda 2.13, refign 1.7 / 3.5 / 4.6, cdda 12)."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint format was recognised but udaseg has no module it maps onto yet."""



def _has(keys: Sequence[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


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
        family = str(
            self.config.get("results_family")
            or f"{self.format}/{'hrda' if self.config.get('hrda') else 'single'}"
        )
        return SEED_RESULTS.get(family, ())

    def format_text(self, max_names: int = 40) -> str:
        """A human-readable report (every unexpected key by name, up to ``max_names``)."""
        cfg = self.config
        lines = [
            f"source:   {self.source}",
            f"format:   {self.format}: {FORMATS.get(self.format, '')}",
            f"selected: {self.which}",
        ]
        if self.target and cfg.get("kind") == "aligner":
            lines.append(f"target:   {self.target} ({cfg.get('description', '')})")
            lines.append(f"mapped:   {len(self.mapping)} tensors (every target tensor filled)")
        elif self.target:
            lines.append(
                f"target:   {self.target} ({cfg.get('backbone')} + {cfg.get('head')} head, "
                f"{cfg.get('head_channels')} channels, {cfg.get('num_classes')} classes"
                + (
                    f", HRDA attention {'class-wise' if cfg.get('hrda_attention_classwise') else 'single'}"
                    + (
                        f" ({cfg['hrda_attention_head']} head)"
                        if cfg.get("hrda_attention_head", "same") != "same"
                        else ""
                    )
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


def start_report(raw, src: str, fmt: str, which: str) -> ImportReport:
    """A fresh report for ``raw`` (a :class:`~.reading.RawCheckpoint`) with the reading notes."""
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
    return report


Entry = tuple[str, Tensor]  # (source key, tensor)


def _take(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Entry]:
    n = len(prefix)
    return {k[n:]: (k, v) for k, v in tensors.items() if k.startswith(prefix)}


def claim(used: set[str], entries: Mapping[str, Entry]) -> None:
    """Mark the source keys of ``entries`` as used."""
    used.update(src for src, _ in entries.values())


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
        classwise = bool(config.get("hrda_attention_classwise", True))
        meta["hrda_attention_classwise"] = "1" if classwise else "0"
        if config.get("hrda_attention_head", "same") != "same":
            # HRDA*: the settings as a JSON dict (read by load_segmentor_for_export / segment)
            import dataclasses
            import json

            from ..hrda import HRDAConfig

            kind = str(config["hrda_attention_head"])
            meta["hrda_attention_head"] = kind
            meta["hrda"] = json.dumps(
                dataclasses.asdict(
                    HRDAConfig(attention_classwise=classwise, attention_head=kind)
                ),
                sort_keys=True,
            )
    if report is not None:
        meta.update(
            source_format=report.format,
            source_model=report.which,
            source_file=Path(report.source).name,
        )
    return meta


def _hrda_config(metadata: Mapping[str, str]):
    """The :class:`~udaseg.models.hrda.HRDAConfig` of converted-weights metadata, or None.

    ``hrda``: ``"0"`` / ``"None"`` (single scale), ``"1"`` (paper defaults) or a JSON dict of
    settings; ``hrda_attention_classwise`` / ``hrda_attention_head`` override the dict."""
    import dataclasses
    import json

    from ..hrda import HRDAConfig

    value = str(metadata.get("hrda", "0")).strip()
    if value in ("0", "None", "", "false", "False"):
        return None
    settings: dict[str, object] = {}
    if value not in ("1", "True", "true"):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise CheckpointError(
                f"converted-weights metadata: hrda={value!r} is neither 0/1 nor a JSON dict"
            )
        settings = parsed
    names = {f.name for f in dataclasses.fields(HRDAConfig)}
    cfg = {k: v for k, v in settings.items() if k in names}
    if "hrda_attention_classwise" in metadata:
        cfg["attention_classwise"] = metadata["hrda_attention_classwise"] == "1"
    if "hrda_attention_head" in metadata:
        cfg["attention_head"] = metadata["hrda_attention_head"]
    try:
        return HRDAConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"converted-weights metadata: bad HRDA settings {cfg}: {e}") from None


def build_from_metadata(metadata: Mapping[str, str]) -> nn.Module:
    """The (randomly initialised) model a converted file was made for.

    ``EncoderDecoder`` from ``build_segmentor(backbone, head, num_classes, head_channels)``; wrapped
    in ``HRDASegmentor`` when ``hrda`` is ``"1"`` (paper-default
    :class:`~udaseg.models.hrda.HRDAConfig`) or a JSON dict of settings (Refign's HRDA*:
    ``attention_head="segformer"``), with ``attention_classwise`` / ``attention_head`` from the
    ``hrda_attention_classwise`` / ``hrda_attention_head`` entries when present.
    """
    from ..hrda import HRDASegmentor
    from ..segmentor import build_segmentor

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
    hrda_cfg = _hrda_config(metadata)
    if hrda_cfg is not None:
        model = HRDASegmentor(model, hrda_cfg)
    return model


def _describe(model: nn.Module) -> str:
    from ..hrda import HRDASegmentor

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
    from ..weights import guess_mit_variant

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

