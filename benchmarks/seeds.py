"""Evaluate a training config the honest way: several seeds, the LAST checkpoint, mean +- std.

::

    python benchmarks/seeds.py --config configs/X.yaml [--config more.yaml] --out runs/seeds/X \
        [--seeds 0 1 2] [--dry-run] [--in-process] [-- EXTRA udaseg OPTIONS]

For each seed S this runs (``udaseg`` = ``python -m udaseg``)::

    udaseg fit      --config X.yaml --seed_everything S --data.seed S \
                    --trainer.default_root_dir OUT/seed_S  EXTRA
    udaseg validate --config X.yaml --seed_everything S --data.seed S \
                    --trainer.default_root_dir OUT/seed_S/validate --ckpt_path LAST \
                    --trainer.logger <CSVLogger into OUT/seed_S/validate>  EXTRA

``--seed_everything`` changes the initialisation and the augmentations, ``--data.seed`` the
order of the training streams (:mod:`udaseg.data.stream`). ``LAST`` is the checkpoint of the
highest ``global_step`` under ``OUT/seed_S`` (``last.ckpt`` when there is one, else the newest
``ModelCheckpoint`` file): never a checkpoint picked by a validation score. Every split of the
config's ``data.val`` is evaluated; the mean and the **sample** standard deviation (ddof = 1)
over the seeds of each split's ``mIoU`` (the config's ``model.label_set``; also ``mIoU19`` when
logged) go to ``OUT/seeds.md`` (a markdown table) and ``OUT/seeds.json`` (per-seed values too).

A seed whose fit finished before (``OUT/seed_S/FIT_DONE``) is not trained again, so an
interrupted sweep resumes (an unfinished fit is restarted from scratch; pass
``-- --ckpt_path OUT/seed_S/.../last.ckpt`` yourself to continue one). ``--dry-run`` prints the
commands and runs nothing. ``--in-process`` runs them inside this Python (no subprocesses; used by
the tests).

This is the protocol of the DAFormer / HRDA / MIC papers (mean over three seeds of the final
checkpoint); CDDA's published numbers are instead the best-on-Cityscapes-val checkpoint of one
seed (``cdda_spec.md`` 12; README, Evaluation).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SEEDS = (0, 1, 2)
FIT_DONE = "FIT_DONE"
METRICS = ("mIoU", "mIoU19")


def udaseg_launcher() -> list[str]:
    return [sys.executable, "-m", "udaseg"]


def _configs(configs: Sequence[str]) -> list[str]:
    return [x for c in configs for x in ("--config", str(c))]


def fit_command(configs: Sequence[str], seed: int, run_dir: Path,
                extra: Sequence[str] = ()) -> list[str]:
    """``udaseg fit`` arguments (without the launcher) for one seed."""
    return ["fit", *_configs(configs), "--seed_everything", str(seed), "--data.seed", str(seed),
            "--trainer.default_root_dir", str(run_dir), *extra]


def validate_command(configs: Sequence[str], seed: int, run_dir: Path, ckpt: Path | str,
                     extra: Sequence[str] = ()) -> list[str]:
    """``udaseg validate`` arguments for one seed's checkpoint; metrics land in
    ``run_dir/validate/metrics/metrics.csv`` (a CSVLogger)."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(run_dir / "validate"), "name": "metrics",
                            "version": ""}}
    return ["validate", *_configs(configs), "--seed_everything", str(seed), "--data.seed",
            str(seed), "--trainer.default_root_dir", str(run_dir / "validate"),
            "--trainer.logger", json.dumps(logger), "--ckpt_path", str(ckpt), *extra]


def metrics_csv(run_dir: Path) -> Path:
    return run_dir / "validate" / "metrics" / "metrics.csv"


def _global_step(path: Path) -> int:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged file is not a candidate; say which
        print(f"seeds: cannot read {path} ({exc}); ignored", file=sys.stderr)
        return -1
    return int(state.get("global_step", -1))


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of the highest global_step under ``run_dir`` (ties: ``last.ckpt``, then the
    newest file); the ``validate/`` folder is not searched."""
    cands = [p for p in Path(run_dir).rglob("*.ckpt")
             if "validate" not in p.relative_to(run_dir).parts[:1]]
    if not cands:
        raise FileNotFoundError(f"seeds: no checkpoint under {run_dir}; did the fit save one "
                                "(trainer.enable_checkpointing)?")
    return max(cands, key=lambda p: (_global_step(p), p.name == "last.ckpt", p.stat().st_mtime))


def read_metrics(path: Path) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` from a validate run's CSVLogger file (columns
    ``val/<split>/<metric>``; the last row holding a value wins)."""
    out: dict[str, dict[str, float]] = {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"seeds: validate logged no metrics ({path} missing); does the "
                                "config have validation splits (data.val)?")
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                parts = (key or "").split("/")
                if len(parts) == 3 and parts[0] == "val" and parts[2] in METRICS and value:
                    out.setdefault(parts[1], {})[parts[2]] = float(value)
    if not out:
        raise ValueError(f"seeds: no val/<split>/mIoU column in {path}")
    return out


def aggregate(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """``{split: {metric: {mean, std, n, values: {seed: v}}}}``; std is the sample standard
    deviation (ddof = 1; 0.0 for one seed)."""
    result: dict[str, dict[str, dict]] = {}
    splits = sorted({s for m in per_seed.values() for s in m})
    for split in splits:
        for metric in METRICS:
            values = {seed: m[split][metric] for seed, m in sorted(per_seed.items())
                      if metric in m.get(split, {})}
            if not values:
                continue
            xs = list(values.values())
            mean = sum(xs) / len(xs)
            var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
            std = math.sqrt(var)
            result.setdefault(split, {})[metric] = {"mean": mean, "std": std, "n": len(xs),
                                                    "values": values}
    return result


def markdown_table(summary: dict[str, dict[str, dict]], title: str = "") -> str:
    seeds = sorted({s for m in summary.values() for r in m.values() for s in r["values"]})
    head = ["split", "metric", "mean +- std", *(f"seed {s}" for s in seeds)]
    lines = [f"{title}\n" if title else "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for split, metrics in summary.items():
        for metric, r in metrics.items():
            cells = [split, metric, f"{r['mean']:.2f} +- {r['std']:.2f} (n={r['n']})",
                     *(f"{r['values'][s]:.2f}" if s in r["values"] else "-" for s in seeds)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(x for x in lines if x) + "\n"


def _run(args: list[str], in_process: bool) -> None:
    print("$ udaseg " + shlex.join(args), flush=True)
    if in_process:
        from udaseg.engine.cli import main as udaseg_main

        rc = udaseg_main(list(args))
    else:
        rc = subprocess.call([*udaseg_launcher(), *args])
    if rc != 0:
        raise SystemExit(f"seeds: `udaseg {args[0]}` failed with exit status {rc}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(
        prog="python benchmarks/seeds.py",
        description="Train a config with several seeds, validate each LAST checkpoint, report "
                    "mean +- std per validation split.",
        epilog="Options after `--` are passed to both udaseg fit and udaseg validate.")
    p.add_argument("--config", action="append", required=True, help="udaseg config (repeatable)")
    p.add_argument("--out", required=True, help="sweep folder (OUT/seed_S per seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                   help="seeds (default 0 1 2)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--in-process", action="store_true",
                   help="run udaseg inside this Python instead of subprocesses")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.dry_run:
        launcher = shlex.join(udaseg_launcher())
        for seed in a.seeds:
            run_dir = out / f"seed_{seed}"
            print(launcher, shlex.join(fit_command(a.config, seed, run_dir, extra)))
            print(launcher, shlex.join(validate_command(
                a.config, seed, run_dir, "<LAST checkpoint under " + str(run_dir) + ">", extra)))
        return 0
    per_seed, ckpts = {}, {}
    for seed in a.seeds:
        run_dir = out / f"seed_{seed}"
        if (run_dir / FIT_DONE).is_file():
            print(f"seeds: seed {seed} already trained ({run_dir / FIT_DONE}); not retrained")
        else:
            _run(fit_command(a.config, seed, run_dir, extra), a.in_process)
            (run_dir / FIT_DONE).write_text("done\n")
        ckpt = last_checkpoint(run_dir)
        ckpts[seed] = str(ckpt)
        csv_path = metrics_csv(run_dir)
        if csv_path.exists():
            csv_path.unlink()  # a re-evaluation must not read an old row
        _run(validate_command(a.config, seed, run_dir, ckpt, extra), a.in_process)
        per_seed[seed] = read_metrics(csv_path)
    summary = aggregate(per_seed)
    title = f"{' + '.join(a.config)}: last checkpoint, seeds {' '.join(map(str, a.seeds))}"
    table = markdown_table(summary, title)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.md").write_text(table)
    (out / "seeds.json").write_text(json.dumps({
        "configs": a.config, "seeds": a.seeds, "extra": extra, "checkpoints": ckpts,
        "selection": "last checkpoint (highest global_step)", "std": "sample (ddof=1)",
        "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary,
    }, indent=2, default=str))
    print(table)
    print(f"seeds: wrote {out / 'seeds.md'} and {out / 'seeds.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
