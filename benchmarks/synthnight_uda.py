"""SynthNight adaptation benchmark: source-only control vs UDA methods, equal compute.

Every run starts from the same source-only checkpoint (``--init``). A UDA run adapts for
``--steps`` iterations; the source-only control continues source training for
``round(steps * cost_ratio)`` iterations, where ``cost_ratio`` is the cost of one UDA iteration
in source iterations (so extra source training is not mistaken for adaptation).

``--cost-ratio measured`` runs the UDA methods first, then one control run with a constant
learning rate (``--power 0``, so that its state at step k is the state of a k-step run),
snapshotted and evaluated every ``--snapshot-every`` steps, then times every run back to back
(same machine load for all); each method is compared with the first control snapshot at or
beyond its equal-compute step. Results (day/night val mIoU) are printed and
appended to ``benchmarks/results.md``.

    python benchmarks/synthnight_uda.py --init runs/synthnight_calibration/.../last.ckpt \
        --data data/synthnight --steps 300 --runs source_only dacs

Runs: ``daformer`` = DACS + RCS + FD, ``hrda`` = daformer + HRDA (multi-resolution training and
slide inference), ``mic`` = hrda + MIC (the paper stacks, CPU-sized as in configs/synthnight),
``refign`` = daformer + Refign (day references, similarity aligner, adapt_to_ref), ``dsrnss`` =
refign + DSRNSS (relation-aware ClassMix, long-tail bank, FPA; adapt_to_ref off as in its
configs), ``icda`` = DACS + ICDA (CEM source views rendered weight-free, DAR, prototypes; FD and
RCS off as in configs/synthnight/icda.yaml), ``cdda`` = daformer + CDDA (depth views, a source
bank built on first use under ``<data>/cdda_bank_*``, schedule scaled to 250 steps). The table
also gives the night IoU of DSRNSS's tail classes (rider, truck, bus, motorcycle, bicycle; "-"
where SynthNight's val has none).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

MIC = {"block_size": 16, "mask_ratio": 0.7, "weight": 1.0, "mode": "separatetrgaug"}
HRDA = dict(hrda={"context_scale": 0.5, "detail_crop_ratio": 0.5, "detail_loss_weight": 0.1},
            inference={"mode": "slide", "crop": [128, 128], "stride": [64, 64]})
# RCS sized for SynthNight: 3000 px on ~1 Mpx GTA labels is ~0.3% of an image; 400 px of 512x256
RCS = {"class_temp": 0.01, "min_pixels": 400, "min_crop_ratio": 0.5}
RUNS = {
    "source_only": dict(self_training=None, methods={}),
    "dacs": dict(self_training={}, methods={}),
    "dacs_fd": dict(self_training={}, methods={"fd": {}}),
    "dacs_mic": dict(self_training={}, methods={"mic": MIC}),
    "daformer": dict(self_training={}, methods={"fd": {}}, rcs=RCS),
    "hrda": dict(self_training={}, methods={"fd": {}}, rcs=RCS, **HRDA),
    "mic": dict(self_training={}, methods={"fd": {}, "mic": MIC}, rcs=RCS, **HRDA),
    # CISS on HRDA: FDA views of both domains, invariance on encoder stages 1-2 (paper ACDC weights)
    "ciss": dict(self_training={}, rcs=RCS, stylize={"method": "fda", "beta": 0.01}, **HRDA,
                 methods={"fd": {"views": ["image", "stylized"]},
                          "ciss": {"preset": "reference",
                                   "invariance": {"weight_source": 50.0, "weight_target": 20.0}}}),
    # Refign on DAFormer (the paper's Refign-DAFormer recipe, CPU-sized): the target carries its
    # day reference, aligned by the weight-free similarity aligner (UAWarpC's weights are not here)
    "refign": dict(self_training={"teacher_stochastic": True}, rcs=RCS, target_views=["ref"],
                   methods={"fd": {}, "refign": {"aligner": "similarity", "gamma": 0.25,
                                                 "adapt_to_ref": True}}),
    # DSRNSS on Refign (configs/synthnight/dsrnss.yaml: FPA from step 145 of 250)
    "dsrnss": dict(self_training={"teacher_stochastic": True}, rcs=RCS, target_views=["ref"],
                   methods={"fd": {}, "refign": {"aligner": "similarity", "gamma": 0.25,
                                                 "adapt_to_ref": False},
                            "dsrnss": {"fpa_start_step": 145}}),
    # ICDA (configs/synthnight/icda.yaml): CEM source, DAR pseudo-labels, prototypes
    "icda": dict(self_training={"teacher_stochastic": True, "pseudo_weight_ignore_top": 15,
                                "pseudo_weight_ignore_bottom": 15},
                 source_name="cityscapes_cem", target_views=["ref"],
                 methods={"icda": {"adapt_to_ref": True, "teacher_dar": True,
                                   "pcl_tau": "icda_release", "pseudo_weight_ignore_top": 15,
                                   "pseudo_weight_ignore_bottom": 15}}),
    # CDDA on DAFormer (configs/synthnight/cdda.yaml): depth of both domains, a source bank built
    # from this run's source stream; the threshold schedule scaled from 40000 to 250 steps
    "cdda": dict(self_training={}, rcs=RCS, source_views=["depth"], target_views=["depth"],
                 cdda_bank=True, methods={"fd": {}, "cdda": {"tau_rw": 0.56, "tau_rl": 0.54,
                                                            "delta": 0.0025, "schedule_start": 62,
                                                            "schedule_every": 6}}),
}
TAIL = {12: "rider", 14: "truck", 15: "bus", 17: "motorcycle", 18: "bicycle"}


class StepTimer:
    """Seconds per iteration after a warm-up of ``skip`` iterations (loader start-up excluded)."""

    def __init__(self, skip: int = 10):
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_end(cb, trainer, *args):
                if trainer.global_step == skip:
                    self.t0 = time.perf_counter()
                self.t1, self.last = time.perf_counter(), trainer.global_step

        self.skip, self.t0, self.t1, self.last = skip, None, None, 0
        self.callback = _CB()

    @property
    def s_per_it(self) -> float:
        return (self.t1 - self.t0) / max(1, self.last - self.skip)


class Snapshots:
    """Keeps copies of the student's weights at given global steps (a Lightning callback)."""

    def __init__(self, steps):
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_end(cb, trainer, module, *args):
                if trainer.global_step in self.steps:
                    self.states[trainer.global_step] = {
                        k: v.detach().clone() for k, v in module.state_dict().items()
                    }

        self.steps = set(steps)
        self.states: dict[int, dict] = {}
        self.callback = _CB()


def cdda_bank(a, spec) -> Path:
    """CDDA's source bank for this benchmark's source stream (pipeline, RCS, seed), built once
    under ``<data>/cdda_bank_<crop>_s<seed>`` by ``udaseg prepare cdda-bank``'s function."""
    import tempfile

    import yaml

    from udaseg.engine.prepare import prepare_cdda_bank

    root = Path(a.data)
    out = root / f"cdda_bank_{a.crop[0]}x{a.crop[1]}_s{a.seed}"
    data = {
        "seed": a.seed, "rcs": spec.get("rcs"),
        "source": {"name": "cityscapes", "root": str(root / "cityscapes"), "split": "train",
                   "views": spec["source_views"]},
        "source_pipeline": {"scale": list(a.scale), "crop_size": list(a.crop),
                            "cat_max_ratio": 0.75},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bank.yaml"
        cfg.write_text(yaml.safe_dump({"data": data}))
        return prepare_cdda_bank([cfg], out, workers=0)


def run_one(name: str, a, steps: int | None = None, snapshots: Snapshots | None = None,
            evaluate_after: bool = True) -> dict | list[dict]:
    import lightning as L

    from udaseg.data.rcs import RCSConfig
    from udaseg.data.stylize import StylizeConfig
    from udaseg.data.transforms import PipelineConfig
    from udaseg.engine.datamodule import DatasetSpec, UDADataModule
    from udaseg.engine.module import UDAModule
    from udaseg.engine.optim import OptimConfig

    spec = RUNS[name]
    adapt = spec["self_training"] is not None
    if steps is None:
        steps = a.steps if adapt else round(a.steps * float(a.cost_ratio))
    L.seed_everything(a.seed, workers=True, verbose=False)
    root = Path(a.data)
    methods = dict(spec["methods"])
    if spec.get("cdda_bank"):
        methods["cdda"] = {**methods["cdda"], "bank": str(cdda_bank(a, spec))}
    pipe = PipelineConfig(scale=tuple(a.scale), crop_size=tuple(a.crop))
    dm = UDADataModule(
        source=DatasetSpec(spec.get("source_name", "cityscapes"), str(root / "cityscapes"), "train",
                           views=spec.get("source_views")),
        target=DatasetSpec("dark_zurich", str(root / "dark_zurich"), "train", labels=False,
                           views=spec.get("target_views")) if adapt else None,
        val={
            "day_val": DatasetSpec("cityscapes", str(root / "cityscapes"), "val"),
            "night_val": DatasetSpec("dark_zurich", str(root / "dark_zurich"), "val"),
        },
        source_pipeline=PipelineConfig(scale=tuple(a.scale), crop_size=tuple(a.crop), cat_max_ratio=0.75),
        target_pipeline=pipe, batch_size=a.batch_size, val_batch_size=16, num_workers=a.workers,
        rcs=RCSConfig(**spec["rcs"]) if spec.get("rcs") else None, seed=a.seed,
        stylize=StylizeConfig(**spec["stylize"]) if spec.get("stylize") else None,
    )
    module = UDAModule(
        backbone=a.backbone, head="segformer", head_channels=a.head_channels, drop_path_rate=0.0,
        init_weights=a.init, optim=OptimConfig(lr=a.lr, warmup_iters=0, power=a.power),
        self_training=spec["self_training"], methods=methods,
        hrda=spec.get("hrda"), inference=spec.get("inference", {"mode": "whole"}),
    )
    timer = StepTimer(skip=min(10, steps // 2))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[timer.callback] + ([snapshots.callback] if snapshots else []),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    # CDDA's gate counters (checkpointed buffers of its refiner): how often each gate opened
    gates = {k.rsplit(".", 1)[1]: int(v) for k, v in module.state_dict().items()
             if k.rsplit(".", 1)[1] in ("rw_open", "rl_open", "guide_steps", "crops", "steps")
             and ".hook_modules." in k}

    def evaluate() -> dict:
        L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False).validate(
            module, datamodule=dm, verbose=False
        )
        out = {s: 100 * r.miou("cityscapes19") for s, r in module.val_results.items()}
        night = module.val_results["night_val"]
        out["tail"] = {TAIL[c]: (None if night.gt_pixels[c] == 0 else 100 * float(night.iou[c]))
                       for c in TAIL}
        return out

    if not evaluate_after:
        return dict(run=name, steps=steps, train_s=train_s, s_per_it=timer.s_per_it)
    if snapshots is None:
        return dict(run=name, steps=steps, train_s=train_s, s_per_it=timer.s_per_it, gates=gates,
                    **evaluate())
    rows = []
    for k in sorted(snapshots.states):
        module.load_state_dict(snapshots.states[k])
        rows.append(dict(run=name, steps=k, train_s=train_s * k / steps, s_per_it=timer.s_per_it,
                         **evaluate()))
    return rows


def measured_comparison(a) -> list[dict]:
    """UDA runs, then one constant-lr control run snapshotted every ``--snapshot-every`` steps up
    to ``--max-ratio`` x steps, then a back-to-back timing of every run (``--timing-steps``
    iterations each, so all are timed under the same machine load). Each method is compared with
    the first control snapshot at or beyond its equal-compute step (never fewer control steps)."""
    methods = [r for r in a.runs if r != "source_only"]
    rows = [run_one(name, a) for name in methods]
    max_steps = round(a.max_ratio * a.steps)
    snaps = Snapshots(range(a.snapshot_every, max_steps + 1, a.snapshot_every))
    controls = run_one("source_only", a, steps=max_steps, snapshots=snaps)
    timing = {name: run_one(name, a, steps=a.timing_steps, evaluate_after=False)["s_per_it"]
              for name in ["source_only", *methods]}
    for r in rows:
        r["s_per_it"] = timing[r["run"]]
        r["ratio"] = timing[r["run"]] / timing["source_only"]
        need = r["ratio"] * a.steps
        c = next((c for c in controls if c["steps"] >= need), controls[-1])
        r["control_steps"], r["control_night"] = c["steps"], c["night_val"]
    for c in controls:
        c["s_per_it"], c["control_night"] = timing["source_only"], None
    return rows + controls


def tail_text(row: dict) -> str:
    """Night IoU of the tail classes, ``a/b/c/d/e`` with ``-`` for a class absent from night_val."""
    tail = row.get("tail") or {}
    return "/".join("-" if tail.get(n) is None else f"{tail[n]:.1f}" for n in TAIL.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="source-only checkpoint every run starts from")
    p.add_argument("--data", default="data/synthnight")
    p.add_argument("--runs", nargs="+", default=["source_only", "dacs"], choices=sorted(RUNS))
    p.add_argument("--steps", type=int, default=300, help="UDA iterations")
    p.add_argument("--cost-ratio", default="2.3",
                   help="UDA / source iteration cost, or 'measured' (see the module docstring)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--power", type=float, default=1.0, help="poly power (0: constant lr)")
    p.add_argument("--max-ratio", type=float, default=5.0,
                   help="measured mode: control steps = max-ratio x steps")
    p.add_argument("--snapshot-every", type=int, default=200, help="measured mode: control snapshots")
    p.add_argument("--timing-steps", type=int, default=40, help="measured mode: timing iterations")
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
    if a.cost_ratio == "measured":
        rows = measured_comparison(a)
    else:
        rows = [run_one(name, a) for name in a.runs]
        base = next((r["night_val"] for r in rows if r["run"] == "source_only"), a.baseline_night)
        for r in rows:
            r["control_night"] = base
    lines = [
        f"\n### SynthNight UDA, {datetime.date.today()} ({platform.machine()}, {platform.node()})\n",
        f"`python benchmarks/synthnight_uda.py --init {a.init} --steps {a.steps} --cost-ratio "
        f"{a.cost_ratio} --lr {a.lr} --power {a.power} --seed {a.seed} --runs {' '.join(a.runs)}`\n",
        "| run | iterations | s / iteration | cost (source its) | day_val mIoU | night_val mIoU "
        "| control (iterations): night | night gain | night tail IoU (rider/truck/bus/moto/bike) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r.get("control_night")
        gain = "" if base is None or r["run"] == "source_only" else f"{r['night_val'] - base:+.2f}"
        ctrl = "" if base is None else f"({r.get('control_steps', '')}): {base:.2f}"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        lines.append(
            f"| {r['run']} | {r['steps']} | {r['s_per_it']:.3f} | {ratio} | "
            f"{r['day_val']:.2f} | {r['night_val']:.2f} | {ctrl} | {gain} | {tail_text(r)} |"
        )
    for r in rows:
        g = r.get("gates")
        if g and g.get("crops"):
            lines.append(
                f"\n{r['run']}: re-weighting/replacement gate open for {g['rw_open']} of "
                f"{g['crops']} target crops, relabel gate for {g['rl_open']}; guidance step ran "
                f"on {g['guide_steps']} of {g['steps']} iterations.")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
