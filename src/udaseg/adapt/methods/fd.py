"""ImageNet Feature Distance (FD), an auxiliary source loss of DAFormer.

Paper: "DAFormer: Improving Network Architectures and Training Strategies for Domain-Adaptive
Semantic Segmentation", Hoyer, Dai and Van Gool, CVPR 2022, arXiv 2111.14887 (the thing-class
ImageNet feature distance).

The student's bottleneck features F_S of the source image are pulled towards those of a frozen
copy of the ImageNet-pretrained backbone F_I, but only on cells showing thing classes. Eq.::

    d(p)  = || F_S(p) - F_I(p) ||_2                       (non-squared L2 over the channels)
    L_FD  = lambda_FD * sum_p d(p) M(p) / sum_p M(p)

M(p) = 1 where the ratio-downscaled source label (:func:`downscale_label_ratio`) is a thing class.
Defaults (DAFormer final config ``dacs_a999_fd_things_rcs0.01_cpl``): lambda_FD = 0.005
(``imnet_feature_dist_lambda``), classes "things" = traffic light/sign, person, rider, car, truck,
bus, train, motorcycle, bicycle (``imnet_feature_dist_classes``, resolved through
:data:`udaseg.data.classes.CLASS_GROUPS`), ``imnet_feature_dist_scale_min_ratio`` 0.75, features of
the last backbone stage only (F4, stride 32).

HRDA (spec 7.6, ``feature_scale=0.5``): the student returns its low-resolution context features and
the ImageNet backbone sees the source image resized by the same factor. That factor is read off the
feature shapes here (see :meth:`ImageNetFeatureDistance.imagenet_features`); the label stays at full
resolution and the downscale factor is ``W_label // W_feature`` (1024 // 16 = 64).

Reference: lhoyer/DAFormer ``mmseg/models/uda/dacs.py`` (the feature-distance part of the UDA
step) and ``mmseg/utils/utils.py`` (the ratio label downscale), Apache-2.0; re-implemented from
``shared/spec/daformer_hrda_mic_spec.md`` sections 5, 7.6 and 11 (no code copied).

Differences from the reference:
- An empty mask gives L_FD = 0 (with an intact, all-zero gradient graph) instead of NaN; the
  mean is computed as ``sum(d M) / max(sum M, 1)``, so no host synchronisation is needed.
- Only a frozen copy of the *backbone* is kept (the reference keeps a whole third segmentor and
  only ever uses its backbone); the numbers are the same.
- Label values outside ``[0, num_classes)`` other than ``ignore_index`` are counted as ignore
  (the reference assumes they do not occur).
- The ImageNet input scale for multi-resolution students is inferred from the feature shapes;
  HRDA's ``feature_scale='all'`` ablation (FD summed over both scales) is not supported.
- ``views`` (CISS): FD summed over several pixel-aligned source views, e.g. the original and
  the stylised source, L_FD = lambda_FD * (FD(x_s) + FD(x~_s)); default the original only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.classes import CLASS_GROUPS, IGNORE_INDEX, NUM_CLASSES
from ..hooks import Stage, StepContext

__all__ = ["FDConfig", "ImageNetFeatureDistance", "downscale_label_ratio", "resolve_classes"]


def downscale_label_ratio(
    label: Tensor,
    scale: int,
    min_ratio: float = 0.75,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Downscale a label map by an integer factor, keeping only near-pure cells (spec 5).

    Each ``scale x scale`` cell gets its majority class if that class covers at least
    ``min_ratio`` of the cell, otherwise ``ignore_index``. Ignored pixels vote for an extra
    (K+1)-th bin; a cell whose majority is that bin is ignored too. Ties go to the lower class id.

    Args:
        label: ``(B, H, W)`` (or ``(B, 1, H, W)``) int64 labels.
        scale: the downscale factor s >= 1 (kernel = stride = s; trailing rows/columns that do
            not fill a whole cell are dropped, as in average pooling).
        min_ratio: the minimum fraction of the majority class.
        num_classes: K; values outside ``[0, K)`` count as ignore.
        ignore_index: the ignore label (255).

    Returns:
        ``(B, H // s, W // s)`` int64 labels.
    """
    if label.ndim == 4 and label.shape[1] == 1:
        label = label[:, 0]
    if label.ndim != 3:
        raise ValueError(
            "downscale_label_ratio: label must be (B, H, W) or (B, 1, H, W), "
            f"got {tuple(label.shape)}"
        )
    if scale < 1:
        raise ValueError(f"downscale_label_ratio: scale must be >= 1, got {scale}")
    label = label.long()
    valid = (label >= 0) & (label < num_classes)
    bins = torch.where(valid, label, torch.full_like(label, num_classes))  # ignore -> bin K
    # one-hot by scatter: F.one_hot validates the values with a host read on CPU tensors
    one_hot = label.new_zeros((label.shape[0], num_classes + 1, *label.shape[1:]), dtype=torch.float)
    one_hot.scatter_(1, bins.unsqueeze(1), 1.0)  # (B, K+1, H, W)
    frac = F.avg_pool2d(one_hot, kernel_size=scale, stride=scale)  # (B, K+1, h, w)
    ratio, cls = frac.max(dim=1)
    ignore = (cls == num_classes) | (ratio < min_ratio)
    return torch.where(ignore, torch.full_like(cls, ignore_index), cls)


def resolve_classes(classes: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """A :data:`CLASS_GROUPS` name or explicit ids -> class ids (None: every cell)."""
    if classes is None:
        return None
    if isinstance(classes, str):
        try:
            return tuple(CLASS_GROUPS[classes])
        except KeyError:
            known = ", ".join(sorted(CLASS_GROUPS))
            raise ValueError(
                f"FDConfig.classes: unknown class group {classes!r}; known groups: {known}, "
                "or give a list of class ids"
            ) from None
    return tuple(int(c) for c in classes)


@dataclass(frozen=True)
class FDConfig:
    """ImageNet feature distance settings (DAFormer final values)."""

    weight: float = 0.005
    """lambda_FD (upstream ``imnet_feature_dist_lambda``)."""
    classes: str | tuple[int, ...] | list[int] | None = "things"
    """Class group name in ``CLASS_GROUPS`` or explicit ids (``imnet_feature_dist_classes``);
    None averages over every feature cell (``dacs_fd``)."""
    scale_min_ratio: float = 0.75
    """Minimum majority fraction of a downscaled label cell
    (``imnet_feature_dist_scale_min_ratio``)."""
    feature_level: int = -1
    """Backbone level compared (-1: the last stage, F4)."""
    views: tuple[str, ...] = ("image",)
    """Source views FD is computed on and summed over: ``"image"`` (the supervised pass) and
    extra pixel-aligned views of the source batch by key, e.g. ``["image", "stylized"]`` for
    CISS (FD on the original and the FDA-stylised source, spec CISS 1.10). An extra view's
    student pass is ``ctx.student_forward("source/<view>", ...)``, shared with other hooks."""

    def __post_init__(self) -> None:
        views = (self.views,) if isinstance(self.views, str) else tuple(self.views)
        if not views or len(set(views)) != len(views):
            raise ValueError(f"FDConfig.views: give distinct source view keys, got {self.views!r}")
        object.__setattr__(self, "views", views)


class ImageNetFeatureDistance(nn.Module):
    """FD as an :class:`~udaseg.adapt.hooks.AuxLoss` (stage "source", log name "fd").

    The ImageNet backbone is a deep copy of ``student.backbone`` taken at construction, so the
    hook **must be built before training starts**, while the student still holds the ImageNet
    weights (iteration 0). The copy is a registered submodule: it is saved in and restored from
    checkpoints (``state_dict``/``load_state_dict``), so a resumed run keeps the ImageNet weights
    even though the student has moved on. It is frozen (``requires_grad=False``), always in eval
    mode (``train()`` is overridden) and run under ``torch.no_grad``.

    Args:
        student: the student segmentor (its ``.backbone`` is copied) or a backbone module itself.
        cfg: FD settings; None uses :class:`FDConfig` defaults.
        num_classes: K for the label downscale; None reads ``student.num_classes`` (default 19).
        ignore_index: the ignore label of the source labels.
    """

    name: str = "fd"
    stage: Stage = "source"

    def __init__(
        self,
        student: nn.Module,
        cfg: FDConfig | None = None,
        num_classes: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else FDConfig()
        self.class_ids = resolve_classes(self.cfg.classes)
        # on the module's device (moves with it): no host-to-device copy per step
        self.register_buffer(
            "class_id_tensor",
            torch.tensor(self.class_ids if self.class_ids is not None else [], dtype=torch.long),
            persistent=False,
        )
        if num_classes is None:
            num_classes = int(getattr(student, "num_classes", NUM_CLASSES))
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        backbone = getattr(student, "backbone", student)
        self.imnet_backbone = copy.deepcopy(backbone)
        self.imnet_backbone.requires_grad_(False)
        self.imnet_backbone.eval()

    def train(self, mode: bool = True) -> ImageNetFeatureDistance:
        """Set train/eval mode; the frozen ImageNet backbone always stays in eval mode."""
        super().train(mode)
        self.imnet_backbone.eval()
        return self

    def feature_mask(self, label: Tensor, feat_hw: tuple[int, int]) -> Tensor:
        """``(B, H, W)`` source labels -> ``(B, h, w)`` float mask M of the feature cells."""
        h, w = feat_hw
        scale = label.shape[-1] // w
        if scale < 1:
            raise ValueError(
                f"ImageNetFeatureDistance: label width {label.shape[-1]} is smaller than the "
                f"feature width {w}"
            )
        low = downscale_label_ratio(
            label, scale, self.cfg.scale_min_ratio, self.num_classes, self.ignore_index
        )
        if tuple(low.shape[-2:]) != (h, w):
            raise ValueError(
                f"ImageNetFeatureDistance: label {tuple(label.shape[-2:])} downscaled by "
                f"{scale} gives {tuple(low.shape[-2:])}, but the features are {(h, w)}; labels "
                "and images must have the same aspect ratio and a size divisible by the stride"
            )
        if self.class_ids is None:
            return torch.ones_like(low, dtype=torch.float32)
        return torch.isin(low, self.class_id_tensor.to(low.device)).float()

    @torch.no_grad()
    def imagenet_features(self, image: Tensor, like: Tensor) -> Tensor:
        """F_I at ``cfg.feature_level`` for ``image``, matched to the student's features ``like``.

        If the student's features are smaller than the backbone's stride implies (HRDA returns
        its context branch at ``feature_scale`` 0.5), the image is first resized bilinearly
        (align_corners=False) by that factor, as HRDA does for its ImageNet model.
        """
        level = self.cfg.feature_level
        info = getattr(self.imnet_backbone, "feature_info", None)
        if info is not None:
            stride = int(info[level]["reduction"])
            expected = -(-image.shape[-1] // stride)  # ceil, as the strided convs give
            if expected != like.shape[-1]:
                factor = like.shape[-1] * stride / image.shape[-1]
                size = (round(image.shape[-2] * factor), round(image.shape[-1] * factor))
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        feats = self.imnet_backbone(image)[level]
        if feats.shape != like.shape:
            raise ValueError(
                f"ImageNetFeatureDistance: ImageNet features {tuple(feats.shape)} do not match the "
                f"student features {tuple(like.shape)} at level {level}"
            )
        return feats

    def view_distance(self, ctx: StepContext, view: str) -> Tensor:
        """The unweighted masked mean distance of one source view (``"image"`` or an extra key)."""
        if view == "image":
            out = ctx.source_out
        else:
            if view not in ctx.source:
                from ...errors import ConfigError

                raise ConfigError(
                    f"ImageNetFeatureDistance: FDConfig.views names {view!r}, but the source batch "
                    f"only has {sorted(ctx.source)}; the 'stylized' view is added by the data "
                    "pipeline when `data.stylize` is set"
                )
            out = ctx.student_forward(f"source/{view}", ctx.source[view])
        feats = out.features[self.cfg.feature_level]
        imnet = self.imagenet_features(ctx.source[view], feats)
        # in fp32 under bf16 autocast too (the distance of nearby features)
        d = torch.linalg.vector_norm(feats.float() - imnet.float(), ord=2, dim=1)  # (B, h, w)
        mask = self.feature_mask(ctx.source["label"], (feats.shape[-2], feats.shape[-1]))
        # masked mean; an empty mask gives 0 (not NaN) and keeps the graph (zero gradient)
        return (d * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, ctx: StepContext) -> Tensor:
        """L_FD for the source batch of ``ctx`` (already multiplied by lambda_FD), summed over
        ``cfg.views``."""
        if ctx.source_out is None:
            raise ValueError(
                "ImageNetFeatureDistance runs at stage 'source': ctx.source_out is not set"
            )
        loss = None
        for view in self.cfg.views:
            d = self.view_distance(ctx, view)
            loss = d if loss is None else loss + d
        return self.cfg.weight * loss


def build(settings: dict, student) -> list:
    """The method-catalog builder (``model.methods.fd``)."""
    from ...configparse import config_from_dict

    return [ImageNetFeatureDistance(student, config_from_dict(FDConfig, settings, "model.methods.fd"))]
