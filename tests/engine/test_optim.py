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
