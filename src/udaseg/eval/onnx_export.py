"""ONNX export of a trained segmentor: whole-image inference with dynamic batch, height and width.

:func:`export_onnx` writes one ``.onnx`` file whose graph takes a **normalised** image batch
``image (B, 3, H, W)`` float32 (RGB, ``(pixel - IMAGENET_MEAN) / IMAGENET_STD`` on the 0..255
scale, as the udaseg data pipeline feeds the model) and returns, at the input resolution
(bilinear, ``align_corners=False``, as :func:`udaseg.eval.inference.whole_inference`):

* ``output="logits"``: ``logits (B, K, H, W)`` float32 (default);
* ``output="probs"``: ``probs (B, K, H, W)``, the softmax over the K classes;
* ``output="labels"``: ``labels (B, H, W)`` int64, the argmax (train IDs).

With ``dynamic=True`` (default) B, H and W are symbolic (``batch``, ``height``, ``width``), so
one file serves every image size; MiT needs no size constraint beyond H, W >= 32 (multiples of 32
give the exact stride-32 grid, other sizes work like in PyTorch). The file records what it holds
in its ``metadata_props`` (``udaseg.output``, ``udaseg.num_classes``, ``udaseg.input_mean`` ...).
Writes are atomic (temporary file in the same folder, then ``os.replace``).

Exporters (``exporter=``):

* ``"dynamo"`` (default): ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based
  exporter that is PyTorch's default since 2.9; it needs the ``onnx`` and ``onnxscript``
  packages (``pip install 'udaseg[onnx]'``). ``scaled_dot_product_attention`` becomes plain
  ``MatMul``/``Softmax`` and the graph uses only standard ONNX operators (opset 18 by default).
  Slow to trace (tens of seconds on a small CPU, whatever the model size).
* ``"torchscript"``: the legacy tracing exporter (``dynamo=False``), deprecated by PyTorch but
  still shipped; a fast fallback for plain segmentors (HRDA needs ``"dynamo"``).

HRDA: :class:`~udaseg.models.hrda.HRDASegmentor` is exported **fused** (context pass + the
overlapping high-resolution slide + scale attention, exactly its eval-mode forward) only at a
fixed input size (``dynamic=False``; the number and place of the detail windows depend on the
size, so the graph cannot be size-generic). Use that size for whole-image inference at one
resolution, or as the window of an outer slide. For a size-generic file, export the shared
single-scale network ``hrda.model`` instead (the HRDA context/detail network without the
multi-resolution fusion: slightly lower quality than HRDA's own inference).

The ``udaseg export`` command is :func:`export_main` (plain argparse, no Lightning import): it reads
a udaseg Lightning checkpoint (``torch.load(..., weights_only=True)``) or a ``.safetensors`` file
written by ``udaseg export-weights``, rebuilds the segmentor and exports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from udaseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from udaseg.errors import CheckpointError, ConfigError
from udaseg.models.hrda import HRDAConfig, HRDASegmentor
from udaseg.models.segmentor import build_segmentor, inference_state

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "OUTPUTS",
    "SegmentorForExport",
    "export_main",
    "export_onnx",
    "load_segmentor_for_export",
    "verify_onnx",
]

OUTPUTS: tuple[str, ...] = ("logits", "probs", "labels")
EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
"""Opset of the exported graphs (LayerNormalization needs >= 17; the dynamo exporter's own
operator library is written for 18, lower values go through the ONNX version converter)."""
INPUT_NAME = "image"
_DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
_INSTALL_HINT = "pip install 'udaseg[onnx]' (or: pip install onnx onnxscript onnxruntime)"

Output = Literal["logits", "probs", "labels"]
Exporter = Literal["dynamo", "torchscript"]


def _require(module: str, purpose: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs the {module} package: {_INSTALL_HINT}") from None


# --------------------------------------------------------------------------- wrapper
class SegmentorForExport(nn.Module):
    """``image (B, 3, H, W) -> logits | probs (B, K, H, W)`` or ``labels (B, H, W)``.

    Runs ``segmentor(image)`` (an :class:`~udaseg.models.segmentor.EncoderDecoder`, an
    :class:`~udaseg.models.hrda.HRDASegmentor` or any module returning logits or an object with
    ``.logits``), resizes the stride-4 logits to the input size (bilinear,
    ``align_corners=False``) and applies the ``output`` transform. Put it in eval mode.
    """

    def __init__(self, segmentor: nn.Module, output: Output = "logits") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        self.segmentor = segmentor
        self.output = output

    def forward(self, image: Tensor) -> Tensor:
        out = self.segmentor(image)
        logits = out if isinstance(out, Tensor) else out.logits
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.output == "probs":
            return logits.softmax(dim=1)
        if self.output == "labels":
            return logits.argmax(dim=1)
        return logits


def _num_classes(segmentor: nn.Module) -> int | None:
    k = getattr(segmentor, "num_classes", None)
    return int(k) if isinstance(k, int) else None


def _model_description(segmentor: nn.Module) -> str:
    inner = segmentor.model if isinstance(segmentor, HRDASegmentor) else segmentor
    parts = [type(segmentor).__name__]
    variant = getattr(getattr(inner, "backbone", None), "variant", None)
    if variant:
        parts.append(str(variant))
    head = getattr(inner, "decode_head", None)
    if head is not None:
        parts.append(type(head).__name__)
    return " ".join(parts)


# --------------------------------------------------------------------------- export
def _export_dynamo(wrapper: nn.Module, example: Tensor, opset: int, dynamic: bool) -> Any:
    """ONNX ModelProto from the torch.export-based exporter."""
    _require("onnxscript", "torch.onnx.export(dynamo=True)")
    dynamic_shapes = {INPUT_NAME: dict(_DYNAMIC_AXES)} if dynamic else None
    # "torchvision is not installed. Skipping torchvision::nms" etc.: irrelevant here
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        return _run_dynamo(wrapper, example, opset, dynamic_shapes)
    finally:
        registration_log.setLevel(level)


def _run_dynamo(wrapper: nn.Module, example: Tensor, opset: int, dynamic_shapes: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation noise inside torch
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(
            wrapper,
            (example,),
            None,
            input_names=[INPUT_NAME],
            output_names=[wrapper.output],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def _export_torchscript(wrapper: nn.Module, example: Tensor, opset: int, dynamic: bool) -> Any:
    """ONNX ModelProto from the legacy tracing exporter (deprecated by PyTorch, still shipped)."""
    import io

    onnx = _require("onnx", "ONNX export")
    buf = io.BytesIO()
    dynamic_axes = None
    if dynamic:
        out_axes = (
            {0: "batch", 1: "height", 2: "width"} if wrapper.output == "labels" else _DYNAMIC_AXES
        )
        dynamic_axes = {INPUT_NAME: dict(_DYNAMIC_AXES), wrapper.output: dict(out_axes)}
    with warnings.catch_warnings():
        # the shape checks in the model (channel counts, "resize only if the size differs") are
        # constant for every input of a valid size, so the tracer's warnings about them are noise
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[wrapper.output],
            opset_version=opset,
            dynamo=False,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return onnx.load_model_from_string(buf.getvalue())


def export_onnx(
    segmentor: nn.Module,
    path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
    example_size: tuple[int, int] = (512, 512),
    dynamic: bool = True,
    *,
    output: Output = "logits",
    exporter: Exporter = "dynamo",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``segmentor`` for whole-image inference as one self-contained ``.onnx`` file.

    Args:
        segmentor: an :class:`~udaseg.models.segmentor.EncoderDecoder` (or any module mapping
            ``(B, 3, H, W)`` images to stride-s logits / an object with ``.logits``), or an
            :class:`~udaseg.models.hrda.HRDASegmentor` (fused, ``dynamic=False`` only; see the
            module docstring). It is traced in eval mode; its train/eval mode is restored after.
        path: output file (parent folders are created; an existing file is replaced atomically).
        opset: ONNX opset version.
        example_size: ``(H, W)`` of the example input used for tracing; with ``dynamic=False``
            the only size the file accepts (batch 1).
        dynamic: symbolic ``batch``, ``height`` and ``width`` axes.
        output: ``"logits"``, ``"probs"`` (softmax over K) or ``"labels"`` (int64 argmax).
        exporter: ``"dynamo"`` (torch.export-based, default) or ``"torchscript"`` (legacy).
        metadata: extra ``metadata_props`` (string values) stored in the file.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: unknown ``output``/``exporter``, a bad ``example_size``, or an HRDA segmentor
            with ``dynamic=True`` or ``exporter="torchscript"``.
        ImportError: ``onnx`` (and ``onnxscript`` for the dynamo exporter) missing.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
    height, width = (int(v) for v in example_size)
    if height < 32 or width < 32:
        raise ValueError(f"example_size must be at least 32x32, got {tuple(example_size)}")
    if isinstance(segmentor, HRDASegmentor):
        if dynamic:
            raise ValueError(
                "HRDA segmentors are exported fused only at a fixed input size: pass dynamic=False "
                "(the file then accepts exactly example_size), or export the single-scale network "
                "segmentor.model for dynamic sizes"
            )
        if exporter != "dynamo":
            raise ValueError("HRDA segmentors need exporter='dynamo' (the tracer cannot follow "
                             "the size arithmetic of the HR slide)")
    onnx = _require("onnx", "ONNX export")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = segmentor.training
    wrapper = SegmentorForExport(segmentor, output).eval()
    try:
        param = next(segmentor.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        # dynamo specialises a dimension whose example value is 1, so the dynamic batch is
        # traced with 2 images
        batch = 2 if dynamic and exporter == "dynamo" else 1
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(batch, 3, height, width, generator=gen).to(device=device, dtype=dtype)
        with torch.no_grad():
            if exporter == "dynamo":
                model = _export_dynamo(wrapper, example, opset, dynamic)
            else:
                model = _export_torchscript(wrapper, example, opset, dynamic)
    finally:
        segmentor.train(was_training)

    props = {
        "udaseg.output": output,
        "udaseg.input": "image (B, 3, H, W) float32 RGB, (pixel - mean) / std on the 0..255 scale",
        "udaseg.input_mean": json.dumps(list(IMAGENET_MEAN)),
        "udaseg.input_std": json.dumps(list(IMAGENET_STD)),
        "udaseg.model": _model_description(segmentor),
        "udaseg.dynamic": "true" if dynamic else "false",
        "udaseg.example_size": json.dumps([height, width]),
        "udaseg.exporter": exporter,
    }
    k = _num_classes(segmentor)
    if k is not None:
        props["udaseg.num_classes"] = str(k)
    props.update({str(key): str(v) for key, v in (metadata or {}).items()})
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    model.producer_name = "udaseg"

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- verify
def _onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    onnx = _require("onnx", "reading an ONNX file")
    model = onnx.load_model(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def verify_onnx(
    path: str | os.PathLike[str],
    segmentor: nn.Module,
    sizes: Sequence[tuple[int, int]],
    *,
    batch_size: int = 1,
    seed: int = 0,
    output: Output | None = None,
) -> float:
    """Run the ONNX file with onnxruntime (CPU) and ``segmentor`` in PyTorch on the same random
    normalised images at each ``(H, W)`` of ``sizes``; return the largest difference.

    ``output`` defaults to the kind recorded in the file (``udaseg.output``, else ``"logits"``).
    For logits and probs the result is the max absolute difference over all sizes; for labels it
    is the largest fraction of pixels whose label differs (0.0 = identical).

    Raises:
        ValueError: no sizes, or a size the file does not accept (static export).
        ImportError: onnxruntime missing.
    """
    ort = _require("onnxruntime", "verify_onnx")
    import numpy as np

    if not sizes:
        raise ValueError("verify_onnx: give at least one (H, W) size")
    if output is None:
        output = _onnx_metadata(path).get("udaseg.output", "logits")  # type: ignore[assignment]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    was_training = segmentor.training
    wrapper = SegmentorForExport(segmentor, output).eval()
    param = next(segmentor.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    worst = 0.0
    try:
        for size in sizes:
            h, w = (int(v) for v in size)
            shape = (batch_size, 3, h, w)
            for want, have in zip(shape, inp.shape, strict=True):
                if isinstance(have, int) and have != want:
                    raise ValueError(
                        f"{str(path)!r} has a static input {tuple(inp.shape)}; cannot run it on "
                        f"{shape} (export with dynamic=True for other sizes)"
                    )
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=gen)
            with torch.no_grad():
                ref = wrapper(x.to(device)).cpu().numpy()
            got = session.run(None, {inp.name: x.numpy()})[0]
            if got.shape != ref.shape:
                raise ValueError(
                    f"verify_onnx: output shape {got.shape} != PyTorch {ref.shape} at {(h, w)}"
                )
            if output == "labels":
                diff = float(np.mean(got != ref))
            else:
                diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
            worst = max(worst, diff)
    finally:
        segmentor.train(was_training)
    return worst


# --------------------------------------------------------------------------- checkpoints
_ARCH_KEYS = ("backbone", "head", "num_classes", "head_channels")


def _parse_meta_value(key: str, value: Any) -> Any:
    """safetensors metadata holds strings: ``"None"``, ``"19"``, ``"mit_b5"``."""
    if not isinstance(value, str):
        return value
    if value == "None":
        return None
    if key in ("num_classes", "head_channels"):
        try:
            return int(value)
        except ValueError:
            raise CheckpointError(f"metadata {key}={value!r} is not an integer") from None
    return value


def _parse_hrda_meta(value: str) -> dict[str, Any] | None:
    """The ``hrda`` metadata entry: ``"None"``/``"0"`` (single scale), ``"1"`` (a ``udaseg
    convert`` file: HRDA with default settings) or a JSON dict of settings."""
    if value in ("None", "", "0", "false", "False"):
        return None
    if value in ("1", "true", "True"):
        return {}
    parsed = json.loads(value)
    return parsed if isinstance(parsed, dict) else None


def _read_weights(
    path: Path, which: Literal["student", "teacher"] = "student"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(segmentor state dict without the ``model.`` / ``algorithm.teacher.model.`` prefix,
    architecture settings found)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        from udaseg.models.weights import read_safetensors

        state, meta = read_safetensors(path)
        if which == "teacher" and meta.get("source_model") != "teacher":
            raise CheckpointError(
                f"{str(path)!r} holds one segmentor (exported or converted weights), not the EMA "
                "teacher; use the student weights, or pass the training checkpoint (.ckpt), or "
                f"convert its teacher first (udaseg convert CKPT OUT.safetensors --which teacher)"
            )
        info: dict[str, Any] = {k: _parse_meta_value(k, meta[k]) for k in _ARCH_KEYS if k in meta}
        if "hrda" in meta:
            info["hrda"] = _parse_hrda_meta(meta["hrda"])
        which = "student"  # the file's tensors are the selected model
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler raises many types on bad input
            raise CheckpointError(
                f"{str(path)!r}: torch.load(weights_only=True) could not read this file: {e}"
            ) from e
        if not isinstance(raw, Mapping):
            raise CheckpointError(
                f"{str(path)!r}: expected a checkpoint dict, got {type(raw).__name__}"
            )
        hparams = raw.get("hyper_parameters") or {}
        info = {k: hparams[k] for k in (*_ARCH_KEYS, "hrda", "inference") if k in hparams}
        state = raw.get("state_dict", raw)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{str(path)!r}: 'state_dict' is not a mapping")
        state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if which == "teacher":
        prefix = "algorithm.teacher.model."
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(
                f"{str(path)!r} has no EMA teacher weights ({prefix}*): the run trained without "
                "self-training (source only) or this is not a udaseg training checkpoint; use "
                "the student weights"
            )
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    elif any(k.startswith("model.") for k in state) and not any(
        k.startswith("scale_attention_head.") for k in state
    ):  # Lightning's model.*, not a bare HRDA segmentor's own model.* + scale_attention_head.*
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    state = inference_state(state)  # training-only modules (ICDA's DAR) are not exported
    if not state:
        raise CheckpointError(f"{str(path)!r}: no segmentor weights found")
    return state, info


def load_segmentor_for_export(
    path: str | os.PathLike[str],
    *,
    overrides: Mapping[str, Any] | None = None,
    hrda: Literal["fused", "single-scale"] = "fused",
    which: Literal["student", "teacher"] = "student",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the segmentor stored in a udaseg checkpoint and load its weights (strict).

    ``path``: a udaseg Lightning ``.ckpt`` (the student ``model.*`` weights and the
    ``hyper_parameters`` backbone / head / num_classes / head_channels / hrda), a ``.safetensors``
    file from ``udaseg export-weights`` (the same settings in its metadata), or a plain ``.pth``
    segmentor state dict. ``overrides`` (non-None values win) supplies settings the file lacks.
    For an HRDA checkpoint, ``hrda="fused"`` returns the :class:`HRDASegmentor`, ``"single-scale"``
    its shared network. ``which="teacher"`` loads the EMA teacher (``algorithm.teacher.model.*``)
    of a Lightning checkpoint (a CheckpointError when it has none, or for a ``.safetensors``
    file unless ``udaseg convert --which teacher`` wrote it).

    Returns:
        ``(segmentor in eval mode, settings used)``; settings has ``hrda`` (a dict or None) and,
        for a Lightning checkpoint, ``inference`` (the test-time config dict) when stored.
    """
    p = Path(path)
    state, info = _read_weights(p, which)
    for key, value in (overrides or {}).items():
        if value is not None:
            info[key] = value
    missing = [k for k in ("backbone", "head", "num_classes") if info.get(k) is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise CheckpointError(
            f"{str(p)!r} does not record {', '.join(missing)}; pass {flags} (and --head-channels "
            "if the head width is not the paper's)"
        )
    is_hrda = info.get("hrda") is not None or any(
        k.startswith("scale_attention_head.") for k in state
    )
    model = build_segmentor(
        backbone=str(info["backbone"]),
        head=str(info["head"]),
        num_classes=int(info["num_classes"]),
        drop_path_rate=0.0,
        head_channels=None if info.get("head_channels") is None else int(info["head_channels"]),
    )
    segmentor: nn.Module = model
    if is_hrda:
        info["hrda_settings"] = "checkpoint" if info.get("hrda") else "defaults"
        cfg_dict = dict(info.get("hrda") or {})
        names = {f.name for f in dataclasses.fields(HRDAConfig)}
        cfg = HRDAConfig(**{k: v for k, v in cfg_dict.items() if k in names})
        att = state.get("scale_attention_head.conv_seg.weight")  # DAFormer head
        if att is None:
            att = state.get("scale_attention_head.linear_pred.weight")  # SegFormer head
        if att is not None and cfg.attention_classwise and att.shape[0] == 1:
            cfg = dataclasses.replace(cfg, attention_classwise=False)
        segmentor = HRDASegmentor(model, cfg)
        info["hrda"] = dataclasses.asdict(cfg)
    else:
        info["hrda"] = None
    try:
        segmentor.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{str(p)!r} does not fit {info['backbone']} + {info['head']} "
            f"(num_classes={info['num_classes']}, head_channels={info.get('head_channels')}): {exc}"
        ) from None
    if is_hrda and hrda == "single-scale":
        segmentor = model
    return segmentor.eval(), info


# --------------------------------------------------------------------------- command
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udaseg export",
        description="Export a trained segmentor for whole-image inference (ONNX). The graph takes "
        "a normalised image batch 'image' (B, 3, H, W) float32 and returns logits (B, K, H, W), "
        "probs (B, K, H, W) or labels (B, H, W) int64 at the input resolution.",
    )
    p.add_argument("ckpt", help="udaseg checkpoint (.ckpt) or segmentor weights (.safetensors)")
    p.add_argument("out", help="output file (.onnx)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--height", type=int, default=None,
                   help="example height (the fixed height with --static or fused HRDA; "
                   "default 512, HRDA: the checkpoint's inference crop)")
    p.add_argument("--width", type=int, default=None, help="example width (see --height)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help="ONNX opset (default %(default)s)")
    p.add_argument("--output", default="logits", choices=list(OUTPUTS),
                   help="graph output (default %(default)s)")
    p.add_argument("--static", action="store_true", help="fixed batch 1 and size instead of "
                   "dynamic batch/height/width")
    p.add_argument("--exporter", default="dynamo", choices=list(EXPORTERS),
                   help="torch.onnx exporter (default %(default)s; torchscript = legacy, faster)")
    p.add_argument("--hrda", default="fused", choices=["fused", "single-scale"],
                   help="HRDA checkpoints: the fused multi-resolution model at a fixed size, or "
                   "the shared single-scale network with dynamic sizes (default %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="compare onnxruntime with PyTorch after the export (needs onnxruntime)")
    g = p.add_argument_group("architecture (only for files that do not record it)")
    g.add_argument("--backbone", default=None)
    g.add_argument("--head", default=None)
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--head-channels", type=int, default=None)
    return p


def export_main(argv: Sequence[str]) -> int:
    """``udaseg export CKPT OUT --format onnx [--height H --width W] [--opset N]
    [--output logits|probs|labels] ...``; returns the exit code."""
    a = _build_parser().parse_args(list(argv))
    segmentor, info = load_segmentor_for_export(
        a.ckpt,
        overrides={"backbone": a.backbone, "head": a.head, "num_classes": a.num_classes,
                   "head_channels": a.head_channels},
        hrda=a.hrda,
    )
    fused_hrda = isinstance(segmentor, HRDASegmentor)
    dynamic = not (a.static or fused_hrda)
    height, width = a.height, a.width
    if (height is None) != (width is None):
        raise ConfigError("give both --height and --width, or neither")
    if height is None:
        height = width = 512
        crop = (info.get("inference") or {}).get("crop")
        if fused_hrda:
            if not crop:
                raise ConfigError(
                    "a fused HRDA export has a fixed input size: pass --height and --width "
                    "(or --hrda single-scale for dynamic sizes)"
                )
            height, width = (int(v) for v in crop)
    if fused_hrda and a.exporter != "dynamo":
        raise ConfigError("fused HRDA export needs --exporter dynamo")
    try:
        path = export_onnx(
            segmentor, a.out, opset=a.opset, example_size=(height, width), dynamic=dynamic,
            output=a.output, exporter=a.exporter,
            metadata={f"udaseg.{k}": str(info.get(k)) for k in _ARCH_KEYS},
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if fused_hrda:
        shape = f"fixed 1x3x{height}x{width} (fused HRDA)"
    elif dynamic:
        shape = "dynamic batch x 3 x height x width"
    else:
        shape = f"fixed 1x3x{height}x{width}"
    if info.get("hrda") is not None and not fused_hrda:
        shape += "; HRDA checkpoint exported as its single-scale network"
    print(f"wrote {path} ({a.output}, input {shape}, opset {a.opset})")
    if fused_hrda and info.get("hrda_settings") == "defaults":
        print("note: the file does not record the HRDA settings; the paper defaults "
              f"({info['hrda']}) were used for the fused forward")
    if a.verify:
        sizes = [(height, width)]
        if dynamic:
            sizes.append((height + 32, width + 64))
        diff = verify_onnx(path, segmentor, sizes)
        what = "label mismatch fraction" if a.output == "labels" else "max abs diff"
        print(f"onnxruntime vs PyTorch at {sizes}: {what} {diff:.3g}")
    return 0
