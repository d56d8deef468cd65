"""A generic dataset read from two glob patterns: any folder of images with label maps.

For data without a dedicated loader. Images and labels are found by glob patterns relative to
the root, with ``{split}`` replaced by the split name, e.g. a Cityscapes-style copy::

    image_glob: "leftImg8bit/{split}/**/*_leftImg8bit.png"
    label_glob: "gtFine/{split}/**/*_gtFine_labelTrainIds.png"
    image_suffix: "_leftImg8bit.png"
    label_suffix: "_gtFine_labelTrainIds.png"

Pairing: every image gets a *key*, its path below the pattern's fixed folder (the components
before the first wildcard, here ``leftImg8bit/<split>``) without ``image_suffix``
(``aachen/aachen_000000_000019``); a label is paired with the image of the same key, computed
the same way with ``label_suffix``. Without a suffix the file extension is dropped (``x.jpg``
pairs with ``x.png``). ``pair_by: stem`` keys on the file name only, for label folders laid out
differently from the image folders (two labels with one key are an error then). Images whose
label is missing are listed in one error, with the label path that was looked for.

Label encodings (``label_encoding``, inferred from the map given when unset):

* ``train_ids`` (default): single-channel PNGs holding the 19 train IDs and 255 (ignore);
* ``ids``: single-channel raw IDs mapped by ``id_map: {raw: train_id}`` (Cityscapes labelIds:
  ``{7: 0, 8: 1, ...}``); 8/16-bit labels go through a lookup table, others through a sorted
  search;
* ``colors``: RGB labels mapped by ``color_map``: ``{"128,64,128": 0, "#f423e8": 1, ...}``, a
  list of ``[r, g, b, train_id]``, or ``cityscapes`` (the Cityscapes palette).

Raw IDs and colours not in the map become 255. The map may instead come from a YAML or JSON
file, ``label_map_file``, holding ``{id_map: ...}`` or ``{color_map: ...}`` (a relative path is
looked up in the working directory, then in the root).

``label_set`` (optional, a name of :data:`udaseg.data.classes.LABEL_SETS`) states which classes
the dataset annotates; ``udaseg prepare folder`` notes labels holding other classes. The mean
that training reports is chosen by ``model.label_set``: set it to the same name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ...errors import ConfigError
from ..classes import CITYSCAPES_PALETTE, IGNORE_INDEX, NUM_CLASSES, label_set as get_label_set
from ..io import DataError, read_label
from ..transforms import Sample
from .base import Record, SegmentationDataset, report_missing, require_dir

ENCODINGS = ("train_ids", "ids", "colors")
PAIR_BY = ("path", "stem")
WILDCARDS = frozenset("*?[")

#: the keyword arguments of :class:`FolderDataset` that describe the folder (``options:``)
OPTION_NAMES = (
    "image_glob", "label_glob", "image_suffix", "label_suffix", "pair_by", "label_encoding",
    "id_map", "color_map", "label_map_file", "label_set",
)


# ----------------------------------------------------------------------------- label encodings


@dataclass(frozen=True)
class LabelDecoder:
    """Reads one label file as (H, W) uint8 train IDs; picklable (RCS counts in processes).

    ``keys`` are raw IDs (``ids``) or packed colours ``r << 16 | g << 8 | b`` (``colors``),
    sorted, and ``values`` their train IDs.
    """

    encoding: str = "train_ids"
    keys: tuple[int, ...] = ()
    values: tuple[int, ...] = ()

    @property
    def cache_key(self) -> str | None:
        """Identifies the mapping in the RCS statistics' meta file (None for plain train IDs,
        the encoding every built-in loader uses, so they share one statistics cache)."""
        if self.encoding == "train_ids":
            return None
        return json.dumps([self.encoding, self.keys, self.values])

    def __call__(self, path: str | Path) -> np.ndarray:
        return self.decode(path)

    def decode(self, path: str | Path) -> np.ndarray:
        """The train IDs of the label at ``path`` (unmapped values -> 255)."""
        if self.encoding == "train_ids":
            return read_label(path, num_classes=NUM_CLASSES)
        raw = self.read_raw(path)
        if self.encoding == "colors":
            rgb = raw.astype(np.int64)
            raw = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        return self._lookup(raw)

    def read_raw(self, path: str | Path) -> np.ndarray:
        """The file's values before mapping: (H, W) IDs or (H, W, 3) uint8 colours."""
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        try:
            with Image.open(path) as im:
                im.load()
                if self.encoding == "colors":
                    return np.array(im.convert("RGB"))
                if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                    raise DataError(
                        f"label {path} has image mode {im.mode!r}, but label_encoding 'ids' "
                        "expects single-channel raw IDs; colour-coded labels need a `color_map`."
                    )
                return np.array(im)
        except FileNotFoundError:
            raise FileNotFoundError(f"label file not found: {path}") from None
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            raise DataError(
                f"cannot read label {path}: {exc}. The file is damaged; restore it from the "
                "dataset archive."
            ) from None

    def _lookup(self, raw: np.ndarray) -> np.ndarray:
        keys = np.asarray(self.keys, dtype=np.int64)
        values = np.asarray(self.values, dtype=np.uint8)
        if raw.dtype in (np.uint8, np.uint16):  # a full table: one indexing pass
            table = np.full(1 << (8 * raw.dtype.itemsize), IGNORE_INDEX, dtype=np.uint8)
            inside = keys < table.size
            table[keys[inside]] = values[inside]
            return table[raw]
        flat = raw.astype(np.int64, copy=False)
        pos = np.searchsorted(keys, flat).clip(0, len(keys) - 1)
        return np.where(keys[pos] == flat, values[pos], IGNORE_INDEX).astype(np.uint8)


def _train_id(value, where: str) -> int:
    try:
        tid = int(value)
    except (TypeError, ValueError):
        tid = -1
    if not (0 <= tid < NUM_CLASSES or tid == IGNORE_INDEX) or isinstance(value, bool):
        raise ConfigError(
            f"{where}: {value!r} is not a train ID; map to 0..{NUM_CLASSES - 1} or "
            f"{IGNORE_INDEX} (ignore)"
        )
    return tid


def _parse_color(key, where: str) -> int:
    """``"r,g,b"``, ``"#rrggbb"`` or a 3-sequence -> packed ``r << 16 | g << 8 | b``."""
    rgb = None
    if isinstance(key, str) and key.startswith("#") and len(key) == 7:
        try:
            rgb = [int(key[i : i + 2], 16) for i in (1, 3, 5)]
        except ValueError:
            rgb = None
    elif isinstance(key, str):
        try:
            rgb = [int(p) for p in key.replace(" ", "").strip("()[]").split(",")]
        except ValueError:
            rgb = None
    elif isinstance(key, Sequence):
        try:
            rgb = [int(p) for p in key]
        except (TypeError, ValueError):
            rgb = None
    if rgb is None or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ConfigError(
            f"{where}: colour {key!r} is not 'r,g,b', '#rrggbb' or [r, g, b] with values 0..255"
        )
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def _sorted_map(pairs: list[tuple[int, int]], where: str, what: str) -> tuple[tuple, tuple]:
    seen: dict[int, int] = {}
    for k, v in pairs:
        if k in seen and seen[k] != v:
            raise ConfigError(f"{where}: {what} {k} is mapped twice ({seen[k]} and {v})")
        seen[k] = v
    if not seen:
        raise ConfigError(f"{where}: the map is empty")
    keys = tuple(sorted(seen))
    return keys, tuple(seen[k] for k in keys)


def parse_id_map(id_map: Mapping, where: str = "id_map") -> tuple[tuple, tuple]:
    """``{raw: train_id}`` (keys may be strings, as JSON has them) -> sorted keys, values."""
    if not isinstance(id_map, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping {{raw_id: train_id}}, got {type(id_map).__name__}"
        )
    pairs = []
    for k, v in id_map.items():
        try:
            raw = int(k)
        except (TypeError, ValueError):
            raw = -1
        if raw < 0 or isinstance(k, bool):
            raise ConfigError(f"{where}: key {k!r} is not a raw label ID (an integer >= 0)")
        pairs.append((raw, _train_id(v, f"{where}[{k!r}]")))
    return _sorted_map(pairs, where, "raw ID")


def parse_color_map(color_map, where: str = "color_map") -> tuple[tuple, tuple]:
    """``{"r,g,b": train_id}``, ``[[r, g, b, train_id], ...]`` or ``"cityscapes"``."""
    if color_map == "cityscapes":
        color_map = [[*rgb, tid] for tid, rgb in enumerate(CITYSCAPES_PALETTE)]
    pairs = []
    if isinstance(color_map, Mapping):
        for k, v in color_map.items():
            pairs.append((_parse_color(k, where), _train_id(v, f"{where}[{k!r}]")))
    elif isinstance(color_map, Sequence) and not isinstance(color_map, str):
        for i, entry in enumerate(color_map):
            if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 4:
                raise ConfigError(f"{where}[{i}]: expected [r, g, b, train_id], got {entry!r}")
            at = f"{where}[{i}]"
            pairs.append((_parse_color(entry[:3], at), _train_id(entry[3], at)))
    else:
        raise ConfigError(
            f"{where}: expected a mapping {{'r,g,b': train_id}}, a list of [r, g, b, train_id] "
            f"or 'cityscapes', got {color_map!r:.100}"
        )
    return _sorted_map(pairs, where, "colour")


def read_label_map_file(path: Path) -> dict:
    """``{id_map: ...}`` or ``{color_map: ...}`` from a YAML or JSON file."""
    import yaml

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"folder: label_map_file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"folder: label_map_file {path} is not valid YAML/JSON: {exc}") from None
    keys = set(content) if isinstance(content, dict) else set()
    if len(keys & {"id_map", "color_map"}) != 1 or keys - {"id_map", "color_map"}:
        raise ConfigError(
            f"folder: label_map_file {path} must hold exactly one of the keys 'id_map' "
            "({raw_id: train_id}) or 'color_map' ({'r,g,b': train_id}), and nothing else"
        )
    return content


def build_decoder(
    label_encoding: str | None = None,
    id_map: Mapping | None = None,
    color_map=None,
    label_map_file: str | Path | None = None,
    root: Path | None = None,
) -> LabelDecoder:
    """The :class:`LabelDecoder` of the folder options (see the module docstring)."""
    where = "folder"
    if label_map_file is not None:
        if id_map is not None or color_map is not None:
            raise ConfigError(
                f"{where}: give the label map either inline (id_map / color_map) or as "
                "label_map_file, not both"
            )
        path = Path(label_map_file)
        if not path.is_absolute() and not path.is_file() and root is not None:
            path = root / path
        content = read_label_map_file(path)
        id_map, color_map = content.get("id_map"), content.get("color_map")
        where = f"folder label_map_file {path}"
    if id_map is not None and color_map is not None:
        raise ConfigError(f"{where}: give id_map or color_map, not both")
    inferred = "ids" if id_map is not None else "colors" if color_map is not None else "train_ids"
    encoding = label_encoding or inferred
    if encoding not in ENCODINGS:
        raise ConfigError(f"folder: unknown label_encoding {encoding!r}; choose from {ENCODINGS}")
    if encoding != inferred:
        need = {"train_ids": "no id_map / color_map", "ids": "an id_map", "colors": "a color_map"}
        raise ConfigError(
            f"{where}: label_encoding {encoding!r} needs {need[encoding]}, but the settings "
            f"give {need[inferred]}"
        )
    if encoding == "ids":
        keys, values = parse_id_map(id_map, f"{where} id_map")
    elif encoding == "colors":
        keys, values = parse_color_map(color_map, f"{where} color_map")
    else:
        keys, values = (), ()
    return LabelDecoder(encoding, keys, values)


# ------------------------------------------------------------------------------------ the listing


def split_pattern(pattern: str, split: str) -> tuple[PurePosixPath, str]:
    """``{split}`` substituted; (fixed folder before the first wildcard, the rest)."""
    text = pattern.replace("{split}", split)
    parts = PurePosixPath(text).parts
    if not parts or PurePosixPath(text).is_absolute() or ".." in parts:
        raise ConfigError(
            f"folder: glob {pattern!r} must be a pattern relative to the root, without '..' "
            "(e.g. 'images/{split}/**/*.png')"
        )
    fixed = 0
    while fixed < len(parts) - 1 and not WILDCARDS & set(parts[fixed]):
        fixed += 1
    return PurePosixPath(*parts[:fixed]) if fixed else PurePosixPath("."), "/".join(parts[fixed:])


def _key(rel: str, suffix: str | None, pair_by: str) -> str | None:
    """The pairing key of the file at ``rel`` (below the fixed folder); None without ``suffix``."""
    if pair_by == "stem":
        rel = rel.rsplit("/", 1)[-1]
    if suffix:
        return rel[: -len(suffix)] if rel.endswith(suffix) and len(rel) > len(suffix) else None
    stem = PurePosixPath(rel)
    return str(stem.with_suffix("")) if stem.suffix else rel


def _listing(root: Path, pattern: str, split: str, what: str) -> tuple[Path, list[Path]]:
    prefix, rest = split_pattern(pattern, split)
    folder = require_dir(
        root / prefix,
        f"folder root {root}: the {what} of split {split!r} ({what}_glob {pattern!r})",
        f"Check the root and `{what}_glob` (the part before the first wildcard must be a folder "
        "under the root; '{split}' is replaced by the split name).",
    )
    files = [p for p in sorted(folder.glob(rest)) if p.is_file() and not p.name.startswith(".")]
    return folder, files


class FolderDataset(SegmentationDataset):
    """Images and labels found by glob patterns, paired by key (module docstring).

    Args:
        root: the dataset folder; the patterns are relative to it.
        split: substituted for ``{split}`` in the patterns.
        labels: load the labels (False lists images only, e.g. as a UDA target).
        image_glob: images, e.g. ``"leftImg8bit/{split}/**/*_leftImg8bit.png"``.
        label_glob: labels, e.g. ``"gtFine/{split}/**/*_gtFine_labelTrainIds.png"``.
        image_suffix / label_suffix: dropped from the file names to form the pairing keys
            (default: the file extension).
        pair_by: ``path`` (relative path below the pattern's fixed folder) or ``stem`` (file name).
        label_encoding: ``train_ids``, ``ids`` or ``colors`` (default: inferred from the map).
        id_map: ``{raw_id: train_id}``; unmapped IDs -> 255.
        color_map: ``{"r,g,b": train_id}``, ``[[r, g, b, train_id], ...]`` or ``"cityscapes"``.
        label_map_file: a YAML/JSON file with ``id_map`` or ``color_map`` instead.
        label_set: the classes the dataset annotates (``cityscapes19``, ``synthia16``, ...).
        views: no extra views exist; accepted so that every loader takes the same arguments.
        transform: joint transform applied to each sample dict.
    """

    dataset_name = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        labels: bool = True,
        image_glob: str = "images/{split}/**/*.png",
        label_glob: str = "labels/{split}/**/*.png",
        image_suffix: str | None = None,
        label_suffix: str | None = None,
        pair_by: str = "path",
        label_encoding: str | None = None,
        id_map: dict | None = None,
        color_map: dict | list | str | None = None,
        label_map_file: str | None = None,
        label_set: str | None = None,
        views: Sequence[str] = (),
        transform: Callable[[Sample], Sample] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        if views:
            raise ConfigError(f"folder: has no extra views (got {list(views)})")
        if pair_by not in PAIR_BY:
            raise ConfigError(f"folder: unknown pair_by {pair_by!r}; choose from {PAIR_BY}")
        self.label_set = get_label_set(label_set) if label_set is not None else None
        self.label_decoder = build_decoder(
            label_encoding, id_map, color_map, label_map_file, self.root
        )
        require_dir(self.root, "folder dataset", "Set `root` to the folder of the glob patterns.")
        img_dir, images = _listing(self.root, image_glob, split, "image")
        if not images:
            raise DataError(
                f"folder: no file under {img_dir} matches image_glob {image_glob!r} (split "
                f"{split!r}). Check the pattern ('**' matches any number of sub-folders)."
            )
        by_key: dict[str, Path] = {}
        duplicates: list[str] = []
        if labels:
            lab_dir, label_files = _listing(self.root, label_glob, split, "label")
            for lab in label_files:
                key = _key(lab.relative_to(lab_dir).as_posix(), label_suffix, pair_by)
                if key is None:
                    continue
                if key in by_key:
                    duplicates.append(f"{by_key[key]} and {lab} (key {key!r})")
                by_key[key] = lab
        report_missing(
            duplicates, f"folder {split} labels share a pairing key",
            "With pair_by: stem the label file names must be unique; use pair_by: path.",
        )
        records, missing = [], []
        for img in images:
            key = _key(img.relative_to(img_dir).as_posix(), image_suffix, pair_by)
            if key is None:
                continue  # matched by the glob but without image_suffix: not an image of the set
            label = None
            if labels:
                label = by_key.get(key)
                if label is None:
                    label_name = f"{key}{label_suffix or '.<ext>'}"
                    want = lab_dir / ("" if pair_by == "path" else "**") / label_name
                    missing.append(f"{img} -> {want}")
            records.append(Record(name=PurePosixPath(key).name, image=img, label=label))
        report_missing(
            missing,
            f"folder {split} images have no label (label_glob {label_glob!r})",
            "Add the labels, or fix label_glob / image_suffix / label_suffix so that each image "
            "and its label get the same key (the path below the patterns' fixed folders, "
            "suffix removed); `labels: false` reads the images only.",
        )
        if not records:
            raise DataError(
                f"folder: none of the {len(images)} files matching image_glob {image_glob!r} "
                f"under {img_dir} ends in image_suffix {image_suffix!r}"
            )
        super().__init__(records, transform)

    def load_label(self, rec: Record, image_size: tuple[int, int]) -> np.ndarray:
        label = self.label_decoder(rec.label)
        if tuple(label.shape[:2]) != tuple(image_size):
            raise DataError(
                f"label {rec.label} has size {label.shape[0]}x{label.shape[1]} (HxW) but its "
                f"image {rec.image} has {image_size[0]}x{image_size[1]}; check the pairing "
                "(label_glob, suffixes) or restore the label."
            )
        return label

    def check_label(self, path: Path, image_hw: tuple[int, int]) -> str | None:
        """``udaseg prepare``'s check of one label: raises DataError for a problem (unreadable,
        wrong mode or size, train IDs out of range), returns a note for a suspicious one (no
        mapped pixel at all, classes outside ``label_set``)."""
        label = self.load_label(Record(name="", image=Path("<image>"), label=Path(path)), image_hw)
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
        if self.label_decoder.encoding != "train_ids" and present.tolist() == [IGNORE_INDEX]:
            raw = self.label_decoder.read_raw(path)
            if raw.ndim == 3:  # colours
                values = np.unique(raw.reshape(-1, raw.shape[-1]), axis=0)
            else:
                values = np.unique(raw)
            which = "id_map" if self.label_decoder.encoding == "ids" else "color_map"
            return (f"{path}: no pixel maps to a train ID (raw values {values[:8].tolist()}); "
                    f"check the {which}")
        if self.label_set is not None:
            known = set(self.label_set.class_ids) | {IGNORE_INDEX}
            outside = [int(c) for c in present if c not in known]
            if outside:
                return f"{path} holds classes {outside} outside label_set {self.label_set.name}"
        return None


# ------------------------------------------------------------------------- `udaseg prepare folder`


@dataclass(frozen=True)
class PrepareSettings:
    """What ``udaseg prepare folder ROOT --config X.yaml`` reads from X.yaml."""

    options: dict
    """The folder options (keyword arguments of :class:`FolderDataset` in :data:`OPTION_NAMES`)."""
    splits: dict[str, bool]
    """Split -> labelled, the splits to check."""
    rcs_split: str | None
    """The split whose RCS statistics are written (the training source)."""
    optional: tuple[str, ...] = ()
    """Splits that may be absent (a note, not a problem)."""


def _check_options(options: dict, where: str) -> dict:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(
            f"{where}: unknown folder setting(s) {unknown}; known: {list(OPTION_NAMES)}"
        )
    return dict(options)


def prepare_settings(config: str | Path, root: str | Path) -> PrepareSettings:
    """Read the folder settings of ``udaseg prepare folder`` from a YAML file, either

    * a training config (a ``data:`` section): its entries with ``name: folder`` (source,
      target, val, predict) whose ``root`` is ``root`` (all of them if none is) give the
      ``options`` (which must agree) and the splits; RCS statistics are written for the source
      split when the source is one of them; or
    * a small YAML holding just the folder options (the keys of ``options:``), plus optionally
      ``splits: [train, val]`` (or ``{train: true, test: false}``: split -> labelled). Default:
      ``train`` and ``val`` (``val`` may be absent); RCS statistics for ``train``.
    """
    import yaml

    path = Path(config)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"udaseg prepare folder: config {path} does not exist") from None
    if not isinstance(content, dict):
        raise ConfigError(f"udaseg prepare folder: {path} must hold a mapping")
    if "data" not in content:
        where = f"udaseg prepare folder: {path}"
        splits = content.pop("splits", None)
        optional: tuple[str, ...] = ()
        if splits is None:
            splits, optional = {"train": True, "val": True}, ("val",)
        elif isinstance(splits, list):
            splits = {str(s): True for s in splits}
        elif not isinstance(splits, dict):
            raise ConfigError(
                f"{where}: splits must be a list of names or a mapping split -> labelled"
            )
        rcs = "train" if splits.get("train") else None
        return PrepareSettings(_check_options(content, where), dict(splits), rcs, optional)

    data = content.get("data") or {}
    entries: list[tuple[str, dict]] = []
    for role in ("source", "target", "predict"):
        if isinstance(data.get(role), dict) and data[role].get("name") == "folder":
            entries.append((role, data[role]))
    for name, spec in (data.get("val") or {}).items():
        if isinstance(spec, dict) and spec.get("name") == "folder":
            entries.append((f"val.{name}", spec))
    if not entries:
        raise ConfigError(
            f"udaseg prepare folder: {path} has a data section but no entry with `name: folder` "
            "(data.source / target / val.* / predict); pass that config or a YAML with just the "
            "folder settings"
        )
    here = Path(root).resolve()
    matching = [e for e in entries if Path(str(e[1].get("root", ""))).resolve() == here]
    entries = matching or entries
    options = {
        k: _check_options(dict(s.get("options") or {}), f"{path} data.{k}") for k, s in entries
    }
    first = next(iter(options.values()))
    differ = [k for k, o in options.items() if o != first]
    if differ:
        raise ConfigError(
            f"udaseg prepare folder: the folder entries of {path} ({', '.join(options)}) have "
            f"different options ({', '.join(differ)} differ from {entries[0][0]}); give their "
            "root as ROOT, or a YAML with just the folder settings"
        )
    splits: dict[str, bool] = {}
    for role, spec in entries:
        split = str(spec.get("split", "train"))
        labelled = bool(spec.get("labels", True)) and role != "predict"
        splits[split] = splits.get(split, False) or labelled
    source = dict(entries).get("source")
    rcs = str(source.get("split", "train")) if source and source.get("labels", True) else None
    return PrepareSettings(first, splits, rcs)
