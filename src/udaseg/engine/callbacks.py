"""Lightning callbacks and plugins of udaseg.

* :class:`SubmissionWriter`: predictions in the benchmark servers' formats;
* :class:`AtomicCheckpointIO`: checkpoints written atomically, read with ``weights_only=True``;
* :class:`PreemptionCheckpoint`: SIGTERM writes ``last.ckpt`` and stops cleanly;
* :class:`SaveConfigKeepingPrevious`: never overwrites an earlier run's ``config.yaml``;
* :class:`ProgressBar`: Lightning's rich bar, reading the logged losses every N iterations only.

:class:`SubmissionWriter` turns ``udaseg predict`` into a benchmark-server submission: it writes
what :meth:`udaseg.engine.module.UDAModule.predict_step` returns (train IDs and confidence at the
input size) with :mod:`udaseg.eval.export`, then zips the folder and checks it. File I/O lives
here, never in the module's steps. Use it from a YAML config::

    trainer:
      callbacks:
        - class_path: udaseg.engine.callbacks.SubmissionWriter
          init_args: {out_dir: predictions/dark_zurich_test, fmt: dark_zurich}
    return_predictions: false   # the writer has them; do not also keep them all in memory
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..eval.export import (
    DARK_ZURICH_FOLDERS,
    FORMATS,
    SubmissionFormat,
    check_submission,
    write_prediction,
    zip_submission,
)


class SubmissionWriter(BasePredictionWriter):
    """Write each predicted batch in a server format; zip and check the result at the end.

    Args:
        out_dir: the submission folder (created; files of an earlier run with the same names are
            replaced, others are kept and reported by the final check).
        fmt: ``dark_zurich`` (three folders, zipped for CodaLab), ``acdc`` (flat 1920x1080
            train-ID PNGs) or ``trainids`` (flat train-ID PNGs of any size); see
            :mod:`udaseg.eval.export`.
        color: also write ``<out_dir>/color/`` palette previews (never zipped).
        invalid_threshold: Dark Zurich: pixels whose confidence is below it are 255 in
            ``labelTrainIds_invalid`` (None: a copy of ``labelTrainIds``).
        zip: write ``zip_path`` at the end (dark_zurich and acdc; trainids is never zipped).
        zip_path: where the zip goes; None = ``<out_dir>.zip`` next to the folder.
        check: run :func:`udaseg.eval.export.check_submission` on the result (the zip when one
            was written) and report the outcome in the summary line.
        expected_size: (H, W) the check expects; None = the format's (1080x1920 for dark_zurich
            and acdc), ``"any"`` to skip (e.g. SynthNight in the Dark Zurich layout).

    Only global rank 0 zips, checks and prints; every rank writes the samples it predicted.
    """

    def __init__(
        self,
        out_dir: str,
        fmt: SubmissionFormat = "dark_zurich",
        color: bool = True,
        invalid_threshold: float | None = None,
        zip: bool = True,
        zip_path: str | None = None,
        check: bool = True,
        expected_size: tuple[int, int] | Literal["any"] | None = None,
    ):
        super().__init__(write_interval="batch")
        if fmt not in FORMATS:
            raise ValueError(f"SubmissionWriter: unknown fmt {fmt!r}; choose from {list(FORMATS)}")
        if invalid_threshold is not None:
            if fmt != "dark_zurich":
                raise ValueError(
                    "SubmissionWriter: invalid_threshold applies to fmt=dark_zurich only"
                )
            if not 0.0 <= invalid_threshold <= 1.0:
                raise ValueError(
                    "SubmissionWriter: invalid_threshold must be in [0, 1], "
                    f"got {invalid_threshold}"
                )
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.color = color
        self.invalid_threshold = invalid_threshold
        self.make_zip = zip and fmt != "trainids"
        self.zip_path = (
            Path(zip_path) if zip_path else self.out_dir.parent / f"{self.out_dir.name}.zip"
        )
        self.check = check
        self.expected_size = expected_size
        self.written = 0
        self.problems: list[str] = []

    # ------------------------------------------------------------------ hooks
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = 0
        self.problems = []
        if trainer.predict_loop.return_predictions:
            rank_zero_warn(
                "SubmissionWriter: the trainer also keeps every full-size prediction in memory; "
                "set `return_predictions: false` (or pass return_predictions=False) for large "
                "test sets"
            )
        if trainer.is_global_zero and self._existing_files():
            rank_zero_warn(
                f"SubmissionWriter: {self.out_dir} already holds predictions; files with the same "
                "names are replaced, the others are kept (the final check reports them as extra)"
            )

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write every sample of ``prediction`` (``predict_step``'s dict) as numpy arrays."""
        if not isinstance(prediction, dict) or "name" not in prediction or "pred" not in prediction:
            raise TypeError(
                "SubmissionWriter: predict_step must return a dict with 'name', 'pred' and "
                f"optionally 'confidence'; got {type(prediction).__name__}"
            )
        names, preds = prediction["name"], prediction["pred"]
        confs = prediction.get("confidence")
        if isinstance(names, str):
            names = [names]
        for i, name in enumerate(names):
            pred = preds[i].detach().cpu().numpy()
            conf = None
            if confs is not None and self.fmt == "dark_zurich":
                conf = confs[i].detach().float().cpu().numpy()
            write_prediction(
                self.out_dir,
                self.fmt,
                str(name),
                pred,
                conf,
                invalid_threshold=self.invalid_threshold,
                color=self.color,
            )
            self.written += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("SubmissionWriter.on_predict_end")  # every rank has written
        if not trainer.is_global_zero:
            return
        count = len(self._existing_files())
        parts = [f"SubmissionWriter: {count} {self.fmt} predictions in {self.out_dir}"]
        if count == 0:
            rank_zero_info(parts[0] + " (nothing was predicted)")
            return
        target = self.out_dir
        if self.make_zip:
            target = zip_submission(self.out_dir, self.zip_path, self.fmt)
            parts.append(f"zip {target}")
        if self.check:
            self.problems = check_submission(target, self.fmt, expected_size=self.expected_size)
            if self.problems:
                parts.append(
                    f"check: {len(self.problems)} problem(s), first: {self.problems[0]} "
                    f"(run `udaseg check-submission {target} --format {self.fmt}`)"
                )
            else:
                parts.append("check: OK")
        print("; ".join(parts), flush=True)

    # ------------------------------------------------------------------ helpers
    def _existing_files(self) -> list[Path]:
        """The prediction PNGs already in ``out_dir`` (labelTrainIds/ for Dark Zurich)."""
        folder = (
            self.out_dir / DARK_ZURICH_FOLDERS[0] if self.fmt == "dark_zurich" else self.out_dir
        )
        if not folder.is_dir():
            return []
        return [p for p in folder.glob("*.png") if p.is_file()]


# ----------------------------------------------------------------------------------------------
# reliability: configs, checkpoints, preemption


class SaveConfigKeepingPrevious(SaveConfigCallback):
    """LightningCLI's config saving, except that an existing ``config.yaml`` in the run folder
    (a previous run with ``logger: false`` in the same ``default_root_dir``) is kept as
    ``config.previous-N.yaml`` instead of being overwritten."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
            path = Path(log_dir) / self.config_filename if log_dir is not None else None
            if trainer.is_global_zero and path is not None and path.is_file():
                n = 1
                while (keep := path.with_name(f"{path.stem}.previous-{n}{path.suffix}")).exists():
                    n += 1
                path.rename(keep)
        super().setup(trainer, pl_module, stage)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, flushed to disk, then renamed
    over the target: a crash or preemption while saving never leaves a truncated ``last.ckpt``
    (the previous file stays intact until the new one is complete). Loading uses
    ``weights_only=True``: udaseg checkpoints hold only tensors and plain values."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        import torch

        from ..fileio import atomic_write

        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        from ..models.weights import load_checkpoint_dict

        return load_checkpoint_dict(path, map_location=map_location)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (cluster preemption, ``scancel``), save ``<dirpath>/last.ckpt`` after the
    current iteration, then let Lightning stop the run (exit status 0). Resume with
    ``--ckpt_path <dirpath>/last.ckpt``: the run continues exactly (see ``udaseg.data.stream``).

    Args:
        dirpath: where to write; default: the ModelCheckpoint's folder, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.saved: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / "last.ckpt"
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.received_sigterm and self.saved is None:
            self.saved = self._target(trainer)
            trainer.save_checkpoint(self.saved)
            rank_zero_info(
                f"udaseg: SIGTERM received; saved {self.saved} at iteration {trainer.global_step}. "
                f"Resume with --ckpt_path {self.saved}"
            )


class ProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar` showing the training
    losses ``show`` (read from ``trainer.callback_metrics``) refreshed every ``metrics_every``
    iterations.

    Values logged with ``prog_bar=True`` are converted to Python numbers by Lightning after every
    batch, which on a GPU is a host-device synchronisation per iteration (the host waits for
    the iteration to finish instead of queueing the next one). :class:`UDAModule` therefore
    logs its losses without ``prog_bar`` and this bar reads them every ``metrics_every``
    iterations (and outside training); the bar itself advances every iteration.
    """

    def __init__(self, metrics_every: int = 10, show: Sequence[str] = ("train/src", "train/mix"),
                 **kwargs: Any):
        super().__init__(**kwargs)
        if metrics_every < 1:
            raise ValueError(f"ProgressBar: metrics_every must be >= 1, got {metrics_every}")
        self.metrics_every = metrics_every
        self.show = tuple(show)
        self._shown: dict | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        fresh = (not trainer.training or self._shown is None
                 or trainer.global_step % self.metrics_every == 0)
        if fresh:
            items = super().get_metrics(trainer, pl_module)
            logged = trainer.callback_metrics
            for key in self.show:
                if key in logged:
                    items[key.removeprefix("train/")] = float(logged[key])  # host read
            self._shown = items
        return self._shown
