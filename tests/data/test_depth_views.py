"""The ``depth`` view (CDDA, spec 2): layout, load-time transform, alignment through the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from udaseg.data.datasets.cityscapes import Cityscapes
from udaseg.data.datasets.dark_zurich import DarkZurich
from udaseg.data.datasets.gta import GTA5
from udaseg.data.datasets.synthia import Synthia
from udaseg.data.depth import cdda_depth_transform
from udaseg.data.io import DataError
from udaseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PipelineConfig, to_tensor_sample
from udaseg.errors import ConfigError

from ..conftest import write_png
from .test_gta_synthia import tiny_gta, tiny_synthia  # noqa: F401  (fixtures)


def test_transform_table_values():
    d = np.array([0, 10, 25, 50, 100, 150, 200, 255], dtype=np.uint8)
    assert cdda_depth_transform(d).tolist() == [255, 201, 141, 78, 24, 7, 2, 0]
    out = cdda_depth_transform(np.arange(256, dtype=np.uint8))
    assert out.dtype == np.uint8
    assert np.all(np.diff(out.astype(int)) <= 0)  # monotone decreasing
    assert len(np.unique(out)) == 119  # only 119 of the 256 values occur (spec 2.2)
    # truncation, not rounding: 255 exp(-6*1/256) = 249.09..., 255 exp(-6*3/256) = 237.68...
    assert out[1] == 249 and out[3] == 237


def _depth(rng, h, w):
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def test_cityscapes_depth_view(tiny_cityscapes):
    rng = np.random.default_rng(0)
    raw = {}
    for img in sorted((tiny_cityscapes / "leftImg8bit" / "train").glob("*/*.png")):
        stem = img.name.replace("_leftImg8bit.png", "")
        raw[stem] = _depth(rng, 32, 64)
        write_png(tiny_cityscapes / "depth_any" / "train" / img.parent.name / f"{stem}_depth.png", raw[stem])
    ds = Cityscapes(tiny_cityscapes, "train", views=["depth"])
    s = ds[0]
    assert s["depth"].shape == (1, 32, 64) and s["depth"].dtype == torch.float32
    assert np.array_equal(s["depth"][0].numpy(), cdda_depth_transform(raw[s["name"]]))
    s = Cityscapes(tiny_cityscapes, "train", views=["depth"], depth_transform="none")[1]
    assert np.array_equal(s["depth"][0].numpy(), raw[s["name"]])
    with pytest.raises(DataError, match="depth map"):
        Cityscapes(tiny_cityscapes, "val", views=["depth"])  # no val depth maps written
    with pytest.raises(ConfigError, match="depth_transform"):
        Cityscapes(tiny_cityscapes, "train", views=["depth"], depth_transform="log")


def test_gta_synthia_depth_view(tiny_gta, tiny_synthia):  # noqa: F811
    rng = np.random.default_rng(1)
    for root, cls, names in ((tiny_gta, GTA5, ["00001", "00002", "00003"]),
                             (tiny_synthia, Synthia, ["0000000", "0000001"])):
        with pytest.raises(DataError, match="udaseg depth"):
            cls(root, views=["depth"])
        raw = {n: _depth(rng, 16, 32) for n in names}
        for n, d in raw.items():
            write_png(root / "depth_any" / f"{n}.png", np.stack([d, d, d], -1))  # 3-channel grey
        ds = cls(root, views=["depth"])
        for i in range(len(ds)):
            s = ds[i]
            assert np.array_equal(s["depth"][0].numpy(), cdda_depth_transform(raw[s["name"]]))
        assert "depth" not in cls(root)[0]
        with pytest.raises(ConfigError, match="unknown views"):
            cls(root, views=["ref"])


def test_dark_zurich_depth_transform(tiny_dark_zurich):
    raw = DarkZurich(tiny_dark_zurich, "val", views=["depth"], depth_transform="none")[0]["depth"]
    cooked = DarkZurich(tiny_dark_zurich, "val", views=["depth"])[0]["depth"]
    assert torch.equal(cooked, torch.from_numpy(cdda_depth_transform(raw.numpy().astype(np.uint8))).float())


def _denorm(image):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


@pytest.mark.parametrize("seed", range(6))
def test_depth_stays_aligned_through_the_train_pipeline(seed):
    """Property: through resize, (cat_max_ratio) crop, flip and pad the depth view follows the
    image exactly (the image carries the raw depth in its channels) and the label (no resize)."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 60)), int(rng.integers(20, 90))
    d = _depth(rng, h, w)
    label = (d // 14).astype(np.uint8)  # 0..18, a function of the depth
    image = np.stack([d, d, 255 - d], -1)
    torch.manual_seed(seed)
    # no resize: the label, the raw image and the transformed depth agree pixel by pixel
    crop = (int(rng.integers(8, h + 1)), int(rng.integers(8, w + 1)))
    pipe = PipelineConfig(scale=(max(h, w), min(h, w)), crop_size=crop, cat_max_ratio=0.75,
                          flip_prob=0.5)
    for _ in range(4):
        s = pipe.train()(to_tensor_sample(image, label, depth=cdda_depth_transform(d)[..., None]))
        raw = _denorm(s["image"])[0].round().to(torch.uint8)
        assert s["depth"].shape == (1, *crop)
        assert torch.equal(s["depth"][0], torch.from_numpy(cdda_depth_transform(raw.numpy())).float())
        assert torch.equal(s["label"], (raw // 14).long())
    # with a resize: bilinear image and bilinear raw depth stay identical
    pipe = PipelineConfig(scale=(2 * max(h, w) + 3, 2 * min(h, w) + 1), crop_size=crop, flip_prob=0.5)
    flips = set()
    for _ in range(6):
        s = pipe.train()(to_tensor_sample(image, label, depth=d[..., None]))
        flips.add(bool(s["flipped"]))
        assert torch.allclose(_denorm(s["image"])[0], s["depth"][0], atol=1e-3)
        box = s["crop_box"].tolist()
        assert box[2] - box[0] == crop[0] and box[3] - box[1] == crop[1]
