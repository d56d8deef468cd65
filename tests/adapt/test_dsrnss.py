"""DSRNSS: the relation-aware ClassMix closures, the long-tail bank and the prototype loss on
hand-checked cases, and DSRNSS iterations in the loop (Refign + DSRNSS, FD off)."""

import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.hooks import MixedBatch, PseudoLabels, StepContext
from udaseg.adapt.methods.dsrnss import (
    DSRNSSConfig,
    FeaturePrototypeAlignment,
    LongTailBank,
    RelationAwareClassMix,
    build,
    class_prototypes,
    prototype_logits,
    prototype_pair_loss,
    relation_mix_choices,
    relation_mix_masks,
    resolve_closures,
)
from udaseg.adapt.self_training import DACSConfig, SelfTraining
from udaseg.catalog import build_methods
from udaseg.data.classes import CLASS_CLOSURES, CLASS_GROUPS
from udaseg.errors import ConfigError
from udaseg.models.segmentor import build_segmentor

# ----------------------------------------------------------------------------------------------
# 1. relation-aware ClassMix


def chosen_sets(label_values, draws=64, include_ignore=True, closures=CLASS_CLOSURES["dsrnss"]):
    """The class sets one image (a 1 x n label row holding ``label_values``) pastes, over draws."""
    y = torch.tensor(label_values).view(1, 1, -1)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(draws):
        row = relation_mix_choices(y, closures, g, include_ignore)[0]
        out.append(frozenset(row.nonzero().flatten().tolist()))
    return out


def test_data_tables():
    assert CLASS_GROUPS["dsrnss_tail"] == (12, 14, 15, 17, 18)
    assert resolve_closures("dsrnss") == (((6, 7), (5,)), ((5,), (6, 7)), ((12,), (17, 18)))
    assert resolve_closures([[[1], [2, 3]]]) == (((1,), (2, 3)),)
    assert resolve_closures(None) == ()
    with pytest.raises(ConfigError, match="known"):
        resolve_closures("nope")


def test_light_or_sign_takes_the_pole_and_the_pole_takes_them():
    # K = {5, 6}: one class is drawn; either way the closure gives {5, 6}
    assert set(chosen_sets([5, 6])) == {frozenset({5, 6})}
    assert set(chosen_sets([5, 7])) == {frozenset({5, 7})}
    # K = {0, 5, 6, 7}: two drawn; any of 5/6/7 drawn brings the whole object group
    for s in chosen_sets([0, 5, 6, 7]):
        assert s & {5, 6, 7} in (set(), {5, 6, 7})
    assert {frozenset({0, 5, 6, 7}), frozenset({5, 6, 7})} <= set(chosen_sets([0, 5, 6, 7]))


def test_absent_pole_links_nothing():
    # no pole in K: a traffic light does not bring the sign (the link goes through the pole)
    assert set(chosen_sets([6, 7])) == {frozenset({6}), frozenset({7})}


def test_rider_takes_its_vehicles_but_not_the_reverse_and_person_is_not_linked():
    sets = set(chosen_sets([12, 18]))
    assert sets == {frozenset({12, 18}), frozenset({18})}  # bicycle alone does not bring rider
    for s in chosen_sets([0, 12, 17, 18]):
        if 12 in s:
            assert {17, 18} <= s
        else:
            assert len(s) == 2
    assert set(chosen_sets([11, 12])) == {frozenset({11}), frozenset({12})}
    # an absent vehicle is not added
    assert set(chosen_sets([12, 17, 0, 1])) >= {frozenset({12, 17, 0}), frozenset({12, 17, 1})}
    assert all(18 not in s for s in chosen_sets([12, 17, 0, 1]))


def test_ceil_half_per_image_and_the_ignore_label():
    # |K| = 5 -> 3 classes without closures
    assert {len(s) for s in chosen_sets([0, 1, 2, 3, 4], closures=())} == {3}
    # 255 is a candidate (upstream) unless include_ignore is off
    assert set(chosen_sets([0, 255])) == {frozenset({0}), frozenset({255})}
    assert set(chosen_sets([0, 255], include_ignore=False)) == {frozenset({0})}
    # per image: image 0 only holds road, so it pastes all of it (the batch-wide draw of DACS
    # would pick from {0, 1, 2} and often leave it out)
    y = torch.stack([torch.zeros(4, 4, dtype=torch.long),
                     torch.tensor([1, 2]).repeat(8).view(4, 4)])
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        m = relation_mix_masks(y, generator=g)
        assert m.shape == (2, 1, 4, 4) and torch.equal(m[0], torch.ones(1, 4, 4))
        assert m[1].sum() == 8  # one of the two classes, 8 pixels each


def test_mixer_mixes_as_dacs():
    g = torch.Generator().manual_seed(0)
    src = {"image": torch.randn(2, 3, 4, 4, generator=g),
           "label": torch.randint(0, 19, (2, 4, 4), generator=g)}
    tgt = {"image": torch.randn(2, 3, 4, 4, generator=g)}
    ctx = StepContext(step=0, source=src, target=tgt, student=None, teacher=None)
    pseudo = PseudoLabels(label=torch.full((2, 4, 4), 3), weight=torch.full((2, 4, 4), 0.25))
    out = RelationAwareClassMix(generator=torch.Generator().manual_seed(1))(ctx, pseudo)
    m = out.mask
    assert torch.equal(out.image, m * src["image"] + (1 - m) * tgt["image"])
    assert torch.equal(out.label, torch.where(m[:, 0] > 0, src["label"], 3))
    assert torch.equal(out.weight, torch.where(m[:, 0] > 0, 1.0, 0.25))


# ----------------------------------------------------------------------------------------------
# 2. long-tail bank


def _bank_ctx(step, seed):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(10, 19, (2, 4, 4), generator=g)  # tail classes mixed in
    src = {"image": torch.randn(2, 3, 4, 4, generator=g), "label": label}
    return StepContext(step=step, source=src, target={}, student=None, teacher=None)


def _mixed(b=2):
    return MixedBatch(image=torch.full((b, 3, 4, 4), 100.0), label=torch.full((b, 4, 4), 7),
                      weight=torch.full((b, 4, 4), 0.5), mask=torch.zeros(b, 1, 4, 4),
                      unaugmented=torch.full((b, 3, 4, 4), 50.0))


def test_bank_keeps_the_last_three_iterations_and_pastes_every_fifth_step():
    bank = LongTailBank()
    tail = torch.tensor([12, 14, 15, 17, 18])
    lengths, pasted = [], []
    for step in range(11):
        ctx = _bank_ctx(step, seed=step)
        out = bank(ctx, _mixed())
        lengths.append(len(bank))
        pasted.append(not torch.equal(out.label, _mixed().label))
        # the newest entry is this step's masked source batch
        m = torch.isin(ctx.source["label"], tail)
        assert torch.equal(bank.bank_mask[-1], m)
        assert torch.equal(bank.bank_label[-1].long(), ctx.source["label"] * m)
        assert torch.equal(bank.bank_image[-1], ctx.source["image"] * m[:, None])
    assert lengths == [1, 2, 3] + [3] * 8
    assert pasted == [s % 5 == 0 for s in range(11)]
    # the bank holds steps 8, 9, 10 (oldest first)
    for i, step in enumerate((8, 9, 10)):
        m = torch.isin(_bank_ctx(step, step).source["label"], tail)
        assert torch.equal(bank.bank_mask[i], m)


def test_paste_oldest_to_newest_at_the_same_positions_weight_unchanged():
    bank = LongTailBank(period=5)
    ctxs = [_bank_ctx(s, seed=s) for s in (3, 4, 5)]
    for ctx in ctxs[:2]:
        bank.record(ctx.source["image"], ctx.source["label"])
    out = bank(ctxs[2], _mixed())  # step 5: records, then pastes all three
    want_img, want_lbl = _mixed().image.clone(), _mixed().label.clone()
    want_un = _mixed().unaugmented.clone()
    for ctx in ctxs:  # newest written last wins
        m = torch.isin(ctx.source["label"], torch.tensor(CLASS_GROUPS["dsrnss_tail"]))
        want_img = torch.where(m[:, None], ctx.source["image"], want_img)
        want_un = torch.where(m[:, None], ctx.source["image"], want_un)
        want_lbl = torch.where(m, ctx.source["label"], want_lbl)
    assert torch.equal(out.image, want_img)  # raw source pixels: no augmentation on them
    assert torch.equal(out.label, want_lbl)
    assert torch.equal(out.unaugmented, want_un)
    assert torch.equal(out.weight, _mixed().weight)  # the weight under a pasted pixel stays
    assert torch.equal(out.mask[:, 0] > 0, want_lbl != 7)
    # a smaller mixed batch takes the first bank samples
    assert bank.paste(_mixed(1)).image.shape == (1, 3, 4, 4)
    # paste_epoch_length: the reference's per-epoch batch index
    assert LongTailBank(epoch_length=7).paste_due(7) and not LongTailBank().paste_due(7)


def test_bank_state_round_trips_through_a_state_dict():
    bank = LongTailBank()
    for step in range(4):
        bank.record(_bank_ctx(step, step).source["image"], _bank_ctx(step, step).source["label"])
    fresh = LongTailBank()
    assert len(fresh) == 0
    fresh.load_state_dict(bank.state_dict())
    assert len(fresh) == 3
    for name in ("bank_image", "bank_label", "bank_mask"):
        assert torch.equal(getattr(fresh, name), getattr(bank, name))
    assert "tail" not in bank.state_dict()


# ----------------------------------------------------------------------------------------------
# 3. feature prototype alignment


def _ce(logits: list[float], y: int) -> float:
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


def _pair():
    """Two 2x2 images, 2 channels, K = 3 classes (pixel order x0 x1 / x2 x3)."""
    feat_a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).t().reshape(2, 2, 2)
    label_a = torch.tensor([[0, 0], [1, 255]])
    feat_b = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 3.0], [3.0, 1.0]]).t().reshape(2, 2, 2)
    label_b = torch.tensor([[0, 1], [2, 255]])
    return feat_a, label_a, feat_b, label_b


def test_prototypes_cosine_and_absent_fill():
    feat_a, label_a, feat_b, _ = _pair()
    protos, present = class_prototypes(feat_a, label_a, 3)
    assert torch.allclose(protos, torch.tensor([[1.5, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert present.tolist() == [True, True, False]
    z = prototype_logits(protos, feat_b, (2, 2), temperature=0.1)
    s5, s10 = math.sqrt(5), math.sqrt(10)
    want = torch.tensor([[2 / s5, 1 / s5, 1 / s10, 3 / s10],
                         [1 / s5, 2 / s5, 3 / s10, 1 / s10],
                         [-1.0, -1.0, -1.0, -1.0]]).view(1, 3, 2, 2) * 10
    assert torch.allclose(z, want)
    # an exact zero cosine is -1 as well (upstream fills `== 0`)
    z0 = prototype_logits(torch.tensor([[0.0, 1.0]]), torch.tensor([[[1.0]], [[0.0]]]), (1, 1), 1.0)
    assert z0.item() == -1.0
    # nearest upsampling to the label size
    z4 = prototype_logits(protos, feat_b, (4, 4), temperature=0.1)
    assert torch.equal(z4, z.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_pair_loss_equals_the_hand_computation():
    feat_a, label_a, feat_b, label_b = _pair()
    s5, s10 = math.sqrt(5), math.sqrt(10)
    # L1: prototypes of a on b; classes present in both: {0, 1} -> w = [1, 1, 0]; the class-2
    # pixel has weight 0 (out of the mean), the 255 pixel is ignored
    z_b = [[20 / s5, 10 / s5, -10], [10 / s5, 20 / s5, -10]]  # x0 (y 0), x1 (y 1)
    l1 = (_ce(z_b[0], 0) + _ce(z_b[1], 1)) / 2
    # L2: prototypes of b (0: (2,1), 1: (1,2), 2: (1,3)) on a, unweighted, 255 ignored
    z_a = [[20 / s5, 10 / s5, 10 / s10],      # x0 (1, 0), y 0
           [20 / s5, 10 / s5, 10 / s10],      # x1 (2, 0), y 0
           [10 / s5, 20 / s5, 30 / s10]]      # x2 (0, 1), y 1
    l2 = (_ce(z_a[0], 0) + _ce(z_a[1], 0) + _ce(z_a[2], 1)) / 3
    got = prototype_pair_loss(feat_a, label_a, feat_b, label_b, 3)
    assert got.item() == pytest.approx(0.1 * l1 + 0.1 * l2, rel=1e-6)
    # optional class weights multiply both terms' weights
    cw = torch.tensor([2.0, 1.0, 1.0])
    l1w = (2 * _ce(z_b[0], 0) + _ce(z_b[1], 1)) / 3
    l2w = (2 * _ce(z_a[0], 0) + 2 * _ce(z_a[1], 0) + _ce(z_a[2], 1)) / 5
    got_w = prototype_pair_loss(feat_a, label_a, feat_b, label_b, 3, class_weights=cw)
    assert got_w.item() == pytest.approx(0.1 * l1w + 0.1 * l2w, rel=1e-6)


def test_pair_loss_resizes_labels_nearest_and_has_no_nan_without_overlap():
    feat_a, label_a, feat_b, label_b = _pair()
    up = lambda y: y.repeat_interleave(2, 0).repeat_interleave(2, 1)  # noqa: E731
    small = prototype_pair_loss(feat_a, label_a, feat_b, label_b, 3)
    big = prototype_pair_loss(feat_a, up(label_a), feat_b, up(label_b), 3)
    assert big.item() == pytest.approx(small.item(), rel=1e-6)
    # no shared class: L1 is 0 (PyTorch's weighted mean would give NaN), L2 stays
    lb = torch.tensor([[2, 2], [2, 255]])
    out = prototype_pair_loss(feat_a, label_a, feat_b, lb, 3, term_weights=(1.0, 0.0))
    assert out.item() == 0.0


def test_pair_loss_falls_under_gradient_descent():
    torch.manual_seed(0)
    feat_a = torch.randn(4, 3, 3, requires_grad=True)
    feat_b = torch.randn(4, 3, 3, requires_grad=True)
    la = torch.randint(0, 3, (6, 6))
    lb = torch.randint(0, 3, (6, 6))
    opt = torch.optim.SGD([feat_a, feat_b], lr=1.0)
    values = []
    for _ in range(30):
        opt.zero_grad()
        loss = prototype_pair_loss(feat_a, la, feat_b, lb, 3)
        loss.backward()
        values.append(loss.item())
        opt.step()
    assert values[-1] < 0.5 * values[0]


class _Student(torch.nn.Module):
    """Two 2x2 feature maps per image, K = 3 logits (for a hand-checked FPA call)."""

    def __init__(self, feats):
        super().__init__()
        self.feats = feats

    def extract_features(self, x):
        return [self.feats]


def test_fpa_hook_combines_metric_and_align_and_switches_on_at_the_start_step():
    from udaseg.models.segmentor import SegOutput

    feat_a, label_a, feat_b, label_b = _pair()
    f_s = feat_a[None].clone().requires_grad_(True)
    f_m = feat_a[None].flip(-1).clone().requires_grad_(True)
    # teacher probabilities whose argmax is label_b (255 -> 2)
    prob = F.one_hot(label_b.clamp(max=2), 3).permute(2, 0, 1)[None].float()
    ctx = StepContext(step=9, source={"image": torch.zeros(1, 3, 2, 2), "label": label_a[None]},
                      target={"image": torch.zeros(1, 3, 2, 2)}, student=_Student(feat_b[None]),
                      teacher=None)
    ctx.source_out = SegOutput(logits=torch.zeros(1, 3, 2, 2), features=[f_s])
    ctx.mixed_out = SegOutput(logits=torch.zeros(1, 3, 2, 2), features=[f_m])
    ctx.pseudo = PseudoLabels(label=torch.zeros(1, 2, 2, dtype=torch.long),
                              weight=torch.ones(1, 2, 2), prob=prob)
    ctx.mixed = MixedBatch(image=torch.zeros(1, 3, 2, 2), label=label_b[None],
                           weight=torch.ones(1, 2, 2), mask=torch.zeros(1, 1, 2, 2))
    hook = FeaturePrototypeAlignment(DSRNSSConfig(fpa_start_step=10))
    assert hook(ctx).item() == 0.0 and "fpa_metric" not in ctx.losses  # before the start
    ctx.step = 10
    loss = hook(ctx)
    y_t = label_b.clamp(max=2)  # every target pixel labelled by the argmax
    metric = prototype_pair_loss(feat_a, label_a, feat_b, y_t, 3)
    align = prototype_pair_loss(feat_a, label_a, feat_a.flip(-1), label_b, 3)
    assert ctx.losses["fpa_metric"].item() == pytest.approx(metric.item(), rel=1e-6)
    assert ctx.losses["fpa_align"].item() == pytest.approx(align.item(), rel=1e-6)
    assert loss.item() == pytest.approx(metric.item() + align.item() / 10, rel=1e-6)  # single scale
    loss.backward()
    assert f_s.grad.abs().sum() > 0 and f_m.grad.abs().sum() > 0
    # HRDA (detail logits present): L_align / 100
    ctx.source_out.detail_logits = torch.zeros(1, 3, 1, 1)
    assert hook(ctx).item() == pytest.approx(metric.item() + align.item() / 100, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the loop


def _batches(seed, b=2, size=32):
    g = torch.Generator().manual_seed(seed)
    src = {"image": torch.randn(b, 3, size, size, generator=g),
           "label": torch.randint(0, 19, (b, size, size), generator=g)}
    tgt = {"image": torch.randn(b, 3, size, size, generator=g),
           "ref": torch.randn(b, 3, size, size, generator=g)}
    return src, tgt


def test_build_hooks_and_switches():
    hooks = build({}, None)
    assert [h.hook_kind for h in hooks] == ["mixer", "mixed_transform", "aux_loss"]
    assert build({"relation_mix": False, "bank": False, "fpa": False}, None) == []
    with pytest.raises(ConfigError, match="accepts"):
        build({"fpa_start": 3}, None)
    assert build({"tail_classes": [1, 2]}, None)[1].tail_classes == (1, 2)
    # a command-line override of a method block arrives as a string
    assert build({"fpa_start_step": "3", "fpa": True}, None)[2].cfg.fpa_start_step == 3


def test_dsrnss_iterations_on_refign_with_fd_off_give_gradients():
    torch.manual_seed(0)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16, drop_path_rate=0.0)
    hooks = build_methods({"refign": {"aligner": "identity", "adapt_to_ref": False},
                           "dsrnss": {"fpa_start_step": 1}}, student)
    assert type(hooks.mixer).__name__ == "RelationAwareClassMix"
    assert [type(h).__name__ for h in hooks.mixed_transforms] == ["LongTailBank"]
    assert [h.name for h in hooks.aux_losses] == ["fpa"]  # no FD
    algo = SelfTraining(student, DACSConfig(pseudo_threshold=0.0, target_loss_weight=0.8),
                        refiners=hooks.refiners, mixer=hooks.mixer, aux_losses=hooks.aux_losses,
                        target_transforms=hooks.target_transforms,
                        mixed_transforms=hooks.mixed_transforms)
    assert any(isinstance(m, LongTailBank) for m in algo.hook_modules)  # checkpointed
    opt = torch.optim.SGD(student.parameters(), lr=0.01)

    # record the gradient on the source features after each backward of the step
    captured = {}
    real_forward = student.forward

    def forward(x):
        out = real_forward(x)
        if "src" not in captured and x is src["image"]:
            out.features[-1].retain_grad()
            captured["src"] = out.features[-1]
        return out

    student.forward = forward
    grads = []

    def backward(loss, retain_graph=False):
        loss.backward(retain_graph=retain_graph)
        if "src" in captured:
            grads.append(captured["src"].grad.clone())

    for step in range(3):
        captured.clear()
        grads.clear()
        src, tgt = _batches(step)
        opt.zero_grad()
        losses = algo.step(student, src, tgt, step, backward)
        assert all(torch.isfinite(v) for v in losses.values())
        total = sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None)
        assert total > 0
        if step == 0:
            assert losses["fpa"].item() == 0.0 and len(algo.mixed_transforms[0]) == 1
            # before the start, the target stage adds nothing to the source features
            assert torch.equal(grads[0], grads[1])
        else:
            assert losses["fpa"].item() > 0 and "fpa_metric" in losses and "fpa_align" in losses
            # FPA's gradient reaches the source features through the retained source graph
            assert not torch.equal(grads[0], grads[1])
        opt.step()
    assert len(algo.mixed_transforms[0]) == 3


def test_dsrnss_with_an_hrda_student_uses_the_context_features_and_align_over_100():
    from udaseg.models.hrda import build_hrda

    torch.manual_seed(0)
    student = build_hrda("mit_tiny", "daformer", head_channels=16, drop_path_rate=0.0)
    hooks = build_methods({"refign": {"aligner": "identity", "adapt_to_ref": False},
                           "dsrnss": {"fpa_start_step": 0}}, student)
    algo = SelfTraining(student, DACSConfig(pseudo_threshold=0.0, target_loss_weight=0.8),
                        refiners=hooks.refiners, mixer=hooks.mixer, aux_losses=hooks.aux_losses,
                        mixed_transforms=hooks.mixed_transforms)
    fpa = hooks.aux_losses[0]
    seen = {}
    real = fpa.target_features

    def target_features(ctx, level):
        f = real(ctx, level)
        seen["t"], seen["s"] = f.shape, ctx.source_out.features[level].shape
        seen["factor"] = fpa.align_factor(ctx)
        return f

    fpa.target_features = target_features
    src, tgt = _batches(0, size=64)
    losses = algo.step(student, src, tgt, 0, lambda loss, retain_graph=False: loss.backward(
        retain_graph=retain_graph))
    assert torch.isfinite(losses["fpa"]) and losses["fpa"] > 0
    # context branch at x0.5, last stage stride 32: 64 -> 32 -> 1x1 features
    assert seen["t"] == seen["s"] == (2, 128, 1, 1) and seen["factor"] == 0.01  # mit_tiny: 128
    want = losses["fpa_metric"] + losses["fpa_align"] / 100
    assert losses["fpa"].item() == pytest.approx(want.item(), rel=1e-6)
