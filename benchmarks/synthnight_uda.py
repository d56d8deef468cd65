"""SynthNight adaptation benchmark: source-only control vs UDA methods, equal compute.

Every run starts from the same source-only checkpoint (``--init``). A UDA run adapts for
``--steps`` iterations; the source-only control continues source training for
``round(steps * cost_ratio)`` iterations, where ``cost_ratio`` is the measured cost of one UDA
iteration in source iterations (so extra source training is not mistaken for adaptation).
Results (day/night val mIoU) are printed and appended to ``benchmarks/results.md``.

    python benchmarks/synthnight_uda.py --init runs/synthnight_calibration/.../last.ckpt \
        --data data/synthnight --steps 300 --runs source_only dacs
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

RUNS = {
    "source_only": dict(self_training=None, methods={}),
    "dacs": dict(self_training={}, methods={}),
    "dacs_fd": dict(self_training={}, methods={"fd": {}}),
    "dacs_mic": dict(self_training={}, methods={"mic": {"block_size": 16, "mode": "separatetrgaug"}}),
}


def run_one(name: str, a) -> dict:
    import lightning as L

    from udaseg.data.transforms import PipelineConfig
    from udaseg.engine.datamodule import DatasetSpec, UDADataModule
    from udaseg.engine.module import UDAModule
    from udaseg.engine.optim import OptimConfig

    spec = RUNS[name]
    adapt = spec["self_training"] is not None
    steps = a.steps if adapt else round(a.steps * a.cost_ratio)
    L.seed_everything(a.seed, workers=True, verbose=False)
    root = Path(a.data)
    pipe = PipelineConfig(scale=tuple(a.scale), crop_size=tuple(a.crop))
    dm = UDADataModule(
        source=DatasetSpec("cityscapes", str(root / "cityscapes"), "train"),
        target=DatasetSpec("dark_zurich", str(root / "dark_zurich"), "train", labels=False) if adapt else None,
        val={
            "day_val": DatasetSpec("cityscapes", str(root / "cityscapes"), "val"),
            "night_val": DatasetSpec("dark_zurich", str(root / "dark_zurich"), "val"),
        },
        source_pipeline=PipelineConfig(scale=tuple(a.scale), crop_size=tuple(a.crop), cat_max_ratio=0.75),
        target_pipeline=pipe, batch_size=a.batch_size, val_batch_size=16, num_workers=a.workers,
    )
    module = UDAModule(
        backbone=a.backbone, head="segformer", head_channels=a.head_channels, drop_path_rate=0.0,
        init_weights=a.init, optim=OptimConfig(lr=a.lr, warmup_iters=0),
        self_training=spec["self_training"], methods=spec["methods"],
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False).validate(
        module, datamodule=dm, verbose=False
    )
    res = {s: 100 * r.miou("cityscapes19") for s, r in module.val_results.items()}
    return dict(run=name, steps=steps, train_s=train_s, **res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="source-only checkpoint every run starts from")
    p.add_argument("--data", default="data/synthnight")
    p.add_argument("--runs", nargs="+", default=["source_only", "dacs"], choices=sorted(RUNS))
    p.add_argument("--steps", type=int, default=300, help="UDA iterations")
    p.add_argument("--cost-ratio", type=float, default=2.3, help="UDA / source iteration cost")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="mit_tiny")
    p.add_argument("--head-channels", type=int, default=128)
    p.add_argument("--scale", type=int, nargs=2, default=[256, 128])
    p.add_argument("--crop", type=int, nargs=2, default=[128, 128])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--baseline-night", type=float, default=None,
                   help="night mIoU of the source-only control when it is not among --runs")
    p.add_argument("--results", default=str(Path(__file__).with_name("results.md")))
    a = p.parse_args()
    rows = [run_one(name, a) for name in a.runs]
    base = next((r["night_val"] for r in rows if r["run"] == "source_only"), a.baseline_night)
    lines = [
        f"\n### SynthNight UDA, {datetime.date.today()} ({platform.machine()}, {platform.node()})\n",
        f"`python benchmarks/synthnight_uda.py --init {a.init} --steps {a.steps} --cost-ratio "
        f"{a.cost_ratio} --lr {a.lr} --seed {a.seed} --runs {' '.join(a.runs)}`\n",
        "| run | iterations | train time (s) | day_val mIoU | night_val mIoU | night gain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gain = "" if base is None else f"{r['night_val'] - base:+.2f}"
        lines.append(
            f"| {r['run']} | {r['steps']} | {r['train_s']:.0f} | {r['day_val']:.2f} | "
            f"{r['night_val']:.2f} | {gain} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
