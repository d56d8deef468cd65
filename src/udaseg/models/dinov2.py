"""DINOv2 ViT-S/B/L/g/14 (with and without registers) as a udaseg backbone module.

Papers: M. Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024,
https://arxiv.org/abs/2304.07193; T. Darcet, M. Oquab, J. Mairal, P. Bojanowski, "Vision
Transformers Need Registers", ICLR 2024, https://arxiv.org/abs/2309.16588.

Reference: facebookresearch/dinov2 ``dinov2/models/vision_transformer.py`` and ``layers/``
(Apache-2.0) and transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``. Written from the
udaseg spec (``vfm_uda_spec.md`` section 5), not copied, and loaded without ``torch.hub``, timm or
remote code. Module names are the official ones (``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``ls1.gamma`` ...) so the released ``dinov2_vit*14[_reg4]_pretrain.pth`` files load without
renaming; the HF layouts are remapped (:func:`remap_hf_dinov2`).

Architecture (width ``D``, ``depth`` blocks, ``D / 64`` heads, patch ``p = 14``):

* **Tokens**: ``x = [cls; Conv_{p,p}(img)] + pos`` where ``pos`` is the ``1 + 37^2`` table trained
  at 518 px, resampled to the input grid ``(H/p, W/p)`` (see *Position embeddings*); with registers,
  ``R = 4`` learned tokens (no position embedding) are inserted after CLS:
  ``x = [cls + pos_0; reg_1..reg_R; patches + pos_{1..}]``.
* **Block** (pre-norm, LayerScale ``gamma`` per channel, all LayerNorms eps 1e-6):
  ``x = x + gamma_1 * Attn(LN_1(x))``, ``x = x + gamma_2 * FFN(LN_2(x))``; ``Attn`` is multi-head
  self-attention with a fused ``qkv`` Linear (bias on; the first D output rows are Q, then K, then
  V, each head-major) computed with :func:`~torch.nn.functional.scaled_dot_product_attention`;
  ``FFN = fc2(GELU(fc1(x)))`` (hidden 4D) for S/B/L, ``w3(SiLU(a) * b)`` with ``[a; b] = w12(x)``
  (SwiGLU, hidden ``(int(8D / 3) + 7) // 8 * 8``) for g.
* **Final norm** ``norm`` (LN eps 1e-6) after the last block.

Position embeddings (spec 5.4), bicubic in fp32, ``align_corners=False``; the 37x37 table is used
as is when the grid is 37x37. ``interp_mode``:

* ``"offset0.1"``: ``scale_factor = ((h + 0.1) / 37, (w + 0.1) / 37)``, no antialias: the official
  non-register models (``interpolate_offset=0.1``) and VFM-UDA++ (default for the plain variants);
* ``"size_aa"``: ``size = (h, w)`` with antialias: official register models
  (``interpolate_antialias=True, interpolate_offset=0``) and transformers'
  ``Dinov2WithRegistersModel`` (default for the ``_reg`` variants);
* ``"size"``: ``size = (h, w)`` without antialias: transformers' ``Dinov2Model`` (v5).

The modes give different tokens for the same weights (up to ~0.02 at 80x80, spec 5.4): pick the
mode of the code the numbers are compared with. Non-square grids work in every mode.

Outputs: ``forward(x)`` returns one ``(B, D, H/14, W/14)`` map per index in ``out_indices``
(patch tokens after that block, CLS and registers dropped), passed through the final ``norm``
when ``norm_taps`` (VFM-UDA++ reads un-normalised taps: default False). :func:`dinov2_layer_id`
gives the layer-wise lr-decay id of each parameter name.

How it plugs into the segmentors (spec 5.5-5.6): :class:`DINOv2Backbone` is the piece
``build_segmentor`` will construct for ``backbone: dinov2_*``. It (1) applies the config's token
policy to the crop (:func:`apply_token_policy`: ``"x1.09"`` resizes to ``floor(1.1 S / 14) * 14``,
``"pad14"`` pads to a multiple of 14, ``"token16"`` resizes so the grid is S/16), (2) runs
:class:`DINOv2` for the 4 taps, (3) turns them into 4 levels at exactly the MiT sizes S/4, S/8,
S/16, S/32 of the crop with :class:`SimpleFeaturePyramid`, and exposes ``out_channels`` /
``feature_info`` like MiT, so DAFormer/SegFormer heads, HRDA (512 crops), MIC (pixel masking
before the call; the ``mask_token`` is never used), FD and slide inference need no change. Still to
do in ``models/segmentor.py`` and the engine: the registry entry and config fields (variant,
token policy, neck widths, weights path -> ``load_dinov2_weights(backbone.vit, path)``), and
layer-wise lr decay as an optimiser option from :func:`dinov2_layer_id` /
:func:`layer_decay_groups` (prefix ``"backbone.vit."``).

Differences from the reference:

* attention is always SDPA (no xFormers ``MemEffAttention``, no nested tensors or list inputs);
  drop-path is per sample as in timm, without the official "sample subset" trick;
* ``mask_token`` is a persistent *buffer* (it loads and saves, but is not a trainable parameter:
  masking is done on pixels, spec 5.6); the ImageNet ``head`` is not built;
* ``forward`` returns feature maps from block taps (the official ``get_intermediate_layers`` with
  ``reshape=True``), not the classifier output; inputs must have H and W divisible by 14 (the
  token policy of the wrapper makes them so) and errors say so;
* the official chunked-blocks layout (``blocks.{chunk}.{i}``, used only for FSDP training) is not
  read; ``dinov2_tiny`` is a non-paper variant for CPU tests and demos.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from udaseg.errors import CheckpointError, ConfigError
from udaseg.models.layers import init_transformer_weights
from udaseg.models.layers import DropPath, memory_format_of
from udaseg.models.weights import LoadReport, _unwrap, load_state_dict_file

__all__ = [
    "DINOV2_VARIANTS",
    "DINOv2",
    "DINOv2Backbone",
    "DINOv2Config",
    "InterpMode",
    "RELEASED_CHECKPOINTS",
    "TOKEN_POLICIES",
    "SimpleFeaturePyramid",
    "apply_token_policy",
    "detect_dinov2_layout",
    "dinov2_config",
    "dinov2_layer_id",
    "guess_dinov2_variant",
    "interpolate_pos_embed",
    "layer_decay_groups",
    "load_dinov2_weights",
    "policy_input_size",
    "pyramid_sizes",
    "remap_hf_dinov2",
    "remap_official_dinov2",
    "to_hf_dinov2",
]

InterpMode = Literal["offset0.1", "size_aa", "size"]
INTERP_MODES: tuple[str, ...] = ("offset0.1", "size_aa", "size")


@dataclass(frozen=True)
class DINOv2Config:
    """Hyper-parameters of one DINOv2 ViT (spec 5.2)."""

    embed_dim: int
    """Token width D."""
    depth: int
    """Number of Transformer blocks."""
    num_heads: int
    """Attention heads (D / 64 for the released models)."""
    mlp_ratio: float = 4.0
    """FFN hidden width as a multiple of D (before the SwiGLU 2/3 rule)."""
    ffn: Literal["mlp", "swiglu"] = "mlp"
    """``"mlp"`` (fc1 -> GELU -> fc2; S/B/L) or ``"swiglu"`` (fused ``w12`` / ``w3``; g)."""
    patch_size: int = 14
    pretrain_grid: int = 37
    """Side of the position-embedding table (518 / 14 = 37)."""
    num_register_tokens: int = 0
    """0, or 4 for the ``*_reg4`` checkpoints."""
    layerscale: bool = True
    """LayerScale ``ls1.gamma`` / ``ls2.gamma`` (init ``layerscale_init``)."""
    layerscale_init: float = 1.0
    ln_eps: float = 1e-6
    interp_mode: InterpMode = "offset0.1"
    """Position-embedding resampling (module docstring, spec 5.4)."""
    out_indices: tuple[int, ...] = (2, 5, 8, 11)
    """Blocks whose output ``forward`` returns (0-based)."""
    norm_taps: bool = False
    """Apply the final ``norm`` to each tap (official ``get_intermediate_layers(norm=True)``)."""
    drop_path: float = 0.0
    """Stochastic-depth rate, the same for every block (the DINOv2 ``uniform`` schedule)."""
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"DINOv2Config: embed_dim {self.embed_dim} is not divisible by num_heads "
                f"{self.num_heads}"
            )
        if self.ffn not in ("mlp", "swiglu"):
            raise ConfigError(f"DINOv2Config: ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.interp_mode not in INTERP_MODES:
            raise ConfigError(
                f"DINOv2Config: interp_mode must be one of {', '.join(INTERP_MODES)}, "
                f"got {self.interp_mode!r}"
            )
        if not self.out_indices:
            raise ConfigError("DINOv2Config: out_indices must name at least one block")
        bad = [i for i in self.out_indices if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(
                f"DINOv2Config: out_indices {self.out_indices} has blocks {bad} outside "
                f"0..{self.depth - 1} (depth {self.depth})"
            )
        if list(self.out_indices) != sorted(set(self.out_indices)):
            raise ConfigError(
                f"DINOv2Config: out_indices must be strictly increasing, got {self.out_indices}"
            )
        if self.num_register_tokens < 0:
            raise ConfigError(
                f"DINOv2Config: num_register_tokens must be >= 0, got {self.num_register_tokens}"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"DINOv2Config: drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the FFN: ``int(D * mlp_ratio)``, SwiGLU: 2/3 of it rounded up to 8."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


def _variants() -> dict[str, DINOv2Config]:
    base = {
        "dinov2_s": DINOv2Config(384, 12, 6),
        "dinov2_b": DINOv2Config(768, 12, 12),
        "dinov2_l": DINOv2Config(1024, 24, 16, out_indices=(5, 11, 17, 23)),
        "dinov2_g": DINOv2Config(1536, 40, 24, ffn="swiglu", out_indices=(9, 19, 29, 39)),
    }
    out = dict(base)
    for name, cfg in base.items():
        out[name + "_reg"] = replace(cfg, num_register_tokens=4, interp_mode="size_aa")
    # NOT a paper variant: a 0.33M-parameter ViT for CPU tests and demos; no checkpoint exists.
    out["dinov2_tiny"] = DINOv2Config(64, 4, 2, out_indices=(0, 1, 2, 3))
    return out


DINOV2_VARIANTS: dict[str, DINOv2Config] = _variants()
"""Variant name -> config. ``dinov2_{s,b,l,g}`` = ``dinov2_vit{s,b,l,g}14`` (interp ``offset0.1``),
``dinov2_{s,b,l,g}_reg`` = ``dinov2_vit*14_reg4`` (interp ``size_aa``); ``dinov2_tiny`` is
udaseg-only."""



def _checkpoints() -> dict[str, tuple[str, str]]:
    out = {}
    for v, hub, hf in (("s", "vits14", "small"), ("b", "vitb14", "base"),
                       ("l", "vitl14", "large"), ("g", "vitg14", "giant")):
        out[f"dinov2_{v}"] = (f"dinov2_{hub}/dinov2_{hub}_pretrain.pth", f"facebook/dinov2-{hf}")
        out[f"dinov2_{v}_reg"] = (
            f"dinov2_{hub}/dinov2_{hub}_reg4_pretrain.pth", f"facebook/dinov2-with-registers-{hf}"
        )
    return out


RELEASED_CHECKPOINTS: dict[str, tuple[str, str]] = _checkpoints()
"""Variant -> (official file under ``https://dl.fbaipublicfiles.com/dinov2/``, HF repo). Weights
are read from local copies only (:func:`load_dinov2_weights`); nothing is downloaded here."""


def dinov2_config(variant: str, **overrides: object) -> DINOv2Config:
    """The config of ``variant`` with ``overrides`` (e.g. ``out_indices``, ``interp_mode``) applied;
    a ConfigError listing the known variants for an unknown name."""
    try:
        cfg = DINOV2_VARIANTS[variant]
    except KeyError:
        raise ConfigError(
            f"unknown DINOv2 variant {variant!r}; known variants: {', '.join(DINOV2_VARIANTS)}"
        ) from None
    return _with_overrides(cfg, overrides)


def _with_overrides(cfg: DINOv2Config, overrides: Mapping[str, object]) -> DINOv2Config:
    if not overrides:
        return cfg
    known = set(DINOv2Config.__dataclass_fields__)
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(
            f"unknown DINOv2 config field(s) {bad}; known fields: {', '.join(sorted(known))}"
        )
    return replace(cfg, **overrides)  # type: ignore[arg-type]


def interpolate_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], mode: InterpMode, dtype: torch.dtype | None = None
) -> Tensor:
    """Resample a ``(1, 1 + M^2, D)`` position table to ``(1, 1 + h w, D)`` for grid ``(h, w)``.

    The CLS entry is kept; the ``M x M`` patch table is resampled bicubically in fp32 per
    ``mode`` (module docstring) and cast to ``dtype`` (default: the table's). Returns the table
    itself when ``(h, w) == (M, M)``.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"interpolate_pos_embed: {n} patch positions are not a square grid")
    h, w = grid
    dtype = pos_embed.dtype if dtype is None else dtype
    if (h, w) == (m, m):
        return pos_embed.to(dtype)
    d = pos_embed.shape[-1]
    table = pos_embed[:, 1:].float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    if mode == "offset0.1":
        out = nn.functional.interpolate(
            table, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic",
            align_corners=False,
        )
    elif mode in ("size_aa", "size"):
        out = nn.functional.interpolate(
            table, size=(h, w), mode="bicubic", align_corners=False, antialias=mode == "size_aa"
        )
    else:
        raise ValueError(f"interpolate_pos_embed: unknown mode {mode!r}; use one of {INTERP_MODES}")
    if tuple(out.shape[-2:]) != (h, w):  # float rounding of the scale factor; never seen
        raise RuntimeError(
            f"interpolate_pos_embed: got a {tuple(out.shape[-2:])} grid, wanted {(h, w)}"
        )
    out = out.permute(0, 2, 3, 1).reshape(1, h * w, d)
    return torch.cat([pos_embed[:, :1].float(), out], dim=1).to(dtype)


class PatchEmbed(nn.Module):
    """``Conv_{p,p}`` patchify: ``(B, 3, H, W) -> tokens (B, (H/p)(W/p), D)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, fused ``qkv`` Linear, SDPA (scale ``d_head^-0.5``), ``proj``.

    Shapes: ``(B, N, D) -> (B, N, D)``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (official name ``gamma``)."""

    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` (exact erf GELU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """``w3(SiLU(a) * b)`` with ``[a; b] = w12(x)`` split in halves along the features
    (official ``SwiGLUFFNFused``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(a) * b)


class Block(nn.Module):
    """Pre-norm ViT block with LayerScale:
    ``x += ls1(Attn(norm1(x)))``, ``x += ls2(FFN(norm2(x)))``."""

    def __init__(self, cfg: DINOv2Config) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        ls = cfg.layerscale_init
        self.ls1: nn.Module = LayerScale(d, ls) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlp: nn.Module = (
            SwiGLUFFN(d, cfg.ffn_hidden) if cfg.ffn == "swiglu" else Mlp(d, cfg.ffn_hidden)
        )
        self.ls2: nn.Module = LayerScale(d, ls) if cfg.layerscale else nn.Identity()
        self.drop_path: nn.Module = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class DINOv2(nn.Module):
    """DINOv2 ViT returning block taps as ``(B, D, H/14, W/14)`` maps.

    Args:
        variant: a key of :data:`DINOV2_VARIANTS` or a :class:`DINOv2Config`.
        in_chans: image channels.
        **overrides: config fields to replace (``out_indices``, ``norm_taps``, ``interp_mode``,
            ``drop_path`` ...).

    Attributes:
        variant, config: the variant name (``"custom"`` for a config) and the final config.
        out_channels: ``(D,) * len(out_indices)``.
        feature_info: per tap ``num_chs`` (D), ``reduction`` (14) and ``module`` (``blocks.{i}``).

    Blocks after ``max(out_indices)`` (and ``norm`` unless ``norm_taps``) do not take part in
    ``forward``; with the default indices the last tap is the last block.
    """

    def __init__(self, variant: str | DINOv2Config = "dinov2_b", in_chans: int = 3,
                 **overrides: object) -> None:
        super().__init__()
        if isinstance(variant, DINOv2Config):
            cfg = _with_overrides(variant, overrides)
            self.variant = "custom"
        else:
            cfg = dinov2_config(variant, **overrides)
            self.variant = variant
        self.config = cfg
        self.in_chans = in_chans
        d = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pretrain_grid**2, d))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
            if cfg.num_register_tokens else None
        )
        self.register_buffer("mask_token", torch.zeros(1, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.out_channels: tuple[int, ...] = (d,) * len(cfg.out_indices)
        self.feature_info: list[dict[str, int | str]] = [
            {"num_chs": d, "reduction": cfg.patch_size, "module": f"blocks.{i}"}
            for i in cfg.out_indices
        ]
        self._pos_cache: tuple[tuple, Tensor] | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: Linear trunc-normal(0.02) with zero bias, ``pos_embed``
        trunc-normal(0.02), ``cls_token`` / registers N(0, 1e-6), LayerScale
        ``layerscale_init``, LayerNorm 1/0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):  # the patch conv keeps PyTorch's init
                init_transformer_weights(m)

    # -- tokens ---------------------------------------------------------------------------------

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        """Patch grid ``(H/14, W/14)``; a ValueError when H or W is not a multiple of the patch."""
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"DINOv2({self.variant}): input {h}x{w} is not a multiple of the patch size {p}; "
                f"resize or pad it first (token policies x1.09 / pad14 / token16, spec 5.5), "
                f"e.g. to {math.ceil(h / p) * p}x{math.ceil(w / p) * p}"
            )
        return h // p, w // p

    def position_embedding(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """``(1, 1 + h w, D)`` position embeddings for ``grid`` (cached per grid in eval mode
        without grad; the key includes the table's storage and version, so loading invalidates
        it)."""
        cacheable = not self.training and not torch.is_grad_enabled()
        pe = self.pos_embed
        key = (grid, dtype, pe.device, pe.data_ptr(), pe._version)
        if cacheable and self._pos_cache is not None and self._pos_cache[0] == key:
            return self._pos_cache[1]
        pos = interpolate_pos_embed(self.pos_embed, grid, self.config.interp_mode, dtype)
        if cacheable:
            self._pos_cache = (key, pos)
        else:
            self._pos_cache = None
        return pos

    def prepare_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + R + h w, D)`` (CLS, registers, patches)
        and the grid ``(h, w)``."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"DINOv2({self.variant}) expects images of shape (B, {self.in_chans}, H, W), "
                f"got {tuple(x.shape)}"
            )
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)
        # torch.cat promotes like the reference: under autocast the bf16 patch tokens join the fp32
        # CLS token as fp32, and the position table is cast to that dtype
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(grid, tokens.dtype)
        if self.register_tokens is not None:
            reg = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], reg, tokens[:, 1:]], dim=1)
        return tokens, grid

    def block_tokens(
        self, x: Tensor, indices: Sequence[int]
    ) -> tuple[list[Tensor], tuple[int, int]]:
        """Full token sequences ``(B, 1 + R + h w, D)`` after each block in ``indices`` (no
        norm), and the grid ``(h, w)``."""
        wanted = set(indices)
        tokens, grid = self.prepare_tokens(x)
        outs: list[Tensor] = []
        last = max(indices)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            tokens = blk(tokens)
            if i in wanted:
                outs.append(tokens)
        return outs, grid

    def final_tokens(self, x: Tensor, norm: bool = True) -> Tensor:
        """All tokens after the last block (and ``norm``): transformers' ``last_hidden_state``."""
        tokens = self.block_tokens(x, [len(self.blocks) - 1])[0][0]
        return self.norm(tokens) if norm else tokens

    def get_intermediate_layers(
        self, x: Tensor, indices: Sequence[int] | None = None, norm: bool | None = None,
        return_cls: bool = False,
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Patch-token maps ``(B, D, h, w)`` after the blocks ``indices`` (default ``out_indices``),
        normed when ``norm`` (default ``norm_taps``); with ``return_cls`` also the ``(B, D)`` CLS
        tokens."""
        indices = list(self.config.out_indices if indices is None else indices)
        norm = self.config.norm_taps if norm is None else norm
        token_lists, (h, w) = self.block_tokens(x, indices)
        fmt = memory_format_of(self.patch_embed.proj.weight)
        start = 1 + self.num_register_tokens
        maps, cls = [], []
        for t in token_lists:
            if norm:
                t = self.norm(t)
            cls.append(t[:, 0])
            m = t[:, start:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)
            maps.append(m.contiguous(memory_format=fmt))
        return (maps, cls) if return_cls else maps

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images ``(B, C, H, W)`` (H, W multiples of 14) -> one ``(B, D, H/14, W/14)`` map per
        tap."""
        return self.get_intermediate_layers(x)  # type: ignore[return-value]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Same as :meth:`forward` (the shared backbone API)."""
        return self.forward(x)


# -- layer-wise lr decay ------------------------------------------------------------------------

_STEM = ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.")


def dinov2_layer_id(name: str, depth: int, prefix: str = "") -> int:
    """Layer id of a parameter for layer-wise lr decay (BEiT / DINOv2-eval convention).

    ``0``: the stem (``patch_embed``, ``cls_token``, ``pos_embed``, ``register_tokens``);
    ``i + 1``: ``blocks.{i}.*``; ``depth + 1``: the final ``norm`` and everything that is not in
    the backbone (neck, head; names not starting with ``prefix``). The lr of id ``k`` is usually
    ``lr * decay ** (depth + 1 - k)``. ``prefix`` is the backbone's name in a larger model, e.g.
    ``"backbone."``.
    """
    if prefix:
        if not name.startswith(prefix):
            return depth + 1
        name = name[len(prefix):]
    if name.startswith(_STEM):
        return 0
    if m := re.match(r"blocks\.(\d+)\.", name):
        return int(m.group(1)) + 1
    return depth + 1


def layer_decay_groups(
    model: nn.Module, lr: float, weight_decay: float, decay: float, depth: int, prefix: str = ""
) -> list[dict]:
    """AdamW groups with lr ``lr * decay ** (depth + 1 - layer_id)``; 1-D parameters and the
    cls/pos/register tokens get no weight decay. Group names ``stem`` / ``blocks.{i}`` / ``top``,
    suffixed ``.no_decay``; every trainable parameter is in exactly one group."""
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = dinov2_layer_id(name, depth, prefix)
        short = name[len(prefix):] if prefix and name.startswith(prefix) else name
        no_wd = p.ndim <= 1 or short in ("cls_token", "pos_embed", "register_tokens")
        base = "stem" if lid == 0 else ("top" if lid == depth + 1 else f"blocks.{lid - 1}")
        key = base + (".no_decay" if no_wd else "")
        g = groups.setdefault(key, {
            "name": key, "params": [], "param_names": [], "layer_id": lid,
            "lr": lr * decay ** (depth + 1 - lid), "weight_decay": 0.0 if no_wd else weight_decay,
        })
        g["params"].append(p)
        g["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["layer_id"], g["name"]))


# -- weights --------------------------------------------------------------------------------------

_HF_EMB = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Block suffix: ours (official) -> HF on-disk / HF v5 in-memory. qkv and SwiGLU v5 are special.
_BLOCK_HF = {
    "norm1": ("norm1", "norm1"),
    "norm2": ("norm2", "norm2"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "ls1.gamma": ("layer_scale1.lambda1", "layer_scale1.lambda1"),
    "ls2.gamma": ("layer_scale2.lambda1", "layer_scale2.lambda1"),
    "mlp.fc1": ("mlp.fc1", "mlp.fc1"),
    "mlp.fc2": ("mlp.fc2", "mlp.fc2"),
    "mlp.w12": ("mlp.weights_in", None),
    "mlp.w3": ("mlp.weights_out", "mlp.down_proj"),
}
_HF_QKV = {
    "attention.attention.query": "q", "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
_HF_GLU = {"mlp.gate_proj": "a", "mlp.up_proj": "b"}
_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_PREFIXES = ("backbone.", "dinov2.", "module.")
_DROPPED = ("head.", "classifier.", "pooler.")


def _strip(flat: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip one wrapper prefix (``backbone.``, ``dinov2.``, ``module.``) when every backbone key
    has it; drop classifier keys. Returns (kept, ignored)."""
    ignored: list[str] = []
    for prefix in _PREFIXES:
        if flat and any(k.startswith(prefix) for k in flat):
            kept = {}
            for k, v in flat.items():
                if k.startswith(prefix):
                    kept[k[len(prefix):]] = v
                else:
                    ignored.append(k)
            flat = kept
            break
    out = {}
    for k, v in flat.items():
        if k.startswith(_DROPPED):
            ignored.append(k)
        else:
            out[k] = v
    return out, ignored


def detect_dinov2_layout(sd: Mapping[str, object]) -> str:
    """``"official"``, ``"hf"`` (on-disk ``facebook/dinov2-*``) or ``"hf_v5"`` (transformers-5
    in-memory names) for a DINOv2 state dict; a CheckpointError showing sample keys otherwise."""
    keys = list(_strip(_unwrap(sd))[0])
    if any(".attention.attention." in k or ".attention.output.dense" in k for k in keys):
        return "hf"
    if any(".attention.q_proj." in k or ".attention.o_proj." in k for k in keys):
        return "hf_v5"
    if any(k.startswith("encoder.layer.") or k.startswith("embeddings.") for k in keys):
        return "hf"
    if any(k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed")) for k in keys):
        return "official"
    sample = ", ".join(keys[:5]) or "<no tensors>"
    raise CheckpointError(
        "cannot tell the DINOv2 checkpoint layout: no official (blocks.*, patch_embed.*, "
        f"pos_embed) or HuggingFace (embeddings.*, encoder.layer.*) keys; first keys: {sample}"
    )


def remap_official_dinov2(sd: Mapping[str, object]) -> dict[str, Tensor]:
    """Official ``dinov2_vit*14[_reg4]_pretrain.pth`` -> our names (identity after unwrapping
    containers, stripping ``backbone.``/``module.`` and dropping a classifier ``head.*``)."""
    return _strip(_unwrap(sd))[0]


def _split_hf(sd: Mapping[str, object]) -> tuple[dict[str, Tensor], list[str]]:
    flat, ignored = _strip(_unwrap(sd))
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    glu: dict[tuple[int, str], dict[str, Tensor]] = {}
    rev = {}
    for ours, (disk, v5) in _BLOCK_HF.items():
        rev[disk] = ours
        if v5 is not None:
            rev[v5] = ours
    for key, value in flat.items():
        if key in _HF_EMB:
            out[_HF_EMB[key]] = value
            continue
        m = _HF_BLOCK.match(key)
        if m is None:
            out[key] = value  # unknown: reported as unexpected
            continue
        idx, sub, param = int(m.group(1)), m.group(2), m.group(3)
        if sub in _HF_QKV:
            qkv.setdefault((idx, param), {})[_HF_QKV[sub]] = value
        elif sub in _HF_GLU:
            glu.setdefault((idx, param), {})[_HF_GLU[sub]] = value
        elif param == "lambda1" and f"{sub}.lambda1" in rev:
            out[f"blocks.{idx}.{rev[f'{sub}.lambda1']}"] = value
        elif sub in rev:
            out[f"blocks.{idx}.{rev[sub]}.{param}"] = value
        else:
            out[key] = value
    for (idx, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"HF DINOv2 checkpoint has only the {sorted(parts)} projections of layer {idx} "
                f"({param}); query, key and value are all needed to build blocks.{idx}.attn.qkv"
            )
        out[f"blocks.{idx}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    for (idx, param), parts in glu.items():
        if set(parts) != {"a", "b"}:
            raise CheckpointError(
                f"HF DINOv2 checkpoint has only one of mlp.gate_proj / mlp.up_proj for layer {idx} "
                f"({param}); both are needed to build blocks.{idx}.mlp.w12"
            )
        out[f"blocks.{idx}.mlp.w12.{param}"] = torch.cat([parts["a"], parts["b"]], 0)
    return out, ignored


def remap_hf_dinov2(sd: Mapping[str, object]) -> dict[str, Tensor]:
    """transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict (on-disk names
    ``attention.attention.{query,key,value}`` or v5 names ``attention.{q,k,v,o}_proj``; optional
    ``dinov2.`` prefix) -> our names. Q, K, V are concatenated into ``attn.qkv`` (Q first); SwiGLU
    ``weights_in`` / ``gate_proj + up_proj`` become ``w12``."""
    return _split_hf(sd)[0]


def to_hf_dinov2(sd: Mapping[str, Tensor], style: Literal["hf", "hf_v5"] = "hf",
                 prefix: str = "") -> dict[str, Tensor]:
    """Inverse of :func:`remap_hf_dinov2`: our/official names -> HF names (``style="hf"``: the
    on-disk ``facebook/dinov2-*`` names, ``"hf_v5"``: transformers-5 module names), under
    ``prefix``."""
    if style not in ("hf", "hf_v5"):
        raise ValueError(f"to_hf_dinov2: style must be 'hf' or 'hf_v5', got {style!r}")
    v5 = style == "hf_v5"
    emb = {v: k for k, v in _HF_EMB.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in emb:
            out[prefix + emb[key]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if m is None:
            raise ValueError(f"to_hf_dinov2: no HF name for DINOv2 key {key!r}")
        idx, sub, param = m.groups()
        base = f"{prefix}encoder.layer.{idx}."
        if sub == "attn.qkv":
            names = (
                ("attention.q_proj", "attention.k_proj", "attention.v_proj") if v5 else
                tuple(f"attention.attention.{n}" for n in ("query", "key", "value"))
            )
            for name, part in zip(names, value.chunk(3, dim=0), strict=True):
                out[f"{base}{name}.{param}"] = part.clone()
        elif sub == "mlp.w12" and v5:
            a, b = value.chunk(2, dim=0)
            out[f"{base}mlp.gate_proj.{param}"] = a.clone()
            out[f"{base}mlp.up_proj.{param}"] = b.clone()
        elif param == "gamma" and f"{sub}.gamma" in _BLOCK_HF:
            out[base + _BLOCK_HF[f"{sub}.gamma"][1 if v5 else 0]] = value  # type: ignore[operator]
        elif sub in _BLOCK_HF:
            out[f"{base}{_BLOCK_HF[sub][1 if v5 else 0]}.{param}"] = value
        else:
            raise ValueError(f"to_hf_dinov2: no HF name for DINOv2 key {key!r}")
    return out


def _depth_of(sd: Mapping[str, Tensor]) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))]
    return 1 + max(idx, default=-1)


def guess_dinov2_variant(sd: Mapping[str, Tensor]) -> str | None:
    """Name of the :data:`DINOV2_VARIANTS` entry whose width, depth, FFN and register count match
    a state dict in our names, or None."""
    w = sd.get("patch_embed.proj.weight")
    if w is None:
        return None
    depth = _depth_of(sd)
    reg = sd.get("register_tokens")
    n_reg = int(reg.shape[1]) if reg is not None else 0
    swiglu = any(".mlp.w12." in k for k in sd)
    for name, cfg in DINOV2_VARIANTS.items():
        if (cfg.embed_dim, cfg.depth, cfg.num_register_tokens, cfg.ffn == "swiglu") == (
            int(w.shape[0]), depth, n_reg, swiglu
        ):
            return name
    return None


def _describe(sd: Mapping[str, Tensor]) -> str:
    w = sd.get("patch_embed.proj.weight")
    depth = _depth_of(sd)
    reg = sd.get("register_tokens")
    guess = guess_dinov2_variant(sd)
    dim = int(w.shape[0]) if w is not None else "?"
    return (f"width {dim}, {depth} blocks, {int(reg.shape[1]) if reg is not None else 0} registers"
            + (f" (= {guess})" if guess else ""))


def load_dinov2_weights(
    model: DINOv2 | DINOv2Backbone,
    source: str | os.PathLike[str] | Mapping[str, object],
    layout: Literal["auto", "official", "hf", "hf_v5"] = "auto",
    *,
    strict: bool = True,
) -> LoadReport:
    """Load DINOv2 weights into ``model`` from a local file or an in-memory state dict.

    Args:
        model: the :class:`DINOv2` to fill in place (or a :class:`DINOv2Backbone`: its ``vit``).
        source: ``.pth/.pt/.bin`` (``weights_only=True``) or ``.safetensors`` path, or a state dict.
        layout: ``"official"``, ``"hf"``, ``"hf_v5"`` or ``"auto"`` (:func:`detect_dinov2_layout`).
        strict: raise when a model tensor is missing or a checkpoint tensor is left unused
            (wrapper prefixes and classifier keys are always ignored, never an error). A
            checkpoint without ``mask_token`` (a HF ``use_mask_token=False`` export) leaves it at
            zero.

    Returns:
        a :class:`~udaseg.models.weights.LoadReport` (``ignored``: wrapper-external and classifier
        keys).

    Raises:
        CheckpointError: unreadable file, unknown layout, a shape that differs from the model's
            (naming the key, the model and checkpoint shapes and what the checkpoint looks like),
            or, when ``strict``, missing / unexpected keys by name.

    The position-embedding interpolation mode is a model setting (``interp_mode``), not taken from
    the file: official non-register weights were trained with ``offset0.1``, register ones with
    ``size_aa`` (the variants' defaults).
    """
    if isinstance(model, DINOv2Backbone):
        model = model.vit
    where = "state dict" if isinstance(source, Mapping) else repr(str(source))
    raw = source if isinstance(source, Mapping) else load_state_dict_file(source)
    if layout == "auto":
        try:
            layout = detect_dinov2_layout(raw)  # type: ignore[assignment]
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
    if layout == "official":
        sd, ignored = _strip(_unwrap(raw))
    elif layout in ("hf", "hf_v5"):
        sd, ignored = _split_hf(raw)
    else:
        raise CheckpointError(
            "load_dinov2_weights: layout must be 'auto', 'official', 'hf' or 'hf_v5', "
            f"got {layout!r}"
        )
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{where} ({layout} layout): shape mismatch for {key!r}: model "
                f"{tuple(own[key].shape)} (DINOv2 {model.variant}: {_describe(own)}), checkpoint "
                f"{tuple(value.shape)} (checkpoint: {_describe(sd)}). Build the variant the "
                "checkpoint was made for"
                + (" (pos_embed: pretrain_grid differs)" if key == "pos_embed" else "") + "."
            )
    missing = sorted(k for k in own if k not in sd and k != "mask_token")
    unexpected = sorted(k for k in sd if k not in own)
    if strict and (missing or unexpected):
        n_ckpt = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
        hint = ""
        if n_ckpt != model.num_register_tokens:
            kind = "_reg" if n_ckpt else "plain"
            hint = (f" The checkpoint has {n_ckpt} register tokens and the model "
                    f"{model.num_register_tokens}: use the {kind} variant.")
        raise CheckpointError(
            f"{where} ({layout} layout) does not match DINOv2 {model.variant} ({_describe(own)}); "
            f"the checkpoint has {_describe(sd)}: {len(missing)} missing keys {missing[:6]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:6]}.{hint}"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    model._pos_cache = None
    return LoadReport(
        path=str(source) if not isinstance(source, Mapping) else "<state dict>",
        layout=str(layout),
        loaded=len(sd) - len(unexpected),
        missing=missing,
        unexpected=unexpected,
        ignored=sorted(ignored),
    )


# -- simple feature pyramid -----------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (ViTDet's ``LayerNorm``), eps 1e-6."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


def pyramid_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Level sizes of a ``h x w`` crop at strides 4, 8, 16, 32, rounded up as MiT's
    (``H_1 = ceil(H / 4)``, ``H_{i+1} = ceil(H_i / 2)``)."""
    sizes = [(math.ceil(h / 4), math.ceil(w / 4))]
    for _ in range(3):
        ph, pw = sizes[-1]
        sizes.append((math.ceil(ph / 2), math.ceil(pw / 2)))
    return sizes


class SimpleFeaturePyramid(nn.Module):
    """ViTDet / mmseg-BEiT simple pyramid: single-stride ViT maps -> 4 levels, strides 4..32
    (spec 5.6).

    From a stride-``p`` map ``F`` (``p = 14``, or 16 under the ``token16`` policy):
    ``P_1 = ConvT_2(GELU(Norm(ConvT_2(F))))`` (x4), ``P_2 = ConvT_2(F)`` (x2), ``P_3 = F``,
    ``P_4 = MaxPool_2(F)`` (x0.5); each is then bilinearly resized (``align_corners=False``) to
    exactly :func:`pyramid_sizes` of the crop (a no-op when the grid is crop / 16) and, when
    ``out_channels`` is given, projected by a 1x1 conv per level (e.g. to MiT's [64, 128, 320, 512]
    so the MiT head configs stay unchanged).

    Args:
        embed_dim: D, the width of the ViT maps.
        out_channels: 4 output widths, or None for ``(D, D, D, D)`` (no projection).
        norm: ``"ln"`` (channel LayerNorm, eps 1e-6, as ViTDet; batch-independent) or ``"bn"``
            (BatchNorm2d, as mmseg's BEiT neck).

    ``forward(features, size)``: ``features`` is one map (used by all levels, ViTDet) or four
    (level i reads tap i, BEiT), each ``(B, D, h, w)``; ``size`` is the crop ``(H, W)``. Returns
    ``[P_1..P_4]``, ``P_i`` of shape ``(B, C_i, *pyramid_sizes(H, W)[i])``.
    """

    def __init__(self, embed_dim: int, out_channels: Sequence[int] | None = None,
                 norm: Literal["ln", "bn"] = "ln") -> None:
        super().__init__()
        d = embed_dim
        if norm not in ("ln", "bn"):
            raise ConfigError(f"SimpleFeaturePyramid: norm must be 'ln' or 'bn', got {norm!r}")
        if out_channels is not None and len(out_channels) != 4:
            raise ConfigError(
                f"SimpleFeaturePyramid: out_channels needs 4 entries, got {tuple(out_channels)}"
            )
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(d, d, 2, stride=2),
            LayerNorm2d(d) if norm == "ln" else nn.BatchNorm2d(d),
            nn.GELU(),
            nn.ConvTranspose2d(d, d, 2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(d, d, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)
        self.proj = (
            nn.ModuleList(nn.Conv2d(d, c, 1) for c in out_channels) if out_channels is not None
            else None
        )
        self.out_channels: tuple[int, ...] = tuple(out_channels) if out_channels else (d,) * 4

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> list[Tensor]:
        if len(features) not in (1, 4):
            raise ValueError(
                f"SimpleFeaturePyramid: expects 1 or 4 ViT maps, got {len(features)}"
            )
        feats = list(features) * 4 if len(features) == 1 else list(features)
        outs = []
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        for i, (op, f, hw) in enumerate(zip(ops, feats, pyramid_sizes(*size), strict=True)):
            y = op(f)
            if tuple(y.shape[-2:]) != hw:
                y = nn.functional.interpolate(y, size=hw, mode="bilinear", align_corners=False)
            if self.proj is not None:
                y = self.proj[i](y)
            outs.append(y)
        return outs


# -- token policy and the segmentation backbone ----------------------------------------------------

TokenPolicy = Literal["x1.09", "pad14", "token16"]
TOKEN_POLICIES: tuple[str, ...] = ("x1.09", "pad14", "token16")


def policy_input_size(h: int, w: int, policy: TokenPolicy, patch: int = 14) -> tuple[int, int]:
    """ViT input size for a ``h x w`` crop under a token policy (spec 5.5).

    ``"x1.09"``: ``floor(1.1 S / p) * p`` per side (VFM-UDA/++: 512 -> 560, 1024 -> 1120);
    ``"pad14"``: ``ceil(S / p) * p`` (512 -> 518, 1024 -> 1036); ``"token16"``: ``ceil(S / 16) * p``
    (512 -> 448, 1024 -> 896: one token per 16x16 crop pixels).
    """
    def side(s: int) -> int:
        if policy == "x1.09":
            return max(1, math.floor(1.1 * s / patch)) * patch
        if policy == "pad14":
            return math.ceil(s / patch) * patch
        if policy == "token16":
            return math.ceil(s / 16) * patch
        raise ConfigError(
            f"unknown token policy {policy!r}; use one of {', '.join(TOKEN_POLICIES)}"
        )

    return side(h), side(w)


def apply_token_policy(x: Tensor, policy: TokenPolicy, patch: int = 14) -> Tensor:
    """Crop ``(B, C, H, W)`` -> ViT input: bilinear resize (``align_corners=False``, no antialias)
    for ``x1.09`` / ``token16``, zero padding at the bottom and right for ``pad14`` (zero is the
    mean colour after normalisation). Returns ``x`` itself when the size already fits."""
    h, w = x.shape[-2:]
    size = policy_input_size(h, w, policy, patch)
    if size == (h, w):
        return x
    if policy == "pad14":
        return nn.functional.pad(x, (0, size[1] - w, 0, size[0] - h))
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DINOv2Backbone(nn.Module):
    """DINOv2 + token policy + simple feature pyramid behind the udaseg backbone contract.

    ``forward(x)`` maps a crop ``(B, 3, H, W)`` (any size) to 4 levels at
    :func:`pyramid_sizes` ``(H, W)`` (strides 4, 8, 16, 32, rounded up as MiT's), with widths
    ``out_channels``; ``feature_info`` carries ``num_chs`` / ``reduction`` per level like MiT's,
    so the DAFormer / SegFormer heads, HRDA and slide inference take it unchanged.

    Args:
        variant: DINOv2 variant (:data:`DINOV2_VARIANTS`) or config.
        token_policy: ``"x1.09"``, ``"pad14"`` or ``"token16"`` (:func:`policy_input_size`).
        out_channels: 4 level widths (a 1x1 projection each, e.g. ``(64, 128, 320, 512)`` for MiT
            head configs) or None for ``(D, D, D, D)``.
        neck_norm: ``"ln"`` or ``"bn"`` in the x4 branch of the pyramid.
        pyramid_input: ``"taps"`` (level i from tap i, needs 4 ``out_indices``; mmseg BEiT) or
            ``"last"`` (every level from the last tap; ViTDet).
        **vit_overrides: DINOv2 config fields (``out_indices``, ``norm_taps``, ``interp_mode``,
            ``drop_path`` ...).

    Submodules: ``vit`` (:class:`DINOv2`; load weights with ``load_dinov2_weights(b.vit, path)``,
    LLRD prefix ``"backbone.vit."`` inside a segmentor) and ``neck``. Under ``pad14`` the levels
    are computed for the padded extent and cropped to the crop's sizes.
    """

    def __init__(
        self,
        variant: str | DINOv2Config = "dinov2_b",
        token_policy: TokenPolicy = "token16",
        out_channels: Sequence[int] | None = None,
        neck_norm: Literal["ln", "bn"] = "ln",
        pyramid_input: Literal["taps", "last"] = "taps",
        **vit_overrides: object,
    ) -> None:
        super().__init__()
        if token_policy not in TOKEN_POLICIES:
            raise ConfigError(
                f"DINOv2Backbone: token_policy must be one of {', '.join(TOKEN_POLICIES)}, "
                f"got {token_policy!r}"
            )
        if pyramid_input not in ("taps", "last"):
            raise ConfigError(
                f"DINOv2Backbone: pyramid_input must be 'taps' or 'last', got {pyramid_input!r}"
            )
        self.vit = DINOv2(variant, **vit_overrides)
        n_taps = len(self.vit.config.out_indices)
        if pyramid_input == "taps" and n_taps != 4:
            raise ConfigError(
                f"DINOv2Backbone: pyramid_input='taps' needs 4 out_indices, got "
                f"{self.vit.config.out_indices}; use pyramid_input='last' for a single tap"
            )
        self.variant = self.vit.variant
        self.token_policy = token_policy
        self.pyramid_input = pyramid_input
        self.neck = SimpleFeaturePyramid(self.vit.config.embed_dim, out_channels, neck_norm)
        self.out_channels: tuple[int, ...] = self.neck.out_channels
        self.feature_info: list[dict[str, int | str]] = [
            {"num_chs": c, "reduction": r, "module": f"neck.fpn{i + 1}"}
            for i, (c, r) in enumerate(zip(self.out_channels, (4, 8, 16, 32), strict=True))
        ]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Crop ``(B, 3, H, W)`` -> ``[P_1..P_4]``, ``P_i`` of shape
        ``(B, C_i, *pyramid_sizes(H, W)[i])``."""
        h, w = x.shape[-2:]
        vin = apply_token_policy(x, self.token_policy, self.vit.patch_size)
        taps = self.vit(vin)
        feats = taps[-1:] if self.pyramid_input == "last" else taps
        extent = tuple(vin.shape[-2:]) if self.token_policy == "pad14" else (h, w)
        levels = self.neck(feats, extent)  # type: ignore[arg-type]
        if extent != (h, w):
            levels = [
                lv[..., :sh, :sw] for lv, (sh, sw) in zip(levels, pyramid_sizes(h, w), strict=True)
            ]
        return levels

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Same as :meth:`forward` (the shared backbone API)."""
        return self.forward(x)
