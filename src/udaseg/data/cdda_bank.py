"""CDDA's offline source bank: N source crops drawn like training, and their class x depth histograms.

Spec: ``cdda_spec.md`` sections 3 (histogram), 4 (bank), 9 (source replacement), 11 (memory).
Built by ``udaseg prepare cdda-bank --config TRAIN.yaml --out BANK`` (:mod:`udaseg.engine.prepare`)
from the exact training config: the N crops are positions 0 .. N-1 of the training source stream
(:mod:`udaseg.data.stream`: same dataset, resize, crop size, ``cat_max_ratio``, rare class sampling
and seed), i.e. N random augmented crops drawn with replacement, as CDDA's ``tools/seg.py``.

On disk ``BANK/`` holds three files (nothing else; no crop PNGs)::

    header.json   {"format": "udaseg-cdda-bank", "version": 1, "n", "done", "crop_size": [h, w],
                   "seed", "rcs": {...} | null, "source": {dataset settings, class, fingerprint},
                   "pipeline": {scale, crop_size, cat_max_ratio, flip_prob, mean, std},
                   "num_classes": 19, "bins": 256, "records": {...}, "hist": {...}}
    hist.npy      (N, 19, 256) float32 raw counts N_i[c, b] (exact: counts < 2^24)
    records.npy   (N, 9) int32: source_index, rcs_class (-1 without RCS), resized_h, resized_w,
                  top, left, bottom, right (crop box in the resized image), flip

A crop is regenerated from its record (:meth:`SourceBank.crop`): the source files are read by the
same dataset loader, resized to the recorded size with :func:`udaseg.data.transforms.resize_view`,
cut to the recorded box, flipped, normalised and padded like the training pipeline, so it equals
the training crop bit for bit; a small LRU cache keeps the last decoded crops. For GTA
(N = 24,966) the histograms take 463 MiB (memory-mapped: pages are read on first use), the
records 0.9 MB, against 10-75 GB of PNGs in the original.

Histogram of one crop (spec 3): N[c, b] = #pixels with label c (< 19; 255 ignored) and
bin = int(depth) (< 256) where depth is the ``cdda``-transformed map (:mod:`udaseg.data.depth`)
after the geometric pipeline (bilinear resize, crop, flip), truncated, never rounded.

The build is interruptible and resumable: it writes into ``BANK.partial/``, flushes the memory-mapped
rows and rewrites ``done`` in the header atomically every few rows, and a re-run with the same
settings continues at ``done``; each row is a pure function of its stream position, so the finished
files equal an uninterrupted build's. The last step renames ``BANK.partial`` to ``BANK``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import atomic_write_json
from .classes import IGNORE_INDEX, NUM_CLASSES

FORMAT = "udaseg-cdda-bank"
VERSION = 1
NUM_BINS = 256
HEADER_FILE = "header.json"
HIST_FILE = "hist.npy"
RECORDS_FILE = "records.npy"
PARTIAL_SUFFIX = ".partial"
RECORD_COLUMNS = (
    "source_index", "rcs_class", "resized_h", "resized_w", "top", "left", "bottom", "right", "flip",
)
BUILD_COMMAND = "udaseg prepare cdda-bank --config TRAIN.yaml [--config more.yaml] --out BANK"
#: header keys that do not take part in "same build settings" (progress only)
_PROGRESS_KEYS = ("done",)


def _build_hint(path: str | os.PathLike | None = None) -> str:
    out = str(path) if path is not None else "BANK"
    return f"`udaseg prepare cdda-bank --config TRAIN.yaml --out {out}` (the training config)"


# --------------------------------------------------------------------------------------------
# histogram


def class_depth_histogram(
    label: torch.Tensor,
    depth: torch.Tensor,
    num_classes: int = NUM_CLASSES,
    bins: int = NUM_BINS,
) -> torch.Tensor:
    """Class x depth-bin pixel counts (spec 3), batched.

    Args:
        label: (..., H, W) integer train IDs; values >= ``num_classes`` (ignore 255) are skipped.
        depth: (..., H, W) or (..., 1, H, W) depth map (the ``cdda``-transformed values after the
            geometric pipeline); bin = truncation ``depth.long()``; bins outside [0, bins) skipped.

    Returns:
        (..., num_classes, bins) float32 raw counts, on the label's device
        (``bincount(label * bins + bin)`` with one offset per leading index).
    """
    if depth.ndim == label.ndim + 1 and depth.shape[-3] == 1:
        depth = depth.squeeze(-3)
    if depth.shape != label.shape:
        raise ValueError(
            f"class_depth_histogram: label {tuple(label.shape)} and depth {tuple(depth.shape)} "
            "differ in shape"
        )
    lead = label.shape[:-2]
    m = int(np.prod(lead)) if lead else 1
    lab = label.reshape(m, -1).long()
    b = depth.reshape(m, -1)
    b = b.long()  # truncation toward zero, as CDDA's `.long()` on the float map
    valid = (lab >= 0) & (lab < num_classes) & (b >= 0) & (b < bins)
    offset = torch.arange(m, device=lab.device).view(m, 1) * (num_classes * bins)
    idx = (offset + lab * bins + b)[valid]
    counts = torch.bincount(idx, minlength=m * num_classes * bins).to(torch.float32)
    return counts.view(*lead, num_classes, bins)


# --------------------------------------------------------------------------------------------
# regenerating a crop from its record


def replay_crop(sample: dict, record: Sequence[int], pipeline: dict) -> dict:
    """Apply a recorded geometry to a loaded (untransformed) sample: resize to (resized_h,
    resized_w), cut the box, flip, normalise and pad exactly like the training pipeline
    (:class:`udaseg.data.transforms.PipelineConfig.train`), to every spatial view."""
    from .transforms import Normalize, Pad, resize_view

    rec = dict(zip(RECORD_COLUMNS, (int(v) for v in record)))
    size = (rec["resized_h"], rec["resized_w"])
    out = dict(sample)
    for k, v in sample.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 2:
            t = resize_view(k, v, size)
            t = t[..., rec["top"] : rec["bottom"], rec["left"] : rec["right"]]
            out[k] = t.flip(-1) if rec["flip"] else t
    out = Normalize(tuple(pipeline["mean"]), tuple(pipeline["std"]))(out)
    return Pad(tuple(pipeline["crop_size"]))(out)


def _import_dataset_class(path: str):
    """Import ``udaseg.data....:Class`` (only dataset classes of udaseg.data)."""
    module, _, attr = str(path).partition(":")
    if not module.startswith("udaseg.data.") or not attr:
        raise ConfigError(f"CDDA source bank: dataset class {path!r} is not a udaseg.data class")
    import importlib

    return getattr(importlib.import_module(module), attr)


def source_fingerprint(dataset) -> str:
    """sha1 of the dataset's record names in order (bank records index into that order)."""
    import hashlib

    h = hashlib.sha1()
    h.update("\n".join(str(r.name) for r in dataset.records).encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the bank


class SourceBank:
    """N source crops (as records, or as in-memory arrays for tests) and their histograms.

    Attributes:
        hist: (N, 19, 256) float32 raw class x depth-bin counts on the CPU (memory-mapped,
            copy-on-write, when opened from disk).
        header: the bank's settings (module docstring).
    """

    def __init__(
        self,
        hist: torch.Tensor,
        header: dict,
        *,
        records: np.ndarray | None = None,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        depths: torch.Tensor | None = None,
        path: Path | None = None,
        root: str | os.PathLike | None = None,
        cache_size: int = 64,
    ):
        self.hist = hist
        self.header = header
        self.path = path
        self.records = records
        self._images, self._labels, self._depths = images, labels, depths
        self._root = root
        self._datasets: dict[bool, Any] = {}
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self.cache_size = int(cache_size)

    def __len__(self) -> int:
        return int(self.hist.shape[0])

    def __repr__(self) -> str:
        h, w = self.header.get("crop_size", ("?", "?"))
        src = self.header.get("source", {}).get("name", "?")
        return f"SourceBank(n={len(self)}, crop={h}x{w}, source={src}, path={self.path})"

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        hist,
        images,
        labels,
        header: dict | None = None,
        depths=None,
    ) -> SourceBank:
        """An in-memory bank: ``hist`` (N, 19, 256), ``images`` (N, 3, h, w) normalised float32,
        ``labels`` (N, h, w) int64 train IDs; ``depths`` (N, [1,] h, w) optional. The header
        gets ``n``, ``crop_size``, ``num_classes`` and ``bins`` filled in when absent."""
        hist = torch.as_tensor(hist).to(torch.float32)
        images = torch.as_tensor(images).to(torch.float32)
        labels = torch.as_tensor(labels).to(torch.int64)
        n = hist.shape[0]
        if hist.ndim != 3 or images.shape[0] != n or labels.shape[0] != n:
            raise ValueError(
                f"SourceBank.from_arrays: hist {tuple(hist.shape)}, images {tuple(images.shape)} "
                f"and labels {tuple(labels.shape)} must be (N, K, B), (N, 3, h, w), (N, h, w)"
            )
        if images.shape[-2:] != labels.shape[-2:]:
            raise ValueError("SourceBank.from_arrays: images and labels differ in crop size")
        header = {
            "format": FORMAT, "version": VERSION, "n": n, "done": n,
            "crop_size": [int(labels.shape[-2]), int(labels.shape[-1])],
            "num_classes": int(hist.shape[1]), "bins": int(hist.shape[2]),
            "seed": None, "rcs": None, "source": {}, "records": None,
            **dict(header or {}),
        }
        dep = torch.as_tensor(depths).to(torch.float32) if depths is not None else None
        return cls(hist, header, images=images, labels=labels, depths=dep)

    @classmethod
    def open(
        cls, path: str | os.PathLike, root: str | os.PathLike | None = None, cache_size: int = 64
    ) -> SourceBank:
        """Open a bank folder written by the prepare command (or its ``header.json``).

        ``root`` overrides the source dataset root stored in the header (a moved dataset).
        A missing, incomplete, corrupt or other-version bank is one :class:`ConfigError` naming
        the file and the command that (re)builds it."""
        path = Path(path)
        if path.name == HEADER_FILE:
            path = path.parent
        header = read_header(path)
        n = int(header["n"])
        if int(header.get("done", -1)) != n:
            raise ConfigError(
                f"CDDA source bank {path} is incomplete ({header.get('done')} of {n} crops); "
                f"finish it by re-running {_build_hint(_final_path(path))}, which continues "
                "where it stopped"
            )
        k, b = int(header.get("num_classes", NUM_CLASSES)), int(header.get("bins", NUM_BINS))
        hist = _open_array(path / HIST_FILE, (n, k, b), np.float32)
        records = _open_array(path / RECORDS_FILE, (n, len(RECORD_COLUMNS)), np.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensor = torch.from_numpy(hist)
        return cls(tensor, header, records=records, path=path, root=root, cache_size=cache_size)

    # ---- checks --------------------------------------------------------------------------

    def check_crop_size(self, crop_size, where: str) -> None:
        """Refuse a bank built for another crop size than training's (its counts are compared
        directly with the target crop's, spec 4.2)."""
        want = [int(v) for v in crop_size]
        have = [int(v) for v in self.header.get("crop_size", [])]
        if have != want:
            where_file = f" {self.path}" if self.path is not None else ""
            raise ConfigError(
                f"{where}: the CDDA source bank{where_file} was built for "
                f"{'x'.join(map(str, have))} crops, but training uses "
                f"{'x'.join(map(str, want))} crops; the class-depth histograms depend on the crop "
                f"size. Rebuild the bank from this training config: {_build_hint(self.path)}"
            )

    # ---- crops ---------------------------------------------------------------------------

    def crop(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank crop ``i``: (image (3, h, w) float32 normalised like the training source batch,
        label (h, w) int64 train IDs, 255 = ignore)."""
        s = self.sample(i, depth=False)
        return s["image"], s["label"]

    def sample(self, i: int, depth: bool = True) -> dict:
        """Bank crop ``i`` as a dict: ``image``, ``label`` and, with ``depth``, ``depth``
        (1, h, w) float32 (in-memory banks: only when given). ``crop`` skips reading the depth
        map (one PNG decode less per replaced source crop)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"SourceBank: index {i} out of range for {len(self)} crops")
        if self._images is not None:
            out = {"image": self._images[i], "label": self._labels[i]}
            if self._depths is not None:
                out["depth"] = self._depths[i]
            return out
        hit = self._cache.get(i)
        if hit is not None and (not depth or "depth" in hit):
            self._cache.move_to_end(i)
            return dict(hit)
        ds = self._source_dataset(depth)
        rec = self.records[i]
        loaded = ds.load(int(rec[0]))
        full = replay_crop(loaded, rec, self.header["pipeline"])
        out = {"image": full["image"].float(), "label": full["label"].long()}
        if "depth" in full:
            out["depth"] = full["depth"].float()
        if self.cache_size > 0:
            self._cache[i] = out
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return dict(out)

    def _source_dataset(self, depth: bool):
        """The source split without transform; with ``depth`` its views include the depth map,
        without it no extra view is read (image and label only)."""
        if self._datasets.get(depth) is not None:
            return self._datasets[depth]
        src = self.header.get("source") or {}
        if "class" not in src:
            raise ConfigError(f"CDDA source bank {self.path}: the header names no source dataset")
        cls = _import_dataset_class(src["class"])
        root = self._root if self._root is not None else src["root"]
        kwargs = dict(root=root, split=src.get("split", "train"), labels=True, transform=None)
        kwargs["views"] = ["depth"] if depth else []
        kwargs.update(src.get("options") or {})
        try:
            ds = cls(**kwargs)
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(
                f"CDDA source bank {self.path}: its source dataset {src.get('name')} at {root} "
                f"cannot be read ({exc}); the bank regenerates its crops from those files. "
                "Restore the dataset, or pass its new root to SourceBank.open(..., root=...)."
            ) from None
        if len(ds) != int(src.get("len", len(ds))) or (
            "fingerprint" in src and source_fingerprint(ds) != src["fingerprint"]
        ):
            raise ConfigError(
                f"CDDA source bank {self.path}: the source dataset at {root} changed since the "
                f"bank was built ({len(ds)} files now, {src.get('len')} then, or other files); "
                f"rebuild it with {_build_hint(self.path)}"
            )
        self._datasets[depth] = ds
        return ds


# --------------------------------------------------------------------------------------------
# files


def _final_path(path: Path) -> Path:
    name = path.name
    return path.with_name(name[: -len(PARTIAL_SUFFIX)]) if name.endswith(PARTIAL_SUFFIX) else path


def read_header(path: str | os.PathLike) -> dict:
    """The validated header of bank folder ``path`` (ConfigError naming the file and the fix)."""
    path = Path(path)
    file = path / HEADER_FILE
    hint = _build_hint(_final_path(path))
    if not path.exists():
        raise ConfigError(f"CDDA source bank {path} does not exist; build it with {hint}")
    if not file.is_file():
        raise ConfigError(
            f"CDDA source bank {path}: {file} is missing, so this is not a complete bank; "
            f"(re)build it with {hint}"
        )
    try:
        header = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"CDDA source bank {file} is corrupt ({exc}); rebuild it with {hint}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ConfigError(
            f"CDDA source bank {file}: not a udaseg CDDA bank header (format "
            f"{header.get('format') if isinstance(header, dict) else None!r}); rebuild it with {hint}"
        )
    if header.get("version") != VERSION:
        raise ConfigError(
            f"CDDA source bank {file}: format version {header.get('version')!r}, this udaseg reads "
            f"version {VERSION}; rebuild it with {hint}"
        )
    missing = [k for k in ("n", "crop_size", "pipeline", "source") if k not in header]
    if missing:
        raise ConfigError(f"CDDA source bank {file}: header lacks {missing}; rebuild it with {hint}")
    return header


def _open_array(file: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    hint = _build_hint(_final_path(file.parent))
    if not file.is_file():
        raise ConfigError(f"CDDA source bank: {file} is missing; rebuild the bank with {hint}")
    try:
        arr = np.load(file, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"CDDA source bank: {file} is corrupt ({exc}); rebuild it with {hint}") from None
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ConfigError(
            f"CDDA source bank: {file} holds {arr.dtype} {tuple(arr.shape)}, the header says "
            f"{np.dtype(dtype)} {tuple(shape)}; rebuild it with {hint}"
        )
    return arr


def same_build(a: dict, b: dict) -> bool:
    """Whether two headers describe the same build (progress keys aside)."""
    strip = lambda h: {k: v for k, v in h.items() if k not in _PROGRESS_KEYS}  # noqa: E731
    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


# --------------------------------------------------------------------------------------------
# building


def sample_row(sample: dict, num_classes: int = NUM_CLASSES, bins: int = NUM_BINS):
    """(hist (K, B) float32, record (9,) int32) of one transformed source sample; the sample
    must carry ``source_index``, ``crop_box``, ``flipped``, ``label``, ``depth`` and the
    resized size in ``resized_size`` (see :class:`IndexReporting`)."""
    for key in ("source_index", "crop_box", "label", "depth"):
        if key not in sample:
            what = "the source has no depth view" if key == "depth" else f"no {key!r} entry"
            raise ConfigError(f"CDDA source bank: a source sample has {what}; cannot build the bank")
    hist = class_depth_histogram(sample["label"], sample["depth"], num_classes, bins)
    box = [int(v) for v in sample["crop_box"]]
    rh, rw = (int(v) for v in sample["resized_size"])
    flip = int(bool(sample.get("flipped", False)))
    c = int(sample["rcs_class"]) if "rcs_class" in sample else -1
    rec = np.array([int(sample["source_index"]), c, rh, rw, *box, flip], dtype=np.int32)
    return hist.numpy(), rec


class IndexReporting:
    """Wraps a source dataset so each sample also says which file it came from
    (``source_index``) and the size it was resized to (``resized_size``, read from the crop
    box's frame: the ``Resize`` stage's size). Everything else (records, root, transform,
    RCS statistics ...) is the wrapped dataset's, so the random draws are unchanged."""

    def __init__(self, dataset):
        self._ds = dataset
        self.transform = _ReportingTransform(getattr(dataset, "transform", None))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_ds":  # unpickling: no _ds yet
            raise AttributeError(name)
        return getattr(self._ds, name)

    def __len__(self) -> int:
        return len(self._ds)

    def load(self, index: int) -> dict:
        sample = self._ds.load(index)
        sample["source_index"] = int(index)
        return sample

    def __getitem__(self, index: int) -> dict:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample


class _ReportingTransform:
    """Runs the pipeline's stages and records the image size after ``Resize``."""

    def __init__(self, transform):
        self.inner = transform

    def __call__(self, sample: dict) -> dict:
        from .transforms import Compose, Resize

        if not isinstance(self.inner, Compose):
            raise ConfigError(
                "CDDA source bank: the source pipeline is not a transforms.Compose; cannot record "
                "the crop geometry"
            )
        for t in self.inner.transforms:
            sample = t(sample)
            if isinstance(t, Resize):
                sample["resized_size"] = tuple(int(v) for v in sample["image"].shape[-2:])
        return sample

    def __bool__(self) -> bool:
        return self.inner is not None


def _pool_init(stream, threads: int) -> None:
    global _WORKER_STREAM
    _WORKER_STREAM = stream
    torch.set_num_threads(threads)


_WORKER_STREAM = None


def _pool_row(position: int):
    return sample_row(_WORKER_STREAM[position])


def build_bank(
    out: str | os.PathLike,
    stream: Callable[[int], dict] | Any,
    n: int,
    header: dict,
    *,
    workers: int = 0,
    progress: bool = True,
    flush_every: int = 64,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write bank ``out`` from stream positions 0 .. n-1 (``stream[p]`` -> transformed sample
    with the :class:`IndexReporting` entries); resumable (module docstring).

    ``header`` holds the build settings (crop_size, seed, rcs, source, pipeline ...); ``n``,
    ``done``, ``format``, ``version``, ``num_classes``, ``bins`` and the file entries are added.
    An existing complete bank with the same settings is kept; one with other settings is an
    error unless ``force``. ``workers`` > 0 draws in that many processes (same result)."""
    out = Path(out)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    n = int(n)
    if n <= 0:
        raise ConfigError(f"udaseg prepare cdda-bank: --n must be > 0, got {n}")
    full = {
        "format": FORMAT, "version": VERSION, "n": n, "done": 0,
        **header,
        "num_classes": NUM_CLASSES, "bins": NUM_BINS,
        "records": {"file": RECORDS_FILE, "dtype": "int32", "columns": list(RECORD_COLUMNS)},
        "hist": {"file": HIST_FILE, "dtype": "float32", "shape": [n, NUM_CLASSES, NUM_BINS],
                 "meaning": "raw pixel counts N[i, class, depth bin]"},
    }
    if out.exists():
        try:
            old = read_header(out)
        except ConfigError:
            old = None
        if old is not None and same_build(old, full) and old.get("done") == n:
            log(f"CDDA source bank {out}: already built with these settings ({n} crops)")
            return out
        if not force:
            raise ConfigError(
                f"udaseg prepare cdda-bank: {out} exists and was built from other settings (or is "
                "not a bank); pass --force to replace it, or choose another --out"
            )
    start = 0
    if partial.exists():
        try:
            old = json.loads((partial / HEADER_FILE).read_text(encoding="utf-8"))
            ok = isinstance(old, dict) and same_build(old, full)
        except (OSError, json.JSONDecodeError):
            ok = False
        if ok:
            try:
                hist = np.lib.format.open_memmap(partial / HIST_FILE, mode="r+")
                recs = np.lib.format.open_memmap(partial / RECORDS_FILE, mode="r+")
                ok = hist.shape == (n, NUM_CLASSES, NUM_BINS) and recs.shape == (n, len(RECORD_COLUMNS))
            except (OSError, ValueError):
                ok = False
        if ok:
            start = int(old.get("done", 0))
            log(f"CDDA source bank {out}: resuming at crop {start} of {n}")
        else:
            log(f"CDDA source bank {out}: discarding {partial} (other settings or unreadable)")
            shutil.rmtree(partial)
    if start == 0 and not partial.exists():
        partial.mkdir(parents=True)
        hist = np.lib.format.open_memmap(
            partial / HIST_FILE, mode="w+", dtype=np.float32, shape=(n, NUM_CLASSES, NUM_BINS)
        )
        recs = np.lib.format.open_memmap(
            partial / RECORDS_FILE, mode="w+", dtype=np.int32, shape=(n, len(RECORD_COLUMNS))
        )
        atomic_write_json(partial / HEADER_FILE, full)

    def commit(done: int) -> None:
        hist.flush()
        recs.flush()
        atomic_write_json(partial / HEADER_FILE, {**full, "done": done})

    rows = _rows(stream, range(start, n), workers)
    bar = _progress(progress, n, start, f"CDDA bank ({header.get('source', {}).get('name', '')})")
    done = start
    try:
        with bar as update:
            for p, (h, rec) in zip(range(start, n), rows):
                hist[p] = h
                recs[p] = rec
                done = p + 1
                update(1)
                if done % flush_every == 0:
                    commit(done)
    finally:
        commit(done)  # an interrupted build keeps what it has (resumed at `done`)
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    del hist, recs
    old_dir = None
    if out.exists():
        old_dir = out.with_name(out.name + ".old")
        if old_dir.exists():
            shutil.rmtree(old_dir)
        os.replace(out, old_dir)
    os.replace(partial, out)
    if old_dir is not None:
        shutil.rmtree(old_dir)
    log(f"CDDA source bank {out}: {n} crops, histograms {n * NUM_CLASSES * NUM_BINS * 4 / 2**20:.1f} MiB")
    return out


def _rows(stream, positions: range, workers: int):
    """Generator of (hist, record) in position order, in this process or a pool."""
    if workers <= 0 or len(positions) == 0:
        for p in positions:
            yield sample_row(stream[p])
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, initializer=_pool_init, initargs=(stream, 1)) as pool:
        # bounded look-ahead: submit a window, yield in order
        window = max(4 * workers, 8)
        pending: list = []
        it = iter(positions)
        for p in it:
            pending.append(pool.submit(_pool_row, p))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


class _progress:
    """A rich progress bar (or nothing); ``with _progress(...) as update: update(k)``."""

    def __init__(self, enabled: bool, total: int, completed: int, description: str):
        self.enabled, self.total, self.completed, self.description = enabled, total, completed, description
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda k: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total, completed=self.completed)
        return lambda k: self._bar.advance(task, k)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False
