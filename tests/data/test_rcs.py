"""Rare class sampling: distribution by hand, statistics files, cache, sampler, crop retry, RNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from udaseg.data import rcs
from udaseg.data.datasets import Cityscapes
from udaseg.data.io import read_label
from udaseg.data.rcs import (
    RareClassDataset,
    RCSConfig,
    compute_class_stats,
    load_or_compute_class_stats,
    rcs_class_probs,
    read_class_stats,
    write_class_stats,
)
from udaseg.data.transforms import Compose, RandomCrop, RandomFlip

from ..conftest import write_png

# ---------------------------------------------------------------------------------------------
# helpers


def write_cityscapes(
    root: Path, labels: list[np.ndarray], split: str = "train", start: int = 0
) -> Path:
    """Cityscapes layout with the given train-ID label maps (images are noise of the same size)."""
    rng = np.random.default_rng(123)
    for i, lab in enumerate(labels, start=start):
        stem = f"aachen_{i:06d}_000019"
        h, w = lab.shape
        write_png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                  rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        write_png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png",
                  lab.astype(np.uint8))
    return root


def known_labels() -> list[np.ndarray]:
    """Three 16x32 labels with exact counts (512 px each)."""
    a = np.zeros((16, 32), np.uint8)          # road 512
    b = np.full((16, 32), 2, np.uint8)        # building 512 - 100 - 40 - 12
    b[:10, :10] = 11                          # person 100
    b[10:14, :10] = 255                       # ignore 40
    b[14:16, :6] = 18                         # bicycle 12
    c = np.zeros((16, 32), np.uint8)          # road 512 - 200 - 5
    c[:, :10] = 2                             # building 160
    c[:4, 10:20] = 11                         # person 40
    c[0, 20:25] = 18                          # bicycle 5
    return [a, b, c]


EXPECTED = [
    {0: 512},
    {2: 512 - 100 - 40 - 12, 11: 100, 18: 12},
    {0: 512 - 160 - 40 - 5, 2: 160, 11: 40, 18: 5},
]


@pytest.fixture
def known_root(tmp_path: Path) -> Path:
    return write_cityscapes(tmp_path / "cs", known_labels())


def counts_of(entry: dict) -> dict[int, int]:
    return {k: v for k, v in entry.items() if k != "file"}


# ---------------------------------------------------------------------------------------------
# distribution


def test_two_classes_ratio_e98():
    classes, probs = rcs_class_probs({0: 99, 1: 1}, 0.01)
    assert classes == [1, 0]  # ascending N_c
    assert probs.sum() == pytest.approx(1.0)
    # f = 0.01 and 0.99: log P(1) - log P(0) = (0.99 - 0.01) / 0.01 = 98
    assert math.log(probs[0]) - math.log(probs[1]) == pytest.approx(98.0, rel=1e-9)


def test_three_classes_by_hand():
    classes, probs = rcs_class_probs({3: 50, 5: 30, 7: 20}, 0.1)
    assert classes == [7, 5, 3]
    z = [math.exp((1 - f) / 0.1) for f in (0.2, 0.3, 0.5)]
    np.testing.assert_allclose(probs, [v / sum(z) for v in z], rtol=1e-12)


def test_uniform_at_infinite_temperature_and_absent_classes_excluded():
    classes, probs = rcs_class_probs({0: 1000, 4: 0, 9: 1, 13: 50}, float("inf"))
    assert classes == [9, 13, 0] and 4 not in classes
    np.testing.assert_allclose(probs, [1 / 3] * 3)


def test_numerically_stable_at_tiny_temperature():
    _, probs = rcs_class_probs({0: 99, 1: 1}, 1e-4)  # exponents ~ 1e4 without the max shift
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)
    assert probs[0] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        rcs_class_probs({0: 1}, bad)
    with pytest.raises(ValueError, match="class_temp"):
        RCSConfig(class_temp=bad)


# ---------------------------------------------------------------------------------------------
# statistics and files


def test_stats_exact_counts_and_relative_paths(known_root):
    ds = Cityscapes(known_root, "train")
    stats = compute_class_stats(ds)
    assert [counts_of(e) for e in stats] == EXPECTED
    assert stats[1]["file"] == "gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png"
    assert all(not Path(e["file"]).is_absolute() for e in stats)


def test_stats_fixture_parallel_equals_serial(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "train")
    serial = compute_class_stats(ds)
    for e, rec in zip(serial, ds.records):
        bins = np.bincount(read_label(rec.label).ravel(), minlength=256)
        assert counts_of(e) == {c: int(bins[c]) for c in range(19) if bins[c] > 0}
    assert compute_class_stats(ds, workers=2, progress=True) == serial


def test_write_read_round_trip(known_root):
    ds = Cityscapes(known_root, "train")
    stats = compute_class_stats(ds)
    write_class_stats(known_root, stats)
    names = {p.name for p in known_root.iterdir() if p.is_file()}
    assert names == {
        rcs.STATS_FILE, rcs.STATS_DICT_FILE, rcs.SAMPLES_WITH_CLASS_FILE, rcs.META_FILE
    }

    as_list = json.loads((known_root / rcs.STATS_FILE).read_text())
    f1 = stats[1]["file"]
    assert as_list[1] == {"2": 360, "11": 100, "18": 12, "file": f1}
    as_dict = json.loads((known_root / rcs.STATS_DICT_FILE).read_text())
    assert as_dict[f1] == {"2": 360, "11": 100, "18": 12}
    with_class = json.loads((known_root / rcs.SAMPLES_WITH_CLASS_FILE).read_text())
    assert with_class["18"] == [[f1, 12], [stats[2]["file"], 5]]
    assert set(with_class) == {"0", "2", "11", "18"}
    meta = json.loads((known_root / rcs.META_FILE).read_text())
    assert meta["num_files"] == 3 and meta["fingerprint"] == rcs.dataset_fingerprint(ds)

    assert read_class_stats(known_root) == stats


def test_read_daformer_absolute_paths(known_root, tmp_path):
    ds = Cityscapes(known_root, "train")
    stats = compute_class_stats(ds)
    # DAFormer wrote the paths seen at conversion time: absolute (another machine) or CWD-relative
    old = "/old/machine/data/cityscapes/"
    legacy = [{**{str(k): v for k, v in counts_of(e).items()}, "file": old + e["file"]}
              for e in stats]
    legacy[2]["file"] = "data/cityscapes/" + stats[2]["file"]
    legacy.append({"7": 10, "file": "/old/machine/data/cityscapes/gtFine/train/zurich/gone.png"})
    (known_root / rcs.STATS_FILE).write_text(json.dumps(legacy))
    with pytest.warns(UserWarning, match="1 entries"):
        assert read_class_stats(known_root) == stats  # mapped through files under root
    with pytest.warns(UserWarning, match="4 entries"):
        assert read_class_stats(known_root, known_files=[]) == []
    # with an explicit file list (a cache folder outside the root)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / rcs.STATS_FILE).write_text(json.dumps(legacy[:3]))
    assert read_class_stats(cache, known_files=rcs.relative_label_paths(ds)) == stats
    # load_or_compute accepts the legacy files (no meta) without recomputing when they match
    assert load_or_compute_class_stats(ds, cache_dir=cache) == stats
    assert not (cache / rcs.META_FILE).exists()


def test_cache_reuse_and_stale_detection(known_root, monkeypatch):
    ds = Cityscapes(known_root, "train")
    stats = load_or_compute_class_stats(ds)
    assert (known_root / rcs.META_FILE).is_file()

    def boom(*a, **k):
        raise AssertionError("recomputed a valid cache")

    with monkeypatch.context() as m:
        m.setattr(rcs, "compute_class_stats", boom)
        assert load_or_compute_class_stats(ds) == stats

    # a new label file makes the cache stale
    extra = np.full((16, 32), 5, np.uint8)
    write_cityscapes(known_root, [extra], start=3)
    ds4 = Cityscapes(known_root, "train")
    stats4 = load_or_compute_class_stats(ds4)
    assert len(stats4) == 4 and counts_of(stats4[3]) == {5: 512}
    meta = json.loads((known_root / rcs.META_FILE).read_text())
    assert meta["num_files"] == 4 and meta["fingerprint"] == rcs.dataset_fingerprint(ds4)
    assert read_class_stats(known_root) == stats4
    assert not list(known_root.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# sampler


def test_sampler_only_draws_files_above_min_pixels(known_root):
    ds = Cityscapes(known_root, "train")
    stats = compute_class_stats(ds)
    cfg = RCSConfig(class_temp=float("inf"), min_pixels=10)
    rds = RareClassDataset(ds, stats, cfg, seed=0)
    assert len(rds) == 3
    # person (11): files 1 (100) and 2 (40); bicycle (18): only file 1 (12 > 10; 5 is not)
    assert rds.files_with_class == {0: [0, 2], 2: [1, 2], 11: [1, 2], 18: [1]}
    by_name = {rec.name: counts_of(e) for rec, e in zip(ds.records, stats)}
    seen = set()
    for k in range(120):
        s = rds[k]
        c = int(s["rcs_class"])
        assert s["rcs_class"].dtype == torch.int64
        assert by_name[s["name"]].get(c, 0) > cfg.min_pixels
        seen.add(c)
    assert seen == {0, 2, 11, 18}  # uniform over classes at T = inf


def test_sampler_drops_class_without_eligible_file(known_root):
    ds = Cityscapes(known_root, "train")
    with pytest.warns(UserWarning, match=r"\[18\]"):
        rds = RareClassDataset(ds, compute_class_stats(ds), RCSConfig(min_pixels=20))
    assert 18 not in rds.classes and rds.probs.sum() == pytest.approx(1.0)


def test_sampler_rejects_stale_stats(known_root):
    ds = Cityscapes(known_root, "train")
    stats = compute_class_stats(ds) + [{0: 5000, "file": "gtFine/train/aachen/missing.png"}]
    with pytest.raises(ValueError, match="stale"):
        RareClassDataset(ds, stats)


def test_crop_retry_finds_the_class(tmp_path):
    lab = np.zeros((64, 64), np.uint8)
    lab[:16, :16] = 12  # rider only in a 16x16 corner: a random 32x32 crop rarely has > 20 px
    root = write_cityscapes(tmp_path / "cs", [lab])
    ds = Cityscapes(root, "train", transform=Compose([RandomCrop((32, 32)), RandomFlip(0.5)]))
    stats = compute_class_stats(ds)

    def hit_rate(tries: int) -> float:
        cfg = RCSConfig(min_pixels=40, min_crop_ratio=0.5, max_crop_tries=tries)
        rds = RareClassDataset(ds, stats, cfg, seed=1)
        assert rds.classes[0] == 12 and rds.probs[0] > 0.999
        torch.manual_seed(0)
        hits = n = 0
        for _ in range(150):
            s = rds[0]
            if int(s["rcs_class"]) == 12:
                n += 1
                hits += int((s["label"] == 12).sum()) > 20
        return hits / n

    without, with_retry = hit_rate(0), hit_rate(10)
    assert without < 0.35  # about 0.18 analytically
    assert with_retry > 0.75  # about 1 - 0.82**11 = 0.89


def test_state_dict_round_trip_and_worker_streams(known_root):
    ds = Cityscapes(known_root, "train")
    stats = compute_class_stats(ds)
    cfg = RCSConfig(class_temp=float("inf"), min_pixels=10)
    a = RareClassDataset(ds, stats, cfg, seed=7)
    for _ in range(5):
        a.draw()
    state = a.state_dict()
    seq_a = [a.draw() for _ in range(30)]

    b = RareClassDataset(ds, stats, cfg, seed=999)
    b.load_state_dict(torch.load(_save(state, known_root), weights_only=False))
    assert [b.draw() for _ in range(30)] == seq_a

    with pytest.raises(ValueError, match="bit_generator"):
        b.load_state_dict({"nope": 1})

    def seq(worker: int, rank: int, base: int = 0) -> list[tuple[int, int]]:
        b.seed_worker(worker, rank=rank, base_seed=base)
        return [b.draw() for _ in range(30)]

    assert seq(0, 0) == seq(0, 0)
    assert seq(0, 0) != seq(0, 1)
    assert seq(0, 0) != seq(1, 0)
    assert seq(0, 1) != seq(1, 0)
    assert seq(0, 0, base=1) != seq(0, 0)
    b.reseed(3)
    r1 = [b.draw() for _ in range(10)]
    b.reseed(3)
    assert [b.draw() for _ in range(10)] == r1


def _save(state: dict, folder: Path) -> Path:
    path = folder / "rcs_state.pt"
    torch.save(state, path)
    return path
