"""``udaseg depth``: write Depth Anything V2 maps for a dataset folder in the ``depth_any/``
layout that the ``depth`` view reads (:mod:`udaseg.data.depth`, CDDA).

::

    udaseg depth DATASET ROOT --model DIR [--splits S ...] [--condition night] [--out DIR]
                 [--input-size 518] [--batch-size 4] [--device cpu|cuda[:N]] [--overwrite]

``DATASET`` is ``cityscapes``, ``gta``, ``synthia``, ``dark_zurich`` or ``folder`` (any folder of
images, searched recursively). The files written for each image::

    cityscapes:  <root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
              -> <root>/depth_any/<split>/<city>/<stem>_depth.png
    gta:         <root>/images/<name>.png        -> <root>/depth_any/<name>.png
    synthia:     <root>/RGB/<name>.png           -> <root>/depth_any/<name>.png
    dark_zurich: <root>/rgb_anon/<split>/<condition>/<rec>/<stem>_rgb_anon.png
              -> <root>/depth_any/<split>/<condition>/<rec>/<stem>_depth.png
    folder:      <root>/<sub>/<name>.<ext>       -> <out>/<sub>/<name>.png   (default out:
                                                    <root>/depth_any, which the search skips)

``--splits`` defaults to every split folder present (cityscapes, dark_zurich).

The model: a Depth Anything V2 checkpoint in the Hugging Face transformers layout
(``config.json`` + ``model.safetensors``, e.g. a local copy of
``depth-anything/Depth-Anything-V2-Small-hf``), loaded with
``AutoModelForDepthEstimation.from_pretrained(DIR, local_files_only=True)``: nothing is
downloaded. transformers is the optional extra ``depth`` (``pip install -e .[depth]``) and is
imported only here. Licences: only **Depth-Anything-V2-Small** is Apache-2.0; the Base, Large and
Giant weights are CC-BY-NC-4.0 (non-commercial). CDDA does not say which encoder or input size
its maps used (``cdda_spec.md`` 14).

What is written is what the official ``run.py --grayscale --pred-only`` writes
(DepthAnything/Depth-Anything-V2 ``run.py`` and ``DepthAnythingV2.infer_image``), per image:

1. RGB / 255, resized keeping the aspect ratio so that both sides are at least ``input_size``
   and multiples of 14 (the official ``Resize(keep_aspect_ratio=True, ensure_multiple_of=14,
   resize_method="lower_bound")``: each side ``round(s * side / 14) * 14``, rounded up instead
   when that falls below ``input_size``, with ``s = max(input_size / H, input_size / W)``);
   bicubic (torch's a = -0.75 kernel with half-pixel centres and no antialiasing, the kernel of
   the official ``cv2.INTER_CUBIC``); then the ImageNet mean / std.
2. The model's relative disparity (ReLU output; larger = nearer), resized back to the image size
   bilinearly with ``align_corners=True`` (as ``infer_image``).
3. ``(d - min) / (max - min) * 255`` truncated to uint8 (as ``run.py``), so each map spans 0..255.
   A constant prediction (max = min) is written as zeros, with a warning.

One difference in the file: ``run.py --grayscale`` repeats the grey map into 3 channels; the
files here are single-channel 8-bit PNGs (the ``depth`` view reads both alike).

Images are processed in batches of images whose network input size is equal (``--batch-size``);
an existing output is skipped unless ``--overwrite`` (so an interrupted run resumes); each file is
written to a temporary name in its folder and renamed into place (never a half-written PNG); an
unreadable image is reported, skipped, and makes the exit status 1 after everything else is done.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

__all__ = [
    "DATASETS", "DepthJob", "DepthRunSummary", "depth_jobs", "depth_main", "disparity_to_uint8",
    "load_depth_model", "network_input_size", "preprocess", "predict_depth_maps",
    "write_depth_maps", "write_png_atomic",
]

DATASETS = ("cityscapes", "gta", "synthia", "dark_zurich", "folder")
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = "pip install -e .[depth]  (or: pip install 'transformers>=4.45')"
#: Depth Anything V2 encoder by the DINOv2 backbone width, with its weights' licence
ENCODERS = {
    384: ("Depth-Anything-V2-Small", "Apache-2.0"),
    768: ("Depth-Anything-V2-Base", "CC-BY-NC-4.0 (non-commercial)"),
    1024: ("Depth-Anything-V2-Large", "CC-BY-NC-4.0 (non-commercial)"),
    1536: ("Depth-Anything-V2-Giant", "CC-BY-NC-4.0 (non-commercial)"),
}


@dataclass(frozen=True)
class DepthJob:
    image: Path
    out: Path


@dataclass
class DepthRunSummary:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    constant: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- the file lists


def _splits(root: Path, base: Path, splits: Sequence[str] | None, dataset: str) -> list[str]:
    if splits:
        missing = [s for s in splits if not (base / s).is_dir()]
        if missing:
            raise ConfigError(f"udaseg depth {dataset}: no split folder "
                              f"{[str(base / s) for s in missing]} in {root}")
        return list(splits)
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and not p.name.endswith("_ref")) if base.is_dir() else []
    if not found:
        raise ConfigError(f"udaseg depth {dataset}: no split folders in {base} (is {root} the "
                          "dataset root?)")
    return found


def _require(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"udaseg depth {dataset}: {path} not found; expected {layout}")
    return path


def _visible(paths) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and not p.name.startswith("."))


def depth_jobs(dataset: str, root: str | os.PathLike[str], splits: Sequence[str] | None = None,
               condition: str = "night", out: str | os.PathLike[str] | None = None
               ) -> list[DepthJob]:
    """``[DepthJob(image, depth file)]`` of a dataset folder, in the layout of the datasets'
    ``depth`` view (module docstring); the depth file need not exist."""
    from ..data.depth import DEPTH_DIR

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"udaseg depth: dataset root {root} not found")
    if out is not None and dataset != "folder":
        raise ConfigError("udaseg depth: --out is for `folder` only; the datasets' depth maps go "
                          f"to <root>/{DEPTH_DIR} where their `depth` view reads them")
    depth_root = root / DEPTH_DIR
    jobs: list[DepthJob] = []
    if dataset == "cityscapes":
        from ..data.datasets.cityscapes import DEPTH_SUFFIX, IMG_SUFFIX

        base = _require(root / "leftImg8bit", dataset, "<root>/leftImg8bit/<split>/<city>/*"
                        + IMG_SUFFIX)
        for split in _splits(root, base, splits, dataset):
            for img in _visible((base / split).glob(f"*/*{IMG_SUFFIX}")):
                stem = img.name[: -len(IMG_SUFFIX)]
                jobs.append(DepthJob(img, depth_root / split / img.parent.name
                                     / f"{stem}{DEPTH_SUFFIX}"))
    elif dataset in ("gta", "synthia"):
        folder = "images" if dataset == "gta" else "RGB"
        base = _require(root / folder, dataset, f"<root>/{folder}/<name>.png")
        jobs = [DepthJob(img, depth_root / img.name) for img in _visible(base.glob("*.png"))]
    elif dataset == "dark_zurich":
        from ..data.datasets.dark_zurich import DEPTH_SUFFIX, IMG_SUFFIX

        base = _require(root / "rgb_anon", dataset,
                        "<root>/rgb_anon/<split>/<condition>/<rec>/*" + IMG_SUFFIX)
        for split in _splits(root, base, splits, dataset):
            cdir = base / split / condition
            if not cdir.is_dir():
                if splits:
                    raise FileNotFoundError(f"udaseg depth dark_zurich: {cdir} not found")
                continue
            for img in _visible(cdir.glob(f"*/*{IMG_SUFFIX}")):
                stem = img.name[: -len(IMG_SUFFIX)]
                jobs.append(DepthJob(img, depth_root / split / condition / img.parent.name
                                     / f"{stem}{DEPTH_SUFFIX}"))
    elif dataset == "folder":
        from .segment import IMAGE_SUFFIXES

        out_dir = Path(out) if out is not None else depth_root
        out_abs = out_dir.resolve()
        seen: dict[Path, Path] = {}
        for img in sorted(root.rglob("*")):
            rel = img.relative_to(root)
            if (not img.is_file() or img.suffix.lower() not in IMAGE_SUFFIXES
                    or any(part.startswith(".") for part in rel.parts)
                    or img.resolve().is_relative_to(out_abs)):
                continue
            target = out_dir / rel.with_suffix(".png")
            if target in seen:
                raise ConfigError(f"udaseg depth folder: {seen[target]} and {img} would both "
                                  f"write {target}; rename one of them")
            seen[target] = img
            jobs.append(DepthJob(img, target))
    else:
        raise ConfigError(f"udaseg depth: unknown dataset {dataset!r}; choose from {DATASETS}")
    return jobs


# ----------------------------------------------------------------------------- the model


def load_depth_model(path: str | os.PathLike[str], device: str = "cpu"):
    """A Depth Anything (V2) ``...ForDepthEstimation`` from a local HF transformers folder,
    in eval mode on ``device``; never downloads."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"udaseg depth: --model {path} is not a Hugging Face checkpoint folder (no "
            "config.json); pass a local folder holding config.json and model.safetensors, e.g. a "
            "copy of depth-anything/Depth-Anything-V2-Small-hf (Apache-2.0)")
    try:
        import transformers
        from transformers import AutoModelForDepthEstimation
    except ImportError:
        raise ConfigError(f"udaseg depth needs the transformers package: {INSTALL_HINT}") from None
    import torch

    try:
        model = AutoModelForDepthEstimation.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"udaseg depth: cannot load the model in {path} with transformers "
                          f"{transformers.__version__}: {exc}") from None
    kind = getattr(model.config, "model_type", None)
    if kind != "depth_anything":
        raise ConfigError(f"udaseg depth: {path} holds a {kind!r} model; a Depth Anything V2 "
                          "checkpoint (model_type 'depth_anything') is needed")
    if getattr(model.config, "depth_estimation_type", "relative") != "relative":
        raise ConfigError(f"udaseg depth: {path} is a metric-depth model; CDDA's maps come from "
                          "the relative (disparity) Depth Anything V2 models")
    return model.to(torch.device(device)).eval()


def describe_model(model) -> str:
    width = getattr(getattr(model.config, "backbone_config", None), "hidden_size", None)
    name, licence = ENCODERS.get(width, (f"an unknown Depth Anything size (width {width})",
                                         "see the model card"))
    return f"{name}, weights licence {licence}"


# ----------------------------------------------------------------------------- the computation


def network_input_size(height: int, width: int, input_size: int = 518,
                       multiple: int = PATCH) -> tuple[int, int]:
    """(H', W') the official ``image2tensor`` resizes an H x W image to (module docstring)."""
    if input_size < multiple or input_size % multiple:
        raise ConfigError(f"udaseg depth: --input-size {input_size} must be a positive multiple "
                          f"of {multiple} (the official default is 518)")
    scale = max(input_size / height, input_size / width)

    def side(x: float) -> int:
        y = int(np.round(x / multiple) * multiple)  # numpy's round half to even, as the original
        if y < input_size:
            y = int(np.ceil(x / multiple) * multiple)
        return y

    return side(scale * height), side(scale * width)


def preprocess(images: Sequence[np.ndarray], input_size: int = 518, device: str = "cpu"):
    """Equal-size (H, W, 3) uint8 RGB images -> (B, 3, H', W') float32 network input."""
    import torch
    import torch.nn.functional as F

    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError("preprocess: images of one batch must have the same size")
    x = torch.from_numpy(np.stack(images)).to(torch.device(device)).permute(0, 3, 1, 2)
    x = x.float() / 255.0
    size = network_input_size(h, w, input_size)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def disparity_to_uint8(disparity, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """(H', W') disparity tensor -> ((H, W) uint8 map, constant?): bilinear (align_corners=True)
    to ``size``, min-max to 0..255, truncated as ``run.py``."""
    import torch
    import torch.nn.functional as F

    d = F.interpolate(disparity[None, None].float(), size=size, mode="bilinear",
                      align_corners=True)[0, 0]
    lo, hi = d.min(), d.max()
    if not bool(hi > lo):
        return np.zeros(size, np.uint8), True
    d = (d - lo) / (hi - lo) * 255.0
    return d.clamp(0, 255).to(torch.uint8).cpu().numpy(), False


def predict_depth_maps(model, images: Sequence[np.ndarray], input_size: int = 518,
                       device: str = "cpu") -> list[tuple[np.ndarray, bool]]:
    """The uint8 maps of equal-size RGB images (one forward pass), with a constant flag each."""
    import torch

    x = preprocess(images, input_size, device)
    with torch.inference_mode():
        disp = model(pixel_values=x).predicted_depth
    size = images[0].shape[:2]
    return [disparity_to_uint8(disp[i], size) for i in range(len(images))]


def write_png_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as a PNG at ``path`` via a temporary file in the same folder + rename."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read(path: Path) -> np.ndarray | tuple[str]:
    from ..data.io import read_image

    try:
        return read_image(path)
    except (DataError, OSError) as exc:
        return (str(exc),)


def write_depth_maps(model, jobs: Sequence[DepthJob], *, input_size: int = 518,
                     batch_size: int = 4, device: str = "cpu", overwrite: bool = False,
                     progress: bool = True, workers: int = 2, log=print) -> DepthRunSummary:
    """Write the depth map of every job (skipping existing ones unless ``overwrite``)."""
    from concurrent.futures import ThreadPoolExecutor

    if batch_size < 1:
        raise ConfigError(f"udaseg depth: --batch-size must be >= 1 (got {batch_size})")
    network_input_size(input_size, input_size, input_size)  # validates input_size
    summary = DepthRunSummary()
    todo = [j for j in jobs if overwrite or not j.out.is_file()]
    summary.skipped = len(jobs) - len(todo)
    bar = task = None
    if progress and todo:
        from rich.progress import Progress

        bar = Progress(transient=False)
        task = bar.add_task("depth maps", total=len(todo))
        bar.start()
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
            # read one chunk ahead of the model (never the whole dataset at once)
            nxt = [pool.submit(_read, j.image) for j in chunks[0]] if chunks else []
            for k, chunk in enumerate(chunks):
                arrays = [f.result() for f in nxt]
                nxt = ([pool.submit(_read, j.image) for j in chunks[k + 1]]
                       if k + 1 < len(chunks) else [])
                groups: dict[tuple[int, int], list[tuple[DepthJob, np.ndarray]]] = {}
                for job, arr in zip(chunk, arrays):
                    if isinstance(arr, tuple):
                        summary.failed.append((job.image, arr[0]))
                        log(f"udaseg depth: skipped {job.image}: {arr[0]}")
                        continue
                    groups.setdefault(arr.shape[:2], []).append((job, arr))
                for items in groups.values():
                    maps = predict_depth_maps(model, [a for _, a in items], input_size, device)
                    for (job, _), (depth, constant) in zip(items, maps):
                        if constant:
                            summary.constant.append(job.image)
                            log(f"udaseg depth: warning: constant prediction for {job.image}; "
                                "written as zeros")
                        write_png_atomic(job.out, depth)
                        summary.written += 1
                if bar is not None:
                    bar.advance(task, len(chunk))
    finally:
        if bar is not None:
            bar.stop()
    return summary


# ----------------------------------------------------------------------------- the command


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udaseg depth",
        description="Write Depth Anything V2 depth maps (8-bit, larger = nearer, min-max per "
                    "image: the official run.py --grayscale --pred-only output) in the depth_any/ "
                    "layout of the datasets' `depth` view (CDDA).",
        epilog="The model is a LOCAL Hugging Face transformers folder (config.json + "
               "model.safetensors), e.g. a copy of depth-anything/Depth-Anything-V2-Small-hf; "
               "nothing is downloaded. Only Depth-Anything-V2-Small is Apache-2.0; Base, Large "
               "and Giant are CC-BY-NC-4.0. Needs transformers: " + INSTALL_HINT)
    p.add_argument("dataset", choices=DATASETS, help="dataset layout of ROOT")
    p.add_argument("root", metavar="ROOT", help="dataset root (or, for `folder`, any image folder)")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="local Depth Anything V2 checkpoint folder (HF transformers layout)")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help="cityscapes/dark_zurich: the splits to do (default: every split folder)")
    p.add_argument("--condition", default="night", help="dark_zurich: condition folder (night)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder: output folder (default ROOT/depth_any)")
    p.add_argument("--input-size", type=int, default=518,
                   help="short side of the network input, a multiple of 14 (official: 518)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (4)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--workers", type=int, default=2, help="image-reading threads (2)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute existing maps (default: skip them, so a run resumes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def depth_main(argv: Sequence[str]) -> int:
    """``udaseg depth DATASET ROOT --model DIR ...``; returns the exit status."""
    a = _build_parser().parse_args(list(argv))
    jobs = depth_jobs(a.dataset, a.root, a.splits, a.condition, a.out)
    if not jobs:
        raise ConfigError(f"udaseg depth {a.dataset}: no images found in {a.root}")
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("udaseg depth: --device cuda but no CUDA GPU is available")
    network_input_size(a.input_size, a.input_size, a.input_size)
    model = load_depth_model(a.model, a.device)
    out_root = Path(a.out) if a.out else Path(a.root) / "depth_any"
    print(f"udaseg depth: {len(jobs)} image(s) in {a.root} -> {out_root}; model {a.model} "
          f"({describe_model(model)}), input size {a.input_size}, device {a.device}")
    s = write_depth_maps(model, jobs, input_size=a.input_size, batch_size=a.batch_size,
                         device=a.device, overwrite=a.overwrite, progress=not a.quiet,
                         workers=a.workers)
    print(f"udaseg depth: {s.written} written, {s.skipped} already there (skipped; --overwrite "
          f"to redo), {len(s.failed)} unreadable")
    if s.failed:
        print(f"udaseg depth: {len(s.failed)} image(s) could not be read and have no depth map:",
              *(f"  {p}" for p, _ in s.failed[:20]), sep="\n")
        if len(s.failed) > 20:
            print(f"  ... and {len(s.failed) - 20} more")
        return 1
    return 0
