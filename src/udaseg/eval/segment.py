"""``udaseg segment``: semantic segmentation of your own images, folders and videos.

::

    udaseg segment INPUT... --ckpt CKPT --out DIR [--weights student|teacher] [--mode whole|slide]
                   [--device cpu|cuda] [--batch-size N] [--confidence] [--overwrite] [--quiet]

``INPUT`` is any mix of image files, folders (searched recursively for image and video files;
names starting with ``.`` and anything inside ``DIR`` are left out) and video files
(:data:`VIDEO_SUFFIXES`). ``CKPT`` is a udaseg Lightning checkpoint (``.ckpt``: the student, or
the EMA teacher with ``--weights teacher``, and the architecture and test-time inference settings
from its ``hyper_parameters``), a ``.safetensors`` file from ``udaseg export-weights`` or one from
``udaseg convert`` (architecture from the file's metadata). Loading is
:func:`udaseg.eval.onnx_export.load_segmentor_for_export`; inference is
:func:`udaseg.eval.inference.predict` (whole image, or sliding windows with the checkpoint's
``model.inference`` crop and stride), on the image normalised as in training
(:class:`udaseg.data.transforms.Normalize`), at the image's own size and aspect ratio.

Outputs, for an input at relative path ``sub/a.jpg`` (relative to the deepest folder that holds
every input: a folder given alone is that folder, files are taken with their parent folder)::

    DIR/labelTrainIds/sub/a.png   uint8 train IDs (0..K-1), the input's height and width
    DIR/color/sub/a.png           RGB, the Cityscapes palette (``udaseg.data.classes``)
    DIR/overlay/sub/a.png         RGB, the image blended with the colours (``--alpha``, 0.5)
    DIR/confidence/sub/a.png      uint16, max softmax x 65535 (only with ``--confidence``)
    DIR/overlay/sub/clip.mp4      for a video ``sub/clip.mov``: the overlay video (H.264, the
                                  input's frame rate; no audio; an odd width or height is padded
                                  by one edge pixel, as 4:2:0 video needs even sides)

Two inputs with the same stem in one folder (``a.jpg``, ``a.png``) keep their suffix in the
output name (``a.jpg.png``, ``a.png.png``). Images are read with Pillow (any mode: greyscale,
palette, RGBA (alpha ignored), 16-bit greyscale; JPEG EXIF orientation is applied, so the outputs
line up with the image as viewers show it). Images whose sides are under what the network needs
(32 pixels for MiT, more for HRDA) are upscaled for the network and the prediction is resized
back. A batch (``--batch-size``) holds images of one size only.

Existing outputs are kept unless ``--overwrite``: an image whose outputs all exist is skipped
(the summary counts them); missing ones (e.g. a first ``--confidence`` run) are added. Every file
is written atomically (temporary file + rename). An unreadable image or video is reported on one
line and skipped. The exit status is 0 when at least one input was segmented or skipped because
its outputs exist, 1 when none was (every input failed); the summary lists every failure.

Videos need PyAV (``pip install 'udaseg[video]'``), imported only when a video is given.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from udaseg.data.transforms import Normalize
from udaseg.errors import ConfigError, DataError
from udaseg.eval.export import CONFIDENCE_SCALE, _write_png
from udaseg.eval.inference import predict, resize_logits
from udaseg.eval.onnx_export import load_segmentor_for_export
from udaseg.eval.report import _overlay, colorize
from udaseg.models.hrda import HRDASegmentor

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "InputFile",
    "SegmentModel",
    "SegmentSummary",
    "collect_inputs",
    "load_model",
    "read_user_image",
    "segment_inputs",
    "segment_main",
]

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif",
)
"""Suffixes (any case) picked up in folders; a file given by name is read whatever its suffix."""
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm")
MIT_MIN_SIDE = 32
"""Smallest side MiT takes (its stage-1 attention reduces H/4 x W/4 by a stride-8 convolution)."""
VIDEO_EXTRA_HINT = "pip install 'udaseg[video]' (or: pip install av)"
_VIDEO_CODECS = ("libx264", "h264", "mpeg4")

Kind = Literal["labelTrainIds", "color", "overlay", "confidence"]


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    """One input: ``path`` (absolute), ``rel`` (its output path under each kind folder, without
    the output suffix) and whether it is a video."""

    path: Path
    rel: Path
    video: bool

    def outputs(self, out_dir: Path, confidence: bool) -> dict[Kind, Path]:
        """The files this input writes under ``out_dir``, by kind."""
        if self.video:
            return {"overlay": out_dir / "overlay" / self.rel.with_name(self.rel.name + ".mp4")}
        name = self.rel.name + ".png"
        kinds: tuple[Kind, ...] = ("labelTrainIds", "color", "overlay")
        if confidence:
            kinds += ("confidence",)
        return {k: out_dir / k / self.rel.with_name(name) for k in kinds}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
                   ) -> list[InputFile]:
    """Expand files and folders into :class:`InputFile` entries (each file once, input order,
    folders sorted).

    Raises:
        FileNotFoundError: an input does not exist.
        DataError: a folder holds no image or video file.
    """
    out = Path(out_dir).resolve()
    wanted = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    roots: list[Path] = []
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"input not found: {str(raw)!r} (resolved: {p.resolve()})")
        p = p.resolve()
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.suffix.lower() in wanted and f.is_file() and not _hidden(f, p)
                and not _inside(f, out)
            )
            if not found:
                raise DataError(
                    f"{raw}: no image or video files in this folder or below it (looked for "
                    f"{', '.join(wanted)}); give the files themselves if they have other suffixes"
                )
            roots.append(p)
            files.extend(found)
        else:
            roots.append(p.parent)
            files.append(p)
    files = list(dict.fromkeys(files))
    base = Path(os.path.commonpath([str(r) for r in roots]))
    rels = [f.relative_to(base) for f in files]
    stems: dict[tuple[Path, str], int] = {}
    for r in rels:
        key = (r.parent, r.stem)
        stems[key] = stems.get(key, 0) + 1
    return [
        InputFile(
            path=f,
            rel=r if stems[(r.parent, r.stem)] > 1 else r.with_suffix(""),
            video=f.suffix.lower() in VIDEO_SUFFIXES,
        )
        for f, r in zip(files, rels)
    ]


def read_user_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB: EXIF orientation applied, alpha dropped,
    greyscale/palette expanded, 16-bit greyscale scaled to 8 bits.

    Raises:
        DataError: the file is not a readable image (naming the file).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16"):
                grey = np.asarray(im, dtype=np.float32) / 257.0
                grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode == "P":  # palette transparency is expressed per index: go through RGBA
                im = im.convert("RGBA")
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        detail = str(exc).replace(f" {str(path)!r}", "").replace(str(path), "the file")
        raise DataError(f"{path}: not a readable image, the file is damaged or of another kind "
                        f"(Pillow: {detail})") from None


# --------------------------------------------------------------------------- model
@dataclass
class SegmentModel:
    """A segmentor ready for :meth:`segment`, with its inference settings."""

    segmentor: nn.Module
    num_classes: int
    device: torch.device
    mode: Literal["whole", "slide"] = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    batch_windows: int | None = 1
    min_side: int = MIT_MIN_SIDE
    size_divisor: int = 1
    description: str = ""
    notes: list[str] = field(default_factory=list)

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Train IDs and confidence of ``(B, H, W, 3)`` uint8 RGB images of one size.

        The images are normalised as in training, upscaled when a side is under ``min_side``,
        padded to multiples of ``size_divisor`` (HRDA), run through :func:`predict`; the logits
        are cropped back and resized (bilinear) to ``(H, W)``.

        Returns:
            ``labels (B, H, W)`` (uint8, or int64 above 256 classes) and ``confidence (B, H, W)``
            float32, the max softmax probability.
        """
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        x = Normalize(keys=("image",))({"image": x})["image"].to(self.device)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if min(size) < self.min_side:  # too small for the network: upscale, predict, resize back
            scale = self.min_side / min(size)
            x = F.interpolate(x, size=(math.ceil(size[0] * scale), math.ceil(size[1] * scale)),
                              mode="bilinear", align_corners=False)
        net_h, net_w = int(x.shape[-2]), int(x.shape[-1])
        pad_h, pad_w = -net_h % self.size_divisor, -net_w % self.size_divisor
        if pad_h or pad_w:  # HRDA's strides must divide the input: pad with 0 (= the mean)
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        logits = predict(
            self.segmentor, x, self.mode, crop_size=self.crop, stride=self.stride,
            num_classes=self.num_classes, batch_windows=self.batch_windows, output="logits",
        )
        logits = resize_logits(logits[:, :, :net_h, :net_w], size)
        probs = logits.float().softmax(dim=1)
        conf, labels = probs.max(dim=1)
        dtype = np.uint8 if self.num_classes <= 256 else np.int64
        return labels.cpu().numpy().astype(dtype), conf.cpu().numpy()


def _pair_setting(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def _min_side(segmentor: nn.Module) -> int:
    """Smallest image side the segmentor takes: MiT's 32, for HRDA the side whose context view
    and detail crop are both at least that."""
    if not isinstance(segmentor, HRDASegmentor):
        return MIT_MIN_SIDE
    side = MIT_MIN_SIDE
    while side < 1 << 14:
        try:
            if min(segmentor.context_size(side, side)) >= MIT_MIN_SIDE and min(
                segmentor.detail_crop_size(side, side)
            ) >= MIT_MIN_SIDE:
                return side
        except ValueError:
            pass
        side += 1
    return side


def _size_divisor(segmentor: nn.Module) -> int:
    """HRDA's context and detail strides must divide the input sides: the least common multiple
    of ``crop_divisor`` and the context-logit stride (4 / ``context_scale``); 1 otherwise."""
    if not isinstance(segmentor, HRDASegmentor):
        return 1
    cfg = segmentor.cfg
    return math.lcm(int(cfg.crop_divisor), max(1, round(4 / cfg.context_scale)))


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch.device (default: ``cuda`` when a GPU is visible, else ``cpu``)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return dev


def load_model(
    ckpt: str | os.PathLike[str],
    *,
    weights: Literal["student", "teacher"] = "student",
    mode: Literal["whole", "slide"] | None = None,
    crop: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> SegmentModel:
    """Rebuild the segmentor of ``ckpt`` (module docstring) for :meth:`SegmentModel.segment`.

    ``mode``, ``crop`` and ``stride`` default to the checkpoint's ``model.inference`` settings
    (whole image when it records none).

    Raises:
        CheckpointError: unreadable file, weights that do not fit, no EMA teacher.
        ConfigError: slide inference without a window, a bad device.
    """
    if weights not in ("student", "teacher"):
        raise ConfigError(f"--weights must be student or teacher, got {weights!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    segmentor, info = load_segmentor_for_export(ckpt, which=weights)
    inference = dict(info.get("inference") or {})
    chosen = mode or inference.get("mode") or "whole"
    if chosen not in ("whole", "slide"):
        raise ConfigError(f"--mode must be whole or slide, got {chosen!r}")
    crop_hw = _pair_setting(crop if crop is not None else inference.get("crop"))
    stride_hw = _pair_setting(stride if stride is not None else inference.get("stride"))
    if chosen == "slide":
        if crop_hw is None or stride_hw is None:
            raise ConfigError(
                f"{ckpt}: --mode slide needs a window, and the file records no model.inference "
                "crop/stride; pass --crop H W --stride H W"
            )
        if stride_hw[0] > crop_hw[0] or stride_hw[1] > crop_hw[1] or min(*crop_hw, *stride_hw) < 1:
            raise ConfigError(
                f"--stride {stride_hw} must be positive and at most --crop {crop_hw}"
            )
    hrda = isinstance(segmentor, HRDASegmentor)
    divisor = _size_divisor(segmentor)
    if chosen == "slide" and crop_hw is not None and (crop_hw[0] % divisor or crop_hw[1] % divisor):
        raise ConfigError(
            f"--crop {crop_hw[0]} {crop_hw[1]}: an HRDA model needs windows whose sides are "
            f"multiples of {divisor}"
        )
    notes = []
    if hrda and info.get("hrda_settings") == "defaults":
        notes.append(f"{ckpt} does not record its HRDA settings; the paper defaults are used")
    parts = [f"{info.get('backbone')} + {info.get('head')}", "HRDA" if hrda else "",
             f"{weights} weights", f"{chosen} inference"
             + (f" (crop {crop_hw}, stride {stride_hw})" if chosen == "slide" else ""), str(dev)]
    return SegmentModel(
        segmentor=segmentor.to(dev).eval(),
        num_classes=int(info["num_classes"]),
        device=dev,
        mode=chosen,
        crop=crop_hw,
        stride=stride_hw,
        batch_windows=inference.get("batch_windows", 1),
        min_side=_min_side(segmentor),
        size_divisor=divisor,
        description=", ".join(p for p in parts if p),
        notes=notes,
    )


# --------------------------------------------------------------------------- writing
def _write_outputs(todo: dict[Kind, Path], image: np.ndarray, labels: np.ndarray,
                   conf: np.ndarray, alpha: float) -> None:
    for kind, path in todo.items():
        if kind == "labelTrainIds":
            _write_png(path, labels)
        elif kind == "color":
            _write_png(path, colorize(labels))
        elif kind == "overlay":
            _write_png(path, _overlay(image, labels, alpha))
        else:
            _write_png(path, np.rint(conf.astype(np.float64) * CONFIDENCE_SCALE).astype(np.uint16))


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ConfigError(f"reading videos needs PyAV: {VIDEO_EXTRA_HINT}") from None
    return av


def _av_reason(exc: BaseException) -> str:
    """FFmpeg's reason without the errno and the file name PyAV adds."""
    return str(getattr(exc, "strerror", None) or exc)


def _has_encoder(av: Any, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 (PyAV raises its own error types for unknown codecs)
        return False
    return True


def _video_codec(av: Any) -> str:
    for name in _VIDEO_CODECS:
        if _has_encoder(av, name):
            return name
    raise ConfigError(f"this PyAV build has none of the encoders {_VIDEO_CODECS}; reinstall av")


def _segment_video(model: SegmentModel, src: Path, dst: Path, *, batch_size: int, alpha: float,
                   on_frames: Callable[[int, int | None], None]) -> int:
    """Write the overlay video of ``src`` to ``dst`` (atomically); returns the frame count.
    ``on_frames(done, total)`` reports progress. Raises DataError for an unreadable video."""
    av = _import_av()
    try:
        container = av.open(str(src))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{src}: cannot open the video ({_av_reason(exc)})") from None
    frames = 0
    with container:
        if not container.streams.video:
            raise DataError(f"{src}: no video stream in this file (or the file is truncated)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = int(stream.frames) or None
        rate = stream.average_rate or stream.guessed_rate or 25
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".mp4")
        os.close(fd)
        try:
            with av.open(tmp, "w", format="mp4") as out:
                ostream = None
                batch: list[np.ndarray] = []

                def flush() -> None:
                    nonlocal ostream, frames
                    if not batch:
                        return
                    labels, _ = model.segment(np.stack(batch))
                    for image, lab in zip(batch, labels):
                        frame = _overlay(image, lab, alpha)
                        h, w = frame.shape[:2]
                        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                        if ostream is None:
                            ostream = out.add_stream(_video_codec(av), rate=rate)
                            ostream.width, ostream.height = frame.shape[1], frame.shape[0]
                            ostream.pix_fmt = "yuv420p"
                        for packet in ostream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")):
                            out.mux(packet)
                        frames += 1
                    batch.clear()
                    on_frames(frames, total)

                try:
                    for decoded in container.decode(stream):
                        image = decoded.to_ndarray(format="rgb24")
                        if batch and image.shape != batch[0].shape:
                            raise DataError(
                                f"{src}: the frame size changes from {batch[0].shape[1]}x"
                                f"{batch[0].shape[0]} to {image.shape[1]}x{image.shape[0]}"
                            )
                        batch.append(image)
                        if len(batch) >= batch_size:
                            flush()
                except av.error.FFmpegError as exc:
                    raise DataError(f"{src}: cannot decode the video ({_av_reason(exc)})") from None
                flush()
                if ostream is None:
                    raise DataError(f"{src}: the video has no frames")
                for packet in ostream.encode(None):
                    out.mux(packet)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return frames


# --------------------------------------------------------------------------- the run
@dataclass
class SegmentSummary:
    """What :func:`segment_inputs` did: inputs segmented (images, videos and their frames),
    skipped because their outputs exist, failed (path, reason), and files written."""

    images: int = 0
    videos: int = 0
    frames: int = 0
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    written: int = 0
    kept: int = 0

    @property
    def ok(self) -> bool:
        """At least one input was segmented or already had its outputs."""
        return bool(self.images or self.videos or self.skipped)

    def format(self, out_dir: Path) -> str:
        parts = [f"segmented {self.images} image(s)"]
        if self.videos:
            parts.append(f"{self.videos} video(s) ({self.frames} frames)")
        lines = [", ".join(parts) + f": {self.written} file(s) written to {out_dir}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} input(s) whose outputs exist (--overwrite "
                         "replaces them)")
        if self.kept:
            lines.append(f"kept {self.kept} existing output file(s) (--overwrite replaces them)")
        if self.failed:
            lines.append(f"failed {len(self.failed)} input(s):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.failed)
        return "\n".join(lines)


class _Progress:
    """A rich progress bar over the inputs (and the frames of the current video), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import Progress

            self.bar = Progress(transient=False)
            self.files = self.bar.add_task("segmenting", total=total)
            self.frames: Any = None

    def start(self) -> None:
        if self.bar is not None:
            self.bar.start()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.files, n)

    def video_frames(self, name: str) -> Callable[[int, int | None], None]:
        """A frame counter for one video, shown until :meth:`video_done`."""
        if self.bar is None:
            return lambda done, total: None
        self.frames = self.bar.add_task(f"  {name}", total=None)

        def update(done: int, total: int | None) -> None:
            self.bar.update(self.frames, completed=done, total=total)

        return update

    def video_done(self) -> None:
        if self.bar is not None and self.frames is not None:
            self.bar.remove_task(self.frames)
            self.frames = None


def segment_inputs(
    model: SegmentModel,
    inputs: Sequence[InputFile],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 1,
    confidence: bool = False,
    overwrite: bool = False,
    alpha: float = 0.5,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> SegmentSummary:
    """Segment every input and write its outputs (see the module docstring).

    ``report(line)`` receives one line per unreadable input (default: stderr). Images are
    batched ``batch_size`` at a time among images of the same size.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {alpha}")
    out = Path(out_dir)
    say = report or (lambda line: print(line, file=sys.stderr))
    summary = SegmentSummary()

    def fail(path: Path, exc: Exception) -> None:
        reason = str(exc).removeprefix(f"{path}: ")
        summary.failed.append((path, reason))
        say(f"udaseg segment: {path}: {reason} (skipped)")

    # images of one size wait in a group until it is full; at most 2 batches wait in all
    pending: dict[tuple[int, ...], list[tuple[np.ndarray, dict[Kind, Path]]]] = {}

    def run(group_key: tuple[int, ...], bar: _Progress) -> None:
        group = pending.pop(group_key)
        labels, conf = model.segment(np.stack([image for image, _ in group]))
        for (image, todo), lab, c in zip(group, labels, conf):
            _write_outputs(todo, image, lab, c, alpha)
            summary.written += len(todo)
            summary.images += 1
        bar.advance(len(group))

    bar = _Progress(progress, len(inputs))
    bar.start()
    try:
        for item in inputs:
            targets = item.outputs(out, confidence)
            todo = {k: p for k, p in targets.items() if overwrite or not p.exists()}
            if not todo:
                summary.skipped.append(item.path)
                bar.advance()
                continue
            summary.kept += len(targets) - len(todo)
            if item.video:
                try:
                    summary.frames += _segment_video(
                        model, item.path, todo["overlay"], batch_size=batch_size, alpha=alpha,
                        on_frames=bar.video_frames(item.path.name),
                    )
                    summary.videos += 1
                    summary.written += 1
                except DataError as exc:
                    fail(item.path, exc)
                bar.video_done()
                bar.advance()
                continue
            try:
                image = read_user_image(item.path)
            except DataError as exc:
                fail(item.path, exc)
                bar.advance()
                continue
            key = image.shape
            pending.setdefault(key, []).append((image, todo))
            if len(pending[key]) >= batch_size:
                run(key, bar)
            elif sum(len(g) for g in pending.values()) > 2 * batch_size:
                run(next(iter(pending)), bar)
        while pending:
            run(next(iter(pending)), bar)
    finally:
        bar.stop()
    return summary


# --------------------------------------------------------------------------- command
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udaseg segment",
        description="Segment your own images, folders (recursively) and videos with a trained "
        "model. Writes DIR/labelTrainIds, DIR/color, DIR/overlay (and DIR/confidence), mirroring "
        "the inputs' relative paths; a video gives DIR/overlay/<name>.mp4. Exit status 0 when at "
        "least one input was segmented (or already had its outputs), else 1.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, video files (" + " ".join(VIDEO_SUFFIXES) + ")")
    p.add_argument("--ckpt", required=True,
                   help="udaseg Lightning checkpoint (.ckpt), or .safetensors from "
                   "`udaseg export-weights` / `udaseg convert`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--weights", default="student", choices=["student", "teacher"],
                   help="the student or the EMA teacher of a .ckpt (default %(default)s)")
    p.add_argument("--mode", default=None, choices=["whole", "slide"],
                   help="whole image or sliding windows (default: the checkpoint's "
                   "model.inference.mode, else whole)")
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="slide window (default: the checkpoint's model.inference.crop)")
    p.add_argument("--stride", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="slide step (default: the checkpoint's model.inference.stride)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images (of one size) or video frames per network call (default 1)")
    p.add_argument("--confidence", action="store_true",
                   help="also write DIR/confidence/*.png: uint16 max softmax x 65535")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the class colours in the overlays (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (default: keep them and skip those inputs)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no summary; unreadable inputs are still reported")
    return p


def segment_main(argv: Sequence[str]) -> int:
    """``udaseg segment INPUT... --ckpt CKPT --out DIR ...``; returns the exit status."""
    a = _build_parser().parse_args(list(argv))
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {a.batch_size}")
    if not 0.0 <= a.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {a.alpha}")
    out = Path(a.out)
    inputs = collect_inputs(a.inputs, out)
    n_videos = sum(item.video for item in inputs)
    if n_videos:
        _import_av()  # fail before loading the model
    model = load_model(a.ckpt, weights=a.weights, mode=a.mode, crop=a.crop, stride=a.stride,
                       device=a.device)
    if not a.quiet:
        print(f"udaseg segment: {len(inputs) - n_videos} image(s), {n_videos} video(s) -> {out} "
              f"({model.description})")
        for note in model.notes:
            print(f"note: {note}")
    summary = segment_inputs(
        model, inputs, out, batch_size=a.batch_size, confidence=a.confidence,
        overwrite=a.overwrite, alpha=a.alpha, progress=not a.quiet,
    )
    if not a.quiet:
        print(summary.format(out))
    return 0 if summary.ok else 1
