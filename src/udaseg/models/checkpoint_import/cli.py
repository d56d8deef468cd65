"""``udaseg convert`` (:func:`convert_main`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ...errors import CheckpointError
from .api import convert_checkpoint, import_checkpoint


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
