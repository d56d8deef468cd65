"""Refign: the refinement on hand-checked cases, each ablation switch, and the loop wiring."""

import math
import random

import pytest
import torch

from udaseg.adapt.hooks import PseudoLabels, StepContext
from udaseg.adapt.methods.refign import (
    ReferenceAsTarget,
    RefignConfig,
    RefignRefiner,
    build,
    normalized_entropy,
    refine_probabilities,
)
from udaseg.adapt.pseudo_label import pseudo_labels_from_probs
from udaseg.adapt.self_training import DACSConfig, SelfTraining
from udaseg.catalog import build_methods
from udaseg.errors import ConfigError
from udaseg.models.alignment import Alignment, IdentityAligner
from udaseg.models.segmentor import build_segmentor

C = 19


def onehotish(cls: int, p: float = 0.9) -> torch.Tensor:
    v = torch.full((C,), (1 - p) / (C - 1))
    v[cls] = p
    return v


def _pair():
    """1 image, 1x2 pixels. Pixel 0: target road (0), reference building (2): both static.
    Pixel 1: target car (13), reference road (0): not both static."""
    p_t = torch.stack([onehotish(0), onehotish(13)], dim=-1).view(1, C, 1, 2)
    p_r = torch.stack([onehotish(2, 0.6), onehotish(0, 0.6)], dim=-1).view(1, C, 1, 2)
    return p_t, p_r


def test_refinement_hand_checked_gamma_zero_with_certainty_and_mask():
    p_t, p_r = _pair()
    cert = torch.tensor([0.3, 0.3]).view(1, 1, 1, 2)
    out = refine_probabilities(p_t, p_r, cert, None, gamma=0.0)  # s = 1
    # pixel 0: static channels get eps = max(0.3, 1) = 1 -> p_R; other channels eps = 0.3
    assert out[0, 0, 0, 0].item() == pytest.approx(p_r[0, 0, 0, 0].item())
    assert out[0, 2, 0, 0].item() == pytest.approx(0.6)  # building from the reference
    assert out[0, 5, 0, 0].item() == pytest.approx(0.7 * p_t[0, 5, 0, 0] + 0.3 * p_r[0, 5, 0, 0])
    assert out[0, 13, 0, 0].item() == pytest.approx(0.7 * p_t[0, 13, 0, 0] + 0.3 * p_r[0, 13, 0, 0])
    # pixel 1: M = 0 everywhere (car is dynamic): eps = 0.3 on every channel
    want = 0.7 * p_t[0, :, 0, 1] + 0.3 * p_r[0, :, 0, 1]
    assert torch.allclose(out[0, :, 0, 1], want)
    # the mixture is not renormalised at pixel 0
    assert abs(out[0, :, 0, 0].sum().item() - 1.0) > 1e-3


def test_refinement_trust_score_gamma_and_validity():
    p_t, p_r = _pair()
    h = normalized_entropy(p_t)
    ent0 = -(0.9 * math.log(0.9) + 18 * (0.1 / 18) * math.log(0.1 / 18)) / math.log(C)
    assert h[0, 0, 0].item() == pytest.approx(ent0, rel=1e-5)
    s = ent0 ** 0.25
    out = refine_probabilities(p_t, p_r, None, torch.tensor([[[True, False]]]), gamma=0.25)
    # disable_P (certainty None): P = 0.5; pixel 1 is invalid: eps = 0 -> p_T
    assert torch.allclose(out[0, :, 0, 1], p_t[0, :, 0, 1])
    e = s * 0.5
    assert out[0, 13, 0, 0].item() == pytest.approx((1 - e) * p_t[0, 13, 0, 0] + e * p_r[0, 13, 0, 0])
    assert out[0, 2, 0, 0].item() == pytest.approx((1 - s) * p_t[0, 2, 0, 0] + s * 0.6)  # M = 1
    # disable_M: static channels of pixel 0 get eps = s * 0.5 too
    out_nm = refine_probabilities(p_t, p_r, None, None, gamma=0.25, use_mask=False)
    assert out_nm[0, 2, 0, 0].item() == pytest.approx((1 - e) * p_t[0, 2, 0, 0] + e * 0.6)


def test_small_static_classes_are_never_masked():
    # target pole (5), reference traffic sign (7): static but small -> not in S, M = 0
    p_t = onehotish(5).view(1, C, 1, 1)
    p_r = onehotish(7).view(1, C, 1, 1)
    out = refine_probabilities(p_t, p_r, torch.zeros(1, 1, 1, 1), None, gamma=0.0)
    assert torch.allclose(out, p_t)  # P = 0 and M = 0: nothing from the reference


class ShiftAligner(torch.nn.Module):
    """Flow +dx everywhere, certainty 1."""

    def __init__(self, dx: float):
        super().__init__()
        self.dx = dx

    def forward(self, target, reference):
        b, _, h, w = target.shape
        flow = torch.zeros(b, 2, h, w)
        flow[:, 0] = self.dx
        from udaseg.models.alignment.base import sample_grid

        return Alignment(flow, torch.ones(b, 1, h, w), sample_grid(flow)[1])


def _ctx(b=1, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(b, C, h, w, generator=g) * 3
    z_r = torch.randn(b, C, h, w, generator=g) * 3
    target = {"image": torch.randn(b, 3, h, w, generator=g),
              "ref": torch.randn(b, 3, h, w, generator=g)}
    ctx = StepContext(step=0, source={}, target=target, student=None, teacher=None)
    ctx.teacher_logits = {"ref": z_r}
    ctx.pseudo_from_probs = lambda p, valid=None: pseudo_labels_from_probs(p, 0.5, valid=valid)
    pseudo = pseudo_labels_from_probs(torch.softmax(z_t, 1), 0.5)
    return ctx, pseudo, z_t, z_r


def test_refiner_warps_the_reference_logits_before_the_softmax():
    ctx, pseudo, z_t, z_r = _ctx()
    cfg = RefignConfig(aligner="identity", gamma=0.0, disable_M=True)
    out = RefignRefiner(cfg, aligner=ShiftAligner(1.0))(ctx, pseudo)
    # target column x sees reference column x + 1; columns whose match is on/over the border and
    # rows 0 / H-1 (v = -1 / +1) are invalid (strictly inside) and keep p_T
    p_t = torch.softmax(z_t, 1)
    p_r = torch.zeros_like(z_r)
    p_r[..., :-1] = torch.softmax(z_r[..., 1:], 1)
    # certainty 1, s = 1 (gamma 0), no mask: eps = 1 on valid pixels -> the warped reference
    want = p_t.clone()
    want[:, :, 1:-1, :-2] = p_r[:, :, 1:-1, :-2]
    assert torch.allclose(out.prob, want, atol=1e-5)
    assert torch.equal(out.label, want.argmax(1))
    # disable_P: P = 0.5
    out_p = RefignRefiner(RefignConfig(aligner="identity", gamma=0.0, disable_M=True,
                                       disable_P=True), aligner=ShiftAligner(1.0))(ctx, pseudo)
    mix = p_t.clone()
    mix[:, :, 1:-1, :-2] = 0.5 * p_t[:, :, 1:-1, :-2] + 0.5 * p_r[:, :, 1:-1, :-2]
    assert torch.equal(out_p.label, mix.argmax(1))


def test_use_align_false_mixes_the_unaligned_reference_everywhere():
    ctx, pseudo, z_t, z_r = _ctx()
    refiner = RefignRefiner(RefignConfig(use_align=False, gamma=0.0, disable_M=True))
    assert refiner.aligner is None
    out = refiner(ctx, pseudo)
    want = 0.5 * torch.softmax(z_t, 1) + 0.5 * torch.softmax(z_r, 1)
    conf, label = want.max(1)
    assert torch.equal(out.label, label)
    assert out.weight.mean().item() == pytest.approx((conf >= 0.5).float().mean().item())


def test_adapted_to_ref_step_is_not_refined_and_missing_view_is_explained():
    ctx, pseudo, _, _ = _ctx()
    refiner = RefignRefiner(RefignConfig(aligner="identity"))
    ctx.target["adapted_to_ref"] = True
    assert refiner(ctx, pseudo) is pseudo
    ctx, pseudo, _, _ = _ctx()
    del ctx.target["ref"]
    with pytest.raises(ConfigError, match="views: \\[ref\\]"):
        refiner(ctx, pseudo)


def test_reference_as_target_swaps_with_probability():
    swap = ReferenceAsTarget(0.5)
    target = {"image": torch.zeros(1), "ref": torch.ones(1)}
    random.seed(0)
    draws = [random.random() < 0.5 for _ in range(20)]
    random.seed(0)
    outs = [swap(None, target) for _ in range(20)]
    for d, o in zip(draws, outs):
        assert bool(o.get("adapted_to_ref")) == d
        assert torch.equal(o["image"], torch.ones(1) if d else torch.zeros(1))
        assert ("ref" in o) != d
    assert any(draws) and not all(draws)


def test_uawarpc_without_weights_is_a_config_error():
    with pytest.raises(ConfigError, match="similarity"):
        build({"aligner": "uawarpc"}, None)


def test_refign_in_the_loop_teacher_sees_target_and_reference_in_one_pass():
    torch.manual_seed(0)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16, drop_path_rate=0.0)
    hooks = build_methods({"refign": {"aligner": "identity", "adapt_to_ref": False}}, student)
    assert [type(h).__name__ for h in hooks.refiners] == ["RefignRefiner"]
    assert not hooks.target_transforms
    algo = SelfTraining(student, DACSConfig(pseudo_threshold=0.0), refiners=hooks.refiners,
                        target_transforms=hooks.target_transforms)
    batches = []
    real = algo.teacher.model.forward
    algo.teacher.model.forward = lambda x: (batches.append(x.shape[0]), real(x))[1]
    g = torch.Generator().manual_seed(1)
    src = {"image": torch.randn(2, 3, 32, 32, generator=g),
           "label": torch.randint(0, 19, (2, 32, 32), generator=g)}
    tgt = {"image": torch.randn(2, 3, 32, 32, generator=g),
           "ref": torch.randn(2, 3, 32, 32, generator=g)}
    losses = algo.step(student, src, tgt, 0, lambda l: l.backward())
    assert batches == [4]  # [target; reference] in one teacher pass
    assert torch.isfinite(losses["mix"])
    # with adapt_to_ref always on, the reference is the target and the teacher sees 2 images
    hooks = build_methods({"refign": {"aligner": "identity", "adapt_to_ref_probability": 1.0}},
                          student)
    assert len(hooks.target_transforms) == 1
    algo = SelfTraining(student, DACSConfig(), refiners=hooks.refiners,
                        target_transforms=hooks.target_transforms)
    seen = []
    real2 = algo.teacher.model.forward
    algo.teacher.model.forward = lambda x: (seen.append(x.clone()), real2(x))[1]
    algo.step(student, src, tgt, 0, lambda l: l.backward())
    assert len(seen) == 1 and torch.equal(seen[0], tgt["ref"])


def test_identity_aligner_config_builds():
    (swap, refiner) = build({"aligner": "identity"}, None)
    assert isinstance(swap, ReferenceAsTarget) and isinstance(refiner.aligner, IdentityAligner)
