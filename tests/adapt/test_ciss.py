"""CISS: the feature invariance loss, the source/target hooks and their place in the loop."""

import pytest
import torch

from udaseg.adapt.hooks import AuxLoss, LabelRefiner, MixedBatch, PseudoLabels, StepContext
from udaseg.adapt.losses import segmentation_loss
from udaseg.adapt.methods.ciss import (
    CISSConfig,
    CISSSourceLoss,
    CISSSourceTerms,
    CISSTargetLoss,
    CISSTargetTerms,
    FeatureInvariance,
    InvarianceSettings,
    StylizedPseudoLabels,
    build_ciss_hooks,
)
from udaseg.errors import ConfigError
from udaseg.models.segmentor import build_segmentor


def _feats(seed=0, shapes=((1, 2, 2, 2), (1, 3, 1, 1), (1, 2, 1, 1), (1, 2, 1, 1))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


# ------------------------------------------------------------------ FeatureInvariance


def test_invariance_zero_for_identical_views_with_finite_gradient():
    a = [f.requires_grad_(True) for f in _feats()]
    for preset in ("reference", "all_stages"):
        loss = CISSConfig(preset=preset).feature_invariance()(a, a)
        assert loss.item() == 0.0
    loss.backward()
    assert all(f.grad is not None and torch.equal(f.grad, torch.zeros_like(f)) for f in a)


def test_invariance_reference_equals_hand_computed_stage1_stage2():
    a = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 1, 1), torch.zeros(1, 2, 1, 1),
         torch.zeros(1, 2, 1, 1)]
    b = [t.clone() for t in a]
    b[0][0, 1, 0, 1] = 2.0  # stage 1: one of 8 elements differs by 2 -> MSE 4/8, MAE 2/8
    b[1] += 1.0  # stage 2: every element differs by 1 -> MSE 1, MAE 1
    b[2] += 100.0  # stages 3 and 4 are not constrained by the reference preset
    b[3] -= 100.0
    ref = CISSConfig().feature_invariance()
    assert ref.levels == (1, 2) and ref.level_weights == (0.9, 0.1)
    assert ref(a, b).item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    l1 = FeatureInvariance((1, 2), (0.9, 0.1), norm="l1")
    assert l1(a, b).item() == pytest.approx(0.9 * 0.25 + 0.1 * 1.0)
    every = CISSConfig(preset="all_stages").feature_invariance()
    assert every(a, b).item() == pytest.approx(0.25 * (0.5 + 1.0 + 100.0**2 + 100.0**2))
    # explicit levels override the preset; weights default to equal 1/n
    cfg = CISSConfig(invariance=InvarianceSettings(levels=(2, 3)))
    assert cfg.resolved_levels() == ((2, 3), (0.5, 0.5))
    with pytest.raises(ValueError, match="level 5"):
        FeatureInvariance((5,), (1.0,))(a, b)


@pytest.mark.parametrize("stop_grad, grad_a, grad_b", [
    ("none", True, True), ("original", False, True), ("stylized", True, False),
])
def test_invariance_stop_grad_gradient_paths(stop_grad, grad_a, grad_b):
    a = torch.zeros(1, 1, 2, 2, requires_grad=True)
    b = torch.ones(1, 1, 2, 2, requires_grad=True)
    inv = FeatureInvariance((1,), (0.9,), stop_grad=stop_grad)
    loss = inv([a], [b])
    assert loss.item() == pytest.approx(0.9)
    loss.backward()
    # d/da 0.9 * mean((a - b)^2) = 0.9 * 2 (a - b) / 4 = -0.45 per element
    assert (a.grad is not None) == grad_a and (b.grad is not None) == grad_b
    if grad_a:
        assert torch.allclose(a.grad, torch.full_like(a, -0.45))
    if grad_b:
        assert torch.allclose(b.grad, torch.full_like(b, 0.45))


def test_invariance_class_average_two_classes():
    # 4x4 label -> 2x2 feature cells (scale 2): TL class 0, TR class 0 (3/4 majority),
    # BL class 1, BR ignore
    label = torch.tensor([[
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [1, 1, 255, 255],
        [1, 1, 255, 255],
    ]])
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    b[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # channel-mean squared diff 1
    b[0, :, 0, 1] = torch.tensor([3.0, 3.0])  # 9
    b[0, :, 1, 0] = torch.tensor([2.0, 0.0])  # (4 + 0) / 2 = 2
    b[0, :, 1, 1] = torch.tensor([10.0, 10.0])  # 100, ignored
    inv = FeatureInvariance((1,), (1.0,), class_average=True)
    # class 0: (1 + 9) / 2 = 5; class 1: 2; mean over the two classes: 3.5
    assert inv([a], [b], label).item() == pytest.approx(3.5)
    # without class averaging: plain MSE over all elements
    assert FeatureInvariance((1,), (1.0,))([a], [b]).item() == pytest.approx(
        (1 + 1 + 9 + 9 + 4 + 0 + 100 + 100) / 8)
    # no labelled cell: 0, not NaN, with a graph
    b.requires_grad_(True)
    empty = inv([a], [b], torch.full((1, 4, 4), 255))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(b.grad, torch.zeros_like(b))
    with pytest.raises(ValueError, match="needs the label"):
        inv([a], [b])


# ------------------------------------------------------------------ configuration


def test_config_defaults_upstream_name_and_validation():
    cfg = CISSConfig()
    assert cfg.upstream_name() == "src_ceorig_inv_trg_ceorigorig_invorigorigstylizedstylized"
    assert cfg.weight_source == 50.0 and cfg.weight_target == 20.0
    assert cfg.invariance.norm == "l2" and cfg.invariance.stop_grad == "none"
    # weight_target None falls back to the source weight (upstream default)
    dz = CISSConfig(invariance=InvarianceSettings(weight_source=100.0, weight_target=None))
    assert dz.weight_target == 100.0
    avg = CISSConfig(source={"ce_stylized": True, "average_ce": True},
                     target={"ce_mixes": [["original", "original"], ["stylized", "stylized"]],
                             "pseudo_labels": "stylized"})
    assert avg.source_ce_coefficients() == (0.5, 0.5)
    assert avg.upstream_name() == (
        "src_ceorig_cestylized_avgce_inv_trg_ceorigorig_cestylizedstylized"
        "_invorigorigstylizedstylized_pseudostylized")
    with pytest.raises(ValueError, match="mixed view"):
        CISSTargetTerms(ce_mixes=[["original", "night"]])
    with pytest.raises(ValueError, match="paired with itself"):
        CISSTargetTerms(invariance_pairs=[[["stylized", "stylized"], ["stylized", "stylized"]]])
    with pytest.raises(ValueError, match="preset"):
        CISSConfig(preset="stage4")
    with pytest.raises(ValueError, match="norm"):
        CISSConfig(invariance=InvarianceSettings(norm="l3"))
    with pytest.raises(ValueError, match="level_weights"):
        CISSConfig(invariance=InvarianceSettings(levels=(1, 2), level_weights=(1.0,)))


def test_catalog_builds_nested_settings_and_rejects_unknown_keys():
    from udaseg.catalog import build_methods

    student = build_segmentor("mit_tiny", "segformer", head_channels=16)
    hooks = build_methods({"ciss": {
        "preset": "all_stages",
        "invariance": {"weight_source": 100.0, "weight_target": 10.0},
        "target": {"pseudo_labels": "stylized"},
    }}, student)
    names = {h.name: h for h in hooks.aux_losses}
    assert set(names) == {"ciss_src", "ciss_trg"}
    assert names["ciss_src"].weight == 100.0 and names["ciss_trg"].weight == 10.0
    assert names["ciss_src"].invariance.levels == (1, 2, 3, 4)
    assert len(hooks.refiners) == 1 and isinstance(hooks.refiners[0], StylizedPseudoLabels)
    assert all(isinstance(h, AuxLoss) for h in hooks.aux_losses)
    assert isinstance(hooks.refiners[0], LabelRefiner)
    with pytest.raises(ConfigError, match="weight"):
        build_methods({"ciss": {"invariance": {"weight": 50}}}, student)
    with pytest.raises(ConfigError, match="lambda_s"):
        build_methods({"ciss": {"lambda_s": 50}}, student)
    # nothing to add on a stage: no hook for it
    only_target = build_ciss_hooks(CISSConfig(source=CISSSourceTerms(invariance=False)))
    assert [h.name for h in only_target] == ["ciss_trg"]


# ------------------------------------------------------------------ hooks on a tiny model


def _student(seed=0):
    torch.manual_seed(seed)
    return build_segmentor("mit_tiny", "segformer", head_channels=16, drop_path_rate=0.0).eval()


def _source(seed=1, size=32, with_stylized=True):
    g = torch.Generator().manual_seed(seed)
    src = {"image": torch.randn(2, 3, size, size, generator=g),
           "label": torch.randint(0, 4, (2, size, size), generator=g)}
    src["label"][:, :4] = 255
    if with_stylized:
        src["stylized"] = torch.randn(2, 3, size, size, generator=g)
    return src


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()]


def _source_ctx(student, src):
    ctx = StepContext(step=0, source=src, target={}, student=student, teacher=None)
    ctx.source_out = student(src["image"])
    loop = segmentation_loss(ctx.source_out, src["label"])  # the loop's own term
    ctx.losses["src"] = loop.detach()
    return ctx, loop


@pytest.mark.parametrize("terms, c_orig, c_sty", [
    (CISSSourceTerms(ce_stylized=True, average_ce=True, invariance=False), 0.5, 0.5),
    (CISSSourceTerms(ce_original=False, ce_stylized=True, invariance=False), 0.0, 1.0),
    (CISSSourceTerms(ce_stylized=True, invariance=False), 1.0, 1.0),
])
def test_source_ce_compensation_gives_the_intended_gradient(terms, c_orig, c_sty):
    student, src = _student(), _source()
    hook = CISSSourceLoss(CISSConfig(source=terms))
    ctx, loop = _source_ctx(student, src)
    (loop + hook(ctx)).backward()
    got = _grads(student)

    student.zero_grad()
    intended = (c_orig * segmentation_loss(student(src["image"]), src["label"])
                + c_sty * segmentation_loss(student(src["stylized"]), src["label"]))
    intended.backward()
    want = _grads(student)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want, strict=True))


def test_source_hook_invariance_value_and_shared_stylized_pass():
    student, src = _student(), _source()
    hook = CISSSourceLoss(CISSConfig())
    ctx, _ = _source_ctx(student, src)
    value = hook(ctx)
    assert set(ctx.outputs) == {"source/stylized"}  # one extra pass, cached for FD
    with torch.no_grad():
        want = 50.0 * FeatureInvariance()(student(src["image"]).features,
                                          student(src["stylized"]).features)
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    assert "ciss_src_inv" not in ctx.losses  # a single term is logged under the hook name only


def test_source_hook_detects_a_different_loop_reduction():
    student, src = _student(), _source()
    hook = CISSSourceLoss(CISSConfig(source=CISSSourceTerms(ce_original=False, ce_stylized=True)),
                          reduction="valid_pixels")
    ctx, _ = _source_ctx(student, src)  # the loop used "all_pixels"; the label has 255 rows
    with pytest.raises(ValueError, match="ce_reduction"):
        hook(ctx)


def test_missing_stylized_view_names_data_stylize():
    student, src = _student(), _source(with_stylized=False)
    ctx, _ = _source_ctx(student, src)
    with pytest.raises(ConfigError, match="data.stylize"):
        CISSSourceLoss(CISSConfig())(ctx)


def _target_ctx(student, gates=(False, False), seed=2, size=32):
    g = torch.Generator().manual_seed(seed)
    src = _source(seed=seed + 10, size=size)
    trg = {"image": torch.randn(2, 3, size, size, generator=g),
           "stylized": torch.randn(2, 3, size, size, generator=g)}
    mask = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()
    pl = torch.randint(0, 4, (2, size, size), generator=g)
    label = torch.where(mask[:, 0] > 0, src["label"], pl)
    weight = torch.where(mask[:, 0] > 0, torch.ones(()), torch.full((), 0.3)).expand(2, size, size)
    image = mask * src["image"] + (1 - mask) * trg["image"]  # the loop's m_oo (gates off)
    ctx = StepContext(step=0, source=src, target=trg, student=student, teacher=None)
    ctx.mixed = MixedBatch(image=image, label=label, weight=weight.contiguous(), mask=mask,
                           aug_gates=gates)
    ctx.mixed_out = student(image)
    loop = segmentation_loss(ctx.mixed_out, label, ctx.mixed.weight)
    ctx.losses["mix"] = loop.detach()
    return ctx, loop


def test_target_stylized_mix_uses_the_loop_mask_before_augmentation():
    student = _student()
    ctx, _ = _target_ctx(student, gates=(False, False))
    hook = CISSTargetLoss(CISSConfig())
    m = ctx.mixed.mask
    view = hook.mixed_view(ctx, ("stylized", "stylized"))
    assert torch.equal(view, m * ctx.source["stylized"] + (1 - m) * ctx.target["stylized"])
    view = hook.mixed_view(ctx, ("original", "stylized"))
    assert torch.equal(view, m * ctx.source["image"] + (1 - m) * ctx.target["stylized"])
    assert hook.mixed_view(ctx, ("original", "original")) is ctx.mixed.image
    # the default value: lambda_t * L_inv(m_oo, m_ss) on the student's features
    value = hook(ctx)
    assert set(ctx.outputs) == {"target/mix_stylized_stylized"}
    with torch.no_grad():
        m_ss = m * ctx.source["stylized"] + (1 - m) * ctx.target["stylized"]
        want = 20.0 * FeatureInvariance()(student(ctx.mixed.image).features,
                                          student(m_ss).features)
    assert value.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("gates", [(True, False), (False, True), (True, True)])
def test_target_views_get_the_loop_gates(monkeypatch, gates):
    from udaseg.adapt import mixing

    seen = []
    real = mixing.strong_augment

    def spy(images, cfg=None, generator=None, jitter_gate=None, blur_gate=None, **kw):
        seen.append((jitter_gate, blur_gate))
        return real(images, cfg, generator, jitter_gate=jitter_gate, blur_gate=blur_gate, **kw)

    monkeypatch.setattr(mixing, "strong_augment", spy)
    student = _student()
    ctx, _ = _target_ctx(student, gates=gates)
    hook = CISSTargetLoss(CISSConfig())
    m = ctx.mixed.mask
    raw = m * ctx.source["stylized"] + (1 - m) * ctx.target["stylized"]
    view = hook.mixed_view(ctx, ("stylized", "stylized"))
    assert seen == [gates]
    assert view.shape == raw.shape and not torch.allclose(view, raw)  # augmented
    ctx.mixed.aug_gates = None
    with pytest.raises(ValueError, match="aug_gates"):
        hook.mixed_view(ctx, ("stylized", "stylized"))


@pytest.mark.parametrize("ce_mixes, coeffs", [
    ([("stylized", "stylized")], {("original", "original"): 0.0, ("stylized", "stylized"): 1.0}),
    ([("original", "original"), ("stylized", "original")],
     {("original", "original"): 1.0, ("stylized", "original"): 1.0}),
    ([], {("original", "original"): 0.0}),
])
def test_target_ce_compensation_same_label_and_weight(ce_mixes, coeffs):
    student = _student()
    ctx, loop = _target_ctx(student)
    cfg = CISSConfig(target=CISSTargetTerms(ce_mixes=ce_mixes, invariance_pairs=()))
    hook = CISSTargetLoss(cfg)
    (loop + hook(ctx)).backward()
    got = _grads(student)

    student.zero_grad()
    m, label, weight = ctx.mixed.mask, ctx.mixed.label, ctx.mixed.weight
    views = {"original": ctx.source["image"], "stylized": ctx.source["stylized"]}, \
        {"original": ctx.target["image"], "stylized": ctx.target["stylized"]}
    intended = 0.0
    for (a, b), c in coeffs.items():
        image = m * views[0][a] + (1 - m) * views[1][b]  # gates off: no augmentation
        intended = intended + c * segmentation_loss(student(image), label, weight)
    intended.backward()
    want = _grads(student)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want, strict=True))


def test_stylized_pseudo_labels_refiner_runs_the_teacher_on_the_stylized_target():
    from udaseg.adapt.pseudo_label import pseudo_labels_from_logits

    teacher = _student(seed=5)
    ctx, _ = _target_ctx(_student())
    ctx.teacher = teacher
    valid = torch.ones(2, 32, 32)
    valid[:, :3] = 0
    pseudo = PseudoLabels(label=torch.zeros(2, 32, 32, dtype=torch.long),
                          weight=torch.ones(2, 32, 32), valid=valid)
    out = StylizedPseudoLabels()(ctx, pseudo)
    from udaseg.adapt.teacher import teacher_forward_mode

    with torch.no_grad(), teacher_forward_mode(teacher):  # BN in train mode, as the loop
        want = pseudo_labels_from_logits(teacher(ctx.target["stylized"]).logits, (32, 32),
                                         valid=valid)
    assert torch.equal(out.label, want.label) and torch.allclose(out.weight, want.weight)
    assert out.weight[:, :3].abs().sum() == 0  # the loop's PL crop is kept
    del ctx.target["stylized"]
    with pytest.raises(ConfigError, match="data.stylize"):
        StylizedPseudoLabels()(ctx, pseudo)


# ------------------------------------------------------------------ in the self-training loop


def _batches(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        src = {"image": torch.randn(2, 3, size, size, generator=g),
               "stylized": torch.randn(2, 3, size, size, generator=g),
               "label": torch.randint(0, 19, (2, size, size), generator=g)}
        trg = {"image": torch.randn(2, 3, size, size, generator=g),
               "stylized": torch.randn(2, 3, size, size, generator=g)}
        yield src, trg


@pytest.mark.parametrize("hrda", [False, True])
def test_self_training_with_ciss_logs_its_terms(hrda):
    from udaseg.adapt.self_training import DACSConfig, SelfTraining
    from udaseg.catalog import build_methods
    from udaseg.models.hrda import HRDAConfig, HRDASegmentor

    torch.manual_seed(0)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16)
    if hrda:
        student = HRDASegmentor(student, HRDAConfig())
    settings = {"fd": {"views": ["image", "stylized"]}, "ciss": {}}
    if hrda:  # exercise the other paths too
        settings["ciss"] = {"source": {"ce_stylized": True, "average_ce": True},
                            "target": {"pseudo_labels": "stylized"}}
    hooks = build_methods(settings, student)
    algo = SelfTraining(student, DACSConfig(), refiners=hooks.refiners,
                        aux_losses=hooks.aux_losses)
    calls = []
    student.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    for step, (src, trg) in enumerate(_batches(2)):
        calls.clear()
        opt.zero_grad()
        losses = algo.step(student, src, trg, step, lambda loss: loss.backward())
        opt.step()
        assert {"src", "mix", "fd", "ciss_src", "ciss_trg"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["ciss_trg"] > 0
        # x_s, x~_s (shared by FD and CISS), m_oo, m_ss: four student passes
        assert len(calls) == 4
    if hrda:
        assert {"ciss_src_inv", "ciss_src_ce"} <= set(losses)
    else:
        assert losses["ciss_src"] > 0


def test_target_class_average_uses_the_unmixed_pseudo_label():
    student = _student()
    ctx, _ = _target_ctx(student)
    g = torch.Generator().manual_seed(7)
    # blocky labels, so that the 0.75 majority downscale keeps them
    pl = torch.randint(0, 4, (2, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    ctx.mixed.label = torch.where(ctx.mixed.mask[:, 0] > 0, torch.zeros_like(pl), pl)
    ctx.pseudo = PseudoLabels(label=pl, weight=torch.ones(2, 32, 32))
    cfg = CISSConfig(target=CISSTargetTerms(ce_mixes=[("original", "original")]),
                     invariance={"class_average": True})
    hook = CISSTargetLoss(cfg)
    value = hook(ctx)
    inv = FeatureInvariance(class_average=True)
    with torch.no_grad():
        m_ss = ctx.mixed.mask * ctx.source["stylized"] + (1 - ctx.mixed.mask) * ctx.target["stylized"]
        fa, fb = student(ctx.mixed.image).features, student(m_ss).features
        want = 20.0 * inv(fa, fb, pl)
        mixed = 20.0 * inv(fa, fb, ctx.mixed.label)
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    assert want.item() > 0
    assert abs(want.item() - mixed.item()) > 1e-4 * want.item()  # the labels matter here
    ctx.pseudo = None
    with pytest.raises(ValueError, match="ctx.pseudo"):
        hook(ctx)


def test_target_average_ce_halves_each_of_two_mixes():
    student = _student()
    ctx, loop = _target_ctx(student)
    mixes = [("original", "original"), ("stylized", "original")]
    cfg = CISSConfig(target=CISSTargetTerms(ce_mixes=mixes, invariance_pairs=(), average_ce=True))
    assert cfg.upstream_name().endswith("trg_ceorigorig_cestylizedorig_avgce")
    (loop + CISSTargetLoss(cfg)(ctx)).backward()
    got = _grads(student)
    student.zero_grad()
    m, label, weight = ctx.mixed.mask, ctx.mixed.label, ctx.mixed.weight
    intended = 0.5 * segmentation_loss(student(ctx.mixed.image), label, weight)
    sty = m * ctx.source["stylized"] + (1 - m) * ctx.target["image"]
    intended = intended + 0.5 * segmentation_loss(student(sty), label, weight)
    intended.backward()
    want = _grads(student)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want, strict=True))
    # a single mix is not averaged (the reference divides only when there are several)
    one = CISSConfig(target=CISSTargetTerms(ce_mixes=mixes[:1], invariance_pairs=(),
                                            average_ce=True))
    assert CISSTargetLoss(one).ce_scale == 1.0


def test_output_invariance_single_resolution_and_hrda_pair():
    from udaseg.models.segmentor import SegOutput

    g = torch.Generator().manual_seed(3)
    fa, fb = _feats(1), _feats(2)
    la, lb = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    inv = FeatureInvariance((1,), (1.0,), output_weight=0.5)
    a, b = SegOutput(logits=la, features=fa), SegOutput(logits=lb, features=fb)
    want = ((fa[0] - fb[0]) ** 2).mean() + 0.5 * ((la - lb) ** 2).mean()
    assert inv.between(a, b).item() == pytest.approx(want.item(), rel=1e-6)
    # HRDA training outputs: (1 - 0.1) d(context logits) + 0.1 d(detail logits)
    ca, cb = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 2, 2, generator=g)
    da, db = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 2, 2, generator=g)
    a = SegOutput(la, fa, detail_logits=da, crop_box=(0, 8, 0, 8), extras={"context_logits": ca})
    b = SegOutput(lb, fb, detail_logits=db, crop_box=(8, 16, 8, 16), extras={"context_logits": cb})
    d_out = 0.9 * ((ca - cb) ** 2).mean() + 0.1 * ((da - db) ** 2).mean()
    assert inv.output_distance(a, b).item() == pytest.approx(d_out.item(), rel=1e-6)
    # through the hook on a real student: lambda_s * (features + w_o * logits)
    student, src = _student(), _source()
    ctx, _ = _source_ctx(student, src)
    cfg = CISSConfig(invariance={"output_weight": 2.0, "class_average": False})
    assert "invoutput" in cfg.upstream_name()
    value = CISSSourceLoss(cfg)(ctx)
    with torch.no_grad():
        o, s = student(src["image"]), student(src["stylized"])
        want = 50.0 * (FeatureInvariance()(o.features, s.features)
                       + 2.0 * ((o.logits - s.logits) ** 2).mean())
    assert value.item() == pytest.approx(want.item(), rel=1e-5)


def test_hrda_training_output_exposes_the_attention_weighted_context_logits():
    from udaseg.models.hrda import HRDAConfig, build_hrda

    torch.manual_seed(0)
    model = build_hrda("mit_tiny", "segformer", num_classes=3, head_channels=16,
                       cfg=HRDAConfig()).eval()  # eval: no dropout, so two passes agree
    x = torch.randn(1, 3, 64, 64)
    out = model.forward_train(x)
    # context logits on the 32x32 context view (stride 4: 8x8), times 1 - masked attention
    features, y_c, a = model._context(x)
    y1, y2, x1, x2 = out.crop_box
    mask = torch.zeros_like(a[:, :1])
    mask[:, :, y1 // 8:y2 // 8, x1 // 8:x2 // 8] = 1
    assert torch.allclose(out.extras["context_logits"], (1 - a * mask) * y_c, atol=1e-6)
