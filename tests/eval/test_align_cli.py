"""``udaseg align`` (udaseg.eval.align): outputs, npz contents, sizes, pairing and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from udaseg.engine.cli import main
from udaseg.eval.align import flow_to_color, pair_inputs
from udaseg.models.alignment import warp


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 4, w // 4, generator=g)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x + 0.15 * F.avg_pool2d(torch.rand(1, 3, h, w, generator=g), 3, 1, 1)).clamp(0, 1)
    return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _shifted(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The target that sees ``img`` shifted: target (x, y) = img (x + dx, y + dy)."""
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    flow = torch.zeros(1, 2, *img.shape[:2])
    flow[:, 0], flow[:, 1] = dx, dy
    out, _ = warp(t, flow)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


@pytest.fixture()
def pair(tmp_path):
    big = _texture(112, 144, seed=5)
    ref = big[8:104, 8:136]  # 96 x 128
    target = _shifted(big, 4.0, -3.0)[8:104, 8:136]
    Image.fromarray(target).save(tmp_path / "target.png")
    Image.fromarray(ref).save(tmp_path / "reference.png")
    return tmp_path / "target.png", tmp_path / "reference.png"


def test_similarity_recovers_the_shift_and_writes_everything(pair, tmp_path, capsys):
    t, r = pair
    out = tmp_path / "out"
    assert main(["align", str(t), str(r), "--aligner", "similarity", "--out", str(out),
                 "--save-flow"]) == 0
    for sub in ("warped", "flow", "certainty"):
        assert (out / sub / "target.png").is_file()
    assert np.asarray(Image.open(out / "warped" / "target.png")).shape == (96, 128, 3)
    assert np.asarray(Image.open(out / "certainty" / "target.png")).shape == (96, 128)
    with np.load(out / "npz" / "target.npz") as z:
        flow, cert, valid = z["flow"], z["certainty"], z["valid"]
    assert flow.shape == (2, 96, 128) and cert.shape == (96, 128) and valid.shape == (96, 128)
    assert flow.dtype == cert.dtype == valid.dtype == np.float32
    m = valid > 0.5
    assert abs(float(flow[0][m].mean()) - 4.0) < 0.3 and abs(float(flow[1][m].mean()) + 3.0) < 0.3
    assert float(np.abs(flow[0] - 4.0).max()) < 0.5  # a pure shift: no spurious zoom
    assert cert.min() > 0.5
    assert "1 pair(s)" in capsys.readouterr().out


def test_reference_of_another_size_is_resized_with_a_note(pair, tmp_path, capsys):
    t, r = pair
    ref = np.asarray(Image.open(r))
    big_ref = tmp_path / "big_reference.png"
    Image.fromarray(ref).resize((256, 192), Image.BICUBIC).save(big_ref)  # 2x the target
    out = tmp_path / "out2"
    assert main(["align", str(t), str(big_ref), "--out", str(out), "--save-flow"]) == 0
    assert "resized to the target's size" in capsys.readouterr().out
    with np.load(out / "npz" / "target.npz") as z:
        flow, valid = z["flow"], z["valid"] > 0.5
    assert flow.shape == (2, 96, 128)
    assert abs(float(flow[0][valid].mean()) - 4.0) < 0.5
    assert abs(float(flow[1][valid].mean()) + 3.0) < 0.5


def test_identity_odd_size_and_folders_paired_by_sorted_order(tmp_path):
    tdir, rdir = tmp_path / "night" / "rec", tmp_path / "day" / "rec_ref"
    tdir.mkdir(parents=True)
    rdir.mkdir(parents=True)
    for i, (h, w) in enumerate(((37, 53), (40, 48))):
        Image.fromarray(_texture(h + 3, w + 3, i)[:h, :w]).save(tdir / f"f{i}_rgb.png")
        Image.fromarray(_texture(h + 3, w + 3, i)[:h, :w]).save(rdir / f"f{i}_ref_rgb.png")
    pairs, how = pair_inputs(tmp_path / "night", tmp_path / "day")
    assert how == "sorted order" and [p[2].name for p in pairs] == ["f0_rgb", "f1_rgb"]
    out = tmp_path / "out"
    assert main(["align", str(tmp_path / "night"), str(tmp_path / "day"), "--aligner",
                 "identity", "--out", str(out), "--save-flow"]) == 0
    with np.load(out / "npz" / "rec" / "f0_rgb.npz") as z:
        assert z["flow"].shape == (2, 37, 53) and not z["flow"].any()
    assert (out / "warped" / "rec" / "f1_rgb.png").is_file()


def test_uawarpc_without_weights_is_a_clear_error(pair, tmp_path, capsys):
    t, r = pair
    assert main(["align", str(t), str(r), "--aligner", "uawarpc", "--out",
                 str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--weights" in err and "--vgg" in err
    missing = tmp_path / "nope.ckpt"
    assert main(["align", str(t), str(r), "--aligner", "uawarpc", "--weights", str(missing),
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "--weights" in err and "--vgg" in err


def test_flow_to_color():
    flow = np.zeros((2, 2, 3), np.float32)
    flow[0, 0, 0] = 1.0
    rgb = flow_to_color(flow, valid=np.array([[1, 1, 1], [1, 1, 0]]))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 1] == 255).all()  # zero flow: white
    assert not (rgb[0, 0] == 255).all()  # the largest flow: saturated colour
    assert (rgb[1, 2] == 0).all()  # invalid: black
