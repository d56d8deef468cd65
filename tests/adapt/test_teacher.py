import pytest
import torch
from torch import nn

from udaseg.adapt.teacher import EMATeacher, ema_alpha, teacher_forward_mode
from udaseg.models.layers import DropPath


class OneParam(nn.Module):
    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))
        self.register_buffer("stat", torch.tensor([0.0]))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        return x * self.w


def test_ema_alpha_schedule():
    assert ema_alpha(0) == 0.0
    assert ema_alpha(1) == pytest.approx(0.5)
    assert ema_alpha(9) == pytest.approx(0.9)
    assert ema_alpha(999) == pytest.approx(0.999)
    assert ema_alpha(1000) == 0.999
    assert ema_alpha(5, alpha=0.99) == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        ema_alpha(-1)


def test_ema_update_hand_checked():
    student = OneParam(3.0)
    teacher = EMATeacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student.w.requires_grad
    student.w.data.fill_(1.0)
    teacher.update(student, 0)  # t = 0: plain copy
    assert teacher.model.w.item() == 1.0
    teacher.model.w.data.fill_(0.0)
    assert teacher.update(student, 1) == 0.5  # phi = 0.5 * 0 + 0.5 * 1
    assert teacher.model.w.item() == pytest.approx(0.5)
    teacher.update(student, 9)  # 0.9 * 0.5 + 0.1 * 1
    assert teacher.model.w.item() == pytest.approx(0.55)
    teacher.update(student, 1000)  # 0.999 * 0.55 + 0.001
    assert teacher.model.w.item() == pytest.approx(0.999 * 0.55 + 0.001)
    assert teacher.model.w.grad is None and not teacher.model.w.requires_grad


def test_buffers_untouched_by_default_and_averaged_with_switch():
    student = OneParam(1.0)
    plain, with_buf = EMATeacher(student), EMATeacher(student, ema_buffers=True)
    student.stat.fill_(1.0)
    student.count.fill_(7)
    for t in (0, 1):
        plain.update(student, t)
        with_buf.update(student, t)
    assert plain.model.stat.item() == 0.0 and plain.model.count.item() == 0
    assert with_buf.model.stat.item() == 1.0 and with_buf.model.count.item() == 7  # copied at t=0
    student.stat.fill_(3.0)
    with_buf.update(student, 1)
    assert with_buf.model.stat.item() == pytest.approx(2.0)  # 0.5 * 1 + 0.5 * 3


def test_teacher_in_state_dict():
    student = OneParam(2.0)
    owner = nn.Module()
    owner.teacher = EMATeacher(student)
    sd = owner.state_dict()
    assert {"teacher.model.w", "teacher.model.stat", "teacher.model.count"} <= set(sd)
    other = nn.Module()
    other.teacher = EMATeacher(OneParam(0.0))
    other.load_state_dict(sd)
    assert other.teacher.model.w.item() == 2.0


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), DropPath(0.5), nn.Linear(8, 3)
    )


def test_teacher_forward_mode_bn_train_dropout_off():
    net = _net().train()
    x = torch.randn(6, 4)
    with torch.no_grad(), teacher_forward_mode(net) as m:
        assert m is net
        assert net[1].training and not net[2].training and not net[3].training
        rm0 = net[1].running_mean.clone()
        y1, y2 = net(x), net(x)
        assert torch.equal(y1, y2)  # dropout/droppath off, BN uses batch stats
        assert not torch.allclose(net[1].running_mean, rm0)  # BN stats updated
    assert all(mod.training for mod in net.modules())  # restored
    # even a model in eval mode gets BN in train mode, and is put back in eval mode
    net.eval()
    with torch.no_grad(), teacher_forward_mode(net):
        assert net[1].training and not net[2].training
    assert not any(mod.training for mod in net.modules())


def test_teacher_forward_mode_bn_eval():
    net = _net().train()
    rm0 = net[1].running_mean.clone()
    with torch.no_grad(), teacher_forward_mode(net, bn_train=False):
        assert not any(mod.training for mod in net.modules())
        net(torch.randn(6, 4))
    assert torch.equal(net[1].running_mean, rm0)
    assert all(mod.training for mod in net.modules())
