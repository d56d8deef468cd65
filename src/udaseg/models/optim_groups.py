"""AdamW parameter groups of DAFormer/HRDA/MIC (spec section 6).

The reference builds them with mmcv's ``DefaultOptimizerConstructor`` and
``custom_keys = {head: lr_mult 10, norm: decay_mult 0}``: keys are substring matches on the full
parameter name, tried longest first and then alphabetically, first match wins. Both keys have
length 4 and ``"head" < "norm"``, so for every trainable parameter ``p`` with name ``n``:

* ``"head" in n`` (every ``decode_head.*`` parameter, its BN included): ``lr = head_lr_mult * lr``,
  ``weight_decay = wd``;
* otherwise ``"norm" in n`` (``norm1``, ``norm2``, ``attn.norm``, ``patch_embed*.norm``, stage
  ``norm*``): ``lr``, ``weight_decay = 0``;
* otherwise (including biases and the SR / patch convs): ``lr``, ``weight_decay = wd``.

Pass the student segmentor only; teacher and ImageNet-FD copies never get gradients.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    head_lr_mult: float = 10.0,
    *,
    head_key: str = "head",
    norm_key: str = "norm",
    norm_decay_mult: float = 0.0,
    no_decay: str = "norm",
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into the DAFormer AdamW groups.

    Returns up to three dicts (empty groups are left out), in the order head, no-decay, decay, each
    with ``params``, ``lr``, ``weight_decay``, ``name`` and ``param_names``; pass the list straight
    to ``torch.optim.AdamW``. Every trainable parameter appears in exactly one group; frozen ones
    (``requires_grad=False``) are skipped.

    ``no_decay="norm"`` (DAFormer/mmseg ``paramwise_cfg``): parameters whose name contains
    ``norm_key`` get ``weight_decay * norm_decay_mult``. ``no_decay="1d"`` (Refign's
    ``optimizer_parameters``): every 1-D parameter (biases, norms), head ones included, gets weight
    decay 0; the head's then form a fourth group ``head_no_decay``.
    """
    if no_decay not in ("norm", "1d"):
        raise ValueError(f"param_groups: no_decay must be 'norm' or '1d', got {no_decay!r}")
    groups: dict[str, dict[str, Any]] = {
        "head": {"name": "head", "lr": lr * head_lr_mult, "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "lr": lr, "weight_decay": weight_decay * norm_decay_mult},
        "decay": {"name": "decay", "lr": lr, "weight_decay": weight_decay},
        "head_no_decay": {"name": "head_no_decay", "lr": lr * head_lr_mult, "weight_decay": 0.0},
    }
    for g in groups.values():
        g["params"] = []
        g["param_names"] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay == "1d":
            flat = p.ndim <= 1
            if head_key in name:
                key = "head_no_decay" if flat else "head"
            else:
                key = "no_decay" if flat else "decay"
            if key == "no_decay":
                groups[key]["weight_decay"] = 0.0
        elif head_key in name:
            key = "head"
        elif norm_key in name:
            key = "no_decay"
        else:
            key = "decay"
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [g for g in groups.values() if g["params"]]
