"""``udaseg demo``: the embedded end-to-end job on SynthNight, on a CPU, in a few minutes.

1. generate SynthNight (version 1) for ``--seed`` (or reuse an identical copy);
2. start from the packaged source model (3000 day iterations; ``--from-scratch`` trains one
   here instead), then from that same model (a) continue source-only training (run
   ``source_only``) and (b) adapt it to the unlabelled night images with DACS self-training
   (run ``dacs``). Both get the same compute: the
   source-only control trains ``cost_ratio`` (measured: one DACS iteration costs about 2.3 source
   iterations) times as many iterations as DACS, so extra source training is not mistaken for
   adaptation. ``--source-only`` trains the source model only (run ``source_only``);
3. evaluate on the day and night validation splits and print the per-class IoU table;
4. write a report folder: ``iou_table.csv/.md``, ``metrics.json``
   (``{run: {split: {"mIoU": %, "IoU": {class: %}}}}``), ``loss_curve.png`` and
   prediction/ground-truth overlays under ``overlays/<run>/<split>/``.

The demo model is deliberately small (``mit_tiny`` + SegFormer head, trained from scratch with
a higher learning rate than the paper's fine-tuning lr, because no ImageNet weights can be
downloaded here); the paper configs live in ``configs/``.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.transforms import PipelineConfig


@dataclass
class DemoConfig:
    """Everything the demo does, with defaults calibrated for 2 CPU cores (7.5 minutes)."""

    seed: int = 0
    out_dir: str = "udaseg_demo"
    data_dir: str | None = None
    steps: int = 600
    batch_size: int = 8
    backbone: str = "mit_tiny"
    head: str = "segformer"
    head_channels: int = 128
    lr: float = 2e-3
    warmup_iters: int = 50
    train_scale: tuple[int, int] = (256, 128)
    crop_size: tuple[int, int] = (128, 128)
    num_workers: int = 2
    overlays_per_split: int = 4
    runs: list[str] = field(default_factory=lambda: ["source_only", "dacs"])
    """``source_only`` and (by default) ``dacs``."""
    init_weights: str | None = None
    """Start every run from these segmentor weights instead of training from scratch."""
    source_model: str = "shipped"
    """Where the source model both runs start from (when ``dacs`` runs and no ``init_weights``):
    ``"shipped"`` = the packaged SynthNight source model (:data:`SHIPPED_SOURCE`, 3000 day
    iterations, reproducible by the command in its docstring), ``"scratch"`` = train ``steps``
    source iterations here first."""
    uda_steps: int = 300
    """DACS iterations (when ``dacs`` is among the runs). 300 (control: 690 source iterations)
    takes the demo to 7 min 24 s on 2 idle cores (seed 0) with night gains of +6.9 / +6.7 / +9.6
    mIoU on seeds 0 / 1 / 2 (README); 450 gave +6.5 / +6.2 / +10.1 in 9 minutes."""
    uda_lr: float = 3e-4
    cost_ratio: float = 2.3
    """Source iterations that cost as much as one DACS iteration (the control's budget;
    measured 2.0-2.3 on 2 CPU cores, the larger value so the control is never short-changed)."""
    synth: dict = field(default_factory=dict)
    """Overrides of :class:`~udaseg.data.synthnight.SynthNightConfig` (sizes, counts) for tests."""
    views_only: bool = True
    """Generate only what the demo reads (images and labels: no events, depth maps or day
    references; the images are the same, every part has its own random stream). Off when
    ``data_dir`` points at a shared copy."""


#: The packaged source model (mit_tiny + SegFormer-128, 2 MB): 3000 source iterations on the
#: SynthNight v1 seed-0 day images, made with
#:   udaseg fit --config configs/synthnight/source_only.yaml --trainer.max_steps 3000 \
#:       --model.optim.lr 2.0e-3 --model.optim.warmup_iters 100 \
#:       --trainer.default_root_dir runs/synthnight_source_3k
#:   udaseg export-weights runs/synthnight_source_3k/.../last.ckpt synthnight_v1_source.safetensors
#: (deterministic on a CPU). It lets the demo spend its minutes on adaptation.
SHIPPED_SOURCE = "synthnight_v1_source.safetensors"


def shipped_source_path() -> Path:
    from importlib.resources import files

    return Path(str(files("udaseg.resources").joinpath(SHIPPED_SOURCE)))


def _data_root(cfg: DemoConfig) -> Path:
    from ..data.synthnight import GENERATOR_VERSION

    if cfg.data_dir:
        return Path(cfg.data_dir)
    light = "_images" if cfg.views_only else ""  # a lighter copy than the full one: own folder
    return Path(cfg.out_dir) / "data" / f"synthnight_v{GENERATOR_VERSION}_seed{cfg.seed}{light}"


def build_datamodule(cfg: DemoConfig, root: Path, adapt: bool = False):
    """Day source, night val; with ``adapt`` the unlabelled night train split as the target."""
    from .datamodule import DatasetSpec, UDADataModule

    pipe = PipelineConfig(scale=cfg.train_scale, crop_size=cfg.crop_size, cat_max_ratio=0.75)
    return UDADataModule(
        source=DatasetSpec("cityscapes", str(root / "cityscapes"), "train"),
        target=DatasetSpec("dark_zurich", str(root / "dark_zurich"), "train", labels=False)
        if adapt else None,
        val={
            "day_val": DatasetSpec("cityscapes", str(root / "cityscapes"), "val"),
            "night_val": DatasetSpec("dark_zurich", str(root / "dark_zurich"), "val"),
        },
        source_pipeline=pipe,
        target_pipeline=PipelineConfig(scale=cfg.train_scale, crop_size=cfg.crop_size),
        batch_size=cfg.batch_size,
        val_batch_size=16,
        num_workers=cfg.num_workers,
    )


def build_module(cfg: DemoConfig, run: str, init_weights: str | None):
    from ..adapt.self_training import DACSConfig
    from .module import UDAModule
    from .optim import OptimConfig

    if run not in ("source_only", "dacs"):
        raise ValueError(f"unknown demo run {run!r}; available: source_only, dacs")
    fine_tune = init_weights is not None
    return UDAModule(
        backbone=cfg.backbone,
        head=cfg.head,
        head_channels=cfg.head_channels,
        drop_path_rate=0.0,
        init_weights=init_weights,
        optim=OptimConfig(
            lr=cfg.uda_lr if fine_tune else cfg.lr, warmup_iters=0 if fine_tune else cfg.warmup_iters
        ),
        self_training=DACSConfig() if run == "dacs" else None,
    )


def run_steps(cfg: DemoConfig, run: str, fine_tune: bool) -> int:
    """Iterations of a run: equal compute for the source-only control and DACS."""
    if not fine_tune:
        return cfg.steps
    return cfg.uda_steps if run == "dacs" else round(cfg.uda_steps * cfg.cost_ratio)


def read_loss_curve(metrics_csv: Path, key: str = "train/src") -> tuple[list[int], list[float]]:
    """(steps, values) of one logged scalar from a Lightning CSVLogger file."""
    steps, values = [], []
    if not metrics_csv.is_file():
        return steps, values
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                steps.append(int(row["step"]))
                values.append(float(row[key]))
    return steps, values


def train_and_evaluate(
    cfg: DemoConfig, run: str, root: Path, out: Path, init_weights: str | None = None,
    name: str | None = None, evaluate: bool = True,
):
    """Fit one run (logged as ``name``), validate it on every split.

    Returns (module, datamodule, results, loss curves).
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .callbacks import ProgressBar

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, run, init_weights)
    steps = run_steps(cfg, run, init_weights is not None)
    dm = build_datamodule(cfg, root, adapt=run == "dacs")
    name = name or run
    logger = CSVLogger(out / "logs", name=name, version="")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=max(1, min(10, steps // 10)),
        callbacks=[
            ProgressBar(leave=True),
            ModelCheckpoint(dirpath=out / "checkpoints" / name, filename="last", save_last=False),
        ],
        enable_model_summary=False,
        deterministic=False,
    )
    trainer.fit(module, datamodule=dm)
    metrics_csv = Path(logger.log_dir) / "metrics.csv"
    curves = {k: read_loss_curve(metrics_csv, f"train/{k}") for k in ("src", "mix")}
    curves = {k: c for k, c in curves.items() if c[0]}
    if not evaluate:
        return module, dm, {}, curves
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[ProgressBar(leave=True)],
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=dm, verbose=False)
    return module, dm, dict(module.val_results), curves


def write_overlays(cfg: DemoConfig, module, dm, out: Path, run: str) -> None:
    """Prediction / ground-truth overlays for the first images of each split."""
    import numpy as np
    import torch

    from ..data.io import read_image
    from ..eval.report import save_overlays

    module.eval()
    for split, ds in dm.val_sets.items():
        images, preds, gts, names = [], [], [], []
        with torch.inference_mode():
            for i in range(min(cfg.overlays_per_split, len(ds))):
                s = ds[i]
                label = s["label"]
                logits = module.predict_logits(s["image"][None], out_size=tuple(label.shape))
                preds.append(logits.argmax(1)[0].numpy().astype(np.uint8))
                gts.append(label.numpy().astype(np.uint8))
                images.append(read_image(ds.records[i].image))
                names.append(s["name"])
        save_overlays(out / "overlays" / run / split, images, preds, gts, names)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns ``{run: {split: IoUResult}}``."""
    import torch
    from rich.console import Console

    from ..data.synthnight import GENERATOR_VERSION, SynthNightConfig, generate
    from ..eval.report import (
        plot_loss_curves,
        print_iou_table,
        write_iou_tables,
        write_metrics_json,
    )
    from ..models.weights import save_segmentor_weights
    from .quiet import quiet_lightning

    quiet_lightning()
    console = Console()
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    root = _data_root(cfg)
    console.rule(f"[bold]udaseg demo[/bold]: SynthNight v{GENERATOR_VERSION}, seed {cfg.seed}")
    light = {"with_events": False, "with_depth": False, "with_refs": False}
    extra = light if cfg.views_only and not cfg.data_dir else {}
    generate(root, SynthNightConfig(**{"seed": cfg.seed, **extra, **cfg.synth}))
    console.print(f"data: {root}  ({time.perf_counter() - t0:.0f} s)")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    init = cfg.init_weights
    if "dacs" in cfg.runs and init is None and cfg.source_model == "shipped":
        init = str(shipped_source_path())
        console.print(f"source model: {init} (packaged, 3000 day iterations)")
    if "dacs" in cfg.runs and init is None:
        # both runs adapt/continue from the same source model, trained here from scratch
        console.rule(f"source pre-training: {cfg.steps} iterations, batch {cfg.batch_size}")
        module, _, _, _ = train_and_evaluate(
            cfg, "source_only", root, out, name="source_pretrain", evaluate=False
        )
        init = str(out / "checkpoints" / "source_pretrain.safetensors")
        save_segmentor_weights(module.model.state_dict(), init, {"backbone": cfg.backbone})
    all_results: dict[str, dict] = {}
    curves = {}
    for run in cfg.runs:
        steps = run_steps(cfg, run, init is not None)
        console.rule(f"run [bold]{run}[/bold]: {steps} iterations, batch {cfg.batch_size}")
        t_run = time.perf_counter()
        module, dm, results, run_curves = train_and_evaluate(cfg, run, root, out, init)
        all_results[run] = results
        curves.update({f"{run}: {k} CE": c for k, c in run_curves.items()})
        write_overlays(cfg, module, dm, report, run)
        console.print(f"run {run}: {time.perf_counter() - t_run:.0f} s (training, evaluation, overlays)")

    flat = {f"{run}/{split}": res for run, splits in all_results.items() for split, res in splits.items()}
    console.rule("per-class IoU (%)")
    print_iou_table(flat, "cityscapes19")
    write_iou_tables(report, flat, "cityscapes19")
    write_metrics_json(report / "metrics.json", all_results, "cityscapes19")
    plot_loss_curves(report / "loss_curve.png", curves)
    for run, splits in all_results.items():
        line = "  ".join(f"{s} mIoU {100 * r.miou('cityscapes19'):.1f}" for s, r in splits.items())
        console.print(f"[bold]{run}[/bold]: {line}")
    if {"source_only", "dacs"} <= set(all_results):
        miou = {r: 100 * all_results[r]["night_val"].miou("cityscapes19") for r in ("source_only", "dacs")}
        gain = miou["dacs"] - miou["source_only"]
        console.print(
            f"night_val mIoU: source_only {miou['source_only']:.1f} | dacs {miou['dacs']:.1f} | "
            f"gain {gain:+.1f} (same compute)"
        )
    console.print(f"report: {report}   total time {time.perf_counter() - t0:.0f} s")
    return all_results


def demo_main(argv: list[str]) -> int:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="udaseg demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=d.seed, help="SynthNight draw and training seed")
    p.add_argument("--out", default=d.out_dir, help="output folder (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="SynthNight folder (default: inside --out)")
    p.add_argument("--steps", type=int, default=d.steps, help="training iterations")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=d.num_workers, help="data loading processes")
    p.add_argument(
        "--source-only", action="store_true", help="skip the DACS run (source-only training only)"
    )
    p.add_argument("--init-weights", default=d.init_weights, help="start from these segmentor weights")
    p.add_argument("--uda-steps", type=int, default=d.uda_steps, help="DACS iterations")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the source model here (--steps iterations) instead of starting "
                   "from the packaged one")
    a = p.parse_args(argv)
    cfg = DemoConfig(
        seed=a.seed, out_dir=a.out, data_dir=a.data_dir, steps=a.steps,
        batch_size=a.batch_size, num_workers=a.workers, init_weights=a.init_weights,
        uda_steps=a.uda_steps, runs=["source_only"] if a.source_only else ["source_only", "dacs"],
        source_model="scratch" if a.from_scratch else "shipped",
    )
    run_demo(cfg)
    return 0
