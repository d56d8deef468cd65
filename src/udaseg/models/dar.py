"""DAR: ICDA's deformable attention relevance module (night <-> day feature coupling).

Paper: "ICDA: Illumination-Coupled Domain Adaptation Framework for Unsupervised Nighttime
Semantic Segmentation", Dong, Kang and Ming, IJCAI 2023, pp. 672-680 (no arXiv version known;
https://www.ijcai.org/proceedings/2023/75). The module adapts the Deformable Attention
Transformer (DAT, Xia et al., CVPR 2022, arXiv 2201.00520). Reference: chenghaoDong666/ICDA
``models/DAT/dat.py`` and ``models/DAT/dat_blocks.py`` (no licence; read for semantics only,
re-implemented from ``shared/spec/refign_dsrnss_icda_spec.md`` section 4.3).

Inputs are two MiT pyramids F = (F_0..F_3) of a query image q (night / enhanced) and a reference
r (day / original). Two stages, stage s = 1, 2 (``dat_tiny``)::

    q_s, r_s = LN(Conv3x3_s2(F_s(q))), LN(Conv3x3_s2(F_s(r)))     same down-projection for both
    for block in ['L', 'D']:                                      pre-norm, only q is updated
        q_s = q_s + DropPath(Attn(LN1(q_s), LN1(r_s)))            the same LN1 on q and r
        q_s = q_s + DropPath(MLP(LN2(q_s)))                        1x1 (x4) -> dw3x3 -> GELU -> 1x1
    out = [F_0(q), F_1(q), F_2(q) + q_1, F_3(q) + q_2]             -> the shared decode head

* ``L``: non-overlapping 4x4 window self-attention on q only (r is ignored).
* ``D``: deformable cross-attention, with E = Conv3x3([q; r]) (the night/day coupling)::

      Q        = Conv1x1(q)
      o        = Conv1x1(GELU(LN(DWConv_kxk(MiTBlock(LN(E_g))))))    per channel group g, 2 channels
      Delta    = tanh(o) * factor / (H, W)       factor 2: |Delta| <= 2/H = ONE feature pixel
      p        = pixel centres + Delta           (normalised, align_corners=False)
      S_g      = grid_sample(E_g, p)             bilinear, zero padding
      K, V     = Conv1x1(S), Conv1x1(S)
      out      = Conv1x1(softmax(Q K^T / sqrt(d)) V)      every pixel attends to all H*W samples

Defaults (``dat_tiny``): heads (4, 8), groups (4, 8), offset kernels (9, 7), window 4, MLP ratio
4, offset range factor 2, drop-path linspace(0, 0.2) over the 4 blocks, no positional encoding.
The widths follow the backbone: stage s maps C_s -> C_{s+1} (MiT-B5: 128 -> 320, 320 -> 512).

Differences from the reference:
- Sampling uses pixel-centre reference points with ``align_corners=False`` throughout; the
  reference builds centre points in the ``align_corners=False`` convention but samples with
  ``align_corners=True``, so its zero-offset grid is shrunk by (W-1)/W about the centre. Here a
  zero offset samples E exactly (the hand check in the tests).
- Maps whose size is not a multiple of the 4x4 window are zero-padded for the L block and cropped
  back (the reference asserts divisibility).
- The unused relative-position bias table of the L block is not allocated; the reference's
  custom init loop is a no-op, so PyTorch's default init is kept (as the reference in effect).
- Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (same math).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import DropPath
from .mit import Block as MiTBlock

__all__ = ["DAR", "DARConfig", "DeformableCrossAttention", "LocalWindowAttention"]


@dataclass
class DARConfig:
    """DAR hyper-parameters (``model.methods.icda.dar``); defaults are ICDA's ``dat_tiny``."""

    heads: tuple[int, int] = (4, 8)
    groups: tuple[int, int] = (4, 8)
    offset_kernels: tuple[int, int] = (9, 7)
    window: int = 4
    mlp_ratio: int = 4
    offset_range_factor: float = 2.0
    drop_path_rate: float = 0.2
    stage_spec: tuple[str, ...] = ("L", "D")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (DAT's ``LayerNormProxy``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvMLP(nn.Module):
    """1x1 conv (x ratio) -> depthwise 3x3 -> GELU -> 1x1 conv (DAT's MLP with a dw conv)."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        hidden = dim * ratio
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class LocalWindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window`` x ``window`` windows of q."""

    def __init__(self, dim: int, heads: int, window: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"LocalWindowAttention: dim {dim} not divisible by heads {heads}")
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, r: Tensor | None = None) -> Tensor:  # r unused (L block)
        b, c, h, w = q.shape
        s = self.window
        ph, pw = (-h) % s, (-w) % s
        x = F.pad(q, (0, pw, 0, ph)) if ph or pw else q
        hh, ww = h + ph, w + pw
        # (B, C, nH*s, nW*s) -> (B * nH * nW, s*s, C)
        t = x.reshape(b, c, hh // s, s, ww // s, s).permute(0, 2, 4, 3, 5, 1)
        t = t.reshape(-1, s * s, c)
        qkv = self.qkv(t).reshape(t.shape[0], s * s, 3, self.heads, c // self.heads)
        qq, kk, vv = qkv.permute(2, 0, 3, 1, 4)  # each (B', heads, s*s, d)
        out = F.scaled_dot_product_attention(qq, kk, vv)
        out = self.proj(out.transpose(1, 2).reshape(t.shape[0], s * s, c))
        out = out.reshape(b, hh // s, ww // s, s, s, c).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(b, c, hh, ww)
        return out[..., :h, :w] if ph or pw else out


class DeformableCrossAttention(nn.Module):
    """DAR's D block attention: q attends to the fused night/day map sampled at offset points.

    ``forward(q, r, return_offsets=True)`` also returns the offsets in **feature pixels**
    ``(B, G, H, W, 2)`` (x, y), each component bounded by ``factor / 2`` (1 with factor 2).
    """

    def __init__(self, dim: int, heads: int, groups: int, kernel: int,
                 offset_range_factor: float = 2.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if dim % heads or dim % groups:
            raise ValueError(f"DeformableCrossAttention: dim {dim} must be divisible by heads "
                             f"{heads} and groups {groups}")
        gc = dim // groups
        if gc % heads:
            raise ValueError(f"DeformableCrossAttention: group width {gc} not divisible by heads "
                             f"{heads} (the offset generator's attention)")
        self.dim, self.heads, self.groups = dim, heads, groups
        self.factor = float(offset_range_factor)
        self.fuse = nn.Conv2d(2 * dim, dim, 3, padding=1)
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.offset_norm = nn.LayerNorm(gc)
        self.offset_block = MiTBlock(gc, heads, mlp_ratio=4, sr_ratio=1, drop_path=drop_path)
        self.offset_conv = nn.Sequential(
            nn.Conv2d(gc, gc, kernel, padding=kernel // 2, groups=gc),
            ChannelLayerNorm(gc),
            nn.GELU(),
            nn.Conv2d(gc, 2, 1, bias=False),
        )

    def offsets(self, fused: Tensor) -> Tensor:
        """Offsets (B*G, 2, H, W), channel 0 = y, 1 = x, in normalised units (<= factor/H)."""
        b, c, h, w = fused.shape
        g = self.groups
        tokens = fused.reshape(b * g, c // g, h * w).transpose(1, 2)
        tokens = self.offset_block(self.offset_norm(tokens), h, w)
        o = self.offset_conv(tokens.transpose(1, 2).reshape(b * g, c // g, h, w))
        scale = torch.tensor([1.0 / h, 1.0 / w], device=o.device, dtype=o.dtype).view(1, 2, 1, 1)
        return o.tanh() * scale * self.factor

    def forward(self, q: Tensor, r: Tensor, return_offsets: bool = False):
        b, c, h, w = q.shape
        g = self.groups
        fused = self.fuse(torch.cat([q, r], dim=1))
        query = self.proj_q(q)
        off = self.offsets(fused)  # (B*G, 2, H, W) (y, x)
        ys = (torch.arange(h, device=q.device, dtype=q.dtype) * 2 + 1) / h - 1
        xs = (torch.arange(w, device=q.device, dtype=q.dtype) * 2 + 1) / w - 1
        ref = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=0)  # (2, H, W) (y, x)
        pos = (ref.unsqueeze(0) + off).permute(0, 2, 3, 1)  # (B*G, H, W, 2) (y, x)
        sampled = F.grid_sample(fused.reshape(b * g, c // g, h, w), pos[..., (1, 0)],
                                mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.reshape(b, c, h, w)
        d = c // self.heads
        qh = query.reshape(b, self.heads, d, h * w).transpose(2, 3)
        kh = self.proj_k(sampled).reshape(b, self.heads, d, h * w).transpose(2, 3)
        vh = self.proj_v(sampled).reshape(b, self.heads, d, h * w).transpose(2, 3)
        out = F.scaled_dot_product_attention(qh, kh, vh)  # (B, heads, HW, d)
        out = self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))
        if not return_offsets:
            return out
        pix = off.reshape(b, g, 2, h, w).permute(0, 1, 3, 4, 2)[..., (1, 0)]
        pix = pix * torch.tensor([w / 2.0, h / 2.0], device=q.device, dtype=q.dtype)
        return out, pix


class DARBlock(nn.Module):
    """Pre-norm block: ``q += DropPath(Attn(LN1 q, LN1 r))``; ``q += DropPath(MLP(LN2 q))``."""

    def __init__(self, kind: str, dim: int, heads: int, groups: int, kernel: int, window: int,
                 mlp_ratio: int, factor: float, drop_path: float) -> None:
        super().__init__()
        self.kind = kind
        self.norm1 = ChannelLayerNorm(dim)
        if kind == "L":
            self.attn: nn.Module = LocalWindowAttention(dim, heads, window)
        elif kind == "D":
            self.attn = DeformableCrossAttention(dim, heads, groups, kernel, factor, drop_path)
        else:
            raise ValueError(f"DAR: block kind {kind!r}; use 'L' or 'D'")
        self.norm2 = ChannelLayerNorm(dim)
        self.mlp = ConvMLP(dim, mlp_ratio)
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, q: Tensor, r: Tensor) -> Tensor:
        q = q + self.drop_path(self.attn(self.norm1(q), self.norm1(r)))
        return q + self.drop_path(self.mlp(self.norm2(q)))


class DARStage(nn.Module):
    """Shared down-projection (conv 3x3 s2 + LN) of q and r, then the blocks on q."""

    def __init__(self, dim_in: int, dim: int, blocks: Sequence[DARBlock]) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(dim_in, dim, 3, stride=2, padding=1),
                                  ChannelLayerNorm(dim))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, q: Tensor, r: Tensor) -> Tensor:
        q, r = self.down(q), self.down(r)
        for blk in self.blocks:
            q = blk(q, r)
        return q


class DAR(nn.Module):
    """The two-stage DAR over a 4-level pyramid (module docstring).

    Args:
        channels: the backbone widths (C_0, C_1, C_2, C_3); stage s maps C_s -> C_{s+1}.
        cfg: :class:`DARConfig`.
    """

    def __init__(self, channels: Sequence[int], cfg: DARConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else DARConfig()
        if len(channels) != 4:
            raise ValueError(f"DAR needs a 4-level pyramid, got channels {tuple(channels)}")
        self.cfg = cfg
        n = 2 * len(cfg.stage_spec)
        dpr = [cfg.drop_path_rate * k / (n - 1) if n > 1 else 0.0 for k in range(n)]
        stages, k = [], 0
        for s in range(2):
            dim_in, dim = int(channels[s + 1]), int(channels[s + 2])
            blocks = []
            for kind in cfg.stage_spec:
                blocks.append(DARBlock(kind, dim, cfg.heads[s], cfg.groups[s],
                                       cfg.offset_kernels[s], cfg.window, cfg.mlp_ratio,
                                       cfg.offset_range_factor, dpr[k]))
                k += 1
            stages.append(DARStage(dim_in, dim, blocks))
        self.stages = nn.ModuleList(stages)

    def forward(self, feats_q: Sequence[Tensor], feats_r: Sequence[Tensor]) -> list[Tensor]:
        """Query and reference pyramids -> the coupled query pyramid (same shapes)."""
        out = list(feats_q)
        for s, stage in enumerate(self.stages):
            y = stage(feats_q[s + 1], feats_r[s + 1])
            out[s + 2] = feats_q[s + 2] + y
        return out
