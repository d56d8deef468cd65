"""Mix Transformer (MiT-B0..B5), the hierarchical encoder of SegFormer.

Paper: E. Xie, W. Wang, Z. Yu, A. Anandkumar, J. M. Alvarez, P. Luo, "SegFormer: Simple and
Efficient Design for Semantic Segmentation with Transformers", NeurIPS 2021,
https://arxiv.org/abs/2105.15203.

Reference: NVlabs/SegFormer ``mmseg/models/backbones/mix_transformer.py`` (NVIDIA Source Code
License), as re-used unchanged by lhoyer/DAFormer, HRDA and MIC. Written from the udaseg spec
(``daformer_hrda_mic_spec.md`` section 1), not copied. Module names are those of the original so
that ``mit_b*.pth`` keys load without renaming (see :mod:`udaseg.models.weights`).

Architecture, for stage ``i = 1..4`` with width ``C_i`` and input map ``X_{i-1}``
(``X_0`` = the image):

* **Overlapping patch merging**: ``Z = LN_{1e-5}(flatten(Conv_{k,s,k//2}(X_{i-1})))`` with
  ``(k, s) = (7, 4)`` for stage 1 and ``(3, 2)`` afterwards, so ``H_1 = ceil(H / 4)`` and
  ``H_{i+1} = ceil(H_i / 2)``. Overlapping windows (k > s) keep local continuity; there is no
  positional embedding.
* **Efficient self-attention with sequence reduction** (ratio ``R = sr_ratio``), Eqs. (1)-(2):
  ``K_r, V_r = Linear_kv(LN_{1e-5}(Conv_{R,R}(Z)))`` shrinks the key/value sequence from
  ``N = H_i W_i`` to ``N / R^2`` (no reduction when ``R = 1``), and
  ``Attn(Q, K_r, V_r) = softmax(Q K_r^T / sqrt(d_head)) V_r`` per head, followed by ``Linear_proj``.
  Cost drops from ``O(N^2)`` to ``O(N^2 / R^2)``.
* **Mix-FFN**, Eq. (3): ``x_out = MLP(GELU(Conv_3x3(MLP(x_in)))) + x_in``; the depthwise 3x3 conv
  between ``fc1`` and GELU leaks positional information from zero padding.
* Each block is pre-norm with stochastic depth:
  ``x = x + DropPath(Attn(LN_{1e-6}(x)))``, ``x = x + DropPath(MixFFN(LN_{1e-6}(x)))``,
  and each stage ends with ``LN_{1e-6}`` and a reshape to ``(B, C_i, H_i, W_i)``.

LayerNorm eps, exactly as the reference: 1e-6 in ``norm1``/``norm2`` and the stage norms
``norm{i}``, 1e-5 (PyTorch default) in ``patch_embed{i}.norm`` and the SR norm ``attn.norm``.

Differences from the reference:

* attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (same math, default
  scale ``d_head^-0.5``; attention dropout is 0 in every config, so it is not exposed);
* ``forward`` returns the list of the four stage maps and the model exposes ``feature_info`` /
  ``out_channels`` (the shared udaseg backbone interface); the ImageNet classifier ``head`` is not
  built, and its checkpoint keys are dropped by the loaders;
* ``mit_tiny`` is an extra, non-paper variant for CPU demos and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from udaseg.models.layers import DropPath, init_transformer_weights, memory_format_of

__all__ = [
    "MiTConfig",
    "MIT_VARIANTS",
    "PAPER_VARIANTS",
    "EfficientSelfAttention",
    "MixFFN",
    "MixTransformer",
    "mit_config",
]


@dataclass(frozen=True)
class MiTConfig:
    """Per-stage hyper-parameters of one MiT variant (spec table 1.1)."""

    embed_dims: tuple[int, int, int, int]
    """Stage widths C_1..C_4."""
    depths: tuple[int, int, int, int]
    """Number of Transformer blocks per stage."""
    num_heads: tuple[int, int, int, int]
    """Attention heads per stage (C_i must be divisible by it)."""
    sr_ratios: tuple[int, int, int, int]
    """Sequence-reduction ratio R per stage; keys/values have N / R^2 tokens."""
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    """Mix-FFN hidden width as a multiple of C_i."""

    def __post_init__(self) -> None:
        fields = {
            "embed_dims": self.embed_dims,
            "depths": self.depths,
            "num_heads": self.num_heads,
            "sr_ratios": self.sr_ratios,
            "mlp_ratios": self.mlp_ratios,
        }
        for name, value in fields.items():
            if len(value) != 4:
                raise ValueError(f"MiTConfig.{name} needs 4 entries (one per stage), got {value}")
        for c, h in zip(self.embed_dims, self.num_heads, strict=True):
            if c % h:
                raise ValueError(
                    f"MiTConfig: embed dim {c} is not divisible by num_heads {h}; "
                    f"embed_dims={self.embed_dims}, num_heads={self.num_heads}"
                )


_B1_TO_B5_DIMS = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
_SR = (8, 4, 2, 1)

MIT_VARIANTS: dict[str, MiTConfig] = {
    "mit_b0": MiTConfig((32, 64, 160, 256), (2, 2, 2, 2), _HEADS, _SR),
    "mit_b1": MiTConfig(_B1_TO_B5_DIMS, (2, 2, 2, 2), _HEADS, _SR),
    "mit_b2": MiTConfig(_B1_TO_B5_DIMS, (3, 4, 6, 3), _HEADS, _SR),
    "mit_b3": MiTConfig(_B1_TO_B5_DIMS, (3, 4, 18, 3), _HEADS, _SR),
    "mit_b4": MiTConfig(_B1_TO_B5_DIMS, (3, 8, 27, 3), _HEADS, _SR),
    "mit_b5": MiTConfig(_B1_TO_B5_DIMS, (3, 6, 40, 3), _HEADS, _SR),
    # NOT a paper variant: a 0.42M-parameter encoder for CPU demos and fast tests. No released
    # checkpoint exists for it; its numbers are not comparable to any published result.
    "mit_tiny": MiTConfig((16, 32, 64, 128), (1, 1, 1, 1), (1, 1, 2, 4), _SR),
}
"""Variant name -> config. b0..b5 follow spec table 1.1 exactly; ``mit_tiny`` is udaseg-only."""

PAPER_VARIANTS: tuple[str, ...] = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
"""The variants defined by the SegFormer paper (and with released ImageNet checkpoints)."""


def mit_config(variant: str) -> MiTConfig:
    """Return the config of ``variant`` or raise a ValueError listing the known variants."""
    try:
        return MIT_VARIANTS[variant]
    except KeyError:
        known = ", ".join(MIT_VARIANTS)
        raise ValueError(f"unknown MiT variant {variant!r}; known variants: {known}") from None


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch merging: ``Conv_{k,s,k//2}`` -> flatten -> LayerNorm (eps 1e-5).

    Shapes: ``(B, C_in, H, W) -> tokens (B, H' W', C)`` plus ``(H', W')``,
    ``H' = floor((H + 2 (k // 2) - k) / s) + 1``.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention with sequence reduction (SegFormer Eqs. (1)-(2)).

    ``Q = x W_q``; ``x_r = LN_{1e-5}(Conv_{R,R}(x))`` if ``R > 1`` else ``x``;
    ``[K, V] = x_r W_kv`` (the first C output rows of ``kv`` are K, the last C are V, each
    head-major); ``out = softmax(Q K^T / sqrt(d)) V`` per head, heads merged, then ``proj``.

    Shapes: tokens ``(B, N, C)`` with ``N = H W`` -> ``(B, N, C)``. Keys/values have
    ``floor(H / R) * floor(W / R)`` tokens (the SR conv has no padding), i.e. ``N / R^2`` when
    ``R`` divides ``H`` and ``W``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"EfficientSelfAttention: dim {dim} not divisible by num_heads {num_heads}"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def reduce(self, x: Tensor, h: int, w: int) -> Tensor:
        """Key/value tokens ``x_r``: ``(B, N, C) -> (B, N / R^2, C)`` (identity when ``R == 1``)."""
        if self.sr_ratio == 1:
            return x
        b, n, c = x.shape
        x_map = x.transpose(1, 2).reshape(b, c, h, w)
        return self.norm(self.sr(x_map).flatten(2).transpose(1, 2))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        x_r = self.reduce(x, h, w)
        kv = self.kv(x_r).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (B, h, N', d)
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # scale d^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """Depthwise 3x3 conv on tokens; the extra nesting reproduces the key ``mlp.dwconv.dwconv``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, stride=1, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Mix-FFN (SegFormer Eq. (3)) without the residual: ``fc2(GELU(DWConv_3x3(fc1(x))))``.

    Shapes: ``(B, N, C) -> (B, N, C)``; hidden width ``mlp_ratio * C``. GELU is the exact erf form.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm MiT block: ``x += DropPath(Attn(LN1(x)))``; ``x += DropPath(MixFFN(LN2(x)))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """MiT encoder returning the four stage maps (strides 4, 8, 16, 32).

    Args:
        variant: a key of :data:`MIT_VARIANTS` (``mit_b0`` .. ``mit_b5``, or the non-paper
            ``mit_tiny``).
        in_chans: input image channels.
        drop_path_rate: the stochastic-depth rate of the last block; block ``k`` of ``n`` (counted
            over all stages) gets ``drop_path_rate * k / (n - 1)`` (spec 1.5; DAFormer uses 0.1).

    Attributes:
        variant, config: the variant name and its :class:`MiTConfig`.
        feature_info: one dict per level with ``num_chs`` (C_i), ``reduction`` (4, 8, 16, 32) and
            ``module`` (the stage-norm name), the backbone interface shared by all udaseg backbones.
        out_channels: ``(C_1, C_2, C_3, C_4)``.

    Module names (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``) are the NVlabs ones.
    """

    def __init__(
        self, variant: str = "mit_b5", in_chans: int = 3, drop_path_rate: float = 0.1
    ) -> None:
        super().__init__()
        cfg = mit_config(variant)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(
                f"MixTransformer: drop_path_rate must be in [0, 1), got {drop_path_rate}"
            )
        self.variant = variant
        self.config = cfg
        self.in_chans = in_chans
        self.drop_path_rate = drop_path_rate

        n_blocks = sum(cfg.depths)
        # Python linspace (not torch.linspace) so the model can be built on the meta device.
        dpr = [
            drop_path_rate * k / (n_blocks - 1) if n_blocks > 1 else 0.0 for k in range(n_blocks)
        ]

        prev = in_chans
        k = 0
        for i in range(4):
            dim = cfg.embed_dims[i]
            patch, stride = (7, 4) if i == 0 else (3, 2)
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(prev, dim, patch, stride))
            blocks = nn.ModuleList(
                Block(dim, cfg.num_heads[i], cfg.mlp_ratios[i], cfg.sr_ratios[i], dpr[k + j])
                for j in range(cfg.depths[i])
            )
            self.add_module(f"block{i + 1}", blocks)
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))
            k += cfg.depths[i]
            prev = dim

        self.out_channels: tuple[int, ...] = tuple(cfg.embed_dims)
        self.feature_info: list[dict[str, int | str]] = [
            {"num_chs": c, "reduction": r, "module": f"norm{i + 1}"}
            for i, (c, r) in enumerate(zip(cfg.embed_dims, (4, 8, 16, 32), strict=True))
        ]
        self.apply(init_transformer_weights)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Same as :meth:`forward` (alias for the shared backbone API)."""
        return self.forward(x)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images ``(B, in_chans, H, W)`` -> ``[F_1, .., F_4]``, ``F_i`` is ``(B, C_i, H_i, W_i)``.

        ``H_1 = ceil(H / 4)``, ``H_{i+1} = ceil(H_i / 2)`` (e.g. 512 -> 128, 64, 32, 16).
        Images are stored in the memory format of the first convolution's weight, and the
        feature maps follow it: channels-last weights (``model.to(memory_format=
        torch.channels_last)``) give channels-last maps that are views of the tokens, no copy.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"MixTransformer({self.variant}) expects images of shape "
                f"(B, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )
        fmt = memory_format_of(self.patch_embed1.proj.weight)
        x = x.contiguous(memory_format=fmt)
        outs: list[Tensor] = []
        for i in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                tokens = blk(tokens, h, w)
            tokens = getattr(self, f"norm{i}")(tokens)
            x = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=fmt)
            outs.append(x)
        return outs
