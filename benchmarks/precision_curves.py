"""fp32 vs bf16: the loss curves of the same SynthNight adaptation run in both precisions.

The issue's accuracy check for ``--trainer.precision bf16-mixed``: the same DACS run (packaged
SynthNight source model, same seed, same data order) trained once in ``32-true`` and once in
``bf16-mixed``; the script compares the logged ``train/src`` / ``train/mix`` losses window by
window and the final day/night mIoU, draws both curves into one PNG and appends a section to
``results.md``. Each run is the README's command::

    udaseg fit --config configs/synthnight/source_only.yaml --config configs/synthnight/dacs.yaml \\
        --model.init_weights src/udaseg/resources/synthnight_v1_source.safetensors \\
        --model.optim.lr 3e-4 --model.optim.warmup_iters 0 --trainer.max_steps 500 \\
        --trainer.precision {32-true,bf16-mixed} --trainer.logger CSVLogger ...

Run both (side by side, one torch thread each) and compare::

    python benchmarks/precision_curves.py --steps 500 --out runs/precision_curves
    python benchmarks/precision_curves.py --steps 500 --accelerator gpu --threads 4   # one GPU

or compare two finished runs (their ``lightning_logs/version_0/metrics.csv``)::

    python benchmarks/precision_curves.py --from-runs runs/precision_curves/32-true \\
        runs/precision_curves/bf16-mixed
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PRECISIONS = ("32-true", "bf16-mixed")
LOSSES = ("src", "mix")


def fit_command(precision: str, out: Path, steps: int, seed: int, workers: int,
                accelerator: str = "cpu") -> list[str]:
    return [
        sys.executable, "-m", "udaseg", "fit",
        "--config", "configs/synthnight/source_only.yaml",
        "--config", "configs/synthnight/dacs.yaml",
        "--model.init_weights", "src/udaseg/resources/synthnight_v1_source.safetensors",
        "--model.optim.lr", "3e-4", "--model.optim.warmup_iters", "0",
        "--trainer.max_steps", str(steps), "--trainer.precision", precision,
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(out / precision),
        "--trainer.default_root_dir", str(out / precision),
        "--data.num_workers", str(workers), "--seed_everything", str(seed),
        "--trainer.accelerator", accelerator,
    ]


def run_both(args) -> list[Path]:
    """Start both runs side by side (one torch thread each) and wait for them."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    procs = []
    for precision in PRECISIONS:
        log = open(out / f"{precision}.log", "w")  # noqa: SIM115 - closed after wait
        cmd = fit_command(precision, out, args.steps, args.seed, args.workers, args.accelerator)
        procs.append((subprocess.Popen(cmd, cwd=common.repo_root(), env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log, precision))
    for proc, log, precision in procs:
        if proc.wait() != 0:
            raise SystemExit(f"the {precision} run failed; see {out / (precision + '.log')}")
        log.close()
    return [out / p for p in PRECISIONS]


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{column: {step: value}}`` of a CSVLogger run folder (newest version)."""
    files = sorted(Path(run_dir).glob("lightning_logs/version_*/metrics.csv"))
    if not files:
        raise SystemExit(f"{run_dir}: no lightning_logs/version_*/metrics.csv (a CSVLogger run?)")
    table: dict[str, dict[int, float]] = {}
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    table.setdefault(key, {})[int(row["step"])] = float(value)
    return table


def compare(a: dict, b: dict, window: int) -> tuple[list[list[str]], dict[str, float]]:
    """Rows of window means (fp32, bf16, relative difference) and summary numbers."""
    rows, summary = [], {}
    steps = sorted(set(a["train/src"]) & set(b["train/src"]))
    if not steps:
        raise SystemExit("the two runs share no logged step")
    last = steps[-1]
    for start in range(0, last + 1, window):
        in_win = [s for s in steps if start <= s < start + window]
        if not in_win:
            continue
        row = [f"{start}-{start + window - 1}"]
        for loss in LOSSES:
            fa = [a[f"train/{loss}"][s] for s in in_win if s in a.get(f"train/{loss}", {})]
            fb = [b[f"train/{loss}"][s] for s in in_win if s in b.get(f"train/{loss}", {})]
            if fa and fb:
                ma, mb = sum(fa) / len(fa), sum(fb) / len(fb)
                row += [f"{ma:.4f}", f"{mb:.4f}", f"{100 * (mb - ma) / ma:+.1f}%"]
            else:
                row += ["", "", ""]
        rows.append(row)
    for loss in LOSSES:
        common_steps = sorted(set(a.get(f"train/{loss}", {})) & set(b.get(f"train/{loss}", {})))
        diffs = [abs(a[f"train/{loss}"][s] - b[f"train/{loss}"][s]) for s in common_steps]
        summary[f"{loss} mean |diff|"] = sum(diffs) / max(1, len(diffs))
    for split in ("day_val", "night_val"):
        key = f"val/{split}/mIoU"
        if key in a and key in b:
            summary[f"{split} fp32"] = a[key][max(a[key])]
            summary[f"{split} bf16"] = b[key][max(b[key])]
    return rows, summary


def plot(path: Path, a: dict, b: dict) -> Path:
    from udaseg.eval.report import plot_loss_curves

    curves = {}
    for name, run in (("fp32", a), ("bf16", b)):
        for loss in LOSSES:
            series = run.get(f"train/{loss}", {})
            steps = sorted(series)
            curves[f"{loss} {name}"] = (steps, [series[s] for s in steps])
    return plot_loss_curves(path, curves, title="SynthNight DACS: fp32 vs bf16-mixed")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--from-runs", nargs=2, metavar=("FP32_DIR", "BF16_DIR"),
                   help="compare two finished runs instead of training")
    p.add_argument("--out", default="runs/precision_curves")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--accelerator", default="cpu", help="trainer.accelerator of both runs (gpu)")
    p.add_argument("--workers", type=int, default=1, help="loader workers per run")
    p.add_argument("--window", type=int, default=100, help="iterations per table row")
    p.add_argument("--plot", default=str(Path(__file__).with_name("precision_curves.png")))
    p.add_argument("--results", default=str(common.RESULTS))
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    dirs = [Path(d) for d in args.from_runs] if args.from_runs else run_both(args)
    a, b = read_metrics(dirs[0]), read_metrics(dirs[1])
    rows, summary = compare(a, b, args.window)
    png = plot(Path(args.plot), a, b)
    for k, v in summary.items():
        print(f"precision/{k.replace(' ', '_')}: {v:.4f}")
    lines = [
        f"\n### fp32 vs bf16-mixed loss curves (precision_curves.py), "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}\n",
        f"`{common.command_line(None if argv is None else [__file__, *argv])}`\n",
        f"- runs: {dirs[0]} (32-true), {dirs[1]} (bf16-mixed); plot: {png.name}",
        *[f"- {n}" for n in args.note],
        "- summary: " + "; ".join(f"{k} {v:.4f}" if "diff" in k else f"{k} {v:.2f}"
                                  for k, v in summary.items()),
        "",
        "| iterations | src fp32 | src bf16 | src diff | mix fp32 | mix bf16 | mix diff |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        common.append(Path(args.results), text)


if __name__ == "__main__":
    main()
