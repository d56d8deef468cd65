"""EMA (mean-teacher) model for DACS self-training, with DAFormer's teacher-mode quirk.

References: DACS (Tranheden et al., "DACS: Domain Adaptation via Cross-domain Mixed Sampling",
WACV 2021, arXiv 2007.08702) and DAFormer (Hoyer et al., "DAFormer: Improving Network
Architectures and Training Strategies for Domain-Adaptive Semantic Segmentation", CVPR 2022,
arXiv 2111.14887); spec sections 3.1, 3.2 and 11 (items 3, 4). Written from the spec.

EMA update, run before the forward pass of every iteration, with ``t`` the local step counter
(0 at the first step, incremented after every optimiser step)::

    alpha_t = min(1 - 1 / (t + 1), alpha)          alpha = 0.999 (DAFormer/HRDA/MIC; DACS: 0.99)
    t == 0 : phi <- theta                           (plain copy)
    t >= 1 : phi <- alpha_t * phi + (1 - alpha_t) * theta

so alpha_1 = 0.5, alpha_9 = 0.9 and alpha_t = 0.999 from t = 999 on. Faithful default: the
average runs over ``parameters()`` only; buffers (BatchNorm running statistics) are *not*
averaged, the teacher's BN buffers evolve on their own through its train-mode forwards.
``ema_buffers=True`` is the named alternative: float buffers are averaged with the same
alpha_t and integer buffers (``num_batches_tracked``) are copied.

Teacher mode (DAFormer quirk): the teacher is never switched to eval mode as a whole. For the
pseudo-label forward only Dropout (``_DropoutNd``) and ``DropPath`` are disabled while BatchNorm
stays in training mode, so pseudo-labels use the target batch's own BN statistics and the
teacher's running statistics drift with target batches. :func:`teacher_forward_mode` does this
(``bn_train=False`` gives the usual ``eval()`` for comparison).

The teacher is an ``nn.Module`` holding its copy as ``self.model``, so its weights and buffers
are part of the owner's ``state_dict`` and survive checkpoint/resume.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["ema_alpha", "EMATeacher", "teacher_forward_mode"]


def ema_alpha(t: int, alpha: float = 0.999) -> float:
    """EMA coefficient at local step ``t``: ``min(1 - 1/(t + 1), alpha)`` (0 at t = 0)."""
    if t < 0:
        raise ValueError(f"ema_alpha: t must be >= 0, got {t}")
    return min(1.0 - 1.0 / (t + 1), alpha)


def _is_drop_module(m: nn.Module) -> bool:
    """Dropout (``_DropoutNd``) or DropPath (by class name, as udaseg.models.layers.DropPath)."""
    return isinstance(m, _DropoutNd) or type(m).__name__ == "DropPath"


def _strip_wrappers(name: str) -> str:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes from a parameter name."""
    return ".".join(p for p in name.split(".") if p not in ("module", "_orig_mod"))


@contextmanager
def teacher_forward_mode(
    model: nn.Module, bn_train: bool = True, stochastic: bool = False
) -> Iterator[nn.Module]:
    """DAFormer's teacher mode for the ``with`` block; every module's mode is restored on exit.

    ``bn_train=True`` (faithful): every ``_BatchNorm`` module (BatchNorm1/2/3d, SyncBatchNorm) is in
    training mode (normalises with batch statistics and updates its running stats); Dropout
    (``_DropoutNd``) and DropPath (matched by class name ``"DropPath"``) are in eval mode; every
    other module is in eval mode as well, as the spec's recipe says ("BN in train mode,
    everything else eval"), which for the layers used here only differs from the original
    (whole-teacher train mode minus dropout) for modules whose forward branches on
    ``self.training``, e.g. a training-only crop in a multi-resolution segmentor, which the
    teacher's inference-path forward must not take.

    ``bn_train=False``: the whole model in eval mode (running statistics used and frozen).

    ``stochastic=True`` (Refign, spec refign 1.3): Dropout and DropPath stay in training mode
    (active), as Refign's no-op ``train()`` override leaves them; wrappers such as HRDA keep their
    inference path.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if bn_train:
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.training = True
                elif _is_drop_module(m):  # already off through eval(); explicit for clarity
                    m.training = False
        if stochastic:
            for m in model.modules():
                if _is_drop_module(m):
                    m.training = True
        yield model
    finally:
        for m, mode in saved:
            m.training = mode


class EMATeacher(nn.Module):
    """Exponential-moving-average copy of a student network.

    Args:
        student: the network to copy (deep-copied once at construction; the copy's parameters
            get ``requires_grad=False``).
        alpha: the EMA ceiling (0.999 in DAFormer/HRDA/MIC, 0.99 in the base DACS config).
        ema_buffers: also average float buffers and copy integer ones (not in the original).
    """

    def __init__(self, student: nn.Module, alpha: float = 0.999, ema_buffers: bool = False) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMATeacher: alpha must be in [0, 1], got {alpha}")
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alpha = float(alpha)
        self.ema_buffers = bool(ema_buffers)

    def forward(self, *args, **kwargs):
        """Forward through the teacher copy (wrap in :func:`teacher_forward_mode` and no_grad)."""
        return self.model(*args, **kwargs)

    @staticmethod
    def _paired(dst: Iterator[tuple[str, Tensor]], src: Iterator[tuple[str, Tensor]], what: str):
        dst, src = list(dst), list(src)
        if [_strip_wrappers(n) for n, _ in dst] != [_strip_wrappers(n) for n, _ in src]:
            raise ValueError(f"EMATeacher.update: student and teacher {what} names differ")
        return [t for _, t in dst], [t for _, t in src]

    @torch.no_grad()
    def update(self, student: nn.Module, t: int) -> float:
        """One EMA step at local iteration ``t``; returns the alpha_t that was used (0 = copy)."""
        a = ema_alpha(t, self.alpha)
        tp, sp = self._paired(
            self.model.named_parameters(), student.named_parameters(), "parameter"
        )
        sp = [s.detach() for s in sp]
        if t == 0:
            torch._foreach_copy_(tp, sp)
        else:
            torch._foreach_mul_(tp, a)
            torch._foreach_add_(tp, sp, alpha=1.0 - a)
        if self.ema_buffers:
            tb, sb = self._paired(self.model.named_buffers(), student.named_buffers(), "buffer")
            fl = [(x, y) for x, y in zip(tb, sb) if x.is_floating_point()]
            for x, y in zip(tb, sb):
                if not x.is_floating_point():
                    x.copy_(y)
            if fl:
                ft, fs = [x for x, _ in fl], [y.detach() for _, y in fl]
                if t == 0:
                    torch._foreach_copy_(ft, fs)
                else:
                    torch._foreach_mul_(ft, a)
                    torch._foreach_add_(ft, fs, alpha=1.0 - a)
        return a
