"""UDADataModule: source (labelled), optional target (unlabelled) and named validation splits.

Training batches are dicts ``{"source": batch}`` or ``{"source": batch, "target": batch}``;
every batch is a dict of stacked sample entries (see :mod:`udaseg.data.transforms`). With
``stylize`` set (CISS) both domains come from one loader over
:class:`~udaseg.data.paired.PairedDataset` and each batch also holds ``stylized`` views.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..catalog import DATASETS, resolve
from ..data.rcs import RCSConfig
from ..data.stylize import StylizeConfig
from ..data.synthnight import SynthNightConfig
from ..data.transforms import PipelineConfig


@dataclass
class DatasetSpec:
    """One split of one dataset, by catalogue name (see :data:`udaseg.catalog.DATASETS`)."""

    name: str
    root: str
    split: str = "train"
    labels: bool = True
    views: list[str] | None = None
    """Extra views to load (None: the dataset's default, e.g. events for ``dsec_night``)."""
    options: dict = field(default_factory=dict)
    """Dataset-specific keyword arguments (e.g. ``{conditions: [night]}`` for ACDC)."""

    def build(self, transform):
        cls = resolve(DATASETS, self.name, "dataset")
        kwargs = dict(root=self.root, split=self.split, labels=self.labels, transform=transform)
        if self.views is not None:
            kwargs["views"] = self.views
        import inspect

        accepted = set(inspect.signature(cls).parameters)
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            from ..errors import ConfigError

            raise ConfigError(
                f"dataset {self.name!r}: unknown option(s) {unknown}; {cls.__name__} accepts "
                f"{sorted(accepted - {'root', 'split', 'labels', 'transform'})}"
            )
        kwargs.update(self.options)
        return cls(**kwargs)


class UDADataModule(L.LightningDataModule):
    """Data for source-only, UDA and oracle training.

    Args:
        source: the labelled training split.
        val: validation splits by display name (e.g. ``{"day_val": ..., "night_val": ...}``).
        target: the unlabelled target training split (None for source-only training).
        source_pipeline / target_pipeline: resize, crop and flip of each domain.
        batch_size: images per domain per iteration (2 in every paper config).
        num_workers: data loading processes per loader.
        synthnight: generate this SynthNight copy into ``synthnight_root`` in ``prepare_data``
            (an identical complete copy is reused).
        synthnight_root: where the SynthNight copy goes.
        rcs: rare class sampling of the source (DAFormer: ``class_temp 0.01, min_pixels 3000,
            min_crop_ratio 0.5``; HRDA/MIC: ``min_crop_ratio 2.0``). Class statistics are computed
            once and cached next to the dataset.
        seed: seed of the training data streams (:mod:`udaseg.data.stream`; each rank reads
            its own stream, and a resumed run continues it exactly).
        predict: the split ``udaseg predict`` runs on (e.g. Dark Zurich ``test``); read without
            labels, with the target's test pipeline (the source's for a source-dataset split),
            one image per batch since test images may differ in size. Predictions come back at
            each image's original size (see ``UDAModule.predict_step``).
        stylize: CISS stylised views (e.g. ``{method: fda, beta: 0.01, common_size: [1024, 1920]}``).
            With a target, training uses ONE loader over source/target pairs
            (:class:`~udaseg.data.paired.PairedDataset`): each domain's batch gains ``stylized``
            (normalised like ``image``, same crop and flip); RCS, if set, draws the source.
        pin_memory: page-locked loader batches; None = on when training on a CUDA device.
    """

    def __init__(
        self,
        source: DatasetSpec,
        val: dict[str, DatasetSpec],
        target: DatasetSpec | None = None,
        source_pipeline: PipelineConfig | None = None,
        target_pipeline: PipelineConfig | None = None,
        batch_size: int = 2,
        val_batch_size: int = 4,
        num_workers: int = 4,
        synthnight: SynthNightConfig | None = None,
        synthnight_root: str = "data/synthnight",
        rcs: RCSConfig | None = None,
        seed: int = 0,
        predict: DatasetSpec | None = None,
        stylize: StylizeConfig | None = None,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        self.source_spec = source
        self.target_spec = target
        self.val_specs = dict(val)
        self.source_pipeline = source_pipeline or PipelineConfig(cat_max_ratio=0.75)
        self.target_pipeline = target_pipeline or PipelineConfig(scale=(960, 540))
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.synthnight = synthnight
        self.synthnight_root = synthnight_root
        self.rcs = rcs
        self.seed = seed
        self.predict_spec = dataclasses.replace(predict, labels=False) if predict is not None else None
        self.predict_set = None
        self.stylize = stylize
        self.pin_memory = pin_memory
        self.train_set = None
        """The paired dataset when ``stylize`` is set and there is a target, else None."""

    @property
    def val_names(self) -> list[str]:
        return list(self.val_specs)

    def prepare_data(self) -> None:
        if self.synthnight is not None:
            from ..data.synthnight import generate

            generate(Path(self.synthnight_root), self.synthnight)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self._paired():
            self._setup_paired()
        elif stage in (None, "fit"):
            self.source_set = self.source_spec.build(self.source_pipeline.train())
            if self.rcs is not None:
                from ..data.rcs import RareClassDataset

                self.source_set = RareClassDataset(self.source_set, config=self.rcs, seed=self.seed)
            self.target_set = (
                self.target_spec.build(self.target_pipeline.train()) if self.target_spec else None
            )
        if stage in (None, "predict") and self.predict_spec is not None:
            self.predict_set = self.predict_spec.build(self._eval_pipeline(self.predict_spec).test())
        if stage == "predict":
            return  # prediction needs no validation split (its root may not exist there)
        # validation splits are scored with the target's test pipeline (day splits with the source's)
        self.val_sets = {}
        for name, spec in self.val_specs.items():
            self.val_sets[name] = spec.build(self._eval_pipeline(spec).test())

    def _paired(self) -> bool:
        if self.stylize is not None and self.target_spec is None:
            import warnings

            warnings.warn(
                "data.stylize is set but there is no data.target: nothing to stylise towards, "
                "training batches carry no 'stylized' view.",
                stacklevel=2,
            )
        return self.stylize is not None and self.target_spec is not None

    def _setup_paired(self) -> None:
        """Source and target without transforms; the PairedDataset runs both pipelines."""
        from ..data.paired import PairedDataset

        source = self.source_spec.build(None)
        rcs = None
        if self.rcs is not None:
            from ..data.rcs import RareClassDataset

            rcs = RareClassDataset(source, config=self.rcs, seed=self.seed)
        self.source_set = rcs if rcs is not None else source
        self.target_set = self.target_spec.build(None)
        self.train_set = PairedDataset(
            source, self.target_set, self.stylize, self.source_pipeline, self.target_pipeline,
            rcs=rcs, seed=self.seed,
        )

    def _eval_pipeline(self, spec: DatasetSpec) -> PipelineConfig:
        """The target's pipeline, or the source's for a split of the source dataset."""
        return self.target_pipeline if spec.name != self.source_spec.name else self.source_pipeline

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def state_dict(self) -> dict:
        """Saved in every checkpoint. The training streams need no state beyond the seed: sample
        p of a stream is a pure function of (seed, domain, rank, p) and a resumed run restarts
        at position ``global_step x batch_size`` (:mod:`udaseg.data.stream`)."""
        return {"seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state and {"seed", "batch_size"} <= set(state) and (
            state["seed"] != self.seed or state["batch_size"] != self.batch_size
        ):
            import warnings

            warnings.warn(
                f"resuming with data.seed={self.seed}, data.batch_size={self.batch_size} but the "
                f"checkpoint was trained with {state['seed']}, {state['batch_size']}: the data "
                "stream will differ from the interrupted run's",
                stacklevel=2,
            )

    def _pin(self) -> bool:
        """``pin_memory`` if set, else on when the trainer runs on a CUDA device: page-locked
        batches make Lightning's non-blocking host-to-device copies truly asynchronous."""
        if self.pin_memory is not None:
            return self.pin_memory
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        device = getattr(strategy, "root_device", None)
        return device is not None and device.type == "cuda"

    def _train_loader(self, ds, domain: int) -> DataLoader:
        # Training is counted in iterations (the papers' 40k), not epochs: with max_steps set, one
        # "epoch" is the whole run. Batch t reads positions t*B .. t*B+B-1 of a deterministic
        # stream, so a resumed run (global_step t) continues exactly where the interrupted one was.
        from ..data.stream import SampleStream, StreamSampler

        trainer = self.trainer
        steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        bs = self.batch_size

        def next_position() -> int:  # iterations done x batch size, read when an iterator starts
            return int(getattr(trainer, "global_step", 0) or 0) * bs if trainer is not None else 0

        if steps and steps > 0:  # iteration-based (every shipped config): exact resume
            sampler = StreamSampler(next_position, steps * bs)
        else:  # epoch-based: epoch e reads its own stretch of the stream (resumed at epoch starts)
            sampler = StreamSampler(0, len(ds) // bs * bs, epochs=True)
        stream = SampleStream(ds, seed=self.seed * 16 + domain, rank=self._rank())
        return DataLoader(
            stream, batch_size=self.batch_size, sampler=sampler,
            drop_last=True, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=self._pin(),
            # the loader's own generator: creating its iterator must not consume the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self):
        if self.train_set is not None:  # stylize: one loader, items {"source": .., "target": ..}
            return self._train_loader(self.train_set, domain=2)
        loaders = {"source": self._train_loader(self.source_set, domain=0)}
        if self.target_set is not None:
            loaders["target"] = self._train_loader(self.target_set, domain=1)
        return loaders

    def _eval_loaders(self) -> list[DataLoader]:
        return [
            DataLoader(ds, batch_size=self.val_batch_size, shuffle=False,
                       num_workers=self.num_workers, pin_memory=self._pin())
            for ds in self.val_sets.values()
        ]

    def val_dataloader(self):
        return self._eval_loaders()

    def test_dataloader(self):
        return self._eval_loaders()

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            from ..errors import ConfigError

            raise ConfigError(
                "udaseg predict: no split to predict; set data.predict, e.g. "
                "{name: dark_zurich, root: data/dark_zurich, split: test}"
            )
        return DataLoader(self.predict_set, batch_size=1, shuffle=False, num_workers=self.num_workers)
