"""``udaseg prepare NAME ROOT``: make a downloaded dataset ready to train on, then check it.

Replaces the seeds' ``tools/convert_datasets/{cityscapes,gta,synthia}.py`` and CMDA's
``create_dsec_dataset_txt.py``. Per dataset:

==================  ==============================================  ====================
dataset             steps                                           checked splits
==================  ==============================================  ====================
cityscapes          labelIds -> trainIds, RCS statistics (train)    train, val (+ test)
gta                 raw IDs -> trainIds, RCS statistics             train
synthia             16-bit raw IDs -> trainIds, RCS statistics      train
dsec_night          image -> event index per sequence, split lists  train, test
dark_zurich         (ships trainIds)                                train, val, test
acdc                (ships trainIds)                                train, val, test
nighttime_driving   (ships trainIds)                                test
bdd100k_night       (ships trainIds)                                test
folder              (settings from ``--config``) RCS statistics      from ``--config``
==================  ==============================================  ====================

Every step is idempotent and interruption-safe: converted labels, index files and statistics
are written to a temporary file and renamed, and a re-run skips what is complete. The check
(:mod:`udaseg.data.check`) then counts images and labels per split and lists every problem.
``--check`` runs the check only and writes nothing.

``udaseg prepare cdda-bank --config TRAIN.yaml --out BANK`` (:func:`prepare_cdda_bank`) builds
CDDA's source bank (:mod:`udaseg.data.cdda_bank`) from a training config instead of a dataset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..catalog import DATASETS, resolve
from ..data.check import CheckReport, check_dataset


@dataclass(frozen=True)
class Preparation:
    """What ``prepare`` does for one dataset."""

    splits: dict[str, bool]
    """Split -> whether it is labelled (what the check reads)."""
    convert: bool = False
    """Raw label IDs to convert (a key of :data:`udaseg.data.convert.CONVERSIONS`)."""
    rcs_split: str | None = None
    """Split whose rare-class-sampling statistics are written into the root."""
    index: Callable[..., object] | None = None
    """Extra indexing step ``f(root, force) -> report with .lines()``."""
    label_check: Callable | None = None
    """Replaces the default label validation of the check (see :func:`check_dataset`)."""
    options: dict = field(default_factory=dict)
    """Dataset constructor options used by the check."""
    optional: tuple[str, ...] = ()
    """Splits a user may not have downloaded (server-scored test splits)."""


def _dsec_index(root: Path, force: bool):
    from ..data.dsec_index import prepare_dsec

    return prepare_dsec(root, force=force)


def _gta_label_check(label_path: Path, image_hw: tuple[int, int]) -> str | None:
    """GTA: a label of a slightly different size is resized at load time, so only a note."""
    from ..data.classes import NUM_CLASSES
    from ..data.datasets.gta import fit_label_to_image
    from ..data.io import read_label

    label = read_label(label_path, num_classes=NUM_CLASSES)
    fit_label_to_image(label, image_hw, label_path, label_path)  # raises on a wrong aspect ratio
    if tuple(label.shape[:2]) != tuple(image_hw):
        return f"{label_path} is {label.shape[0]}x{label.shape[1]}, its image {image_hw[0]}x{image_hw[1]} (resized when loaded)"
    return None


PREPARATIONS: dict[str, Preparation] = {
    "cityscapes": Preparation({"train": True, "val": True, "test": False}, convert=True,
                              rcs_split="train", optional=("test",)),
    "gta": Preparation({"train": True}, convert=True, rcs_split="train", label_check=_gta_label_check),
    "synthia": Preparation({"train": True}, convert=True, rcs_split="train"),
    "dsec_night": Preparation({"train": False, "test": True}, index=_dsec_index),
    "dark_zurich": Preparation({"train": False, "val": True, "test": False}, optional=("test",)),
    "acdc": Preparation({"train": True, "val": True, "test": False}, optional=("test",)),
    "nighttime_driving": Preparation({"test": True}),
    "bdd100k_night": Preparation({"test": True}),
    # splits, options and the RCS split come from --config (data.datasets.folder.prepare_settings)
    "folder": Preparation({}),
}


@dataclass
class PrepareResult:
    """Lines describing what was done, and the check of the prepared dataset."""

    lines: list[str]
    check: CheckReport


def prepare_dataset(
    name: str,
    root: str | Path,
    *,
    check_only: bool = False,
    workers: int | None = None,
    progress: bool = True,
    rcs: bool = True,
    force: bool = False,
    splits: list[str] | None = None,
    log: Callable[[str], None] = print,
    config: str | Path | None = None,
) -> PrepareResult:
    """Prepare (unless ``check_only``) and check dataset ``name`` at ``root``.

    Args:
        name: a dataset name of :data:`PREPARATIONS`.
        root: the dataset root as extracted from the archives.
        check_only: only check; write nothing.
        workers: processes for label conversion and statistics (default: all cores).
        rcs: write the rare class sampling statistics of the source datasets.
        force: rebuild index files that look up to date (DSEC).
        splits: check only these splits (default: every split the dataset has).
        log: receives one line per step.
        config: ``folder`` only: a YAML with its settings (a training config or just the
            folder options, see :func:`udaseg.data.datasets.folder.prepare_settings`).
    """
    from ..errors import ConfigError

    if name not in PREPARATIONS:
        raise ConfigError(
            f"udaseg prepare: unknown dataset {name!r}; choose from {', '.join(PREPARATIONS)}"
        )
    prep = PREPARATIONS[name]
    if name == "folder":
        from ..data.datasets.folder import prepare_settings

        if config is None:
            raise ConfigError(
                "udaseg prepare folder: pass the folder settings with --config X.yaml (a training "
                "config with a `name: folder` data entry, or a YAML with just its options)"
            )
        fs = prepare_settings(config, root)
        prep = dataclasses.replace(prep, splits=fs.splits, rcs_split=fs.rcs_split,
                                   options=fs.options, optional=fs.optional)
    elif config is not None:
        raise ConfigError(f"udaseg prepare: --config is read for `folder` only, not {name!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{name}: dataset root {root} does not exist; extract the dataset archives there first"
        )
    cls = resolve(DATASETS, name, "dataset")

    def build(**kwargs):
        return cls(root=root, **prep.options, **kwargs)

    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        log(line)

    conversion = None
    if not check_only and prep.convert:
        from ..data.convert import convert_dataset

        conversion = convert_dataset(name, root, workers=workers, progress=progress)
        say(
            f"{name}: train-ID labels: {conversion.converted} written, {conversion.skipped} "
            f"already done, {len(conversion.failed)} failed"
        )
    if not check_only and prep.index is not None:
        for line in prep.index(root, force).lines():
            say(line)

    wanted = prep.splits if splits is None else {s: prep.splits.get(s, True) for s in splits}
    report = check_dataset(
        name, root, wanted, build, workers=workers or 8, progress=progress,
        label_check=prep.label_check, optional=prep.optional,
    )
    if conversion is not None and conversion.failed:
        report.splits[0].problems.insert(0, conversion.failure_report())

    if not check_only and rcs and prep.rcs_split is not None:
        rcs_report = next((s for s in report.splits if s.split == prep.rcs_split), None)
        if rcs_report is not None and rcs_report.problems:
            say(f"{name}: RCS statistics not written: the {prep.rcs_split} split has problems (below)")
        else:
            from ..data.rcs import STATS_FILE, load_or_compute_class_stats

            ds = build(split=prep.rcs_split, labels=True)
            n_proc = workers if workers is not None else min(8, os.cpu_count() or 1)
            stats = load_or_compute_class_stats(ds, workers=n_proc if n_proc > 1 else 0, progress=progress)
            say(f"{name}: RCS statistics of {len(stats)} {prep.rcs_split} labels in {root / STATS_FILE}")
    return PrepareResult(lines, report)


# --------------------------------------------------------------------------------------------
# udaseg prepare cdda-bank


def load_training_configs(paths: list[str | Path]) -> dict:
    """Merge YAML training configs in order, like ``udaseg fit --config A --config B``: nested
    mappings merge key by key, anything else (lists included) is replaced by the later file."""
    import yaml

    from ..errors import ConfigError

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    merged: dict = {}
    for p in paths:
        path = Path(p)
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"training config {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"training config {path} is not valid YAML ({exc})") from None
        if not isinstance(content, dict):
            raise ConfigError(f"training config {path} must hold a mapping (trainer/model/data)")
        merged = merge(merged, content)
    return merged


def _cdda_source(data: dict, transform):
    """The training source dataset of a ``data`` section, built like ``DatasetSpec.build``;
    returns (dataset, its settings for the bank header)."""
    import inspect

    from ..errors import ConfigError

    spec = data.get("source")
    if not isinstance(spec, dict) or "name" not in spec or "root" not in spec:
        raise ConfigError("udaseg prepare cdda-bank: the config has no data.source {name, root}")
    unknown = sorted(set(spec) - {"name", "root", "split", "labels", "views", "options"})
    if unknown:
        raise ConfigError(f"data.source: unknown setting(s) {unknown}")
    if spec.get("labels", True) is False:
        raise ConfigError("udaseg prepare cdda-bank: data.source must be labelled (labels: true)")
    name = str(spec["name"])
    cls = resolve(DATASETS, name, "dataset")
    options = dict(spec.get("options") or {})
    accepted = set(inspect.signature(cls).parameters)
    bad = sorted(set(options) - accepted)
    if bad:
        raise ConfigError(f"dataset {name!r}: unknown option(s) {bad}; {cls.__name__} accepts "
                          f"{sorted(accepted - {'root', 'split', 'labels', 'transform'})}")
    kwargs = dict(root=spec["root"], split=spec.get("split", "train"), labels=True, transform=transform)
    views = spec.get("views")
    if views is not None:
        kwargs["views"] = list(views)
    ds = cls(**kwargs, **options)
    if not ds.records or "depth" not in ds.records[0].views:
        raise ConfigError(
            f"udaseg prepare cdda-bank: data.source ({name} at {spec['root']}) has no depth view, "
            "and the bank's class x depth histograms need the source depth maps. Add "
            "`views: [depth]` to data.source (the maps go in <root>/depth_any/, written by "
            "`udaseg depth`; SynthNight copies have them)."
        )
    from ..data.cdda_bank import source_fingerprint

    settings = {
        "name": name, "class": DATASETS[name], "root": str(Path(spec["root"]).resolve()),
        "split": kwargs["split"], "views": list(views) if views is not None else ["depth"],
        "options": options, "len": len(ds), "fingerprint": source_fingerprint(ds),
    }
    return ds, settings


def prepare_cdda_bank(
    configs: list[str | Path],
    out: str | Path,
    *,
    n: int | None = None,
    workers: int = 0,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Build CDDA's source bank from the training config(s) (:mod:`udaseg.data.cdda_bank`).

    The crops are the first ``n`` positions (default: the source dataset's size, as CDDA) of
    the training source stream of rank 0: the same dataset, source pipeline (resize, crop size,
    ``cat_max_ratio``, flip), rare class sampling and ``data.seed`` as ``udaseg fit`` with these
    configs (:class:`udaseg.engine.datamodule.UDADataModule`, domain 0 of the stream seed).
    """
    import warnings

    from ..configparse import config_from_dict
    from ..data.cdda_bank import IndexReporting, build_bank
    from ..data.rcs import RareClassDataset, RCSConfig
    from ..data.stream import SampleStream
    from ..data.transforms import PipelineConfig
    from ..errors import ConfigError

    if not configs:
        raise ConfigError("udaseg prepare cdda-bank: pass the training config with --config X.yaml")
    cfg = load_training_configs(configs)
    data = cfg.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError("udaseg prepare cdda-bank: the config's data section must be a mapping")
    if data.get("synthnight") is not None:  # what UDADataModule.prepare_data does
        from ..data.synthnight import SynthNightConfig, generate

        generate(Path(data.get("synthnight_root", "data/synthnight")),
                 config_from_dict(SynthNightConfig, data["synthnight"], "data.synthnight"))
    if data.get("stylize") is not None and data.get("target") is not None:
        warnings.warn(
            "data.stylize is set: training draws its source crops through the paired (CISS) "
            "stream; the bank uses the plain source stream (same distribution, other draws).",
            stacklevel=2,
        )
    if "source_pipeline" in data and data["source_pipeline"] is not None:
        pipeline = config_from_dict(PipelineConfig, data["source_pipeline"], "data.source_pipeline")
    else:
        pipeline = PipelineConfig(cat_max_ratio=0.75)  # UDADataModule's default
    rcs = config_from_dict(RCSConfig, data["rcs"], "data.rcs") if data.get("rcs") is not None else None
    seed = int(data.get("seed", 0))
    source, source_settings = _cdda_source(data, pipeline.train())
    ds = IndexReporting(source)
    if rcs is not None:
        ds = RareClassDataset(ds, config=rcs, seed=seed)
    stream = SampleStream(ds, seed=seed * 16 + 0, rank=0)  # UDADataModule._train_loader, domain 0
    n = len(source) if n is None else int(n)
    header = {
        "crop_size": [int(v) for v in pipeline.crop_size],
        "seed": seed,
        "stream": {"seed": seed * 16, "rank": 0, "positions": [0, n]},
        "rcs": dataclasses.asdict(rcs) if rcs is not None else None,
        "source": source_settings,
        "pipeline": {
            "scale": [int(v) for v in pipeline.scale],
            "crop_size": [int(v) for v in pipeline.crop_size],
            "cat_max_ratio": float(pipeline.cat_max_ratio),
            "flip_prob": float(pipeline.flip_prob),
            "mean": [float(v) for v in pipeline.mean],
            "std": [float(v) for v in pipeline.std],
        },
    }
    return build_bank(out, stream, n, header, workers=workers, progress=progress, force=force, log=log)
