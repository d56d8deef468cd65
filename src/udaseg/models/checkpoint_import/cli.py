"""``udaseg convert`` (:func:`convert_main`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ...errors import CheckpointError
from .api import import_from_raw
from .common import ImportReport
from .detection import detect_format
from .reading import read_checkpoint


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``udaseg convert SRC DST`` -> exit status (0 converted, 1 unusable file, 2 bad usage)."""
    p = argparse.ArgumentParser(
        prog="udaseg convert",
        description="Convert a released checkpoint of DAFormer / HRDA / MIC / CISS / CDDA (mmseg "
        "0.16) or Refign / DSRNSS / ICDA (Lightning) to udaseg segmentor weights (.safetensors "
        "with metadata, loadable by model.init_weights), or Refign's UAWarpC aligner "
        "checkpoint to aligner weights for UAWarpCAligner.from_files (--what). Prints what was "
        "mapped, what was dropped and which numbers the seed papers report for such checkpoints.",
    )
    p.add_argument("src", help="the checkpoint to convert (.pth / .ckpt / .safetensors)")
    p.add_argument(
        "dst",
        nargs="?",
        help="output .safetensors file (aligner: also .pt / .pth; omit with --dry-run)",
    )
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
        help="expected backbone (e.g. mit_b5; for ResNets it also picks the flavour, e.g. "
        "resnet101_v1c_refign); fail if the file does not fit it",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail when source tensors are left unmapped (default: report them)",
    )
    p.add_argument(
        "--what",
        choices=("auto", "segmentor", "aligner"),
        default="auto",
        help="what to extract: the segmentor, or Refign's UAWarpC aligner (alignment_head.* + "
        "the VGG16 alignment_backbone.* when present; output .safetensors/.pt/.pth for "
        "UAWarpCAligner.from_files). auto (default): the aligner for a UAWarpC checkpoint "
        "(uawarpc_megadepth.ckpt), the segmentor otherwise; use aligner to take the aligner "
        "out of a full Refign / DSRNSS / ICDA checkpoint",
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
        report = _run(a)
    except (CheckpointError, FileNotFoundError) as exc:
        if os.environ.get("UDASEG_DEBUG"):
            raise
        print(f"udaseg convert: error: {exc}", file=sys.stderr)
        return 1
    print(report.format_text(max_names=10**9 if a.verbose else 40))
    if not a.dry_run:
        print(f"wrote:    {a.dst}")
    return 0


def _run(a: argparse.Namespace) -> ImportReport:
    """Read the file once, pick segmentor or aligner, convert (and write unless --dry-run)."""
    from pathlib import Path

    suffix = Path(a.dst).suffix if a.dst is not None else None
    if suffix is not None and suffix not in (".safetensors", ".pt", ".pth"):
        raise CheckpointError(
            f"{a.dst!r}: the output must be a .safetensors file (an aligner may also be .pt/.pth)"
        )
    if a.what == "segmentor" and suffix not in (None, ".safetensors"):
        raise CheckpointError(f"{a.dst!r}: the output must be a .safetensors file")
    raw = read_checkpoint(a.src, allow_unsafe=a.allow_unsafe)
    fmt = detect_format(raw)
    what = a.what
    if what == "auto":
        what = "aligner" if fmt == "refign-uawarpc" else "segmentor"
    if what == "aligner":
        from .aligner import aligner_import_from_raw, save_aligner

        if a.which != "student":
            raise CheckpointError(
                "--which does not apply to the aligner: Refign keeps one frozen UAWarpC copy"
            )
        if a.backbone is not None:
            raise CheckpointError("--backbone applies to segmentors only, not to the aligner")
        aligner = aligner_import_from_raw(raw, fmt, a.src, a.strict)
        if not a.dry_run:
            save_aligner(aligner, a.dst)
        return aligner.report
    if suffix not in (None, ".safetensors"):
        raise CheckpointError(
            f"{a.dst!r}: the output must be a .safetensors file (.pt/.pth only for --what aligner)"
        )
    imported = import_from_raw(raw, fmt, a.src, a.which, a.backbone, a.strict)
    if not a.dry_run:
        from ..weights import save_segmentor_weights

        save_segmentor_weights(imported.state_dict, a.dst, imported.metadata)
    return imported.report
