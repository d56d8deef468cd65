"""ICDA: prototypes and PCL on crafted cases, the head freeze, gradient routing, the loop."""

import math
import random

import pytest
import torch

from udaseg.adapt.hooks import StepContext
from udaseg.adapt.methods.icda import (
    ClassPrototypes,
    DARPseudoLabels,
    ICDAConfig,
    SourcePairDARLoss,
    build,
    frozen_parameters,
    pcl_loss,
)
from udaseg.adapt.self_training import DACSConfig, SelfTraining
from udaseg.catalog import build_methods
from udaseg.errors import ConfigError
from udaseg.models.segmentor import build_segmentor


def test_prototype_update_new_mean_gets_the_momentum():
    p = ClassPrototypes(num_classes=3, dim=2, momentum=0.9)
    p.proto.copy_(torch.tensor([[1.0, 1.0], [5.0, 5.0], [2.0, 2.0]]))
    feats = torch.tensor([[3.0, 1.0], [5.0, 3.0], [0.0, 4.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 2, 255])  # class 1 absent, 255 ignored
    p.update(feats, labels)
    # class 0: mean (4, 2): 0.9 * (4, 2) + 0.1 * (1, 1) = (3.7, 1.9); class 2: 0.9 (0, 4) + 0.1 (2, 2)
    want = torch.tensor([[3.7, 1.9], [5.0, 5.0], [0.2, 3.8]])
    torch.testing.assert_close(p.proto, want)
    old = ClassPrototypes(3, 2, momentum=0.9, convention="old")
    old.proto.copy_(torch.tensor([[1.0, 1.0], [5.0, 5.0], [2.0, 2.0]]))
    old.update(feats, labels)  # m weights the old value: 0.1 * mean + 0.9 * old
    torch.testing.assert_close(old.proto[0], torch.tensor([1.3, 1.1]))
    assert "proto" in dict(p.named_buffers())


def test_pcl_loss_value_by_hand():
    proto = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # class 2 unseen: zero prototype
    feats = torch.tensor([[1.0, 1.0], [0.0, -2.0], [5.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 255])
    tau = 0.5
    loss = pcl_loss(proto, feats, labels, tau)
    c = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(c / tau) / (math.exp(c / tau) + math.exp(c / tau) + 1))
    l1 = -math.log(math.exp(-1 / tau) / (1 + math.exp(-1 / tau) + 1))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    loss.backward()
    assert feats.grad[2].abs().sum() == 0  # the ignored pixel gets nothing


def test_release_tau_is_nearly_flat_and_the_alternative_is_not():
    assert ICDAConfig().tau == 50.0 and ICDAConfig(pcl_tau=0.02).tau == 0.02
    torch.manual_seed(0)
    proto = torch.randn(19, 19)
    feats = torch.randn(64, 19, requires_grad=True)
    labels = torch.randint(0, 19, (64,))
    release = pcl_loss(proto, feats, labels, 50.0)
    assert abs(release.item() - math.log(19)) < 0.02  # logits in +-0.02
    g50 = torch.autograd.grad(release, feats)[0].norm()
    g002 = torch.autograd.grad(pcl_loss(proto, feats, labels, 0.02), feats)[0].norm()
    assert g002 > 100 * g50
    with pytest.raises(ConfigError):
        ICDAConfig(pcl_tau="nope")


def test_head_requires_grad_is_restored_even_when_the_dar_backward_raises():
    head = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    head[1].bias.requires_grad_(False)  # a flag that was already off stays off
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_parameters(head):
            assert not any(p.requires_grad for p in head.parameters())
            raise RuntimeError("boom")
    assert [p.requires_grad for p in head.parameters()] == [True, True, True, False]


def _student():
    torch.manual_seed(0)
    return build_segmentor("mit_tiny", "daformer", head_channels=16, drop_path_rate=0.0)


def _batches(b=2, h=64):
    src = {"image": torch.randn(b, 3, h, h), "label": torch.randint(0, 19, (b, h, h)),
           "enhanced": torch.randn(b, 3, h, h), "enhanced_label": torch.randint(0, 19, (b, h, h))}
    src["enhanced_label"][:, :4] = 255  # off-image rows of a warp
    trg = {"image": torch.randn(b, 3, h, h), "ref": torch.randn(b, 3, h, h)}
    return src, trg


def test_dar_terms_train_the_dar_only():
    student = _student()
    hooks = build({}, student)
    ref_hook = next(h for h in hooks if isinstance(h, SourcePairDARLoss))
    tp_hook = hooks[-1]
    src, trg = _batches()
    ctx = StepContext(step=0, source=src, target=trg, student=student, teacher=None,
                      seg_loss=SelfTraining(student).seg_loss)
    ctx.source_out = student(src["image"])
    (ref_hook(ctx) + tp_hook(ctx)).backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("decode_head."))
    assert all(g is None for n, g in grads.items() if n.startswith("backbone."))
    assert all(g is not None for n, g in grads.items() if n.startswith("train_only.dar.stages.1.blocks.1"))
    assert all(p.requires_grad for p in student.decode_head.parameters())  # restored
    assert ref_hook.prototypes.proto.abs().sum() > 0  # updated from the enhanced pair
    assert set(ctx.losses) >= {"icda_ref_ce", "icda_sp"}


def _loop(student, settings=None, **dacs):
    hooks = build_methods({"icda": settings or {}}, student)
    algo = SelfTraining(student, DACSConfig(teacher_stochastic=True, pseudo_weight_ignore_top=15,
                                            pseudo_weight_ignore_bottom=15, **dacs),
                        refiners=hooks.refiners, aux_losses=hooks.aux_losses,
                        target_transforms=hooks.target_transforms)
    return algo, hooks


def test_icda_iterations_on_a_tiny_student_and_the_teacher_dar_pseudo_labels():
    student = _student()
    algo, hooks = _loop(student)
    assert [h.name for h in algo.aux_losses] == ["icda_enh", "icda_ref", "icda_tp"]
    assert "dar" in algo.teacher.model.train_only  # the EMA covers the DAR
    refiner = algo.refiners[0]
    assert isinstance(refiner, DARPseudoLabels) and refiner.teacher_views == ("ref",)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    seen = []
    orig = refiner.__call__

    def spy(ctx, pseudo):
        out = orig(ctx, pseudo)
        seen.append((bool(ctx.target.get("adapted_to_ref")), out is pseudo))
        return out

    refiner.__call__ = spy  # instance attribute: the loop calls refine(ctx, pseudo)
    algo.refiners[0] = spy
    random.seed(3)
    dar_before = student.train_only["dar"].stages[0].down[0].weight.detach().clone()
    for step in range(4):
        src, trg = _batches()
        opt.zero_grad()
        losses = algo.step(student, src, trg, step, lambda l, **kw: l.backward(**kw))
        opt.step()
        assert all(torch.isfinite(v) for v in losses.values())
        assert {"src", "mix", "icda_enh", "icda_ref", "icda_tp", "icda_sp"} <= set(losses)
    assert not torch.equal(dar_before, student.train_only["dar"].stages[0].down[0].weight)
    # both branches happened: reference-as-target (labels kept) and DAR (labels replaced)
    assert (True, True) in seen and (False, False) in seen
    assert refiner.capture.handle is None  # the one-shot capture hook never lingers


def test_dar_pseudo_labels_reuse_the_loop_teacher_features():
    student = _student()
    algo, _ = _loop(student, {"adapt_to_ref": False})
    src, trg = _batches()
    calls = []
    algo.teacher.model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    algo.step(student, src, trg, 0, lambda l, **kw: l.backward(**kw))
    assert calls == [4]  # one teacher backbone pass on [target; reference]


def test_prototypes_survive_a_checkpoint_round_trip():
    student = _student()
    algo, _ = _loop(student)
    src, trg = _batches()
    algo.step(student, src, trg, 0, lambda l, **kw: l.backward(**kw))
    state = algo.state_dict()
    keys = [k for k in state if k.endswith("prototypes.proto")]
    assert len(keys) == 1 and state[keys[0]].abs().sum() > 0
    fresh, _ = _loop(_student())
    fresh.load_state_dict(state)
    assert torch.equal(dict(fresh.state_dict())[keys[0]], state[keys[0]])


def test_missing_views_name_the_fix():
    student = _student()
    algo, _ = _loop(student)
    src, trg = _batches()
    del src["enhanced"]
    with pytest.raises(ConfigError, match="cityscapes_cem"):
        algo.step(student, src, trg, 0, lambda l, **kw: l.backward(**kw))
    with pytest.raises(ConfigError, match="HRDA"):
        build({}, torch.nn.Linear(2, 2))
