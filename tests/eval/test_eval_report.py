"""Tables, metrics JSON, overlays and loss plots."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from udaseg.data.classes import CITYSCAPES_CLASSES, IGNORE_INDEX
from udaseg.eval.metrics import IoUResult, confusion_matrix
from udaseg.eval.report import (
    colorize,
    format_iou_table,
    iou_table_markdown,
    plot_loss_curves,
    print_iou_table,
    save_overlays,
    write_iou_tables,
    write_metrics_json,
)

K = 19


def make_result(seed: int, absent: tuple[int, ...] = (14,)) -> IoUResult:
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([c for c in range(K) if c not in absent])
    target = allowed[torch.randint(len(allowed), (2, 16, 16), generator=g)]
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.5,
        target,
        allowed[torch.randint(len(allowed), target.shape, generator=g)],
    )
    target[:, :2] = IGNORE_INDEX
    return IoUResult(confusion_matrix(pred, target))


@pytest.fixture
def results() -> dict[str, IoUResult]:
    return {"val": make_result(0), "test": make_result(1, absent=(14, 16))}


def test_rich_table_and_print(results) -> None:
    table = format_iou_table(results)
    assert table.row_count == K + 1
    assert [c.header for c in table.columns] == ["class", "val", "test"]
    assert list(table.columns[0].cells)[-1] == "mIoU"
    truck = CITYSCAPES_CLASSES.index("truck")
    assert list(table.columns[1].cells)[truck] == "-"
    assert list(table.columns[1].cells)[-1] == f"{100 * results['val'].miou():.2f}"

    buf = io.StringIO()
    print_iou_table(results, "synthia16", file=buf)
    text = buf.getvalue()
    assert "road" in text and "mIoU" in text and "terrain" not in text
    assert "\x1b[" not in text  # not a terminal: no colour codes


def test_write_iou_tables(tmp_path, results) -> None:
    csv_path, md_path = write_iou_tables(tmp_path / "out", results)
    assert csv_path.name == "iou_table.csv" and md_path.name == "iou_table.md"
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["class", "val", "test"]
    assert [r[0] for r in rows[1:]] == [*CITYSCAPES_CLASSES, "mIoU"]
    assert float(rows[1][1]) == pytest.approx(100 * results["val"].iou[0], abs=0.005)
    assert rows[1 + 14][1] == "" and rows[1 + 16][2] == ""  # NaN -> empty cell
    assert float(rows[-1][2]) == pytest.approx(100 * results["test"].miou(), abs=0.005)

    md = md_path.read_text().splitlines()
    assert len(md) == 2 + K + 1
    assert md[0] == "| class | val | test |"
    assert md[2].startswith("| road | ")
    assert " - |" in md[1 + 1 + 14]
    assert md[-1].startswith("| **mIoU** |")
    assert md_path.read_text() == iou_table_markdown(results)
    assert not [p for p in csv_path.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_write_metrics_json_percent_null_and_merge(tmp_path, results) -> None:
    path = tmp_path / "metrics.json"
    write_metrics_json(path, {"run1": results})
    text = path.read_text()
    assert "NaN" not in text and "null" in text
    data = json.loads(text)
    d = data["run1"]["val"]
    assert d["protocol"] == "cityscapes19" and d["num_classes"] == 19
    assert d["mIoU"] == pytest.approx(100 * results["val"].miou())
    assert list(d["IoU"]) == list(CITYSCAPES_CLASSES)
    assert d["IoU"]["truck"] is None
    assert d["IoU"]["road"] == pytest.approx(100 * results["val"].iou[0])
    assert 0 <= d["aAcc"] <= 100

    # another run is merged in; a new split of run1 is added without dropping the old ones
    write_metrics_json(path, {"run2": {"val": results["val"]}}, label_set="synthia16")
    write_metrics_json(path, {"run1": {"night": results["test"]}}, label_set={"night": "dsec18"})
    data = json.loads(path.read_text())
    assert set(data) == {"run1", "run2"}
    assert set(data["run1"]) == {"val", "test", "night"}
    assert data["run2"]["val"]["num_classes"] == 16 and "terrain" not in data["run2"]["val"]["IoU"]
    assert data["run1"]["night"]["protocol"] == "dsec18"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_metrics_json_moves_corrupt_file_aside(tmp_path, results) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        write_metrics_json(path, {"run": results})
    assert (tmp_path / "metrics.json.corrupt").read_text() == "{not json"
    assert set(json.loads(path.read_text())) == {"run"}


def test_colorize() -> None:
    label = np.array([[0, 1], [255, 18]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (128, 64, 128)
    assert tuple(rgb[0, 1]) == (244, 35, 232)
    assert tuple(rgb[1, 0]) == (0, 0, 0)
    assert tuple(rgb[1, 1]) == (119, 11, 32)
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 1), dtype=np.uint8))


def test_save_overlays(tmp_path) -> None:
    rng = np.random.default_rng(0)
    h, w = 24, 32
    images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    preds = rng.integers(0, K, (2, h, w))
    gts = rng.integers(0, K, (2, h, w)).astype(np.uint8)
    gts[:, -4:] = IGNORE_INDEX
    paths = save_overlays(tmp_path / "vis", images, preds, gts, ["frankfurt/a_000001", "b"], alpha=0.5)
    assert [p.name for p in paths] == ["frankfurt_a_000001.png", "b.png"]
    for i, p in enumerate(paths):
        img = np.asarray(Image.open(p).convert("RGB"))
        assert img.shape == (h, 3 * w, 3)
        # bottom-right area: no caption; image panel is the input, GT ignore pixels show the input
        np.testing.assert_array_equal(img[-4:, :w][:, -4:], images[i][-4:, -4:])
        np.testing.assert_array_equal(img[-4:, 2 * w :][:, -4:], images[i][-4:, -4:])
        expected = np.rint(0.5 * images[i][-1, 0].astype(float) + 0.5 * colorize(preds[i])[-1, 0]).astype(np.uint8)
        np.testing.assert_array_equal(img[-1, w], expected)
    # unlabelled samples and no captions
    (p,) = save_overlays(tmp_path / "vis2", [images[0]], [preds[0]], None, ["x"], draw_labels=False)
    img = np.asarray(Image.open(p).convert("RGB"))
    np.testing.assert_array_equal(img[:, 2 * w :], images[0])
    with pytest.raises(ValueError, match="uint8"):
        save_overlays(tmp_path, [images[0].astype(np.float32)], [preds[0]], None, ["y"])


def test_plot_loss_curves(tmp_path) -> None:
    steps = list(range(0, 500, 10))
    curves = {
        "train/loss": (steps, [2.0 * math.exp(-s / 200) + 0.1 for s in steps]),
        "train/mic/loss": (steps, [1.0 / (1 + s) if s != 100 else float("nan") for s in steps]),
    }
    path = plot_loss_curves(tmp_path / "plots" / "loss.png", curves, title="losses", log_y=True)
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    empty = plot_loss_curves(tmp_path / "empty.png", {})
    assert empty.stat().st_size > 0
    with pytest.raises(ValueError, match="steps"):
        plot_loss_curves(tmp_path / "bad.png", {"x": ([1, 2], [1.0])})
