"""Smoke tests of the benchmark scripts (benchmarks/bench_*.py): each runs on a tiny config and
returns sane figures; no timing is asserted."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def check(figures, names, unit):
    assert [f.name for f in figures] == names
    for f in figures:
        assert f.unit == unit
        assert math.isfinite(f.value) and f.value > 0, f.line()
        assert f.line().startswith(f.name)


def test_train_step_all_presets(bench, tmp_path):
    mod = bench("bench_train_step")
    results = tmp_path / "results.md"
    figs = mod.main(["--backbone", "mit_tiny", "--head-channels", "16", "--crop", "64",
                     "--iters", "1", "--warmup", "1", "--threads", "1", "--results", str(results)])
    check(figs, [f"train_step/{p}" for p in ("daformer", "hrda", "mic", "source_only")], "it/s")
    for f in figs:
        assert f.numbers["peak_memory_bytes"] > 0 and f.numbers["flops"] > 0
    assert "HRDA context x0.5 detail 32x32" in figs[1].setting
    assert "DACS+FD+MIC" in figs[2].setting and "source only" in figs[3].setting
    text = results.read_text()
    assert "### Train step (bench_train_step.py)" in text
    assert "`python benchmarks/bench_train_step.py --backbone mit_tiny" in text
    assert "torch " in text and "Python " in text and "cores" in text
    assert "1 torch threads" in text


def test_inference(bench):
    mod = bench("bench_inference")
    figs = mod.main(["--backbone", "mit_tiny", "--scale", "0.0625", "--iters", "1",
                     "--warmup", "0", "--threads", "1", "--no-append"])
    check(figs, ["inference/daformer_whole", "inference/hrda_hr_slide"], "images/s")
    assert "64x32 (WxH), whole image" in figs[0].setting
    assert "128x64 (WxH), slide 64x64 stride 32x32" in figs[1].setting


def test_data(bench, tiny_cityscapes):
    mod = bench("bench_data")
    figs = mod.main(["--data", str(tiny_cityscapes.parent), "--pipeline", "synthnight",
                     "--workers", "0", "--samples", "4", "--no-append"])
    check(figs, ["data/decode/workers0", "data/pipeline/workers0"], "samples/s")
    assert figs[1].numbers["vs_decode"] > 0


def test_mit_vs_hf_equal_outputs(bench):
    mod = bench("bench_mit_vs_hf")
    figs = mod.main(["--variants", "mit_tiny", "--size", "64", "--reps", "1", "--threads", "1",
                     "--no-append"])
    check(figs, ["mit_vs_hf/mit_tiny"], "x HF time")
    assert figs[0].numbers["equal"] == 1.0
    assert figs[0].numbers["max_abs_diff_same_eps"] <= 1e-4


def test_mit_vs_hf_without_transformers(bench, monkeypatch):
    mod = bench("bench_mit_vs_hf")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SystemExit, match="pip install transformers"):
        mod.import_transformers()


def test_compare_strips_its_own_switches(bench):
    common = bench("common")
    argv = ["--presets", "daformer", "--compare", "HEAD~1", ".", "--rounds=3", "--no-append",
            "--results", "x.md", "--iters", "2"]
    assert common._strip_args(argv, {"--compare": 2, "--rounds": 1, "--results": 1,
                                     "--no-append": 0}) == ["--presets", "daformer",
                                                            "--iters", "2"]


def test_train_step_with_speed_switches(bench, tmp_path):
    mod = bench("bench_train_step")
    figs = mod.main(["--presets", "source_only", "--backbone", "mit_tiny", "--head-channels", "16",
                     "--crop", "64", "--iters", "1", "--warmup", "1", "--threads", "1",
                     "--no-flops", "--no-append", "--channels-last", "--compile",
                     "--compile-backend", "aot_eager"])
    check(figs, ["train_step/source_only"], "it/s")
    assert "channels-last compiled (default, aot_eager)" in figs[0].setting


def test_precision_curves_compares_two_logged_runs(bench, tmp_path):
    mod = bench("precision_curves")
    for name, scale in (("fp32", 1.0), ("bf16", 1.1)):
        d = tmp_path / name / "lightning_logs" / "version_0"
        d.mkdir(parents=True)
        rows = ["epoch,step,train/mix,train/src,val/day_val/mIoU,val/night_val/mIoU"]
        rows += [f"0,{s},{scale * 0.5},{scale * (2.0 - s / 100)},," for s in range(9, 200, 10)]
        rows.append(f"0,199,,,{40 * scale},{10 * scale}")
        (d / "metrics.csv").write_text("\n".join(rows) + "\n")
    results = tmp_path / "results.md"
    mod.main(["--from-runs", str(tmp_path / "fp32"), str(tmp_path / "bf16"), "--window", "100",
              "--plot", str(tmp_path / "curves.png"), "--results", str(results)])
    text = results.read_text()
    # window 0-99: src mean of 2 - s/100 over s = 9..99 step 10 is 1.46; bf16 is 10% higher
    assert "| 0-99 | 1.4600 | 1.6060 | +10.0% | 0.5000 | 0.5500 | +10.0% |" in text
    assert "night_val fp32 10.00; night_val bf16 11.00" in text
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_cdda_bank(bench, tmp_path):
    mod = bench("bench_cdda_bank")
    figs = mod.main(["--n", "64", "--crop", "32", "--threads", "1", "--no-append", "--iters", "1",
                     "--dir", str(tmp_path)])
    check(figs, ["cdda_bank/open/N64", "cdda_bank/search/N64"], "ms")
    assert figs[0].numbers["file_bytes"] >= 64 * 19 * 256 * 4
    assert figs[1].numbers["search_s"] > 0 and "batch 2 target crops 32x32" in figs[1].setting


def test_train_step_refign_presets(bench):
    """Refign-DAFormer with UAWarpC (random weights: no files here) and with the identity aligner:
    their difference is the alignment's cost per iteration."""
    mod = bench("bench_train_step")
    figs = mod.main(["--presets", "refign", "refign_identity", "--backbone", "mit_tiny",
                     "--head-channels", "16", "--crop", "64", "--iters", "1", "--warmup", "1",
                     "--threads", "1", "--no-flops", "--no-append"])
    check(figs, ["train_step/refign", "train_step/refign_identity"], "it/s")
    assert "DACS+FD+REFIGN (UAWarpC, random weights aligner)" in figs[0].setting
    assert "(identity aligner)" in figs[1].setting
