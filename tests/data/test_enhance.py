"""ICDA's CEM data side: flows, the nearest warp of a label, the shared field, the dataset."""

import numpy as np
import pytest
import torch

from tests.conftest import write_png
from udaseg.data.enhance import (
    CEMConfig,
    CEMTransform,
    CityscapesCEM,
    CompositeFlowConfig,
    _base_grid,
    _tps_control,
    affine_grid,
    composite_grid,
    homography_grid,
    render_night,
    tps_grid,
    warp_nearest,
)
from udaseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, PipelineConfig


def _identity(h, w):
    gx, gy = _base_grid(h, w)
    return torch.stack([gx, gy], dim=-1)


def test_nearest_warp_of_a_label_by_one_pixel_shift():
    label = torch.arange(20).view(4, 5)
    # sample one pixel to the right: m(p) = p + (1 px, 0), 1 px = 2 / (W - 1) normalised
    theta = torch.tensor([[1.0, 0.0, 2.0 / 4], [0.0, 1.0, 0.0]])
    out, valid = warp_nearest(label, affine_grid(4, 5, theta))
    assert out.dtype == torch.int64
    assert torch.equal(out[:, :4], label[:, 1:])
    assert valid[:, :4].all() and not valid[:, 4].any()
    assert torch.equal(out[:, 4], torch.zeros(4, dtype=torch.int64))  # zero padding
    # nearest never invents values: a half-pixel shift still only copies labels
    theta[0, 2] = 0.4 * 2.0 / 4
    out, _ = warp_nearest(label, affine_grid(4, 5, theta))
    assert set(out.unique().tolist()) <= set(range(20))


def test_identity_parameters_give_the_identity_flow():
    h, w = 5, 7
    corners = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    torch.testing.assert_close(homography_grid(h, w, corners=corners), _identity(h, w))
    torch.testing.assert_close(tps_grid(h, w, targets=_tps_control()), _identity(h, w))


def test_tps_interpolates_its_control_points_and_homography_its_corners():
    torch.manual_seed(0)
    q = _tps_control() + (torch.rand(9, 2) - 0.5) * 0.6
    g = tps_grid(3, 3, targets=q)  # the 3x3 output grid IS the control grid
    p = _tps_control()
    for i in range(9):
        x, y = p[i].tolist()
        torch.testing.assert_close(g[int(y) + 1, int(x) + 1], q[i], rtol=1e-4, atol=1e-4)
    c = torch.tensor([[-0.9, -1.1], [-1.2, 0.8], [1.1, -0.7], [0.9, 1.2]])
    g = homography_grid(2, 2, corners=c)
    torch.testing.assert_close(torch.stack([g[0, 0], g[1, 0], g[0, 1], g[1, 1]]), c)


def test_composite_flow_draws_each_kind_with_the_spec_parameters():
    cfg = CompositeFlowConfig()
    assert cfg.transforms == ("hom", "tps", "afftps")
    assert (cfg.random_t_hom, cfg.random_t_tps, cfg.random_alpha, cfg.random_s,
            cfg.random_tx, cfg.random_ty, cfg.random_t_tps_for_afftps) == (
        0.333, 0.333, 0.26, 0.45, 0.25, 0.25, 0.08)
    torch.manual_seed(0)
    for _ in range(5):
        g = composite_grid(16, 24, cfg)
        assert g.shape == (16, 24, 2) and torch.isfinite(g).all()


def test_cem_warps_image_and_label_with_the_same_field():
    torch.manual_seed(0)
    h, w = 24, 32
    label = torch.randint(0, 19, (h, w))
    raw = (label.float() * 10).expand(3, h, w).clone()  # the enhanced image encodes the label
    sample = Normalize()({"image": raw.clone(), "label": label.clone(), "enhanced": raw.clone()})
    cfg = CEMConfig(jitter=(0.0, 0.0, 0.0), blur_p=0.0)  # keep the colours exact
    for _ in range(6):
        out = CEMTransform(cfg)(dict(sample))
        enh, lab = out["enhanced"], out["enhanced_label"]
        assert enh.shape == (3, h, w) and lab.dtype == torch.int64
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        decoded = ((enh * std + mean)[0] / 10).round().long()
        inside = lab != 255
        assert inside.any() and torch.equal(decoded[inside], lab[inside])
        # off-image pixels: ignored in the label and zero (= the mean colour) in the image
        assert (enh[:, ~inside] == 0).all()
        assert set(lab.unique().tolist()) <= set(range(19)) | {255}


def test_night_rendering_is_darker_and_keeps_the_layout():
    torch.manual_seed(0)
    img = torch.rand(3, 16, 16) * 0.7
    night = render_night(img)
    assert night.shape == img.shape and night.min() >= 0 and night.max() <= 1
    assert night.mean() < 0.6 * img.mean()
    without_view = CEMTransform()(Normalize()({"image": img * 255, "label": torch.zeros(16, 16, dtype=torch.long)}))
    assert without_view["enhanced"].shape == (3, 16, 16)


def test_cityscapes_cem_dataset_rendered_and_from_a_folder(tiny_cityscapes, tmp_path):
    pipe = PipelineConfig(scale=(64, 32), crop_size=(32, 32)).train()
    torch.manual_seed(0)
    ds = CityscapesCEM(tiny_cityscapes, "train", transform=pipe)
    s = ds[0]
    assert s["enhanced"].shape == (3, 32, 32) and s["enhanced_label"].shape == (32, 32)
    # ICDA's layout: <enhanced_root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    enh_root = tmp_path / "CycleGANCityscapes"
    for img in sorted((tiny_cityscapes / "leftImg8bit" / "train").glob("*/*.png")):
        write_png(enh_root / "leftImg8bit" / "train" / img.parent.name / img.name,
                  np.full((32, 64, 3), 7, np.uint8))
    ds = CityscapesCEM(tiny_cityscapes, "train", transform=pipe, enhanced_root=str(enh_root),
                       cem={"jitter": [0, 0, 0], "blur_p": 0, "flow": {"transforms": ["identity"]}})
    s = ds[1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(s["enhanced"] * std + mean, torch.full((3, 32, 32), 7.0),
                               rtol=1e-4, atol=1e-3)
    assert torch.equal(s["enhanced_label"], s["label"])
    from udaseg.data.io import DataError

    with pytest.raises(DataError, match="enhanced"):
        CityscapesCEM(tiny_cityscapes, "train", enhanced_root=str(tmp_path / "nowhere"))
