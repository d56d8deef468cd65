"""``udaseg depth`` (CDDA's depth maps) with a tiny randomly initialised Depth Anything model saved
in the Hugging Face layout: never a download."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from udaseg.data.datasets.cityscapes import Cityscapes
from udaseg.data.datasets.dark_zurich import DarkZurich
from udaseg.data.datasets.gta import GTA5
from udaseg.data.datasets.synthia import Synthia
from udaseg.engine.cli import HELP, main
from udaseg.errors import ConfigError
from udaseg.eval.depth_maps import (
    depth_jobs,
    depth_main,
    load_depth_model,
    network_input_size,
    write_png_atomic,
)

from ..conftest import write_png

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, patch_size=14, image_size=56,
                            out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                              head_hidden_size=8, patch_size=14)
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(cfg).eval()
    with torch.no_grad():  # a non-zero ReLU output everywhere: a varied map, not mostly zeros
        model.head.conv3.bias.fill_(1.0)
    path = tmp_path_factory.mktemp("da_tiny")
    model.save_pretrained(path)
    return path


def reference_map(model, rgb: np.ndarray, net_size: tuple[int, int]) -> np.ndarray:
    """The official pipeline written out independently: /255, bicubic to the network size,
    ImageNet mean/std, model, bilinear (align_corners=True) back, min-max * 255, astype uint8."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255.0
    x = F.interpolate(x, size=net_size, mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    x = ((x - mean) / std).float()
    with torch.no_grad():
        d = model(pixel_values=x).predicted_depth
    d = F.interpolate(d[:, None], (h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
    d = (d - d.min()) / (d.max() - d.min()) * 255.0
    return d.astype(np.uint8)


def test_network_input_size_matches_the_official_resize():
    assert network_input_size(1024, 2048) == (518, 1036)   # Cityscapes
    assert network_input_size(1052, 1914) == (518, 938)    # GTA: 941.6 -> 67.3 * 14 -> 938
    assert network_input_size(760, 1280) == (518, 868)     # SYNTHIA: 872.4 / 14 = 62.3 -> 868
    assert network_input_size(1080, 1920) == (518, 924)    # Dark Zurich: 920.9 / 14 = 65.8
    assert network_input_size(32, 64, 28) == (28, 56)
    assert network_input_size(60, 40, 28) == (42, 28)      # portrait: the short side gets 28
    with pytest.raises(ConfigError, match="multiple of 14"):
        network_input_size(32, 64, 30)


def test_help_lists_depth():
    assert "\n  depth " in HELP


def test_cityscapes_maps_match_the_model_and_load_as_the_view(tiny_cityscapes, tiny_model_dir):
    rc = main(["depth", "cityscapes", str(tiny_cityscapes), "--model", str(tiny_model_dir),
               "--input-size", "28", "--batch-size", "2", "--quiet"])
    assert rc == 0
    model = load_depth_model(tiny_model_dir)
    for split, n in (("train", 3), ("val", 2)):
        outs = sorted((tiny_cityscapes / "depth_any" / split / "aachen").glob("*_depth.png"))
        assert len(outs) == n
        ds = Cityscapes(tiny_cityscapes, split, views=["depth"], depth_transform="none")
        for rec, i in zip(ds.records, range(n)):
            assert rec.views["depth"] in outs
            with Image.open(rec.views["depth"]) as im:
                assert im.mode == "L" and im.size == (64, 32)
                got = np.array(im)
            assert got.dtype == np.uint8 and got.min() == 0 and got.max() == 255
            assert np.array_equal(ds[i]["depth"][0].numpy(), got)
            rgb = np.array(Image.open(rec.image).convert("RGB"))
            want = reference_map(model, rgb, (28, 56))
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert not list((tiny_cityscapes / "depth_any").rglob(".*tmp"))  # no temporary files left


def test_folder_resume_overwrite_and_corrupt_image(tmp_path, tiny_model_dir, capsys):
    rng = np.random.default_rng(3)
    root = tmp_path / "pics"
    write_png(root / "a.png", rng.integers(0, 255, (30, 45, 3), dtype=np.uint8))
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 28, 3), dtype=np.uint8)).save(root / "sub" / "b.jpg")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = ["folder", str(root), "--model", str(tiny_model_dir), "--input-size", "28", "--quiet"]
    assert depth_main(args) == 1  # the corrupt image is reported, the others are written
    err = capsys.readouterr().out
    assert "bad.png" in err and "2 written" in err and "1 unreadable" in err
    a, b = root / "depth_any" / "a.png", root / "depth_any" / "sub" / "b.png"
    assert not (root / "depth_any" / "bad.png").exists()
    for path, size in ((a, (45, 30)), (b, (28, 40))):
        with Image.open(path) as im:
            assert im.size == size and im.mode == "L"
            arr = np.array(im)
        assert arr.min() == 0 and arr.max() == 255
    (root / "bad.png").unlink()
    write_png(a, np.zeros((30, 45), np.uint8))  # a stand-in: kept when resuming
    assert depth_main(args) == 0
    assert "0 written, 2 already there" in capsys.readouterr().out
    assert np.array(Image.open(a)).max() == 0
    assert depth_main([*args, "--overwrite"]) == 0  # depth_any/ itself is never an input
    assert "2 written" in capsys.readouterr().out
    assert np.array(Image.open(a)).max() == 255


def test_dataset_layouts_match_the_depth_views(tmp_path):
    rng = np.random.default_rng(4)

    def img():
        return rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)

    gta, syn, dz = tmp_path / "gta", tmp_path / "synthia", tmp_path / "dz"
    for name in ("00001", "00002"):
        write_png(gta / "images" / f"{name}.png", img())
    write_png(syn / "RGB" / "0000001.png", img())
    for split in ("train", "val"):
        rec = dz / "rgb_anon" / split / "night" / "GOPR0356"
        write_png(rec / "GOPR0356_frame_000001_rgb_anon.png", img())
    write_png(dz / "rgb_anon" / "val_ref" / "day" / "GOPR0356_ref" / "x_ref_rgb_anon.png", img())
    jobs = {"gta": depth_jobs("gta", gta), "synthia": depth_jobs("synthia", syn),
            "dark_zurich": depth_jobs("dark_zurich", dz)}
    assert [j.out for j in jobs["gta"]] == [gta / "depth_any" / "00001.png",
                                            gta / "depth_any" / "00002.png"]
    assert [j.out.relative_to(dz) for j in jobs["dark_zurich"]] == [
        Path(f"depth_any/{s}/night/GOPR0356/GOPR0356_frame_000001_depth.png")
        for s in ("train", "val")]
    assert len(depth_jobs("dark_zurich", dz, splits=["val"])) == 1
    for js in jobs.values():
        for j in js:
            write_png(j.out, np.zeros((8, 16), np.uint8))
    # the datasets find every file (they raise when a depth map is missing)
    assert {r.views["depth"] for r in GTA5(gta, labels=False, views=["depth"]).records} == {
        j.out for j in jobs["gta"]}
    assert [r.views["depth"] for r in Synthia(syn, labels=False, views=["depth"]).records] == [
        j.out for j in jobs["synthia"]]
    for split in ("train", "val"):
        ds = DarkZurich(dz, split, labels=False, views=["depth"])
        assert ds.records[0].views["depth"] in {j.out for j in jobs["dark_zurich"]}
    with pytest.raises(ConfigError, match="--out is for `folder` only"):
        depth_jobs("gta", gta, out=tmp_path / "x")


def test_write_png_atomic_leaves_no_temporary(tmp_path):
    path = tmp_path / "d" / "x.png"
    write_png_atomic(path, np.full((4, 5), 7, np.uint8))
    assert np.array(Image.open(path)).tolist() == [[7] * 5] * 4
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]


def test_missing_transformers_is_one_clear_error(tiny_model_dir, tiny_cityscapes, monkeypatch,
                                                 capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install -e \.\[depth\]"):
        load_depth_model(tiny_model_dir)
    assert main(["depth", "cityscapes", str(tiny_cityscapes), "--model", str(tiny_model_dir)]) == 1
    assert "pip install -e .[depth]" in capsys.readouterr().err


def test_model_folder_must_be_local_checkpoint(tmp_path, tiny_cityscapes, capsys):
    rc = main(["depth", "cityscapes", str(tiny_cityscapes), "--model",
               "depth-anything/Depth-Anything-V2-Small-hf"])
    assert rc == 1 and "no config.json" in capsys.readouterr().err
