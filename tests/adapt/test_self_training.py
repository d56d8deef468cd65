"""The DACS loop: order of passes, gradients, stacking of methods, and that it learns."""

import pytest
import torch

from udaseg.adapt.self_training import DACSConfig, SelfTraining
from udaseg.catalog import build_methods
from udaseg.models.hrda import HRDAConfig, HRDASegmentor
from udaseg.models.segmentor import build_segmentor


def student(hrda=False):
    torch.manual_seed(0)
    m = build_segmentor("mit_tiny", "segformer", head_channels=16, drop_path_rate=0.0)
    return HRDASegmentor(m, HRDAConfig()) if hrda else m


def batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable toy task: the label is the colour channel that dominates each 16x16 block
    blocks = torch.randint(0, 3, (n, size // 16, size // 16), generator=g)
    label = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    image = torch.nn.functional.one_hot(label, 3).permute(0, 3, 1, 2).float() * 2 - 1
    image = image + 0.1 * torch.randn(image.shape, generator=g)
    return {"image": image, "label": label}


def test_source_only_has_no_teacher_and_one_backward():
    s = student()
    algo = SelfTraining(s, None)
    calls = []
    losses = algo.step(s, batch(), None, 0, lambda l: (calls.append(l), l.backward()))
    assert algo.teacher is None and len(calls) == 1 and set(losses) == {"src"}


@pytest.mark.parametrize("hrda", [False, True])
def test_dacs_with_fd_and_mic_stacked(hrda):
    s = student(hrda)
    hooks = build_methods({"fd": {}, "mic": {"block_size": 16}}, s)
    algo = SelfTraining(s, DACSConfig(pseudo_threshold=0.0), aux_losses=hooks.aux_losses)
    backward_calls = []

    def backward(loss):
        backward_calls.append(loss.detach())
        loss.backward()

    src, tgt = batch(seed=1), {"image": batch(seed=2)["image"]}
    losses = algo.step(s, src, tgt, step=0, backward=backward)
    assert set(losses) == {"src", "fd", "pl_quality", "mix", "mic"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert len(backward_calls) == 2  # one per stage
    # threshold 0 -> every pixel is confident -> quality weight 1
    assert losses["pl_quality"].item() == pytest.approx(1.0)
    trainable = [(n, p) for n, p in s.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable)
    assert all(p.grad is None for p in algo.teacher.parameters())
    # at t = 0 the teacher is a copy of the student
    for (n, p), q in zip(s.named_parameters(), algo.teacher.model.parameters()):
        assert torch.equal(p.detach(), q), n
    # everything a resume needs is in the state dict: teacher and the frozen ImageNet copy
    keys = algo.state_dict().keys()
    assert any(k.startswith("teacher.model.") for k in keys)
    assert any("imnet_backbone" in k for k in keys)


def test_a_few_dacs_iterations_lower_the_loss():
    s = student()
    algo = SelfTraining(s, DACSConfig(alpha=0.9))
    opt = torch.optim.AdamW(s.parameters(), lr=3e-3)
    src, tgt = batch(4, seed=3), {"image": batch(4, seed=4)["image"]}
    totals = []
    for t in range(25):
        opt.zero_grad()
        losses = algo.step(s, src, tgt, step=t, backward=lambda l: l.backward())
        opt.step()
        totals.append((losses["src"] + losses["mix"]).item())
    assert sum(totals[-3:]) / 3 < 0.7 * sum(totals[:3]) / 3


def test_config_alpha_reaches_the_teacher():
    s = student()
    algo = SelfTraining(s, DACSConfig(alpha=0.9))
    assert algo.teacher.alpha == 0.9
    src, tgt = batch(seed=1), {"image": batch(seed=2)["image"]}
    for t in range(3):
        algo.step(s, src, tgt, step=t, backward=lambda l: l.backward())
    # at t = 50 the alpha used is capped by the configured 0.9, not the default 0.999
    assert algo.teacher.update(s, 50) == 0.9


def test_mixed_batch_contract_mixer_image_unaugmented_loop_image_augmented(monkeypatch):
    from udaseg.adapt import mixing
    from udaseg.adapt.mixing import ClassMix

    returned, seen = [], []

    class SpyMixer:
        def __call__(self, ctx, pseudo):
            mixed = ClassMix()(ctx, pseudo)
            returned.append(mixed.image.clone())
            return mixed

    class SpyLoss:
        name, stage = "spy", "target"

        def __call__(self, ctx):
            seen.append(ctx.mixed)
            return ctx.mixed_out.logits.sum() * 0.0

    monkeypatch.setattr(mixing, "strong_augment",
                        lambda x, cfg, return_gates=False, **kw: (x + 1.0, (True, False)))
    s = student()
    algo = SelfTraining(s, DACSConfig(), mixer=SpyMixer(), aux_losses=[SpyLoss()])
    algo.step(s, batch(seed=1), {"image": batch(seed=2)["image"]}, 0, lambda l: l.backward())
    (mixed,) = seen
    assert torch.equal(mixed.unaugmented, returned[0])  # the Mixer's plain mix
    assert torch.equal(mixed.image, returned[0] + 1.0)  # what the student saw
    assert mixed.aug_gates == (True, False)


def test_target_loss_weight_and_retained_source_graph():
    """A target-stage hook may back-propagate through the source pass when it asks for it; the
    mixed CE can be scaled (DSRNSS-HRDA's 0.8)."""

    class UsesSourceGraph:
        name, stage, retain_source_graph = "src_again", "target", True

        def __call__(self, ctx):
            return ctx.source_out.features[-1].mean() * 0.0 + ctx.mixed_out.logits.mean() * 0.0

    s = student()
    calls = []

    def backward(loss, **kw):
        calls.append(kw)
        loss.backward(**kw)

    algo = SelfTraining(s, DACSConfig(target_loss_weight=0.8), aux_losses=[UsesSourceGraph()])
    losses = algo.step(s, batch(seed=1), {"image": batch(seed=2)["image"]}, 0, backward)
    assert calls == [{"retain_graph": True}, {}]
    # the logged mixed CE is the plain one; the backward sees 0.8 of it
    s.zero_grad()
    algo2 = SelfTraining(s, DACSConfig(target_loss_weight=0.0))
    torch.manual_seed(0)
    seen = []
    algo2.step(s, batch(seed=1), {"image": batch(seed=2)["image"]}, 0,
               lambda l: (seen.append(l.detach()), l.backward()))
    assert seen[1].item() == 0.0 and torch.isfinite(losses["mix"])
