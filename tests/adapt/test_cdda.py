"""CDDA (spec cdda_spec.md section 13): histogram, similarity identities, search, schedule,
re-weighting (class and legacy first-row), soft labels, gates, the bank checks and a few loop
iterations with an in-memory bank."""

import pytest
import torch

from udaseg.adapt.hooks import PseudoLabels, StepContext
from udaseg.adapt.methods import cdda
from udaseg.adapt.methods.cdda import (
    BankIndex,
    CDDAConfig,
    CDDARefiner,
    build,
    class_depth_histogram,
    guidance_gate,
    reweight,
    search,
    similarity,
    soft_labels,
    threshold_at,
)
from udaseg.adapt.self_training import DACSConfig, SelfTraining
from udaseg.catalog import build_methods
from udaseg.data.cdda_bank import SourceBank
from udaseg.errors import ConfigError

K, NB = 19, 256


def _rand_hist(n, seed=0, classes=K):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (n, 16, 16), generator=g)
    depth = torch.randint(0, NB, (n, 16, 16), generator=g).float()
    return class_depth_histogram(label, depth)


# ---------------------------------------------------------------------------- histogram


def test_histogram_equals_a_naive_loop_and_skips_ignore():
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, K, (2, 9, 11), generator=g)
    label[0, :2] = 255
    depth = torch.rand(2, 1, 9, 11, generator=g) * 260  # some bins >= 256 are skipped
    hist = class_depth_histogram(label, depth)
    naive = torch.zeros(2, K, NB)
    for b in range(2):
        for y in range(9):
            for x in range(11):
                c, d = int(label[b, y, x]), int(depth[b, 0, y, x])  # truncation
                if c < K and d < NB:
                    naive[b, c, d] += 1
    assert torch.equal(hist, naive)
    valid = ((label < K) & (depth[:, 0].long() < NB)).sum(dim=(1, 2)).float()
    assert torch.equal(hist.sum(dim=(1, 2)), valid)


# ---------------------------------------------------------------------------- similarity


def test_omega_identity_and_s_in_unit_interval():
    bank, tgt = _rand_hist(5, 0, classes=6), _rand_hist(2, 1, classes=8)
    s, rho = similarity(bank, tgt)
    assert s.shape == (2, 5, K) and rho.shape == (2, 5)
    assert (s >= 0).all() and (s <= 1 + 1e-6).all()
    # omega = 1 - sum|N_m - N_t| / (n_m + n_t) = 2 sum min / (n_m + n_t) on the target classes
    n_m, n_t = bank.sum(-1), tgt.sum(-1)
    omega_l1 = 1 - (bank[None] - tgt[:, None]).abs().sum(-1) / (n_m[None] + n_t[:, None]).clamp_min(1)
    kappa = torch.nn.functional.cosine_similarity(bank[None], tgt[:, None], dim=-1, eps=1e-8)
    want = torch.where(n_t[:, None] > 0, (kappa + omega_l1) / 2, torch.zeros_like(kappa))
    assert torch.allclose(s, want, atol=1e-6)


def test_self_match_gives_one_and_missing_class_gives_zero():
    bank = _rand_hist(6, 2, classes=5)
    res = search(BankIndex(bank), bank[[4, 1]].clone(), chunk_size=4)
    assert res.m_star.tolist() == [4, 1]
    assert torch.allclose(res.mu, torch.ones(2), atol=1e-5)
    assert torch.allclose(res.rho, torch.ones(2), atol=1e-5)
    present = bank[[4, 1]].sum(-1) > 0
    assert torch.allclose(res.s_star[present], torch.ones(int(present.sum())), atol=1e-5)
    # a target class the bank entry lacks contributes s = 0
    tgt = bank[[0]].clone()
    tgt[0, 12, 7] = 40.0
    s, _ = similarity(bank[[0]], tgt)
    assert s[0, 0, 12] == 0 and s[0, 0, :5].min() > 0


def test_chunked_search_equals_one_pass():
    bank, tgt = _rand_hist(37, 3, classes=7), _rand_hist(3, 4, classes=7)
    index = BankIndex(bank)
    one = search(index, tgt, chunk_size=1000)
    for chunk in (1, 5, 16):
        res = search(index, tgt, chunk_size=chunk)
        assert torch.equal(res.m_star, one.m_star)
        assert torch.allclose(res.score, one.score, atol=1e-6)
    # against a plain per-entry loop over the bank
    loop = torch.stack([torch.stack([similarity(bank[m:m + 1], tgt[t:t + 1])[1][0, 0]
                                     * similarity(bank[m:m + 1], tgt[t:t + 1])[0][0, 0].sum()
                                     for m in range(37)]) for t in range(3)])
    assert torch.equal(loop.argmax(1), one.m_star)


# ---------------------------------------------------------------------------- schedule


def test_schedule_is_a_pure_function_of_the_step():
    tau = lambda t: threshold_at(t, 0.56, 0.0025)  # noqa: E731
    assert tau(0) == tau(9999) == 0.56
    assert tau(10000) == pytest.approx(0.56 - 0.0025)
    assert tau(10999) == pytest.approx(0.56 - 0.0025) and tau(11000) == pytest.approx(0.555)
    assert tau(39000) == pytest.approx(0.56 - 30 * 0.0025)
    assert tau(40000) == pytest.approx(0.485) and tau(10**6) == pytest.approx(0.485)
    assert threshold_at(7, 0.5, 0.1, start=5, every=1, count=2) == pytest.approx(0.3)


# ---------------------------------------------------------------------------- re-weighting


def test_reweight_piecewise_map():
    label = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 3]]])  # (1, 2, 4)
    conf = torch.tensor([[[True, False, True, False], [True, False, True, True]]])
    q = torch.full((1, 2, 4), 0.3)
    s = torch.zeros(1, K)
    s[0, 0], s[0, 1], s[0, 2] = 0.9, 0.05, 0.425  # > 0.75, < 0.1, ramp (0.5); class 3 not applied
    apply = torch.zeros(1, K, dtype=torch.bool)
    apply[0, :3] = True
    w = reweight(q, label, conf, s, apply)
    assert torch.allclose(w, torch.tensor([[[1.0, 0.3, 0.0, 0.0], [0.5, 0.5, 0.3, 0.3]]]))
    # the crop margins are applied to the written values again; a closed gate changes nothing
    valid = torch.ones(1, 2, 4)
    valid[0, 0] = 0
    w = reweight(q * valid, label, conf, s, apply, valid)
    assert torch.allclose(w, torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.3, 0.3]]]))
    assert torch.equal(reweight(q, label, conf, s, apply & False), q)


def test_legacy_first_row_stripes_on_a_square_crop():
    # top row: class 0 in columns 0-1, class 1 in column 2, class 2 in column 3
    label = torch.full((1, 4, 4), 3)
    label[0, 0] = torch.tensor([0, 0, 1, 2])
    conf = torch.ones(1, 4, 4, dtype=torch.bool)
    conf[0, 3, 0] = False
    q = torch.full((1, 4, 4), 0.3)
    s = torch.zeros(1, K)
    s[0, 0], s[0, 1], s[0, 2], s[0, 3] = 0.9, 0.05, 0.425, 0.9
    apply = torch.zeros(1, K, dtype=torch.bool)
    apply[0, :4] = True
    w = reweight(q, label, conf, s, apply, mode="legacy_first_row")
    want = torch.full((1, 4, 4), 0.3)
    want[0, :, 0:2] = 1.0  # class 0 (s > 0.75): confident pixels of COLUMNS 0 and 1
    want[0, 3, 0] = 0.3    # (not confident)
    want[0, 2, :] = 0.0    # class 1 (< 0.1): ROW 2 (its top-row column index)
    want[0, 3, :] = 0.5    # class 2 (ramp): ROW 3
    # class 3 is in C_t but not in the top row: no change anywhere
    assert torch.allclose(w, want)
    assert not torch.allclose(w, reweight(q, label, conf, s, apply))  # differs from "class"
    with pytest.raises(ConfigError, match="square"):
        reweight(q[:, :, :3], label[:, :, :3], conf[:, :, :3], s, apply, mode="legacy_first_row")


# ---------------------------------------------------------------------------- soft labels


def test_soft_labels_rows_sum_to_one_and_the_clamp():
    # matched crop: bin 10 holds classes 5 (3 px) and 6 (1 px); bin 20 only class 5;
    # bin 30 classes 7 and 8 equally; the target has class 0 everywhere
    match = torch.zeros(1, K, NB)
    match[0, 5, 10], match[0, 6, 10], match[0, 5, 20] = 3, 1, 2
    match[0, 7, 30], match[0, 8, 30], match[0, 0, 40] = 1, 1, 5
    label = torch.zeros(1, 2, 3, dtype=torch.long)
    depth = torch.tensor([[[10.0, 20.0, 30.0], [40.0, 50.0, 10.7]]])
    missing = torch.zeros(1, K, dtype=torch.bool)
    missing[0, [5, 6, 7, 8]] = True
    y, added = soft_labels(label, depth, match, missing)
    assert torch.allclose(y.sum(1), torch.ones(1, 2, 3), atol=1e-6)
    assert (y >= 0).all()
    # bin 10: 0.75 / 0.25 -> the pseudo-label entry 1 - 1 = 0 (mass exactly 1, not > 1)
    assert torch.allclose(y[0, [5, 6, 0], 0, 0], torch.tensor([0.75, 0.25, 0.0]))
    # bin 20: pi = 1 clamped to 0.99999, pseudo-label keeps 1e-5
    assert y[0, 5, 0, 1] == pytest.approx(0.99999) and y[0, 0, 0, 1] == pytest.approx(1e-5, abs=1e-6)
    assert torch.allclose(y[0, [7, 8, 0], 0, 2], torch.tensor([0.5, 0.5, 0.0]))
    # bins 40 and 50: nothing added (pi = 0 there): one-hot
    assert y[0, 0, 1, 0] == 1 and y[0, 0, 1, 1] == 1 and added[0, 1, :2].sum() == 0
    # missing classes are non-zero only where pi > 0
    for c in (5, 6, 7, 8):
        pi_pix = match[0, c, depth[0].long()] / match[0, :, depth[0].long()].sum(0).clamp_min(1)
        assert ((y[0, c] > 0) == (pi_pix > 0)).all()


def test_negative_mass_clamp_and_legacy(monkeypatch):
    # P(c | bin) of one crop sums to <= 1 over classes, so the added mass exceeds 1 only by
    # rounding; the clamp's arithmetic is checked with pi forced to 0.8 for two missing classes
    match = torch.zeros(1, K, NB)
    match[0, 5, 3], match[0, 6, 3] = 1, 1
    missing = torch.zeros(1, K, dtype=torch.bool)
    missing[0, [5, 6]] = True
    label = torch.zeros(1, 1, 1, dtype=torch.long)
    depth = torch.full((1, 1, 1), 3.0)
    for mode in ("clamp", "legacy"):  # pi 0.5 + 0.5: the entry is 0 in both modes
        y, _ = soft_labels(label, depth, match, missing, negative_mass=mode)
        assert torch.allclose(y[0, [0, 5, 6], 0, 0], torch.tensor([0.0, 0.5, 0.5]))
    monkeypatch.setattr(cdda, "depth_conditional", lambda m, miss, c=0.99999: torch.where(
        miss[..., None], torch.full_like(m, 0.8), torch.zeros_like(m)))
    y_leg, added = soft_labels(label, depth, match, missing, negative_mass="legacy")
    y_cl, _ = soft_labels(label, depth, match, missing, negative_mass="clamp")
    assert added[0, 0, 0] == pytest.approx(1.6)
    assert y_leg[0, 0, 0, 0] == pytest.approx(-0.6)  # the release's negative entry
    assert y_cl[0, 0, 0, 0] == 0 and y_cl[0, :, 0, 0].sum() == pytest.approx(1.0)
    assert torch.allclose(y_cl[0, [5, 6], 0, 0], torch.tensor([0.5, 0.5]))


def test_guidance_gate_any_and_legacy_last():
    missing = torch.zeros(2, K, dtype=torch.bool)
    overlap = torch.zeros(2, K, dtype=torch.bool)
    assert not guidance_gate(missing, overlap, "any") and not guidance_gate(missing, overlap, "legacy_last")
    missing[0, 3], missing[1, 2] = True, True
    overlap[0, 3] = True  # the first pair passes, the last (crop 1, class 2) fails
    assert guidance_gate(missing, overlap, "any")
    assert not guidance_gate(missing, overlap, "legacy_last")
    overlap[1, 2] = True
    assert guidance_gate(missing, overlap, "legacy_last")


# ---------------------------------------------------------------------------- bank and loop


def _bank(n=6, size=16, seed=0, source="gta"):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (n, size, size), generator=g)
    labels[:, :4] = 10  # sky on top
    depth = torch.randint(0, NB, (n, 1, size, size), generator=g).float()
    images = torch.randn(n, 3, size, size, generator=g)
    hist = class_depth_histogram(labels, depth)
    return SourceBank.from_arrays(hist, images, labels, {"source": {"name": source}}, depths=depth)


def test_crop_size_refusal_and_missing_depth_view():
    core = CDDARefiner(CDDAConfig(), bank=_bank(size=16))
    prob = torch.softmax(torch.randn(1, K, 8, 8), 1)
    pseudo = PseudoLabels(label=prob.argmax(1), weight=torch.ones(1, 8, 8), prob=prob)
    ctx = StepContext(step=0, source={}, target={"image": torch.zeros(1, 3, 8, 8),
                                                 "depth": torch.zeros(1, 1, 8, 8)},
                      student=None, teacher=None)
    with pytest.raises(ConfigError, match="16x16 crops, but training uses 8x8"):
        core(ctx, pseudo)
    del ctx.target["depth"]
    with pytest.raises(ConfigError, match="views: \\[depth\\]"):
        core(ctx, pseudo)
    with pytest.raises(ConfigError, match="prepare cdda-bank"):
        CDDARefiner(CDDAConfig()).get_bank()


def test_build_hooks_switches_and_absent_classes():
    hooks = build({}, None)
    assert [h.hook_kind for h in hooks] == ["refiner", "mixer", "aux_loss"]
    assert [h.hook_kind for h in build({"replace_source": False, "guidance": False}, None)] == ["refiner"]
    assert build({"tau_rw": "0.4"}, None)[0].cfg.tau_rw == 0.4
    with pytest.raises(ConfigError, match="reweight_mask"):
        build({"reweight_mask": "rows"}, None)
    assert CDDARefiner(bank=_bank(source="synthia")).absent_classes() == (9, 14, 16)
    assert CDDARefiner(bank=_bank()).absent_classes() == ()
    assert CDDARefiner(CDDAConfig(absent_classes=[1]), bank=_bank()).absent_classes() == (1,)


def _batches(seed, bank, b=2, size=32):
    g = torch.Generator().manual_seed(seed)
    src = {"image": torch.randn(b, 3, size, size, generator=g),
           "label": torch.randint(0, 19, (b, size, size), generator=g)}
    # target depth = bank crops' depth: the teacher's labels decide the match
    tgt = {"image": torch.randn(b, 3, size, size, generator=g),
           "depth": torch.stack([bank.sample(i)["depth"] for i in range(b)])}
    return src, tgt


def test_cdda_iterations_with_an_in_memory_bank(monkeypatch):
    from udaseg.models.segmentor import build_segmentor

    torch.manual_seed(0)
    bank = _bank(size=32)
    monkeypatch.setattr(cdda, "open_bank", lambda *a, **k: bank)
    student = build_segmentor("mit_tiny", "segformer", head_channels=16, drop_path_rate=0.0)
    # thresholds below any mu: every gate opens; guidance runs when a class is missing
    hooks = build_methods({"cdda": {"bank": "mem", "tau_rw": -1.0, "tau_rl": -1.0}}, student)
    core = hooks.refiners[0]
    algo = SelfTraining(student, DACSConfig(pseudo_threshold=0.0), refiners=hooks.refiners,
                        mixer=hooks.mixer, aux_losses=hooks.aux_losses)
    assert core in list(algo.hook_modules)
    seen = {}
    real_crop = bank.crop
    monkeypatch.setattr(bank, "crop", lambda i: seen.setdefault("crops", []).append(i) or real_crop(i))
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    for step in range(2):
        src, tgt = _batches(step, bank, b=1)
        src_before = src["image"].clone()
        opt.zero_grad()
        losses = algo.step(student, src, tgt, step, lambda loss, **kw: loss.backward(**kw))
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["cdda_rw_open"] == 1 and losses["cdda_rl_open"] == 1
        assert "cdda_guide" in losses and "cdda_mu" in losses
        assert torch.equal(src["image"], src_before)  # the source batch itself is untouched
        opt.step()
    assert len(seen["crops"]) == 2  # one crop replaced per step
    assert int(core.rw_open) == 2 and int(core.crops) == 2 and int(core.steps) == 2
    state = core.state_dict()
    assert set(state) == {"rw_open", "rl_open", "guide_steps", "crops", "steps"}


def test_guidance_loss_matches_the_hand_formula_and_gates(monkeypatch):
    from udaseg.models.segmentor import SegOutput

    bank = _bank(n=3, size=8)
    core = CDDARefiner(CDDAConfig(tau_rw=2.0, tau_rl=-1.0), bank=bank)  # rw closed, rl open
    guide = cdda.CDDAGuidance(core)
    logits = torch.randn(1, K, 4, 4, requires_grad=True)

    class Student:
        def __call__(self, x):
            return SegOutput(logits=logits, features=[])

    label = torch.full((1, 8, 8), 15)  # a class no bank crop holds: every bank class is missing
    prob = torch.nn.functional.one_hot(label, K).permute(0, 3, 1, 2).float()
    pseudo = PseudoLabels(label=label, weight=torch.full((1, 8, 8), 0.5), prob=prob)
    depth = bank.sample(0)["depth"][None].clone()
    empty = (bank.hist.sum(dim=(0, 1)) == 0).nonzero()[0, 0]
    depth[..., :2, :] = float(empty)  # bins no bank crop has: no soft mass there
    ctx = StepContext(step=0, source={}, target={"image": torch.zeros(1, 3, 8, 8), "depth": depth},
                      student=Student(), teacher=None, pseudo_threshold=0.968)
    out = core(ctx, pseudo)
    assert torch.equal(out.weight, pseudo.weight)  # re-weighting gate closed
    step = ctx.state["cdda"]
    assert step.guide_open and step.missing[0, :6].any() and not step.missing[0, 15]
    loss = guide(ctx)
    y, _ = soft_labels(label, depth, step.match_hist, step.missing)
    z = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    want = (0.1 * 0.5 * -(y * torch.log_softmax(z, 1)).sum(1)).mean()
    assert torch.allclose(loss, want)
    # no hard term: only pixels with soft mass
    core.cfg.guidance_hard_term = False
    assert guide(ctx) < loss
    # closed gate: 0 without a student pass
    core.cfg.tau_rl = 2.0
    core(ctx, pseudo)
    assert guide(ctx) == 0
