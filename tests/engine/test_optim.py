import pytest
import torch

from udaseg.engine.optim import OptimConfig, build_optimizer, poly_warmup_factor


def test_poly_warmup_values():
    cfg = OptimConfig()  # warm-up 1500, ratio 1e-6, power 1
    T = 40000
    assert poly_warmup_factor(0, T, cfg) == pytest.approx(1e-6)
    # t=750: poly (1 - 750/40000) times warm-up (1 - 0.5 * (1 - 1e-6))
    assert poly_warmup_factor(750, T, cfg) == pytest.approx((1 - 750 / T) * (1 - 0.5 * (1 - 1e-6)))
    assert poly_warmup_factor(1500, T, cfg) == pytest.approx(1 - 1500 / T)
    assert poly_warmup_factor(20000, T, cfg) == pytest.approx(0.5)
    assert poly_warmup_factor(T, T, cfg) == 0.0


def test_optimizer_groups_follow_schedule():
    from udaseg.models.segmentor import build_segmentor

    model = build_segmentor("mit_tiny", "segformer", head_channels=32)
    opt, sched = build_optimizer(model, OptimConfig(warmup_iters=0), total_iters=10)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([6e-5, 6e-4])
    for _ in range(5):
        opt.step()
        sched.step()
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([3e-5, 3e-4])
    assert isinstance(opt, torch.optim.AdamW)


def test_restored_optimizer_state_takes_the_parameters_layout():
    """A run resumed with channels-last weights gets AdamW moments in the same layout."""
    import torch

    from udaseg.engine.optim import match_state_layout

    conv = torch.nn.Conv2d(3, 4, 3)
    opt = torch.optim.AdamW(conv.parameters())
    conv(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()  # moments in the default (contiguous) layout
    moment = opt.state[conv.weight]["exp_avg"].clone()
    conv.to(memory_format=torch.channels_last)
    assert match_state_layout(opt) == 2  # exp_avg and exp_avg_sq of the weight; bias is 1-D
    state = opt.state[conv.weight]
    assert state["exp_avg"].stride() == conv.weight.stride() != moment.stride()
    assert torch.equal(state["exp_avg"], moment)  # same values
    assert match_state_layout(opt) == 0


def test_refign_no_decay_on_every_1d_parameter():
    from udaseg.models.optim_groups import param_groups
    from udaseg.models.segmentor import build_segmentor

    model = build_segmentor("mit_tiny", "segformer", head_channels=16)
    groups = {g["name"]: g for g in param_groups(model, lr=6e-5, weight_decay=0.01,
                                                  head_lr_mult=10.0, no_decay="1d")}
    assert set(groups) == {"head", "head_no_decay", "no_decay", "decay"}
    # Refign: backbone 6e-5 (lr 6e-4 x 0.1), everything else 6e-4; wd 0 on all 1-D parameters
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == pytest.approx(6e-4)
    assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == pytest.approx(6e-5)
    assert groups["head_no_decay"]["weight_decay"] == groups["no_decay"]["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    for g in groups.values():
        flat = [named[n].ndim <= 1 for n in g["param_names"]]
        assert all(flat) if "no_decay" in g["name"] else not any(flat)
    # a bias outside any norm decays under DAFormer's rule, not under Refign's
    daformer = {n: g["name"] for g in param_groups(model, 6e-5, 0.01) for n in g["param_names"]}
    bias = next(n for n in named if n.endswith(".bias") and "norm" not in n and "head" not in n)
    assert daformer[bias] == "decay"
