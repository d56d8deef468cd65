"""Optimiser and schedule of DAFormer/HRDA/MIC (spec section 6).

AdamW, lr 6e-5, betas (0.9, 0.999), weight decay 0.01; decode-head parameters get lr x10;
backbone parameters whose name contains ``norm`` get no weight decay. Per iteration t of T::

    lr_poly(t) = base_lr * (1 - t / T) ** power                 (power 1.0, min_lr 0)
    lr(t)      = lr_poly(t) * (1 - (1 - t / t_w) * (1 - r_w))    for t < t_w (linear warm-up)
    lr(t)      = lr_poly(t)                                      otherwise

with t_w = 1500 and r_w = 1e-6. The warm-up multiplies the already-decayed poly value (mmcv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.segmentor import param_groups


@dataclass
class OptimConfig:
    """AdamW + poly schedule with linear warm-up (paper defaults)."""

    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    head_lr_mult: float = 10.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    no_decay: str = "norm"
    """Which parameters skip weight decay: "norm" (DAFormer: names with "norm") or "1d" (Refign:
    every 1-D parameter, biases included, head too)."""
    fused: bool | None = None
    """Fused AdamW kernel (same maths, one kernel per step); None = on when the model is on CUDA."""
    layer_decay: float | None = None
    """Layer-wise lr decay for ViT backbones (``dinov2_*``; BEiT / DINOv2 convention): a backbone
    parameter of layer id k (0 the patch embedding and tokens, i + 1 block i, depth + 1 the final
    norm) gets ``lr * layer_decay ** (depth + 1 - k)`` on top of its group's lr; the neck and head
    are unchanged. None (default) = off."""


def _layer_decay(model: torch.nn.Module, groups: list[dict], decay: float) -> list[dict]:
    """Split ``groups`` by ViT layer id; scale each part's lr (:attr:`OptimConfig.layer_decay`)."""
    from ..errors import ConfigError
    from ..models.dinov2 import DINOv2, dinov2_layer_id

    vits = [(n, m) for n, m in model.named_modules() if isinstance(m, DINOv2)]
    if len(vits) != 1:
        raise ConfigError("model.optim.layer_decay needs a model with one ViT backbone (dinov2_*); "
                          f"found {len(vits)}. Remove layer_decay or choose a dinov2_* backbone.")
    prefix = vits[0][0] + "." if vits[0][0] else ""
    depth = vits[0][1].config.depth
    out = []
    for g in groups:
        parts: dict[int, dict] = {}
        for name, p in zip(g["param_names"], g["params"], strict=True):
            lid = dinov2_layer_id(name, depth, prefix)
            if lid not in parts:
                settings = {k: v for k, v in g.items() if k not in ("params", "param_names")}
                parts[lid] = {**settings, "name": f"{g['name']}.layer{lid}", "params": [],
                              "param_names": [], "lr": g["lr"] * decay ** (depth + 1 - lid)}
            part = parts[lid]
            part["params"].append(p)
            part["param_names"].append(name)
        out.extend(parts[k] for k in sorted(parts))
    return out


def poly_warmup_factor(t: int, total: int, cfg: OptimConfig) -> float:
    """lr(t) / base_lr for iteration t (see the module docstring)."""
    t = min(t, total)
    factor = (1.0 - t / total) ** cfg.power if total > 0 else 1.0
    if t < cfg.warmup_iters:
        factor *= 1.0 - (1.0 - t / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
    return factor


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_iters: int):
    """AdamW over ``model``'s trainable parameters and a per-iteration LambdaLR."""
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          head_lr_mult=cfg.head_lr_mult, no_decay=cfg.no_decay)
    if cfg.layer_decay is not None:
        groups = _layer_decay(model, groups, float(cfg.layer_decay))
    fused = cfg.fused
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"]) and len(groups) > 0
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=bool(fused) or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: poly_warmup_factor(t, total_iters, cfg))
    return opt, sched


def match_state_layout(optimizer: torch.optim.Optimizer) -> int:
    """Give every per-parameter state tensor (AdamW's ``exp_avg``/``exp_avg_sq``) its
    parameter's memory layout; returns how many were converted. Optimiser state restored from
    a checkpoint keeps the layout it was saved with, and a run resumed with another
    ``model.speed.channels_last`` would otherwise mix layouts, which fused AdamW refuses."""
    converted = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == param.shape
                    and value.stride() != param.stride()):
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
                converted += 1
    return converted
