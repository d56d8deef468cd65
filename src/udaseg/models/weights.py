"""Loading MiT backbone weights from local checkpoint files, with key remapping per layout.

Weights are data: they are read only from local files, with ``torch.load(..., weights_only=True)``
for ``.pth/.pt/.bin`` or with ``safetensors`` for ``.safetensors``; nothing is downloaded.

Supported layouts (spec sections 1.7, 1.8):

* ``"nvlabs"``: the original SegFormer ImageNet checkpoints ``mit_b*.pth`` (keys
  ``patch_embed1.proj.weight``, ``block3.17.attn.kv.weight``, ``norm4.bias``, ``head.weight``
  ...), optionally wrapped under ``state_dict``/``model`` and/or prefixed ``backbone.`` (a
  segmentor checkpoint). These are our module names, so the remap is the identity apart from
  dropping the classifier.
* ``"hf"``: HuggingFace ``nvidia/mit-b*`` (transformers-4 names, ``segformer.encoder.`` or
  ``encoder.`` prefix): ``patch_embeddings.{i-1}.proj/layer_norm``,
  ``block.{i-1}.{j}.layer_norm_1``,
  ``attention.self.query/key/value/sr/layer_norm``, ``attention.output.dense``, ``layer_norm_2``,
  ``mlp.dense1/dwconv.dwconv/dense2``, ``layer_norm.{i-1}``. HF stores K and V separately; we
  concatenate ``kv = [key; value]`` along the output dimension (the first C rows are K).

Note that HF's SegFormer applies LayerNorm eps 1e-5 everywhere, our model keeps the original 1e-6 in
the block/stage norms, so outputs of the two implementations differ slightly for the same weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

__all__ = [
    "LoadReport",
    "detect_layout",
    "guess_mit_variant",
    "load_backbone_weights",
    "load_state_dict_file",
    "remap_hf_mit",
    "remap_nvlabs_mit",
    "to_hf_mit",
]

Layout = Literal["auto", "nvlabs", "hf"]

_HF_PREFIXES = ("segformer.encoder.", "encoder.")
_DROPPED_HF_PREFIXES = ("classifier.", "decode_head.")

# Block-internal names: NVlabs suffix -> HF suffix (``attn.kv`` is handled separately: K/V split).
_BLOCK_NV_TO_HF = {
    "norm1": "layer_norm_1",
    "norm2": "layer_norm_2",
    "attn.q": "attention.self.query",
    "attn.proj": "attention.output.dense",
    "attn.sr": "attention.self.sr",
    "attn.norm": "attention.self.layer_norm",
    "mlp.fc1": "mlp.dense1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.fc2": "mlp.dense2",
}
_BLOCK_HF_TO_NV = {v: k for k, v in _BLOCK_NV_TO_HF.items()}

_NV_PATCH = re.compile(r"^patch_embed(\d)\.(proj|norm)\.(\w+)$")
_NV_BLOCK = re.compile(r"^block(\d)\.(\d+)\.(.+)\.(\w+)$")
_NV_STAGE_NORM = re.compile(r"^norm(\d)\.(\w+)$")
_HF_PATCH = re.compile(r"^patch_embeddings\.(\d)\.(proj|layer_norm)\.(\w+)$")
_HF_BLOCK = re.compile(r"^block\.(\d)\.(\d+)\.(.+)\.(\w+)$")
_HF_STAGE_NORM = re.compile(r"^layer_norm\.(\d)\.(\w+)$")


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did.

    ``missing``: model keys the file did not provide (they keep their current values).
    ``unexpected``: file keys (after remapping) that the model does not have; not loaded.
    ``ignored``: file keys dropped on purpose by the remap (ImageNet classifier ``head.*`` /
    ``classifier.*``, decode-head or other non-backbone keys of a segmentor checkpoint).
    ``loaded``: number of tensors copied into the model.
    """

    path: str
    layout: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every model tensor was loaded and no file key was left unused."""
        return not self.missing and not self.unexpected


def _unwrap(sd: Mapping[str, object]) -> dict[str, Tensor]:
    """Unwrap ``{'state_dict': ...}`` / ``{'model': ...}`` containers and keep tensor entries."""
    obj: object = sd
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None
            )
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _split_nvlabs(sd: Mapping[str, object]) -> tuple[dict[str, Tensor], list[str]]:
    """NVlabs remap returning (kept, ignored keys)."""
    flat = _unwrap(sd)
    ignored: list[str] = []
    if any(k.startswith("backbone.") for k in flat):
        kept = {}
        for k, v in flat.items():
            if k.startswith("backbone."):
                kept[k[len("backbone.") :]] = v
            else:
                ignored.append(k)
        flat = kept
    out: dict[str, Tensor] = {}
    for k, v in flat.items():
        if k.startswith("head."):
            ignored.append(k)
        else:
            out[k] = v
    return out, ignored


def remap_nvlabs_mit(sd: Mapping[str, object]) -> dict[str, Tensor]:
    """NVlabs ``mit_b*.pth`` (or a ``backbone.``-prefixed segmentor dict) -> our MiT names.

    Unwraps ``state_dict``/``model`` containers, strips an optional ``backbone.`` prefix (dropping
    keys outside ``backbone.``) and drops the ImageNet classifier ``head.*``; names are otherwise
    unchanged.
    """
    return _split_nvlabs(sd)[0]


def _split_hf(sd: Mapping[str, object]) -> tuple[dict[str, Tensor], list[str]]:
    """HF remap returning (kept, ignored keys)."""
    flat = _unwrap(sd)
    ignored: list[str] = []
    out: dict[str, Tensor] = {}
    pending_kv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key.startswith(_DROPPED_HF_PREFIXES):
            ignored.append(key)
            continue
        name = key
        for prefix in _HF_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if m := _HF_PATCH.match(name):
            stage, sub, param = m.groups()
            out[f"patch_embed{int(stage) + 1}.{'proj' if sub == 'proj' else 'norm'}.{param}"] = (
                value
            )
        elif m := _HF_STAGE_NORM.match(name):
            stage, param = m.groups()
            out[f"norm{int(stage) + 1}.{param}"] = value
        elif m := _HF_BLOCK.match(name):
            stage, idx, sub, param = m.groups()
            base = f"block{int(stage) + 1}.{idx}"
            if sub in ("attention.self.key", "attention.self.value"):
                pending_kv.setdefault((base, param), {})[sub.rsplit(".", 1)[1]] = value
            elif sub in _BLOCK_HF_TO_NV:
                out[f"{base}.{_BLOCK_HF_TO_NV[sub]}.{param}"] = value
            else:
                out[key] = value  # unknown: surfaces as "unexpected"
        else:
            out[key] = value  # unknown: surfaces as "unexpected"
    for (base, param), parts in pending_kv.items():
        if set(parts) != {"key", "value"}:
            have = ", ".join(sorted(parts))
            raise CheckpointError(
                f"HF checkpoint has only attention.self.{{{have}}}.{param} for {base}; "
                "both key and value are needed to build attn.kv"
            )
        out[f"{base}.attn.kv.{param}"] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out, ignored


def remap_hf_mit(sd: Mapping[str, object]) -> dict[str, Tensor]:
    """HuggingFace ``nvidia/mit-b*`` state dict -> our (NVlabs) MiT names.

    Strips ``segformer.encoder.`` / ``encoder.``, renames every key (see the module docstring),
    concatenates ``attention.self.key`` and ``.value`` into ``attn.kv`` (K first) and drops
    ``classifier.*`` and ``decode_head.*``.
    """
    return _split_hf(sd)[0]


def to_hf_mit(sd: Mapping[str, Tensor], prefix: str = "segformer.encoder.") -> dict[str, Tensor]:
    """Inverse of :func:`remap_hf_mit`: our/NVlabs MiT names -> HF names under ``prefix``.

    ``attn.kv`` is split into ``attention.self.key`` (first C rows) and ``.value`` (last C rows);
    ``head.*`` becomes ``classifier.*`` (no prefix), as in the HF image-classification checkpoints.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("head."):
            out["classifier." + key[len("head.") :]] = value
        elif m := _NV_PATCH.match(key):
            stage, sub, param = m.groups()
            sub_hf = "proj" if sub == "proj" else "layer_norm"
            out[f"{prefix}patch_embeddings.{int(stage) - 1}.{sub_hf}.{param}"] = value
        elif m := _NV_STAGE_NORM.match(key):
            stage, param = m.groups()
            out[f"{prefix}layer_norm.{int(stage) - 1}.{param}"] = value
        elif m := _NV_BLOCK.match(key):
            stage, idx, sub, param = m.groups()
            base = f"{prefix}block.{int(stage) - 1}.{idx}"
            if sub == "attn.kv":
                k, v = value.chunk(2, dim=0)
                out[f"{base}.attention.self.key.{param}"] = k.clone()
                out[f"{base}.attention.self.value.{param}"] = v.clone()
            elif sub in _BLOCK_NV_TO_HF:
                out[f"{base}.{_BLOCK_NV_TO_HF[sub]}.{param}"] = value
            else:
                raise ValueError(f"to_hf_mit: no HF name for MiT key {key!r}")
        else:
            raise ValueError(f"to_hf_mit: no HF name for MiT key {key!r}")
    return out


def detect_layout(sd: Mapping[str, object]) -> str:
    """``"nvlabs"`` or ``"hf"`` for a MiT state dict; a ValueError showing sample keys otherwise."""
    keys = list(_unwrap(sd))
    if any("patch_embeddings." in k or ".attention.self." in k for k in keys):
        return "hf"
    if any(re.search(r"(^|\.)(patch_embed\d|block\d)\.", k) for k in keys):
        return "nvlabs"
    sample = ", ".join(keys[:5]) or "<no tensors>"
    raise CheckpointError(
        "cannot tell the checkpoint layout: no NVlabs (patch_embed1.*, block1.*) or HuggingFace "
        f"(patch_embeddings.*, attention.self.*) MiT keys found; first keys: {sample}. "
        "Pass layout='nvlabs' or layout='hf' explicitly if the file is a MiT checkpoint."
    )


def guess_mit_variant(sd: Mapping[str, Tensor]) -> str | None:
    """Name of the :data:`~udaseg.models.mit.MIT_VARIANTS` entry whose widths and depths match a
    NVlabs-named state dict, or None."""
    from udaseg.models.mit import MIT_VARIANTS

    dims = []
    for i in range(1, 5):
        w = sd.get(f"patch_embed{i}.proj.weight")
        if w is None:
            return None
        dims.append(int(w.shape[0]))
    depths = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"^block{i}\.(\d+)\.", k))}
        depths.append(max(idx) + 1 if idx else 0)
    for name, cfg in MIT_VARIANTS.items():
        if tuple(dims) == cfg.embed_dims and tuple(depths) == cfg.depths:
            return name
    return None


def load_checkpoint_dict(path: str | os.PathLike[str], map_location=None) -> dict:
    """A whole training checkpoint (the dict Lightning saved), read with ``weights_only=True``;
    a file that needs the unsafe unpickler gets a message naming the file and the fix."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(p)!r} (resolved: {p.resolve()})")
    try:
        obj = torch.load(p, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises many types on bad input
        reason = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler" in ln),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CheckpointError(
            f"{str(p)!r}: torch.load(weights_only=True) could not read this checkpoint ({reason}).\n"
            "It is truncated, not a PyTorch checkpoint, or it pickles Python objects (a checkpoint "
            "of another code base). udaseg's own checkpoints hold only tensors and plain values; "
            "import a foreign one with `udaseg convert SRC DST.safetensors` (add --allow-unsafe "
            "only for a trusted file: it executes pickled code) and pass it as model.init_weights."
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{str(p)!r}: expected a checkpoint dict, found a {type(obj).__name__}")
    return dict(obj)


def require_weights_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or FileNotFoundError saying weights are read from local files only."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint file not found: {str(p)!r} (resolved: {p.resolve()}); weights are only "
            "read from local files, download them first"
        )
    return p


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file, with errors naming the file and the fix."""
    p = str(path)
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"reading {p!r} needs the safetensors package: pip install safetensors") from None
    try:
        tensors = load_file(p, device="cpu")
        with safe_open(p, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(
            f"{p!r}: not a readable .safetensors file ({e}); it is damaged or truncated: "
            "download it again, or re-export it (udaseg export-weights / udaseg convert)"
        ) from e
    return tensors, metadata


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a local checkpoint file into a flat ``{name: tensor}`` dict (containers unwrapped).

    ``.safetensors`` is read with the ``safetensors`` package (imported lazily); anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``.
    """
    p = require_weights_file(path)
    if p.suffix == ".safetensors":
        return read_safetensors(p)[0]
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises many types on bad input
        raise CheckpointError(
            f"{str(p)!r}: torch.load(weights_only=True) could not read this file: {e}\n"
            "It is corrupt, not a PyTorch checkpoint, or it pickles Python objects other than "
            "tensors. If you trust its source, re-save only the tensors, e.g. "
            "torch.save(state_dict, 'clean.pth'), or convert it to .safetensors. Released "
            "checkpoints of the seed repositories (mmseg/mmcv, Lightning 1.x) convert with "
            "`udaseg convert SRC DST.safetensors --allow-unsafe` (this loads with "
            "weights_only=False, which executes code pickled in the file: trusted files only)."
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{str(p)!r}: expected a state dict, the file holds a {type(obj).__name__}"
        )
    try:
        return _unwrap(obj)
    except ValueError as e:
        raise CheckpointError(f"{str(p)!r}: {e}") from e


def load_backbone_weights(
    backbone: nn.Module,
    path: str | os.PathLike[str],
    layout: Layout = "auto",
    *,
    strict: bool = False,
) -> LoadReport:
    """Load a local MiT checkpoint into ``backbone`` (a :class:`~udaseg.models.mit.MixTransformer`).

    Args:
        backbone: the model to fill in place.
        path: ``.pth/.pt/.bin`` (read with ``weights_only=True``) or ``.safetensors``.
        layout: ``"nvlabs"``, ``"hf"`` or ``"auto"`` (:func:`detect_layout`).
        strict: if True, raise a ValueError when any model key is missing or any file key is unused
            (the classifier ``head.*``/``classifier.*`` is always ignored, never an error).

    Returns:
        a :class:`LoadReport` listing missing, unexpected and ignored keys by name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, unknown layout, or a tensor shape that differs from the model's
            (the message names the file, the key, both shapes and the likely variant mix-up).
    """
    raw = load_state_dict_file(path)
    if layout == "auto":
        try:
            layout = detect_layout(raw)  # type: ignore[assignment]
        except ValueError as e:
            raise CheckpointError(f"{str(path)!r}: {e}") from e
    if layout == "nvlabs":
        sd, ignored = _split_nvlabs(raw)
    elif layout == "hf":
        sd, ignored = _split_hf(raw)
    else:
        raise CheckpointError(
            f"load_backbone_weights: layout must be 'auto', 'nvlabs' or 'hf', got {layout!r}"
        )

    own = backbone.state_dict()
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            ckpt_variant = guess_mit_variant(sd)
            model_variant = getattr(backbone, "variant", type(backbone).__name__)
            if ckpt_variant is not None and ckpt_variant != model_variant:
                cause = f"checkpoint is for {ckpt_variant} but the model is {model_variant}"
            else:
                cause = (
                    f"the checkpoint was made for a different architecture or variant than the "
                    f"model ({model_variant})"
                )
            raise CheckpointError(
                f"{str(path)!r}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs "
                f"model {tuple(own[key].shape)}. Likely cause: {cause}."
            )
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    if strict and (missing or unexpected):
        model_variant = getattr(backbone, "variant", type(backbone).__name__)
        ckpt_variant = guess_mit_variant(sd)
        hint = (
            f" The checkpoint looks like {ckpt_variant}."
            if ckpt_variant is not None and ckpt_variant != model_variant
            else ""
        )
        raise CheckpointError(
            f"{str(path)!r} ({layout} layout) does not match the {model_variant} backbone: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}.{hint}"
        )
    backbone.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport(
        path=str(path),
        layout=layout,
        loaded=len(sd) - len(unexpected),
        missing=missing,
        unexpected=unexpected,
        ignored=sorted(ignored),
    )


def save_segmentor_weights(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write segmentor weights as ``.safetensors`` atomically (temp file + rename).

    ``metadata`` (string values, e.g. backbone/head/num_classes) is stored in the file header.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path
