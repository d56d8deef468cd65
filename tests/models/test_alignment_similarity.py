"""SimilarityAligner (weight-free scale + translation aligner) and SynthNight's exact reference
flow (udaseg.data.synthnight.writer.reference_flow)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from udaseg.data.synthnight import SynthNightConfig, make_sample
from udaseg.data.synthnight.scene import rasterize, sample_dynamic, sample_layout
from udaseg.data.synthnight.writer import (
    _DYNAMIC,
    _REF_DYNAMIC,
    _STATIC,
    REF_SHIFT,
    REF_ZOOM,
    _rng,
    reference_camera_move,
    reference_flow,
)
from udaseg.models.alignment import DenseAligner, warp, warp_nearest
from udaseg.models.alignment.similarity import SimilarityAligner, SimilarityEstimate

MEAN = torch.tensor((123.675, 116.28, 103.53)).view(1, 3, 1, 1)
STD = torch.tensor((58.395, 57.12, 57.375)).view(1, 3, 1, 1)
STATIC_MAX = 10  # train IDs 0..10: road .. sky; 11..18 are traffic (re-drawn in the reference)

CFG = SynthNightConfig(
    seed=0, width=256, height=128, n_day_train=0, n_day_val=0, n_night_train=0, n_night_val=4,
    with_events=False, with_depth=False,
)


def _norm(rgb: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - MEAN) / STD


def _texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random RGB texture (ImageNet-normalised), blurred so bilinear warps are exact."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 4, w // 4, generator=g)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    x = x + 0.15 * F.avg_pool2d(torch.rand(1, 3, h, w, generator=g), 3, 1, 1)
    return (x.clamp(0, 1) * 255 - MEAN) / STD


def _epe(flow: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> float:
    return float((flow - gt).norm(dim=1)[mask].mean())


def _similarity_gt(scale: float, tx: float, ty: float, h: int, w: int) -> torch.Tensor:
    est = SimilarityEstimate(
        torch.tensor([scale]), torch.zeros(1), torch.tensor([[tx / w, ty / h]])
    )
    return est.flow(h, w)


@pytest.mark.parametrize(
    ("scale", "tx", "ty"),
    [(1.0, 5.0, -3.0), (1.0, 2.37, 1.61), (1.04, 0.0, 0.0), (1.04, -3.3, 2.2), (0.97, 4.5, 0.0)],
)
def test_recovers_synthetic_shift_and_zoom(scale, tx, ty):
    h = w = 128
    big = _texture(h + 64, w + 64, seed=1)
    # the reference is the texture; the target sees it through the similarity (a crop of a
    # warp, so no zero padding enters the target)
    ref = big[:, :, 32 : 32 + h, 32 : 32 + w]
    gt = _similarity_gt(scale, tx, ty, h, w)
    yy, xx = torch.meshgrid(torch.arange(h + 64.0), torch.arange(w + 64.0), indexing="ij")
    cx = cy = (h + 64) / 2
    gt_big = torch.stack(  # the same map on the larger grid (same centre)
        (
            (scale - 1) * (xx + 0.5 - cx) + tx,
            (scale - 1) * (yy + 0.5 - cy) + ty,
        )
    )[None]
    tgt_big, _ = warp(big, gt_big)
    tgt = tgt_big[:, :, 32 : 32 + h, 32 : 32 + w]
    aligner = SimilarityAligner()
    assert isinstance(aligner, DenseAligner)
    out = aligner(tgt, ref)
    assert out.flow.shape == (1, 2, h, w) and out.flow.dtype == torch.float32
    assert out.certainty.shape == (1, 1, h, w) and out.valid.shape == (1, h, w)
    assert out.valid.dtype == torch.bool
    assert float(out.certainty.min()) >= 0.0 and float(out.certainty.max()) <= 1.0
    assert float(out.certainty[0, 0, 0, 0]) > 0.5  # a clean pair is trusted
    assert torch.all(out.certainty == out.certainty[0, 0, 0, 0])  # constant per image
    assert _epe(out.flow, gt, out.valid) < 0.5


def test_batched_and_unrelated_pairs():
    h, w = 96, 160
    a, b = _texture(h, w, 2), _texture(h, w, 3)
    flow = _similarity_gt(1.0, 3.0, -2.0, h, w)
    shifted, _ = warp(a, flow)
    aligner = SimilarityAligner()
    out = aligner(torch.cat((shifted, shifted)), torch.cat((a, b)))  # second pair: unrelated
    assert _epe(out.flow[:1], flow, out.valid[:1] & (shifted.abs().sum(1) > 0)) < 0.5
    assert float(out.certainty[0].mean()) > 0.5
    assert float(out.certainty[1].mean()) < 0.2
    flat = aligner(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))
    assert torch.equal(flat.flow, torch.zeros_like(flat.flow))  # nothing to match: identity
    assert float(flat.certainty.max()) == 0.0
    with pytest.raises(ValueError, match="one size"):
        aligner(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 72))


@pytest.fixture(scope="module")
def night_pairs():
    return [make_sample(CFG, "night_val", i) for i in range(CFG.n_night_val)]


def test_reference_camera_move_is_in_range_and_deterministic():
    for i in range(4):
        sx, sy, zoom = reference_camera_move(CFG, "night_val", i)
        assert REF_ZOOM[0] <= zoom <= REF_ZOOM[1]
        assert abs(sx) <= REF_SHIFT * CFG.width and abs(sy) <= REF_SHIFT * CFG.height
        assert (sx, sy, zoom) == reference_camera_move(CFG, "night_val", i)
    with pytest.raises(ValueError, match="night"):
        reference_camera_move(CFG, "day_train", 0)


def test_reference_flow_maps_the_reference_labels_onto_the_night_labels(night_pairs):
    """Rasterise the reference's labels (same draws as the writer) and warp them with the exact
    flow: on static classes they match the night labels (only boundary pixels differ)."""
    split = "night_val"
    for i, sample in enumerate(night_pairs[:2]):
        layout = sample_layout(
            _rng(CFG, split, i, _STATIC), _rng(CFG, split, i, _DYNAMIC), CFG.width, CFG.height
        )
        sx, sy, zoom = reference_camera_move(CFG, split, i)
        traffic = sample_dynamic(_rng(CFG, split, i, _REF_DYNAMIC), layout.street)
        ref_label = rasterize(
            replace(layout, dynamic=traffic), layout.camera.moved(sx, sy, zoom)
        ).label
        flow = torch.from_numpy(reference_flow(CFG, split, i))[None]
        assert flow.shape == (1, 2, CFG.height, CFG.width) and flow.dtype == torch.float32
        ref_t = torch.from_numpy(ref_label.astype(np.int64))[None]
        night = torch.from_numpy(sample.label.astype(np.int64))[None]

        def agreement(f: torch.Tensor) -> float:
            warped, valid = warp_nearest(ref_t, f)
            m = valid & (night <= STATIC_MAX) & (warped <= STATIC_MAX)
            return float((warped[m] == night[m]).float().mean())

        exact = agreement(flow)
        assert exact > 0.95
        assert exact > agreement(torch.zeros_like(flow)) + 0.05
        for dx, dy in ((1.0, 0.0), (0.0, 1.0)):  # the exact flow beats a one-pixel error
            assert exact > agreement(flow + torch.tensor([dx, dy]).view(1, 2, 1, 1))


def test_synthnight_pairs_error_well_below_identity(night_pairs):
    aligner = SimilarityAligner()
    ours, ident = [], []
    for i, sample in enumerate(night_pairs):
        gt = torch.from_numpy(reference_flow(CFG, "night_val", i))[None]
        out = aligner(_norm(sample.image), _norm(sample.reference))
        m = out.valid & torch.from_numpy(sample.label <= STATIC_MAX)[None]
        ours.append(_epe(out.flow, gt, m))
        ident.append(float(gt.norm(dim=1)[m].mean()))
    assert np.mean(ours) < 1.0, ours
    assert np.mean(ours) < 0.2 * np.mean(ident), (ours, ident)
