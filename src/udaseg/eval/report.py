"""What a person looks at after a run: IoU tables, metrics JSON, overlays, loss curves.

* :func:`format_iou_table` / :func:`print_iou_table`: a rich table, one row per class of the
  protocol, one column per split or run, IoU in percent, ``-`` where a class has an empty union.
* :func:`write_iou_tables`: the same table as ``iou_table.csv`` and ``iou_table.md``.
* :func:`write_metrics_json`: ``{run: {split: IoUResult.to_dict()}}``, merged into an existing file.
* :func:`colorize`, :func:`save_overlays`: Cityscapes-palette label maps and
  ``[image | prediction overlay | ground-truth overlay]`` PNGs.
* :func:`plot_loss_curves`: smoothed + raw loss curves with matplotlib (imported lazily, Agg).

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a truncated table or JSON behind. Nothing here is meant for the
training hot path; call it from callbacks or scripts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import numpy as np

from udaseg.data.classes import IGNORE_INDEX, palette_array
from udaseg.fileio import atomic_write
from udaseg.eval.metrics import IoUResult, LabelSetLike, resolve_label_set

if TYPE_CHECKING:  # rich is imported lazily inside the functions
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "IoUTablePaths",
    "colorize",
    "format_iou_table",
    "iou_table_markdown",
    "plot_loss_curves",
    "print_iou_table",
    "save_overlays",
    "write_iou_tables",
    "write_metrics_json",
]

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- atomic writes
def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then ``os.replace`` it."""
    return atomic_write(path, write)


def _atomic_write_text(path: PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    return _atomic_write(path, lambda f: f.write(data))


# --------------------------------------------------------------------------- IoU tables
class _TableData(NamedTuple):
    protocol: str
    columns: list[str]
    rows: list[tuple[str, list[float]]]  # class name -> IoU fractions (NaN allowed), per column
    miou: list[float]


def _table_data(results: Mapping[str, IoUResult], label_set: LabelSetLike) -> _TableData:
    if not results:
        raise ValueError("results is empty: pass {split_or_run_name: IoUResult}")
    columns = list(results)
    first = results[columns[0]]
    _, protocol = resolve_label_set(label_set, first.num_classes)
    per_class = {name: r.per_class(label_set) for name, r in results.items()}
    class_names = list(per_class[columns[0]])
    rows = [(c, [per_class[col][c] for col in columns]) for c in class_names]
    miou = [results[col].miou(label_set) for col in columns]
    return _TableData(protocol, columns, rows, miou)


def _pct(value: float, missing: str = "-") -> str:
    return missing if math.isnan(value) else f"{100.0 * value:.2f}"


def format_iou_table(
    results: Mapping[str, IoUResult],
    label_set: LabelSetLike = "cityscapes19",
    title: str | None = None,
) -> Table:
    """Rich table: one row per class of ``label_set``, one column per entry of ``results``.

    Values are IoU in percent with two decimals, ``-`` where the union is empty (NaN); the last
    row (after a separator) is the protocol's mIoU.
    """
    from rich.table import Table

    data = _table_data(results, label_set)
    table = Table(title=title if title is not None else f"IoU (%), {data.protocol}")
    table.add_column("class", justify="left", no_wrap=True)
    for col in data.columns:
        table.add_column(col, justify="right", no_wrap=True)
    for name, values in data.rows:
        table.add_row(name, *(_pct(v) for v in values))
    table.add_section()
    table.add_row("mIoU", *(_pct(v) for v in data.miou), style="bold")
    return table


def print_iou_table(
    results: Mapping[str, IoUResult],
    label_set: LabelSetLike = "cityscapes19",
    title: str | None = None,
    console: Console | None = None,
    file: IO[str] | None = None,
) -> None:
    """Print :func:`format_iou_table` with ``console`` (default: a new rich Console on ``file``).

    When the output is not a terminal (log file, CI, pipe), rich writes plain text without colour
    codes; the width is widened so that the table never wraps.
    """
    from rich.console import Console

    table = format_iou_table(results, label_set, title)
    if console is None:
        console = Console(file=file)
        if not console.is_terminal:
            console = Console(file=file, width=max(console.width, 40 + 12 * len(results)))
    console.print(table)


def iou_table_markdown(results: Mapping[str, IoUResult], label_set: LabelSetLike = "cityscapes19") -> str:
    """The IoU table as GitHub Markdown (percent, ``-`` for NaN, final bold mIoU row)."""
    data = _table_data(results, label_set)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [
        "| " + " | ".join(["class", *(esc(c) for c in data.columns)]) + " |",
        "|" + "|".join(["---", *("---:" for _ in data.columns)]) + "|",
    ]
    for name, values in data.rows:
        lines.append("| " + " | ".join([esc(name), *(_pct(v) for v in values)]) + " |")
    lines.append("| " + " | ".join(["**mIoU**", *(f"**{_pct(v)}**" for v in data.miou)]) + " |")
    return "\n".join(lines) + "\n"


def _iou_table_csv(results: Mapping[str, IoUResult], label_set: LabelSetLike) -> str:
    data = _table_data(results, label_set)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", *data.columns])
    for name, values in data.rows:
        writer.writerow([name, *(_pct(v, missing="") for v in values)])
    writer.writerow(["mIoU", *(_pct(v, missing="") for v in data.miou)])
    return buf.getvalue()


class IoUTablePaths(NamedTuple):
    csv: Path
    md: Path


def write_iou_tables(
    out_dir: PathLike,
    results: Mapping[str, IoUResult],
    label_set: LabelSetLike = "cityscapes19",
) -> IoUTablePaths:
    """Write ``iou_table.csv`` and ``iou_table.md`` into ``out_dir`` (created if needed).

    Both hold the table of :func:`format_iou_table`: header ``class,<run or split>...``, one row
    per class, a final ``mIoU`` row, IoU in percent with two decimals. A NaN IoU (empty union) is
    an empty CSV cell and ``-`` in Markdown.

    Returns:
        ``IoUTablePaths(csv, md)``.
    """
    out_dir = Path(out_dir)
    csv_path = _atomic_write_text(out_dir / "iou_table.csv", _iou_table_csv(results, label_set))
    md_path = _atomic_write_text(out_dir / "iou_table.md", iou_table_markdown(results, label_set))
    return IoUTablePaths(csv_path, md_path)


def write_metrics_json(
    path: PathLike,
    metrics: Mapping[str, Mapping[str, IoUResult]],
    label_set: LabelSetLike | Mapping[str, LabelSetLike] = "cityscapes19",
) -> Path:
    """Write ``{run_name: {split_name: IoUResult.to_dict(label_set)}}`` to ``path`` atomically.

    If ``path`` already holds a JSON object, it is merged: other runs are kept, and for a run
    present in both, its other splits are kept and the splits given here replace the old ones.
    An unreadable existing file is moved aside to ``<path>.corrupt`` (with a warning), never
    silently lost. Values are percentages, NaN is written as ``null``.

    Args:
        path: the JSON file.
        metrics: run name -> split name -> :class:`IoUResult`.
        label_set: one protocol for every split, or a mapping split name -> protocol (splits not
            in the mapping use ``"cityscapes19"``).
    """
    path = Path(path)
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError(f"top level is {type(loaded).__name__}, not an object")
            existing = loaded
        except (ValueError, UnicodeDecodeError) as err:
            backup = path.with_name(path.name + ".corrupt")
            os.replace(path, backup)
            warnings.warn(
                f"write_metrics_json: {path} was not a JSON object ({err}); moved it to {backup}",
                stacklevel=2,
            )

    for run, splits in metrics.items():
        entry = existing.get(run)
        if not isinstance(entry, dict):
            entry = {}
        for split, result in splits.items():
            ls = (
                label_set.get(split, "cityscapes19")
                if isinstance(label_set, Mapping)
                else label_set
            )
            entry[split] = result.to_dict(ls, percent=True)
        existing[run] = entry

    text = json.dumps(existing, indent=2, allow_nan=False) + "\n"
    return _atomic_write_text(path, text)


# --------------------------------------------------------------------------- images
def colorize(label: np.ndarray) -> np.ndarray:
    """``(H, W)`` integer label map -> ``(H, W, 3)`` uint8 RGB with the Cityscapes palette.

    Ignore (255) and any id without a palette entry (19..254) are black.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"colorize: expected an (H, W) label map, got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"colorize: expected integer labels, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(
            f"colorize: label values must be in [0, 255], got [{label.min()}, {label.max()}]"
        )
    return palette_array()[label.astype(np.intp)]


def _overlay(image: np.ndarray, label: np.ndarray, alpha: float) -> np.ndarray:
    color = colorize(label).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * color
    out = np.where((label == IGNORE_INDEX)[..., None], image.astype(np.float32), blended)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _draw_caption(panel: Any, text: str) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(panel)
    left, top, right, bottom = draw.textbbox((4, 4), text)
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))


def _safe_name(name: str) -> str:
    name = name.replace("/", "_").replace("\\", "_").strip()
    if not name or name in (".", ".."):
        raise ValueError(f"save_overlays: unusable sample name {name!r}")
    return name


def save_overlays(
    out_dir: PathLike,
    images: Sequence[np.ndarray] | np.ndarray,
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray | None] | np.ndarray | None,
    names: Sequence[str],
    alpha: float = 0.5,
    draw_labels: bool = True,
) -> list[Path]:
    """One PNG per sample: ``[input image | prediction overlay | ground-truth overlay]``.

    Args:
        out_dir: output folder (created); files are ``<name>.png`` with ``/`` in names
            replaced by ``_``.
        images: N ``(H, W, 3)`` uint8 RGB images (list or ``(N, H, W, 3)`` array), de-normalised.
        preds: N ``(H, W)`` integer predictions (train IDs).
        gts: N ``(H, W)`` integer ground truths, 255 = ignore; ``None`` (or a ``None`` entry)
            for unlabelled samples, whose third panel is then the plain image.
        names: N sample names.
        alpha: weight of the palette colour in the overlays; ignore pixels show the image.
        draw_labels: write small captions ("image", "prediction", "ground truth") on the panels.

    Returns:
        The written paths; each image is ``H x 3W`` pixels.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"save_overlays: alpha must be in [0, 1], got {alpha}")
    n = len(names)
    gts_seq: Sequence[np.ndarray | None] = [None] * n if gts is None else gts
    if not (len(images) == len(preds) == len(gts_seq) == n):
        raise ValueError(
            f"save_overlays: got {len(images)} images, {len(preds)} preds, {len(gts_seq)} gts "
            f"and {n} names; they must match"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, pred, gt, name in zip(images, preds, gts_seq, names, strict=True):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"save_overlays[{name}]: image must be (H, W, 3) uint8, got shape {image.shape} "
                f"dtype {image.dtype}; de-normalise and convert to uint8 first"
            )
        pred = np.asarray(pred)
        if pred.shape != image.shape[:2]:
            raise ValueError(
                f"save_overlays[{name}]: prediction shape {pred.shape} != image size {image.shape[:2]}"
            )
        panels = [image, _overlay(image, pred, alpha)]
        captions = ["image", "prediction", "ground truth"]
        if gt is None:
            panels.append(image)
            captions[2] = "no ground truth"
        else:
            gt = np.asarray(gt)
            if gt.shape != image.shape[:2]:
                raise ValueError(
                    f"save_overlays[{name}]: ground-truth shape {gt.shape} != image size {image.shape[:2]}"
                )
            panels.append(_overlay(image, gt, alpha))
        pil_panels = [Image.fromarray(np.ascontiguousarray(p)) for p in panels]
        if draw_labels:
            for panel, caption in zip(pil_panels, captions, strict=True):
                _draw_caption(panel, caption)
        h, w = image.shape[:2]
        canvas = Image.new("RGB", (3 * w, h))
        for i, panel in enumerate(pil_panels):
            canvas.paste(panel, (i * w, 0))
        path = out_dir / f"{_safe_name(name)}.png"
        paths.append(_atomic_write(path, lambda f, c=canvas: c.save(f, format="PNG")))
    return paths


# --------------------------------------------------------------------------- loss curves
def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average; non-finite values are skipped."""
    out = np.full(values.shape, np.nan, dtype=np.float64)
    last, count = 0.0, 0
    for i, v in enumerate(values):
        if not np.isfinite(v):
            continue
        last = last * weight + (1.0 - weight) * float(v)
        count += 1
        out[i] = last / (1.0 - weight**count) if weight > 0 else last
    return out


def plot_loss_curves(
    path: PathLike,
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    title: str = "Training losses",
    log_y: bool = False,
    smoothing: float = 0.9,
    xlabel: str = "iteration",
    ylabel: str = "loss",
) -> Path:
    """Plot ``{name: (steps, values)}`` to a PNG: a faint raw line and a smoothed line per curve.

    Args:
        path: output PNG.
        curves: curve name -> (steps, values) of equal length; NaN/inf values are not drawn.
        title: figure title.
        log_y: logarithmic y axis (``symlog`` with a warning if a value is <= 0).
        smoothing: EMA weight in ``[0, 1)`` (TensorBoard-style, debiased); 0 draws only the raw line.
        xlabel, ylabel: axis labels.

    Returns:
        ``path``. Uses the Agg backend through an explicit ``FigureCanvasAgg`` (no pyplot state,
        safe in threads and in notebooks).
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules or not matplotlib.is_interactive():
        # Headless runs (scripts, training, tests) get Agg explicitly. An interactive session
        # (notebook, plt.ion()) keeps its backend: the figure below renders through its own
        # FigureCanvasAgg and does not depend on the global backend anyway.
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"plot_loss_curves: smoothing must be in [0, 1), got {smoothing}")

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    any_nonpositive = False
    drawn = 0
    for i, (name, (steps, values)) in enumerate(curves.items()):
        x = np.asarray(steps, dtype=np.float64)
        y = np.asarray(values, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(
                f"plot_loss_curves: curve {name!r} has {x.size} steps and {y.size} values"
            )
        finite = np.isfinite(y)
        if not finite.any():
            continue
        any_nonpositive |= bool((y[finite] <= 0).any())
        color = f"C{i % 10}"
        if smoothing > 0:
            ax.plot(x[finite], y[finite], color=color, alpha=0.25, linewidth=0.8)
            ys = _ema(y, smoothing)
            ax.plot(x[finite], ys[finite], color=color, linewidth=1.6, label=name)
        else:
            ax.plot(x[finite], y[finite], color=color, linewidth=1.2, label=name)
        drawn += 1
    if log_y:
        if any_nonpositive:
            warnings.warn("plot_loss_curves: values <= 0, using a symlog y axis", stacklevel=2)
            ax.set_yscale("symlog")
        else:
            ax.set_yscale("log")
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _atomic_write(path, lambda f: fig.savefig(f, format="png"))
