"""Shared fixtures: tiny datasets written in the real on-disk layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def random_label(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    lab = rng.integers(0, 19, size=(h, w)).astype(np.uint8)
    lab[rng.random((h, w)) < 0.1] = 255
    return lab


def make_tiny_cityscapes(root: Path) -> Path:
    """3 train + 2 val images in Cityscapes' layout (32x64) under ``root``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            stem = f"aachen_{i:06d}_000019"
            write_png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                      rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
            write_png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png",
                      random_label(rng, 32, 64))
    return root


@pytest.fixture
def tiny_cityscapes(tmp_path: Path) -> Path:
    """3 train + 2 val images in Cityscapes' layout (32x64)."""
    return make_tiny_cityscapes(tmp_path / "cityscapes")


@pytest.fixture
def tiny_dark_zurich(tmp_path: Path) -> Path:
    """2 val night images with refs, labels and depth in Dark Zurich's layout (32x64)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "dark_zurich"
    for i in range(2):
        rec, stem = "GOPR0356", f"GOPR0356_frame_{i:06d}"
        write_png(root / "rgb_anon/val/night" / rec / f"{stem}_rgb_anon.png",
                  rng.integers(0, 60, (32, 64, 3), dtype=np.uint8))
        write_png(root / "rgb_anon/val_ref/day" / f"{rec}_ref" / f"{stem}_ref_rgb_anon.png",
                  rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
        write_png(root / "gt/val/night" / rec / f"{stem}_gt_labelTrainIds.png", random_label(rng, 32, 64))
        write_png(root / "depth_any/val/night" / rec / f"{stem}_depth.png",
                  rng.integers(0, 255, (32, 64), dtype=np.uint8))
    return root
