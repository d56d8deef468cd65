"""Rare Class Sampling (RCS): per-image class statistics and a sampler over the source set.

Paper: L. Hoyer, D. Dai, L. Van Gool, "DAFormer: Improving Network Architectures and Training
Strategies for Domain-Adaptive Semantic Segmentation", CVPR 2022, https://arxiv.org/abs/2111.14887,
Sec. 3.3 (Rare Class Sampling). Reference behaviour: lhoyer/DAFormer (Apache-2.0),
``tools/convert_datasets/*.py`` (statistics files) and ``mmseg/datasets/uda_dataset.py``
(sampler), as described in ``daformer_hrda_mic_spec.md`` section 4; this module is written from
that description, not from the code.

Sampling distribution (N_c: pixels of train ID c summed over all source labels at their original
resolution; only classes with N_c > 0 take part, e.g. Synthia's terrain/truck/train are excluded)::

    f_c  = N_c / sum_c' N_c'
    P(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T)          T = class_temp = 0.01

With T = 0.01 a frequency difference of 0.01 changes P by a factor of e, so almost all the mass
goes to the rarest classes; T = inf gives uniform class sampling (the paper's ablation).

Per ``__getitem__`` (the index is ignored):

1. draw c ~ P, then a file uniformly among the files with n_c > ``min_pixels`` = 3000 (the count at
   original resolution, from the statistics);
2. run the whole source pipeline (resize, random crop, flip, ...) on that file; while the crop
   holds <= ``min_pixels * min_crop_ratio`` pixels of c, re-run the pipeline (a new random crop),
   at most ``max_crop_tries`` = 10 times, then keep the last crop. ``min_crop_ratio`` is 0.5 for
   DAFormer's 512x512 crops (1500 px) and 2.0 for HRDA/MIC's 1024x1024 crops (6000 px);
   ``min_crop_ratio <= 0`` switches the check off.

Statistics files (DAFormer-compatible, written into the dataset root or a cache folder):

* ``sample_class_stats.json``: a list, one ``{"<c>": n_c, ..., "file": path}`` per label image;
* ``sample_class_stats_dict.json``: ``path -> {"<c>": n_c}``;
* ``samples_with_class.json``: ``"<c>" -> [[path, n_c], ...]``;
* ``rcs_stats_meta.json`` (ours): number of files and a sha1 fingerprint of the sorted relative
  label paths, so a cache made for another file list is detected and recomputed; for a dataset
  that maps raw label values itself (``dataset.label_decoder``, e.g. the ``folder`` loader's
  ``id_map``) also the mapping, so changing it recomputes the statistics.

Differences from the reference:

* Paths are stored RELATIVE to the dataset root (posix separators), so a dataset can move.
  DAFormer stored the path as seen at conversion time (absolute, or relative to the working
  directory) and matched it by exact string. :func:`read_class_stats` still accepts such files:
  a path that is not already a relative path of the dataset is mapped to the longest of its
  trailing sub-paths that is one (``/old/place/cityscapes/gtFine/train/x/y.png`` ->
  ``gtFine/train/x/y.png``); entries that match nothing are dropped with a warning.
* A class that occurs but has no file with n_c > min_pixels is removed from P (P renormalised over
  the others, with a warning); DAFormer stops with an assertion in that case.
* The pipeline is re-run on the already loaded sample instead of re-reading the file (same result).
* The class/file draws use the sampler's own :class:`numpy.random.Generator`, which is saved in
  :meth:`RareClassDataset.state_dict`; the crops use torch's global generator like every transform.

Seeding: training goes through :class:`udaseg.data.stream.SampleStream`, which hands
:meth:`RareClassDataset.get` one generator per stream position (derived from the seed, the rank
and the position), so draws are reproducible with any number of workers and ranks, and a resumed
run continues exactly. Used on its own (``dataset[i]``), the sampler draws from its own generator
(:meth:`state_dict`, :meth:`seed_worker` for per-rank/per-worker streams).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..fileio import atomic_write_json
from .classes import IGNORE_INDEX, NUM_CLASSES
from .datasets.base import SegmentationDataset
from .io import DataError, read_label
from .transforms import Sample

STATS_FILE = "sample_class_stats.json"
STATS_DICT_FILE = "sample_class_stats_dict.json"
SAMPLES_WITH_CLASS_FILE = "samples_with_class.json"
META_FILE = "rcs_stats_meta.json"
META_VERSION = 1

#: one entry per label image: ``{train_id: pixel_count, ..., "file": relative label path}``
ClassStats = dict


@dataclass(frozen=True)
class RCSConfig:
    """Rare Class Sampling hyper-parameters (DAFormer config keys ``rare_class_sampling``)."""

    class_temp: float = 0.01
    """Temperature T of the class distribution; ``float('inf')`` = uniform over classes."""
    min_pixels: int = 3000
    """A file is drawn for class c only if its label has more than this many pixels of c."""
    min_crop_ratio: float = 0.5
    """Re-crop while the crop has <= min_pixels * min_crop_ratio pixels of c.

    0.5 for DAFormer's 512 crops, 2.0 for HRDA/MIC's 1024 crops; <= 0 switches the check off."""
    max_crop_tries: int = 10
    """Most re-runs of the pipeline after the first one; then the last crop is kept."""

    def __post_init__(self) -> None:
        if not (self.class_temp > 0):
            raise ValueError(f"rcs.class_temp must be > 0 (or inf), got {self.class_temp}")
        if self.min_pixels < 0:
            raise ValueError(f"rcs.min_pixels must be >= 0, got {self.min_pixels}")
        if self.max_crop_tries < 0:
            raise ValueError(f"rcs.max_crop_tries must be >= 0, got {self.max_crop_tries}")


class ClassProbs(NamedTuple):
    """Classes sorted by ascending total pixel count and their sampling probabilities."""

    classes: list[int]
    probs: np.ndarray


# --------------------------------------------------------------------------------------------
# statistics


def _dataset_root(dataset: SegmentationDataset) -> Path:
    root = getattr(dataset, "root", None)
    if root is None:
        raise ValueError(
            f"{dataset.dataset_name}: RCS statistics store label paths relative to the dataset "
            "root, but the dataset has no `root` attribute. Set `dataset.root` to its folder."
        )
    return Path(root)


def relative_label_paths(dataset: SegmentationDataset) -> list[str]:
    """The label path of every record, relative to ``dataset.root``, with posix separators."""
    root = _dataset_root(dataset)
    out = []
    for rec in dataset.records:
        if rec.label is None:
            raise ValueError(
                f"{dataset.dataset_name}: record {rec.name!r} has no label; rare class sampling "
                "needs a labelled source split (labels=True)."
            )
        try:
            rel = Path(rec.label).relative_to(root)
        except ValueError:
            raise DataError(
                f"{dataset.dataset_name}: label {rec.label} is not under the dataset root {root}; "
                "RCS statistics store paths relative to the root. Keep labels inside the root."
            ) from None
        out.append(rel.as_posix())
    return out


def stats_fingerprint(files: Iterable[str]) -> str:
    """sha1 of the sorted relative label paths, one per line."""
    h = hashlib.sha1()
    h.update("\n".join(sorted(files)).encode("utf-8"))
    return h.hexdigest()


def dataset_fingerprint(dataset: SegmentationDataset) -> str:
    return stats_fingerprint(relative_label_paths(dataset))


def _count_label(path: str, num_classes: int, decode: Callable | None = None) -> dict[int, int]:
    """{train_id: pixels} of one label file at its original resolution, ignore (255) excluded;
    ``decode(path)`` reads the train IDs of datasets that map raw values (default: read_label)."""
    label = decode(path) if decode is not None else read_label(path, num_classes=num_classes)
    counts = np.bincount(label.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts)}


def compute_class_stats(
    dataset: SegmentationDataset, workers: int = 0, progress: bool = False
) -> list[ClassStats]:
    """Count the pixels of every train ID in every label of ``dataset``.

    Args:
        dataset: a labelled split with a ``root`` attribute (the labels must lie under it).
        workers: > 0 counts in a process pool of that size.
        progress: show a rich progress bar.

    Returns:
        One dict per record, in record order: ``{train_id: n, ...}`` for the IDs with n > 0 and
        ``"file"``: the label path relative to ``dataset.root``.
    """
    rel = relative_label_paths(dataset)
    paths = [str(rec.label) for rec in dataset.records]
    num_classes = getattr(dataset, "num_classes", NUM_CLASSES)
    decode = getattr(dataset, "label_decoder", None)  # picklable path -> train IDs, or None
    n = len(paths)

    def _track(it):
        if not progress:
            return it
        from rich.progress import track

        return track(it, total=n, description=f"RCS stats ({dataset.dataset_name})")

    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor

        chunk = max(1, n // (workers * 8))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            counts = list(_track(pool.map(_count_label, paths, [num_classes] * n, [decode] * n,
                                          chunksize=chunk)))
    else:
        counts = [_count_label(p, num_classes, decode) for p in _track(paths)]
    return [{**dict(sorted(c.items())), "file": r} for c, r in zip(counts, rel)]


def _class_items(entry: ClassStats) -> list[tuple[int, int]]:
    return [(int(k), int(v)) for k, v in entry.items() if k != "file"]


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def _labels_key(dataset: SegmentationDataset) -> str | None:
    """The dataset's raw-value mapping as stored in the meta file (None: plain train IDs)."""
    return getattr(getattr(dataset, "label_decoder", None), "cache_key", None)


def write_class_stats(
    root: str | Path, stats: Sequence[ClassStats], labels_key: str | None = None
) -> None:
    """Write the three DAFormer statistics files and ``rcs_stats_meta.json`` into ``root``.

    Each file is written to a temporary file and moved into place (``os.replace``); the meta file
    comes last, and :func:`load_or_compute_class_stats` also checks the list itself, so an
    interrupted write is never taken for a valid cache.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    as_list, as_dict, with_class = [], {}, {}
    for entry in stats:
        items = sorted(_class_items(entry))
        f = entry["file"]
        as_list.append({**{str(c): n for c, n in items}, "file": f})
        as_dict[f] = {str(c): n for c, n in items}
        for c, n in items:
            with_class.setdefault(c, []).append([f, n])
    files = [e["file"] for e in stats]
    meta = {
        "version": META_VERSION,
        "num_files": len(files),
        "fingerprint": stats_fingerprint(files),
        "paths": "relative to the dataset root",
    }
    if labels_key is not None:
        meta["labels"] = labels_key
    _atomic_write_json(root / STATS_FILE, as_list)
    _atomic_write_json(root / STATS_DICT_FILE, as_dict)
    with_class_json = {str(c): with_class[c] for c in sorted(with_class)}
    _atomic_write_json(root / SAMPLES_WITH_CLASS_FILE, with_class_json)
    _atomic_write_json(root / META_FILE, meta)


def _match_path(path: str, root: Path, known: set[str] | None) -> str | None:
    """Map a stored path to a relative label path of the dataset (see the module docstring)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    parts = tuple(p for p in parts if p not in ("/", ""))
    for i in range(len(parts)):
        cand = "/".join(parts[i:])
        if (cand in known) if known is not None else (root / cand).is_file():
            return cand
    return None


def read_class_stats(
    root: str | Path, known_files: Iterable[str] | None = None
) -> list[ClassStats]:
    """Read ``sample_class_stats.json`` from ``root``; class keys become ints.

    Paths are returned relative to the dataset root. Files written by DAFormer's own conversion
    scripts hold absolute (or working-directory relative) paths: each is mapped to the longest
    trailing sub-path that is a known relative label path (``known_files``, e.g. from
    :func:`relative_label_paths`) or, without ``known_files``, that exists as a file under
    ``root``. Entries that match nothing are dropped with a warning.
    """
    root = Path(root)
    path = root / STATS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"RCS statistics {path} not found; compute them with `udaseg prepare` or "
            "udaseg.data.rcs.load_or_compute_class_stats."
        ) from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"RCS statistics {path} is not valid JSON ({exc}); delete it to recompute."
        ) from None
    if not isinstance(raw, list):
        raise DataError(
            f"RCS statistics {path} must hold a list of per-image dicts; delete it to recompute."
        )
    known = set(known_files) if known_files is not None else None
    out, dropped = [], []
    for entry in raw:
        if not isinstance(entry, dict) or "file" not in entry:
            raise DataError(
                f"RCS statistics {path}: entry {entry!r:.200} has no 'file'; "
                "delete the file to recompute."
            )
        rel = _match_path(str(entry["file"]), root, known)
        if rel is None:
            dropped.append(str(entry["file"]))
            continue
        out.append({**dict(sorted(_class_items(entry))), "file": rel})
    if dropped:
        warnings.warn(
            f"{len(dropped)} entries of {path} match no label file of the dataset "
            f"(first: {dropped[0]}); they are ignored.",
            stacklevel=2,
        )
    return out


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def load_or_compute_class_stats(
    dataset: SegmentationDataset,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = False,
) -> list[ClassStats]:
    """Statistics of ``dataset``, read from ``cache_dir`` (default ``dataset.root``) when valid.

    The cache is valid when ``rcs_stats_meta.json`` (if present) and the list read back both have
    the fingerprint of the dataset's relative label paths; DAFormer's files (no meta) are accepted
    when their paths map onto exactly the dataset's labels. Otherwise the statistics are
    recomputed and written; a folder that cannot be written only gives a warning.
    """
    files = relative_label_paths(dataset)
    want = stats_fingerprint(files)
    cache = Path(cache_dir) if cache_dir is not None else _dataset_root(dataset)
    if (cache / STATS_FILE).is_file():
        meta = _read_meta(cache)
        key = _labels_key(dataset)
        if (meta is None and key is None) or (
            meta is not None and meta.get("fingerprint") == want and meta.get("labels") == key
        ):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    stats = read_class_stats(cache, known_files=files)
            except DataError:
                stats = None
            if stats is not None and stats_fingerprint(e["file"] for e in stats) == want:
                order = {f: i for i, f in enumerate(files)}
                return sorted(stats, key=lambda e: order[e["file"]])
    stats = compute_class_stats(dataset, workers=workers, progress=progress)
    try:
        write_class_stats(cache, stats, _labels_key(dataset))
    except OSError as exc:
        warnings.warn(
            f"could not write the RCS statistics to {cache} ({exc}); they will be recomputed next "
            "time. Pass a writable cache_dir.",
            stacklevel=2,
        )
    return stats


# --------------------------------------------------------------------------------------------
# distribution


def rcs_class_probs(class_pixels: dict[int, int], temperature: float) -> ClassProbs:
    """P(c) = softmax_c((1 - f_c) / T) over the classes with N_c > 0 (module docstring).

    Args:
        class_pixels: N_c, total pixels per train ID over the source set.
        temperature: T > 0; ``float('inf')`` gives the uniform distribution.

    Returns:
        ``(classes, probs)``: classes sorted by ascending N_c (ties by class ID), float64 probs.
    """
    if not (temperature > 0):
        raise ValueError(f"rcs temperature must be > 0 (or inf), got {temperature}")
    present = ((int(c), int(n)) for c, n in class_pixels.items() if n > 0)
    items = sorted(present, key=lambda x: (x[1], x[0]))
    if not items:
        raise ValueError("rare class sampling: no class has any labelled pixel in the source set")
    classes = [c for c, _ in items]
    counts = np.array([n for _, n in items], dtype=np.float64)
    if math.isinf(temperature):
        return ClassProbs(classes, np.full(len(classes), 1.0 / len(classes)))
    logits = (1.0 - counts / counts.sum()) / temperature
    e = np.exp(logits - logits.max())
    return ClassProbs(classes, e / e.sum())


def total_class_pixels(stats: Iterable[ClassStats]) -> dict[int, int]:
    """N_c summed over all entries."""
    total: dict[int, int] = {}
    for entry in stats:
        for c, n in _class_items(entry):
            total[c] = total.get(c, 0) + n
    return total


# --------------------------------------------------------------------------------------------
# sampler


class RareClassDataset(Dataset):
    """The source set seen through rare class sampling; ``__getitem__`` ignores its index.

    Args:
        source: the labelled source split; its ``transform`` is the (random) train pipeline.
        stats: per-image statistics (:func:`load_or_compute_class_stats`); None = load or compute.
        config: the RCS hyper-parameters (None = :class:`RCSConfig` defaults).
        seed: seed of the class/file generator (see :meth:`seed_worker` for DDP and workers).

    Each sample is the source sample plus ``rcs_class`` (int64 scalar tensor): the drawn class.
    """

    def __init__(
        self,
        source: SegmentationDataset,
        stats: Sequence[ClassStats] | None = None,
        config: RCSConfig | None = None,
        seed: int = 0,
    ):
        config = config if config is not None else RCSConfig()
        self.source = source
        self.config = config
        if stats is None:
            stats = load_or_compute_class_stats(source)
        index = {f: i for i, f in enumerate(relative_label_paths(source))}
        unknown = [e["file"] for e in stats if e["file"] not in index]
        if unknown:
            raise DataError(
                f"{len(unknown)} RCS statistics entries name no label of {source.dataset_name} "
                f"(first: {unknown[0]}); the statistics are stale. Recompute them with "
                "udaseg.data.rcs.load_or_compute_class_stats."
            )
        classes, probs = rcs_class_probs(total_class_pixels(stats), config.class_temp)
        files: dict[int, list[int]] = {c: [] for c in classes}
        for entry in stats:
            for c, n in _class_items(entry):
                if n > config.min_pixels and c in files:
                    files[c].append(index[entry["file"]])
        empty = [c for c in classes if not files[c]]
        if empty:
            warnings.warn(
                f"rare class sampling: classes {empty} have no file with more than "
                f"{config.min_pixels} pixels; they are never drawn (rcs.min_pixels too high?).",
                stacklevel=2,
            )
            keep = [i for i, c in enumerate(classes) if files[c]]
            if not keep:
                raise ValueError(
                    "rare class sampling: no file has more than "
                    f"rcs.min_pixels={config.min_pixels} pixels of any class; lower rcs.min_pixels."
                )
            probs = probs[keep] / probs[keep].sum()
            classes = [classes[i] for i in keep]
        #: classes that can be drawn, by ascending pixel count, and their probabilities
        self.classes: list[int] = classes
        self.probs: np.ndarray = probs
        #: class -> indices (into ``source``) of the files with n_c > min_pixels, sorted
        self.files_with_class: dict[int, list[int]] = {c: sorted(files[c]) for c in classes}
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.source)

    def draw(self, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """One (class, source index) draw from ``rng`` (default: the sampler's own generator)."""
        rng = self._rng if rng is None else rng
        c = self.classes[int(rng.choice(len(self.classes), p=self.probs))]
        candidates = self.files_with_class[c]
        return c, candidates[int(rng.integers(len(candidates)))]

    def _enough(self, sample: Sample, c: int) -> bool:
        if "label" not in sample:
            raise DataError("rare class sampling: the source pipeline dropped the 'label' entry")
        thr = self.config.min_pixels * self.config.min_crop_ratio
        return int((sample["label"] == c).sum()) > thr

    def transform_with_retries(
        self, loaded: Sample, c: int, transform: Callable[[Sample], Sample] | None
    ) -> Sample:
        """Run ``transform`` (random crop, ...) on a shallow copy of ``loaded``; while the result
        holds <= ``min_pixels * min_crop_ratio`` pixels of class ``c``, re-run it on a fresh copy,
        at most ``max_crop_tries`` times, and keep the last result. ``transform=None`` returns
        ``loaded`` itself. Used by ``__getitem__`` (the source's own transform) and by
        :class:`udaseg.data.paired.PairedDataset` (the part of the pipeline after stylisation)."""
        if transform is None:
            return loaded
        sample = transform(dict(loaded))
        if self.config.min_crop_ratio > 0:
            for _ in range(self.config.max_crop_tries):
                if self._enough(sample, c):
                    break
                sample = transform(dict(loaded))
        return sample

    def get(self, idx: int, rng: np.random.Generator | None = None) -> Sample:
        """A sample whose class and file are drawn from ``rng`` (the index is ignored); used by
        :class:`udaseg.data.stream.SampleStream` with one generator per stream position."""
        c, i = self.draw(rng)
        sample = self.transform_with_retries(self.source.load(i), c, self.source.transform)
        sample["rcs_class"] = torch.tensor(c, dtype=torch.int64)
        return sample

    def __getitem__(self, idx: int) -> Sample:
        return self.get(idx)

    # ---- generator state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The class/file generator state (goes into the training checkpoint)."""
        return {"bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        bg = state.get("bit_generator") if isinstance(state, dict) else None
        kind = type(self._rng.bit_generator).__name__
        if not isinstance(bg, dict) or bg.get("bit_generator") != kind:
            raise ValueError(
                "RareClassDataset.load_state_dict: expected {'bit_generator': <numpy "
                f"{kind} state>}}, got {state!r:.200}"
            )
        self._rng.bit_generator.state = bg

    def reseed(self, seed: int) -> None:
        """Restart the class/file generator from ``seed``."""
        self._rng = np.random.default_rng(seed)

    def seed_worker(self, worker_id: int, rank: int = 0, base_seed: int | None = 0) -> None:
        """Give (base_seed, rank, worker_id) its own stream; usable as ``worker_init_fn``.

        Every DDP rank must pass its own ``rank``, otherwise all ranks draw the same classes and
        files. ``base_seed=None`` mixes in ``torch.initial_seed()`` (changes every epoch in
        non-persistent DataLoader workers).
        """
        base = torch.initial_seed() if base_seed is None else int(base_seed)
        entropy = [base, int(rank), int(worker_id)]
        if min(entropy) < 0:
            raise ValueError(f"seed_worker: seeds must be >= 0, got {entropy}")
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
