"""Write a SynthNight copy to disk in the Cityscapes / Dark Zurich / DSEC layouts.

Layout under ``root`` (``<day>`` = ``<city>_<seq:06d>_000019``, ``<n>`` = ``<rec>_frame_<k:06d>``)::

    synthnight.json                                            written last: marks a complete copy
    cityscapes/leftImg8bit/{train,val}/<city>/<day>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<day>_gtFine_labelTrainIds.png
    cityscapes/depth_any/{train,val}/<city>/<day>_depth.png      (with_depth; CDDA's source depth)
    dark_zurich/rgb_anon/{train,val}/night/<rec>/<n>_rgb_anon.png
    dark_zurich/rgb_anon/{train,val}_ref/day/<rec>_ref/<n>_ref_rgb_anon.png   (with_refs)
    dark_zurich/gt/val/night/<rec>/<n>_gt_labelTrainIds.png
    dark_zurich/depth_any/{train,val}/night/<rec>/<n>_depth.png  (with_depth)
    dark_zurich/events/{train,val}/night/<rec>/<n>_events.h5     (with_events)

Determinism: image ``i`` of split ``s`` draws all its randomness from
``SeedSequence(seed, spawn_key=(split_code(s), i, purpose))``, so the copy is a pure function of
(seed, size, counts, version), and changing one split's count changes no other split's files.
Day and night scenes are different scenes (unpaired domains). A night image's day reference shows
the same static street from a slightly moved camera (shift up to ``REF_SHIFT`` = 4 % of the image
size, zoom in ``REF_ZOOM`` = 0.95-1.05) with re-drawn traffic, like Dark Zurich's GPS-matched
day/night pairs. The night frame of ``events.h5`` number ``i`` is at ``t_offset + 50 ms`` with
``t_offset = (i + 1) s``: the events cover the 50 ms before the frame.

``synthnight.json`` holds the parameters (compared to decide whether a copy is already there)
and, under ``stats``, per split: pixels per class, mean luminance (0..255) and mean event count.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from udaseg.data.classes import CITYSCAPES_CLASSES, NUM_CLASSES

from .events import EventSimConfig, EventStream, simulate_events, write_events_h5
from .render import DayStyle, NightParams, NightStyle, image_luminance, render_day, render_night
from .scene import (
    depth_to_png,
    noise_tiles,
    rasterize,
    sample_camera,
    sample_dynamic,
    sample_layout,
)

GENERATOR_VERSION = 1

SPLITS = ("day_train", "day_val", "night_train", "night_val")
DAY_CITIES = {
    "train": ("synthburg", "pixelton", "rendermark", "texelford"),
    "val": ("voxelhaven", "meshmouth"),
}
NIGHT_RECORDINGS = {"train": ("GOPR0001", "GOPR0002", "GOPR0003", "GOPR0004"), "val": ("GOPR0005",)}
META_NAME = "synthnight.json"
PARTIAL_NAME = ".synthnight.partial"

# Misalignment of a night image's day reference: zoom range and shift (fraction of W and H).
REF_ZOOM = (0.95, 1.05)
REF_SHIFT = 0.04
# Event files: the night frame is at the end of the window; frame i sits 1 s after frame i - 1.
T_OFFSET_STEP_US = 1_000_000

# Purposes of the per-image random streams.
_STATIC, _DYNAMIC, _RENDER, _REF_DYNAMIC, _REF_RENDER, _EVENTS = range(6)


@dataclass(frozen=True)
class SynthNightConfig:
    """What to generate. The output is a pure function of these fields and GENERATOR_VERSION."""

    seed: int = 0
    width: int = 512
    height: int = 256
    n_day_train: int = 400
    n_day_val: int = 100
    n_night_train: int = 400
    n_night_val: int = 100
    with_events: bool = True
    with_depth: bool = True
    with_refs: bool = True
    night_style: NightStyle = field(default_factory=NightStyle)
    """Ranges of the night rendering (defaults documented in :class:`NightStyle`)."""

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ValueError(
                f"SynthNightConfig: width and height must be >= 16 pixels, got "
                f"{self.width} x {self.height}"
            )
        for split in SPLITS:
            if self.count(split) < 0:
                raise ValueError(
                    f"SynthNightConfig: n_{split} must be >= 0, got {self.count(split)}"
                )
        if self.seed < 0:
            raise ValueError(f"SynthNightConfig: seed must be >= 0, got {self.seed}")

    def count(self, split: str) -> int:
        return {
            "day_train": self.n_day_train,
            "day_val": self.n_day_val,
            "night_train": self.n_night_train,
            "night_val": self.n_night_val,
        }[split]


@dataclass(eq=False)
class SynthNightSample:
    """One generated image with everything written for it (arrays, not files)."""

    split: str
    index: int
    image: np.ndarray
    """(H, W, 3) uint8: day image for day splits, night image for night splits."""
    label: np.ndarray
    """(H, W) uint8 train IDs (0..18)."""
    depth: np.ndarray
    """(H, W) uint8 Depth-Anything-style disparity (larger = nearer)."""
    reference: np.ndarray | None = None
    """(H, W, 3) uint8 misaligned day reference (night splits with refs)."""
    events: EventStream | None = None
    """Events of the 50 ms before the night frame (night splits with events)."""
    night_params: NightParams | None = None


def _rng(config: SynthNightConfig, split: str, index: int, purpose: int) -> np.random.Generator:
    ss = np.random.SeedSequence(config.seed, spawn_key=(SPLITS.index(split), index, purpose))
    return np.random.Generator(np.random.PCG64(ss))


def make_sample(config: SynthNightConfig, split: str, index: int) -> SynthNightSample:
    """Generate image ``index`` of ``split`` (one of SPLITS) in memory."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    layout = sample_layout(
        _rng(config, split, index, _STATIC),
        _rng(config, split, index, _DYNAMIC),
        config.width,
        config.height,
    )
    raster = rasterize(layout)
    depth = (
        depth_to_png(raster.depth) if config.with_depth else np.zeros(raster.label.shape, np.uint8)
    )
    if split.startswith("day"):
        image = render_day(raster, _rng(config, split, index, _RENDER))
        return SynthNightSample(split, index, image, raster.label, depth)
    rng = _rng(config, split, index, _RENDER)
    params = config.night_style.sample(rng)
    image, lum = render_night(raster, rng, params)
    sample = SynthNightSample(split, index, image, raster.label, depth, night_params=params)
    if config.with_refs:
        rng_ref = _rng(config, split, index, _REF_RENDER)
        cam = layout.camera
        zoom = rng_ref.uniform(*REF_ZOOM)
        shift = rng_ref.uniform(-REF_SHIFT, REF_SHIFT, size=2) * np.array([cam.width, cam.height])
        traffic = sample_dynamic(_rng(config, split, index, _REF_DYNAMIC), layout.street)
        ref_raster = rasterize(
            replace(layout, dynamic=traffic),
            cam.moved(float(shift[0]), float(shift[1]), float(zoom)),
        )
        sample.reference = render_day(ref_raster, rng_ref)
    if config.with_events:
        rng_ev = _rng(config, split, index, _EVENTS)
        sample.events = simulate_events(lum, layout.camera.cx, layout.camera.cy, rng_ev)
    return sample


def reference_camera_move(
    config: SynthNightConfig, split: str, index: int
) -> tuple[float, float, float]:
    """``(shift_x, shift_y, zoom)`` of night image ``index``'s day reference camera.

    Recomputed from the same random draws :func:`make_sample` uses (the first draws of the
    reference render stream), so it is exact and cheap: no rendering. The reference camera is
    ``camera.moved(shift_x, shift_y, zoom)``: focal * zoom, principal point + (shift_x, shift_y).
    """
    if split not in ("night_train", "night_val"):
        raise ValueError(
            f"reference_camera_move: only night splits have references, got {split!r}"
        )
    rng_ref = _rng(config, split, index, _REF_RENDER)
    zoom = rng_ref.uniform(*REF_ZOOM)
    shift = rng_ref.uniform(-REF_SHIFT, REF_SHIFT, size=2) * np.array([config.width, config.height])
    return float(shift[0]), float(shift[1]), float(zoom)


def reference_flow(config: SynthNightConfig, split: str, index: int) -> np.ndarray:
    """Exact ground-truth flow night image -> day reference, (2, H, W) float32 in pixels.

    The convention of :mod:`udaseg.models.alignment.base`: pixel (x, y) of the night image (column
    x, row y) shows the static scene point seen at (x + F_x, y + F_y) in the reference. The move
    changes only the intrinsics, so for pixel centres x + 0.5 (the rasteriser's)
    ``F_x = (zoom - 1) (x + 0.5 - cx) + shift_x`` and ``F_y = (zoom - 1) (y + 0.5 - cy) + shift_y``
    with the night camera's principal point (cx, cy). Holds for every static pixel; the traffic is
    re-drawn in the reference, so dynamic objects have no true match.
    """
    shift_x, shift_y, zoom = reference_camera_move(config, split, index)
    cam = sample_camera(_rng(config, split, index, _STATIC), config.width, config.height)
    xs = np.arange(config.width, dtype=np.float64) + 0.5 - cam.cx
    ys = np.arange(config.height, dtype=np.float64) + 0.5 - cam.cy
    flow = np.empty((2, config.height, config.width), dtype=np.float32)
    flow[0] = ((zoom - 1.0) * xs + shift_x)[None, :]
    flow[1] = ((zoom - 1.0) * ys + shift_y)[:, None]
    return flow


# ----------------------------------------------------------------------------- layout on disk


def sample_paths(split: str, index: int) -> dict[str, Path]:
    """Relative paths of every file written for image ``index`` of ``split``."""
    domain, sub = split.split("_")
    if domain == "day":
        cities = DAY_CITIES[sub]
        city = cities[index % len(cities)]
        stem = f"{city}_{index // len(cities):06d}_000019"
        cs = Path("cityscapes")
        return {
            "image": cs / "leftImg8bit" / sub / city / f"{stem}_leftImg8bit.png",
            "label": cs / "gtFine" / sub / city / f"{stem}_gtFine_labelTrainIds.png",
            "depth": cs / "depth_any" / sub / city / f"{stem}_depth.png",
        }
    recs = NIGHT_RECORDINGS[sub]
    rec = recs[index % len(recs)]
    stem = f"{rec}_frame_{index // len(recs):06d}"
    dz = Path("dark_zurich")
    return {
        "image": dz / "rgb_anon" / sub / "night" / rec / f"{stem}_rgb_anon.png",
        "reference": dz
        / "rgb_anon"
        / f"{sub}_ref"
        / "day"
        / f"{rec}_ref"
        / f"{stem}_ref_rgb_anon.png",
        "label": dz / "gt" / sub / "night" / rec / f"{stem}_gt_labelTrainIds.png",
        "depth": dz / "depth_any" / sub / "night" / rec / f"{stem}_depth.png",
        "events": dz / "events" / sub / "night" / rec / f"{stem}_events.h5",
    }


def written_keys(config: SynthNightConfig, split: str) -> tuple[str, ...]:
    """Which of :func:`sample_paths`' files ``config`` writes for ``split``."""
    keys = ["image"]
    if split != "night_train":  # Dark Zurich has no train labels
        keys.append("label")
    if config.with_depth:
        keys.append("depth")
    if split.startswith("night"):
        keys += (["reference"] if config.with_refs else []) + (
            ["events"] if config.with_events else []
        )
    return tuple(keys)


def _leaf_dirs() -> list[Path]:
    """Every folder the generator owns (named after its own cities and recordings)."""
    dirs = []
    for split in SPLITS:
        domain, sub = split.split("_")
        n = len(DAY_CITIES[sub] if domain == "day" else NIGHT_RECORDINGS[sub])
        for i in range(n):
            dirs += [p.parent for p in sample_paths(split, i).values()]
    return sorted(set(dirs))


def png_bytes(array: np.ndarray, level: int, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    """Encode an (H, W) or (H, W, 3) uint8 array as PNG with the "Up" filter and zlib ``level``.

    A minimal encoder (IHDR, one IDAT, IEND): deterministic, and about twice as fast as Pillow's
    for noisy images because it skips Pillow's per-row adaptive filter choice.
    """
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    rows = array.reshape(h, w * channels)
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 wrap-around, as the PNG Up filter defines it
    raw = np.concatenate([np.full((h, 1), 2, dtype=np.uint8), up], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    colour_type = {1: 0, 3: 2}[channels]
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    idat = z.compress(raw) + z.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _save_png(path: Path, array: np.ndarray) -> None:
    # Noisy RGB images: Huffman-only coding of the Up residuals is faster and smaller than LZ77
    # matching. Labels and depth maps are smooth: default deflate.
    if array.ndim == 3:
        path.write_bytes(png_bytes(array, 1, zlib.Z_HUFFMAN_ONLY))
    else:
        path.write_bytes(png_bytes(array, 6))


def _job(args: tuple[SynthNightConfig, str, int, str]) -> dict:
    config, split, index, root = args
    s = make_sample(config, split, index)
    paths = {k: Path(root) / v for k, v in sample_paths(split, index).items()}
    keys = written_keys(config, split)
    for key, array in (
        ("image", s.image),
        ("label", s.label),
        ("depth", s.depth),
        ("reference", s.reference),
    ):
        if key in keys:
            _save_png(paths[key], array)
    n_events = 0
    if "events" in keys:
        t_offset = T_OFFSET_STEP_US * (index + 1)
        write_events_h5(paths["events"], s.events, t_offset, t_offset + EventSimConfig().window_us)
        n_events = len(s.events)
    return {
        "split": split,
        "class_pixels": np.bincount(s.label.ravel(), minlength=256)[:NUM_CLASSES],
        "luminance": image_luminance(s.image),
        "events": n_events,
    }


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_record(config: SynthNightConfig) -> dict:
    """The parameter part of synthnight.json (what identifies a copy)."""
    return {
        "generator": "synthnight",
        "version": GENERATOR_VERSION,
        "seed": config.seed,
        "size": [config.width, config.height],
        "counts": {split: config.count(split) for split in SPLITS},
        "with_events": config.with_events,
        "with_depth": config.with_depth,
        "with_refs": config.with_refs,
        "night_style": _jsonable(asdict(config.night_style)),
        "day_style": _jsonable(asdict(DayStyle())),
        "events": _jsonable(asdict(EventSimConfig())),
        "reference": {"zoom": list(REF_ZOOM), "shift": REF_SHIFT},
        "cities": {k: list(v) for k, v in DAY_CITIES.items()},
        "recordings": {k: list(v) for k, v in NIGHT_RECORDINGS.items()},
    }


def _prepare_root(root: Path, record: dict, overwrite: bool) -> bool:
    """Check ``root``; return True when an identical complete copy is already there."""
    meta = root / META_NAME
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "stats"} == record:
            return True
        if not overwrite:
            raise FileExistsError(
                f"{root} holds a SynthNight copy with other parameters ({meta}); "
                "pass overwrite=True to replace it, or choose another root"
            )
    elif (
        root.exists()
        and any(root.iterdir())
        and not (root / PARTIAL_NAME).exists()
        and not overwrite
    ):
        raise FileExistsError(
            f"{root} is not empty and holds no SynthNight copy; pass overwrite=True to write into "
            "it anyway (only SynthNight's own city/recording folders are replaced), or choose "
            "another root"
        )
    return False


def generate(
    root: str | os.PathLike,
    config: SynthNightConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate a SynthNight copy under ``root`` and return its path.

    Args:
        root: output folder (created if missing).
        config: what to generate; default ``SynthNightConfig()``.
        workers: worker processes; None = ``os.cpu_count()``, 0 = run in this process.
        progress: show a rich progress bar.
        overwrite: allow writing into a non-empty folder that is not an identical SynthNight copy.
            Only the generator's own city/recording folders and synthnight.json are replaced.

    A complete copy with identical parameters (compared through synthnight.json) is kept as is.
    synthnight.json is written last, so a copy without it is incomplete; a folder left by an
    interrupted run (it holds ``.synthnight.partial``) is regenerated without ``overwrite``.
    """
    config = config or SynthNightConfig()
    root = Path(root)
    record = config_record(config)
    if _prepare_root(root, record, overwrite):
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / META_NAME).unlink(missing_ok=True)
    (root / PARTIAL_NAME).write_text(json.dumps(record, indent=1))
    for d in _leaf_dirs():
        shutil.rmtree(root / d, ignore_errors=True)
    jobs = [
        (config, split, i, str(root))
        for split in ("night_train", "night_val", "day_train", "day_val")  # heavy jobs first
        for i in range(config.count(split))
    ]
    dirs = {
        (root / sample_paths(s, i)[k]).parent
        for _, s, i, _ in jobs
        for k in written_keys(config, s)
    }
    for d in sorted(dirs):
        d.mkdir(parents=True, exist_ok=True)
    results = _run(jobs, workers, progress)
    stats = _summarise(results)
    tmp = root / (META_NAME + ".tmp")
    tmp.write_text(json.dumps({**record, "stats": stats}, indent=1))
    os.replace(tmp, root / META_NAME)
    (root / PARTIAL_NAME).unlink(missing_ok=True)
    return root


def _run(jobs: list, workers: int | None, progress: bool) -> list[dict]:
    workers = (os.cpu_count() or 1) if workers is None else workers
    workers = min(workers, len(jobs))
    noise_tiles()  # build once; forked workers inherit it
    results: list[dict] = []
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        bar.start()
        task = bar.add_task("SynthNight", total=len(jobs))
    try:
        if workers <= 0:
            it = map(_job, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            it = pool.map(_job, jobs, chunksize=max(1, min(8, len(jobs) // (workers * 8))))
        try:
            for res in it:
                results.append(res)
                if bar is not None:
                    bar.advance(task)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    finally:
        if bar is not None:
            bar.stop()
    return results


def _summarise(results: list[dict]) -> dict:
    out: dict = {"classes": list(CITYSCAPES_CLASSES)}
    for split in SPLITS:
        rs = [r for r in results if r["split"] == split]
        if not rs:
            continue
        pix = np.sum([r["class_pixels"] for r in rs], axis=0)
        out[split] = {
            "class_pixels": [int(v) for v in pix],
            "mean_luminance": round(float(np.mean([r["luminance"] for r in rs])), 3),
            "mean_events": round(float(np.mean([r["events"] for r in rs])), 1),
        }
    return out
