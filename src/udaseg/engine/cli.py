"""The ``udaseg`` command.

``fit | validate | test | predict`` are LightningCLI subcommands (YAML configs via ``--config``,
every value overridable on the command line). ``demo`` and ``synth`` are udaseg's own. Lightning
is imported only when a Lightning subcommand runs, so ``udaseg --help`` and ``udaseg synth`` start
fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CheckpointError, ConfigError, UdasegError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

HELP = """\
usage: udaseg <command> [options]

Unsupervised domain adaptation of semantic segmentation (DAFormer / HRDA / MIC family).

commands:
  demo       generate SynthNight, train on day, evaluate on day and night, write a report
  synth      write a SynthNight copy (procedural day/night benchmark) to a folder
  prepare    convert labels, write RCS statistics / event indexes, check a dataset folder;
             `udaseg prepare cdda-bank --config TRAIN.yaml --out BANK`: CDDA's source bank
  fit        train a model from a YAML config          (LightningCLI: udaseg fit --config X.yaml)
  validate   evaluate a checkpoint on the validation splits
  test       evaluate a checkpoint on the test splits
  predict    run inference and write predictions
  export-weights  write a checkpoint's segmentor weights as .safetensors (for model.init_weights)
  export     export a trained segmentor to ONNX (dynamic height/width)
  segment    segment your own images, folders and videos (label, colour and overlay PNGs)
  align      align a reference image onto a target (Refign's warp): warped image, flow, certainty
  depth      write Depth Anything V2 depth maps (depth_any/ layout, CDDA) from a local model
  convert    import a released DAFormer/HRDA/MIC/CISS/CDDA/Refign/ICDA checkpoint (.safetensors)
  check-submission  validate a benchmark-server export (Dark Zurich zip, ACDC folder) before upload

Run `udaseg <command> --help` for the options of one command.
"""


def default_precision(accelerator: str | None, strategy: object = None) -> str | None:
    """``bf16-mixed`` when ``udaseg fit`` will use a CUDA GPU with bf16 tensor cores (compute
    capability 8.0 or newer: A100, H100, L4, RTX 30xx/40xx ...), else None (Lightning's
    ``32-true``). bf16 keeps accuracy here (benchmarks/results.md: 500 SynthNight DACS
    iterations, loss curves within 0.1 %, the same mIoU; measured with CPU autocast) and uses
    the tensor cores; older GPUs (V100, T4) only emulate bf16 and CPUs without bf16 units are
    slower in it, so they stay in fp32. Fork-based strategies are left alone: reading the
    GPU's capability initialises CUDA, which they forbid before the fork."""
    if accelerator not in (None, "auto", "gpu", "cuda"):
        return None
    if isinstance(strategy, str) and ("fork" in strategy or "notebook" in strategy):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    major, _minor = torch.cuda.get_device_capability()
    return "bf16-mixed" if major >= 8 else None


def lightning_main(argv: list[str] | None) -> int:
    """Run LightningCLI; ``argv=None`` reads sys.argv (the console script).

    Every run gets atomic checkpoint writes read back with ``weights_only=True``
    (:class:`~udaseg.engine.callbacks.AtomicCheckpointIO`, unless ``trainer.plugins`` is set), a
    checkpoint on SIGTERM (:class:`~udaseg.engine.callbacks.PreemptionCheckpoint`), keeps an
    earlier run's ``config.yaml``, and ``fit`` runs in bf16-mixed precision on GPUs with bf16
    tensor cores unless ``trainer.precision`` is given (:func:`default_precision`).
    """
    from lightning.pytorch.cli import LightningCLI

    from .callbacks import AtomicCheckpointIO, PreemptionCheckpoint, SaveConfigKeepingPrevious
    from .datamodule import UDADataModule
    from .module import UDAModule
    from .quiet import quiet_lightning

    quiet_lightning()

    class UdasegCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            # training on a bf16 GPU defaults to bf16-mixed, written into the saved config.yaml
            # (evaluation commands keep what they are given: fp32 unless said)
            if self.subcommand != "fit":
                return
            cfg = self.config[self.subcommand]
            if cfg.get("trainer.precision") is None:
                chosen = default_precision(cfg.get("trainer.accelerator"),
                                           cfg.get("trainer.strategy"))
                if chosen is not None:
                    cfg["trainer.precision"] = chosen
                    print(f"udaseg: trainer.precision {chosen} (the default on this GPU; "
                          "--trainer.precision 32-true for fp32)", file=sys.stderr)

        def instantiate_trainer(self, **kwargs):
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            if not trainer_cfg.get("plugins"):
                kwargs["plugins"] = [AtomicCheckpointIO()]
            return super().instantiate_trainer(**kwargs)

    try:
        UdasegCLI(
            UDAModule,
            UDADataModule,
            args=argv,
            seed_everything_default=0,
            save_config_callback=SaveConfigKeepingPrevious,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [PreemptionCheckpoint()]},
            parser_kwargs={"prog": "udaseg", "exit_on_error": False},
        )
    except argparse.ArgumentError as exc:  # a config typo: one line, not the whole usage
        raise ConfigError(f"{exc}; run `udaseg {(argv or sys.argv[1:])[0]} --help` for the accepted options") from None
    return 0


def synth_main(argv: list[str]) -> int:
    from ..data.synthnight import SynthNightConfig, generate

    d = SynthNightConfig()
    p = argparse.ArgumentParser(prog="udaseg synth", description="Write a SynthNight copy.")
    p.add_argument("out", help="output folder (created; an identical complete copy is kept)")
    p.add_argument("--seed", type=int, default=d.seed, help="scene draw (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--n-day-train", type=int, default=d.n_day_train)
    p.add_argument("--n-day-val", type=int, default=d.n_day_val)
    p.add_argument("--n-night-train", type=int, default=d.n_night_train)
    p.add_argument("--n-night-val", type=int, default=d.n_night_val)
    p.add_argument("--no-events", action="store_true", help="skip the event streams")
    p.add_argument("--no-depth", action="store_true", help="skip the depth maps")
    p.add_argument("--no-refs", action="store_true", help="skip the day reference images")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a different copy in OUT")
    a = p.parse_args(argv)
    cfg = SynthNightConfig(
        seed=a.seed, width=a.width, height=a.height, n_day_train=a.n_day_train,
        n_day_val=a.n_day_val, n_night_train=a.n_night_train, n_night_val=a.n_night_val,
        with_events=not a.no_events, with_depth=not a.no_depth, with_refs=not a.no_refs,
    )
    path = generate(a.out, cfg, workers=a.workers, overwrite=a.overwrite)
    print(f"SynthNight v{cfg_version()} written to {path}")
    return 0


def cdda_bank_main(argv: list[str]) -> int:
    from .prepare import prepare_cdda_bank

    p = argparse.ArgumentParser(
        prog="udaseg prepare cdda-bank",
        description="Build CDDA's source bank from a training config: N source crops drawn exactly "
        "like training (dataset, resize, crop, cat_max_ratio, RCS, data.seed), stored as records "
        "(file, crop box, flip), and their class x depth-bin histograms (one memory-mapped array). "
        "Interruptible: a re-run continues where it stopped.",
    )
    p.add_argument("--config", action="append", required=True,
                   help="training config YAML (repeat to merge, as for `udaseg fit`)")
    p.add_argument("--out", required=True, help="bank folder to write (header.json, hist.npy, records.npy)")
    p.add_argument("--n", type=int, default=None,
                   help="number of crops (default: the source dataset's size, as CDDA)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes drawing crops (default: up to 8; 0 = this process)")
    p.add_argument("--force", action="store_true", help="replace an existing bank with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    workers = a.workers if a.workers is not None else min(8, os.cpu_count() or 1)
    path = prepare_cdda_bank(a.config, a.out, n=a.n, workers=workers if workers > 1 else 0,
                             progress=not a.quiet, force=a.force)
    print(f"CDDA source bank ready: {path}")
    return 0


def prepare_main(argv: list[str]) -> int:
    if argv and argv[0] == "cdda-bank":
        return cdda_bank_main(argv[1:])
    from .prepare import PREPARATIONS, prepare_dataset

    p = argparse.ArgumentParser(
        prog="udaseg prepare",
        description="Make a downloaded dataset ready (train-ID labels, RCS statistics, DSEC event "
        "index), then count images/labels per split and list every problem. Idempotent. "
        "CDDA's source bank: `udaseg prepare cdda-bank --help`.",
    )
    p.add_argument("dataset", choices=list(PREPARATIONS), help="dataset name")
    p.add_argument("root", help="the dataset root, as extracted from the archives")
    p.add_argument("--check", action="store_true", help="only check the folder; write nothing")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--splits", nargs="+", default=None, help="check only these splits")
    p.add_argument("--no-rcs", action="store_true", help="skip the rare class sampling statistics")
    p.add_argument("--force", action="store_true", help="rebuild index files that look up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--config", default=None, help="folder only: a training config with a "
                   "`name: folder` data entry, or a YAML with just the folder options")
    a = p.parse_args(argv)
    result = prepare_dataset(
        a.dataset, a.root, check_only=a.check, workers=a.workers, progress=not a.quiet,
        rcs=not a.no_rcs, force=a.force, splits=a.splits, config=a.config,
    )
    print(result.check.format())
    return 0 if result.check.ok else 1


def export_weights_main(argv: list[str]) -> int:
    import torch

    from ..models.segmentor import inference_state
    from ..models.weights import load_state_dict_file, save_segmentor_weights

    p = argparse.ArgumentParser(
        prog="udaseg export-weights",
        description="Write the student segmentor weights of a udaseg checkpoint as .safetensors.",
    )
    p.add_argument("ckpt", help="a udaseg Lightning checkpoint (.ckpt)")
    p.add_argument("out", help="output .safetensors file")
    a = p.parse_args(argv)
    state = load_state_dict_file(a.ckpt)
    weights = inference_state(
        {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    )
    if not weights:
        raise CheckpointError(
            f"{a.ckpt}: no 'model.*' weights, so it is not a udaseg training checkpoint; a released "
            "checkpoint of DAFormer/HRDA/MIC/CISS/Refign... is imported with "
            f"`udaseg convert {a.ckpt} OUT.safetensors`"
        )
    hparams = torch.load(a.ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    meta = {k: hparams[k] for k in ("backbone", "head", "head_channels", "num_classes") if k in hparams}
    path = save_segmentor_weights(weights, a.out, meta)
    print(f"wrote {len(weights)} tensors to {path} ({meta})")
    return 0


def user_message(exc: BaseException) -> str:
    """The error's own message; for an error re-raised from a DataLoader worker (whose message
    embeds the worker's traceback) only the original message at its end."""
    text = str(exc)
    if "Original Traceback" in text:
        marker = f"{type(exc).__name__}: "
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
    return text


def cfg_version() -> int:
    from ..data.synthnight import GENERATOR_VERSION

    return GENERATOR_VERSION


def main(argv: list[str] | None = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"udaseg {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in (*LIGHTNING_COMMANDS, "demo", "synth", "prepare", "export-weights",
                   "check-submission", "convert", "export", "segment", "align", "depth"):
        print(f"udaseg: unknown command {cmd!r}\n\n{HELP}", file=sys.stderr)
        return 2
    try:
        if cmd in LIGHTNING_COMMANDS:
            return lightning_main(None if from_sys else argv)
        if cmd == "demo":
            from .demo import demo_main

            return demo_main(rest)
        if cmd == "export-weights":
            return export_weights_main(rest)
        if cmd == "prepare":
            return prepare_main(rest)
        if cmd == "export":
            from ..eval.onnx_export import export_main

            return export_main(rest)
        if cmd == "segment":
            from ..eval.segment import segment_main

            return segment_main(rest)
        if cmd == "align":
            from ..eval.align import align_main

            return align_main(rest)
        if cmd == "depth":
            from ..eval.depth_maps import depth_main

            return depth_main(rest)
        if cmd == "convert":
            from ..models.checkpoint_import import convert_main

            return convert_main(rest)
        if cmd == "check-submission":
            from ..eval.export import check_submission_main

            return check_submission_main(rest)
        return synth_main(rest)
    except (UdasegError, FileNotFoundError, FileExistsError) as exc:
        if os.environ.get("UDASEG_DEBUG"):
            raise
        print(f"udaseg {cmd}: error: {user_message(exc)}\n(set UDASEG_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
