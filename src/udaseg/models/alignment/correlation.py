"""Feature correlations of the UAWarpC matcher (spec ``refign_dsrnss_icda_spec.md`` 2.2), in
plain PyTorch (no compiled extension).

* :func:`global_correlation` -- every target position against every reference position:
  ``C[b, k, i, j] = <f_ref[:, k], f_trg[:, i, j]>`` with ``k = y_ref * W_ref + x_ref``
  (reference positions **row-major**, H first, as channels); one batched matrix product.
* :func:`mutual_matching` -- the soft mutual-nearest-neighbour filter of NC-Net applied to a
  global correlation: ``C * (C / (max_k C + eps)) * (C / (max_ij C + eps))``, eps = 1e-5.
* :func:`global_correlation_layer` -- global correlation, mutual matching, ReLU, L2
  normalisation over the channels (what UAWarpC's level 4 consumes).
* :func:`local_correlation` -- a (2r+1)^2 neighbourhood around each target position:
  ``out[b, dy * P + dx, h, w] = sum_c f_trg[b, c, h, w] * f_ref[b, c, h + dy - r, w + dx - r]``,
  zero where the reference position is outside the map, channel order **dy-major**, and **no**
  division by the number of channels (Clement Pinard's ``spatial_correlation_sample`` with
  ``patch_size=P``, ``kernel_size=1``, as Refign calls it).
* :func:`local_correlation_layer` -- local correlation, ReLU, L2 normalisation over the P^2
  channels (UAWarpC's levels 3, 2, 1).

:func:`local_correlation` loops over the P columns of the window only (9 steps, not 81), each
step one vectorised product over the channels and the P rows of the window through a strided view
(``Tensor.unfold``, no copy); the temporary per step, (B, C, P, H, W) = P x the reference map, is
bounded by splitting the channels into groups (``chunk_elements``). Both this and the naive
81-offset loop are memory-bound; an ``F.unfold`` + einsum (P^2 x the map copied) is several times
slower on a CPU. See ``benchmarks/bench_alignment.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MUTUAL_MATCHING_EPS",
    "global_correlation",
    "global_correlation_layer",
    "local_correlation",
    "local_correlation_layer",
    "mutual_matching",
]

MUTUAL_MATCHING_EPS = 1e-5


def _check_pair(target: Tensor, reference: Tensor, what: str) -> None:
    if target.ndim != 4 or reference.ndim != 4:
        raise ValueError(f"{what}: features must be (B, C, H, W), got {tuple(target.shape)} and "
                         f"{tuple(reference.shape)}")
    if target.shape[:2] != reference.shape[:2]:
        raise ValueError(f"{what}: target {tuple(target.shape)} and reference "
                         f"{tuple(reference.shape)} differ in batch or channels")


def global_correlation(target: Tensor, reference: Tensor) -> Tensor:
    """(B, H_r * W_r, H_t, W_t): channel ``k = y * W_r + x`` is reference position (x, y)."""
    _check_pair(target, reference, "global_correlation")
    b, c, ht, wt = target.shape
    hr, wr = reference.shape[-2:]
    ref = reference.reshape(b, c, hr * wr)
    trg = target.reshape(b, c, ht * wt)
    corr = torch.bmm(ref.transpose(1, 2), trg)  # (B, Hr*Wr, Ht*Wt)
    return corr.view(b, hr * wr, ht, wt)


def mutual_matching(corr: Tensor, eps: float = MUTUAL_MATCHING_EPS) -> Tensor:
    """Soft mutual nearest neighbours on a (B, K, H_t, W_t) global correlation: each score is
    multiplied by its ratio to the best score over the reference positions (channels) and by
    its ratio to the best score over the target positions."""
    b, k, h, w = corr.shape
    ratio_ref = corr / (corr.amax(dim=1, keepdim=True) + eps)
    ratio_trg = corr / (corr.view(b, k, h * w).amax(dim=2).view(b, k, 1, 1) + eps)
    return corr * (ratio_trg * ratio_ref)


def global_correlation_layer(target: Tensor, reference: Tensor,
                             mutual: bool = True) -> Tensor:
    """Global correlation -> (mutual matching) -> ReLU -> L2-normalise over the channels."""
    corr = global_correlation(target, reference)
    if mutual:
        corr = mutual_matching(corr)
    return F.normalize(F.relu(corr), p=2, dim=1)


def local_correlation(target: Tensor, reference: Tensor, patch_size: int = 9,
                      chunk_elements: int | None = None) -> Tensor:
    """(B, P^2, H, W) local correlation, dy-major channels, zero outside, no /C (module doc).

    ``chunk_elements`` bounds the temporary product (B, c, P, H, W) per step by splitting the
    channels into groups of ``c``; default 2^22 elements on the CPU (cache-sized), 2^28 on a GPU
    (one group at Refign's sizes).
    """
    _check_pair(target, reference, "local_correlation")
    if target.shape[-2:] != reference.shape[-2:]:
        raise ValueError(f"local_correlation: target {tuple(target.shape)} and reference "
                         f"{tuple(reference.shape)} differ in size")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(
            f"local_correlation: patch_size must be odd and positive, got {patch_size}")
    b, c, h, w = target.shape
    r = patch_size // 2
    if chunk_elements is None:
        chunk_elements = 1 << 22 if target.device.type == "cpu" else 1 << 28
    group = max(1, min(c, chunk_elements // max(1, b * patch_size * h * w)))
    ref = F.pad(reference, (r, r, r, r))  # zero outside the map
    trg = target.unsqueeze(2)  # (B, C, 1, H, W)
    dtype = torch.promote_types(target.dtype, reference.dtype)
    out = target.new_zeros(b, patch_size, patch_size, h, w, dtype=dtype)
    for dx in range(patch_size):
        # (B, C, P, H, W) strided view: [.., dy, h, w] = reference (h + dy - r, w + dx - r)
        cols = ref[..., dx:dx + w].unfold(2, patch_size, 1).permute(0, 1, 4, 2, 3)
        acc = out[:, :, dx]
        for c0 in range(0, c, group):
            acc += (trg[:, c0:c0 + group] * cols[:, c0:c0 + group]).sum(dim=1)
    return out.view(b, patch_size * patch_size, h, w)


def local_correlation_layer(target: Tensor, reference: Tensor, patch_size: int = 9) -> Tensor:
    """Local correlation -> ReLU -> L2-normalise over the P^2 channels."""
    return F.normalize(F.relu(local_correlation(target, reference, patch_size)), p=2, dim=1)
