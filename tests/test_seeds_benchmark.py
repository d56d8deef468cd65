"""benchmarks/seeds.py: several seeds, the LAST checkpoint, mean +- std (cdda_spec.md 12)."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_cityscapes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seeds.py"


@pytest.fixture(scope="module")
def seeds():
    spec = importlib.util.spec_from_file_location("bench_seeds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_prints_fit_and_validate_per_seed(seeds, capsys, tmp_path):
    assert seeds.main(["--config", "a.yaml", "--config", "b.yaml", "--out", str(tmp_path / "s"),
                       "--dry-run", "--", "--trainer.max_steps", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6  # seeds 0 1 2, fit + validate each
    for i, seed in enumerate((0, 1, 2)):
        fit, val = lines[2 * i], lines[2 * i + 1]
        assert " fit --config a.yaml --config b.yaml " in fit
        assert f"--seed_everything {seed} --data.seed {seed}" in fit and fit.endswith(
            f"seed_{seed} --trainer.max_steps 5")
        assert " validate " in val and "--ckpt_path" in val and "CSVLogger" in val
    assert not (tmp_path / "s").exists()


def test_aggregate_and_table(seeds):
    per_seed = {0: {"night": {"mIoU": 40.0, "mIoU19": 30.0}}, 1: {"night": {"mIoU": 42.0}},
                2: {"night": {"mIoU": 47.0}}}
    s = seeds.aggregate(per_seed)
    r = s["night"]["mIoU"]
    assert r["n"] == 3 and r["mean"] == pytest.approx(43.0)
    assert r["std"] == pytest.approx(statistics.stdev([40.0, 42.0, 47.0]))  # sample std
    assert s["night"]["mIoU19"] == {"mean": 30.0, "std": 0.0, "n": 1, "values": {0: 30.0}}
    table = seeds.markdown_table(s)
    assert "| night | mIoU | 43.00 +- 3.61 (n=3) | 40.00 | 42.00 | 47.00 |" in table
    assert "| night | mIoU19 | 30.00 +- 0.00 (n=1) | 30.00 | - | - |" in table


def test_last_checkpoint_is_the_highest_step_not_the_best(seeds, tmp_path):
    run = tmp_path / "seed_0"
    (run / "checkpoints").mkdir(parents=True)
    for name, step in (("best-mIoU=60.ckpt", 1000), ("epoch=0-step=4000.ckpt", 4000),
                       ("last.ckpt", 4000)):
        torch.save({"global_step": step}, run / "checkpoints" / name)
    (run / "validate").mkdir()
    torch.save({"global_step": 9999}, run / "validate" / "x.ckpt")  # never a candidate
    assert seeds.last_checkpoint(run).name == "last.ckpt"
    (run / "checkpoints" / "last.ckpt").unlink()
    assert seeds.last_checkpoint(run).name == "epoch=0-step=4000.ckpt"


def test_finished_seeds_are_not_retrained(seeds, tmp_path, monkeypatch):
    calls = []

    def fake_run(args, in_process):
        calls.append(args[0])
        root = Path(args[args.index("--trainer.default_root_dir") + 1])
        if args[0] == "fit":
            root.mkdir(parents=True, exist_ok=True)
            torch.save({"global_step": 2}, root / "last.ckpt")
        else:
            seed = int(args[args.index("--seed_everything") + 1])
            csv = root / "metrics" / "metrics.csv"
            csv.parent.mkdir(parents=True, exist_ok=True)
            csv.write_text(f"epoch,step,val/a/mIoU\n0,0,{10.0 + seed}\n")

    monkeypatch.setattr(seeds, "_run", fake_run)
    out = tmp_path / "sweep"
    assert seeds.main(["--config", "c.yaml", "--out", str(out), "--seeds", "0", "1"]) == 0
    assert calls == ["fit", "validate", "fit", "validate"]
    calls.clear()
    assert seeds.main(["--config", "c.yaml", "--out", str(out), "--seeds", "0", "1", "2"]) == 0
    assert calls == ["validate", "validate", "fit", "validate"]
    res = json.loads((out / "seeds.json").read_text())
    assert res["summary"]["a"]["mIoU"]["mean"] == pytest.approx(11.0)
    assert "| a | mIoU | 11.00 +- 1.00 (n=3) |" in (out / "seeds.md").read_text()


def test_real_tiny_sweep(seeds, tmp_path, capsys):
    """A real 2-step fit whose LAST checkpoint goes through `udaseg validate` and the CSV (one
    seed to stay fast: the several-seed bookkeeping is the test above)."""
    root = make_tiny_cityscapes(tmp_path / "cityscapes")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "trainer: {accelerator: cpu, devices: 1, max_steps: 2, enable_progress_bar: false,\n"
        "          enable_model_summary: false, num_sanity_val_steps: 0, logger: false}\n"
        "model: {backbone: mit_tiny, head: segformer, head_channels: 16, drop_path_rate: 0.0}\n"
        "data:\n"
        f"  source: {{name: cityscapes, root: {root}}}\n"
        f"  val: {{cs_val: {{name: cityscapes, root: {root}, split: val}}}}\n"
        "  batch_size: 1\n  num_workers: 0\n"
        "  source_pipeline: {scale: [64, 32], crop_size: [32, 32]}\n")
    out = tmp_path / "sweep"
    assert seeds.main(["--config", str(cfg), "--out", str(out), "--seeds", "3",
                       "--in-process"]) == 0
    res = json.loads((out / "seeds.json").read_text())
    assert [Path(p).name for p in res["checkpoints"].values()] == ["epoch=0-step=2.ckpt"]
    r = res["summary"]["cs_val"]["mIoU"]
    assert r["n"] == 1 and r["std"] == 0.0 and 0.0 <= r["mean"] <= 100.0
    assert (out / "seed_3" / "validate" / "metrics" / "metrics.csv").is_file()
    assert "| cs_val | mIoU |" in (out / "seeds.md").read_text()
