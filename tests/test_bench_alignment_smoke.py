"""Smoke test of benchmarks/bench_alignment_synthnight.py on a tiny generated copy."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_alignment_synthnight_tiny(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        mod = importlib.import_module("bench_alignment_synthnight")
        results = tmp_path / "results.md"
        figs = mod.main(["--width", "128", "--height", "64", "--limit", "2", "--splits",
                         "night_val", "--workers", "0", "--threads", "1",
                         "--results", str(results)])
    finally:
        sys.path.remove(str(BENCH))
    assert [f.name for f in figs] == ["align_epe/identity/night_val",
                                      "align_epe/similarity/night_val"]
    for f in figs:
        assert f.unit == "px EPE" and math.isfinite(f.value)
        assert 0.0 <= f.numbers["lt1"] <= 1.0 and f.numbers["seconds_per_pair"] >= 0
    assert figs[1].value < figs[0].value  # aligning beats not aligning
    text = results.read_text()
    assert "### Alignment on SynthNight (bench_alignment_synthnight.py)" in text
    assert "bench_alignment_synthnight.py --width 128" in text
