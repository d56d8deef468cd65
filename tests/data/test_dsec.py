"""DSEC Night-Semantic: index building, split lists and the dataset (tiny files, real layout)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from udaseg.data.datasets.dsec import DSECNightSemantic
from udaseg.data.dsec_index import (
    TEST_LIST,
    TRAIN_LIST,
    build_lists,
    build_sequence_index,
    prepare_dsec,
    read_index,
)
from udaseg.data.events import event_tensor, events_to_voxel, normalize_events, rectify
from udaseg.data.io import DataError
from udaseg.data.transforms import Compose, RandomCrop, RandomFlip, Resize

from ..conftest import random_label, write_png
from .test_events import write_events_file, write_rectify_map

T_OFFSET = 1_000_000
FRAME_US = 50_000


def rect_map(h: int, w: int) -> np.ndarray:
    """A crafted rectify map: shift right by 0.5 px and down by 0.25 px."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx + 0.5, yy + 0.25], axis=-1)


def make_sequence(
    root: Path,
    name: str,
    n_frames: int,
    warp_frames: list[int],
    label_frames: list[int],
    h: int = 48,
    w: int = 64,
    seed: int = 0,
) -> dict:
    """One sequence folder in the DSEC Night-Semantic layout.

    Frame i is at ``T_OFFSET + 50 ms * i`` (so frame 0 has tau = 0 -> index -1), the events
    stop 20 ms before the last frame (-> index -1 there too).
    """
    rng = np.random.default_rng(seed)
    seq = root / name
    t_end = FRAME_US * (n_frames - 1) - 20_000
    n = 40 * n_frames
    t = np.sort(rng.integers(1, t_end, n))
    x, y, p = rng.integers(0, w, n), rng.integers(0, h, n), rng.integers(0, 2, n)
    write_events_file(seq / "events/left/events.h5", x, y, t, p, t_offset=T_OFFSET, blosc=True)
    write_rectify_map(seq / "events/left/rectify_map.h5", rect_map(h, w))
    stamps = T_OFFSET + FRAME_US * np.arange(n_frames)
    (seq / "images").mkdir(parents=True, exist_ok=True)
    (seq / "images/timestamps.txt").write_text("".join(f"{s}\n" for s in stamps))
    for f in sorted(set(warp_frames) | set(label_frames)):  # labelled frames have a warp image
        write_png(seq / "warp_images" / f"{f:06d}.png",
                  rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    for f in label_frames:
        write_png(seq / "labels" / f"{name}_{f:06d}_grey_gtFine_labelTrainIds.png",
                  random_label(rng, h, w))
    return {"x": x, "y": y, "t": t, "p": p, "stamps": stamps}


@pytest.fixture
def dsec_root(tmp_path: Path) -> tuple[Path, dict]:
    """09_b (published cut-off 149) and an unknown sequence (default rule: last label - 13)."""
    root = tmp_path / "DSEC_Night"
    seqs = {
        # train candidates 148..152 -> only those above 149; labels at 140, 150
        "zurich_city_09_b": make_sequence(root, "zurich_city_09_b", 155, [0, 148, 149, 150, 151, 154],
                                          [140, 150], seed=1),
        # labels at 5 and 19 -> cut-off 6; warp frames 0..9 -> train 7..9
        "zurich_city_99_a": make_sequence(root, "zurich_city_99_a", 20, list(range(10)), [5, 19],
                                          seed=2),
    }
    return root, seqs


def brute_index(ev: dict, frame: int) -> int:
    tau = int(ev["stamps"][frame]) - T_OFFSET
    if tau <= 0 or tau > ev["t"][-1]:
        return -1
    return int(np.searchsorted(ev["t"], tau, side="right")) - 1


# -- index and lists ----------------------------------------------------------------------------


def test_sequence_index_matches_brute_force_and_is_idempotent(dsec_root):
    root, seqs = dsec_root
    seq = root / "zurich_city_99_a"
    path, written = build_sequence_index(seq)
    assert written and path == seq / "images/images_to_events_index.txt"
    index = read_index(path)
    ev = seqs["zurich_city_99_a"]
    assert len(index) == 20
    np.testing.assert_array_equal(index, [brute_index(ev, f) for f in range(20)])
    assert index[0] == -1 and index[-1] == -1 and (index[1:-1] > 0).all()
    mtime = path.stat().st_mtime_ns
    assert build_sequence_index(seq) == (path, False)
    assert path.stat().st_mtime_ns == mtime
    assert build_sequence_index(seq, force=True)[1]
    # a newer input makes it stale
    ts = seq / "images/timestamps.txt"
    later = path.stat().st_mtime_ns + 10**9
    os.utime(ts, ns=(later, later))
    assert build_sequence_index(seq)[1]
    assert not list(seq.glob("images/.*.tmp"))


def test_lists_follow_the_rules_relative_and_idempotent(dsec_root):
    root, seqs = dsec_root
    report = prepare_dsec(root)
    assert all(w for _, w in report.index_files)
    train = (root / TRAIN_LIST).read_text().splitlines()
    test = (root / TEST_LIST).read_text().splitlines()

    def idx(seq: str, f: int) -> int:
        return brute_index(seqs[seq], f)

    rel = "images/left/rectified"
    expected_train = [f"zurich_city_09_b/{rel}/{f:06d}.png {idx('zurich_city_09_b', f)}"
                      for f in (150, 151)]  # 148, 149 <= cut-off 149; 154 has index -1
    expected_train += [f"zurich_city_99_a/{rel}/{f:06d}.png {idx('zurich_city_99_a', f)}"
                       for f in range(7, 10)]  # cut-off 19 - 13 = 6
    assert train == expected_train
    assert test == [
        f"zurich_city_09_b/{rel}/000140.png {idx('zurich_city_09_b', 140)}",
        f"zurich_city_09_b/{rel}/000150.png {idx('zurich_city_09_b', 150)}",
        f"zurich_city_99_a/{rel}/000005.png {idx('zurich_city_99_a', 5)}",
        f"zurich_city_99_a/{rel}/000019.png -1",  # labelled frame after the last event
    ]
    assert not any(line.startswith("/") or str(root) in line for line in train + test)
    assert report.lists["train"][2] == 5 and report.lists["test"][2] == 4

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.txt")}
    again = prepare_dsec(root)
    assert not any(w for _, w in again.index_files)
    assert not again.lists["train"][1] and not again.lists["test"][1]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.txt")} == mtimes
    assert any("up to date" in line for line in again.lines())


def test_lists_need_index_files(dsec_root):
    root, _ = dsec_root
    with pytest.raises(FileNotFoundError, match=r"images_to_events_index.txt.*udaseg prepare dsec"):
        build_lists(root)


# -- dataset ------------------------------------------------------------------------------------


def expected_events(ev: dict, first: int, last: int, h: int, w: int) -> np.ndarray:
    """The event tensor of indices [first, last], computed from the raw arrays."""
    sl = slice(first, last + 1)
    xr, yr = rectify(ev["x"][sl], ev["y"][sl], rect_map(h, w))
    voxel = events_to_voxel(xr, yr, ev["t"][sl], ev["p"][sl], h, w)
    return normalize_events(voxel, last + 1 - first)[0]


def test_train_sample_image_and_events(dsec_root):
    root, seqs = dsec_root
    prepare_dsec(root)
    ds = DSECNightSemantic(root, "train", labels=False)
    assert len(ds) == 5
    s = ds[2]  # zurich_city_99_a frame 7
    assert s["name"] == "zurich_city_99_a_000007"
    assert s["image"].shape == (3, 48, 64) and s["image"].dtype == torch.float32
    assert "label" not in s
    e = s["events"]
    assert e.shape == (3, 48, 64) and e.dtype == torch.float32
    assert torch.equal(e[0], e[1]) and torch.equal(e[0], e[2])
    assert e.abs().max() <= 1 and (e != 0).any()
    ev = seqs["zurich_city_99_a"]
    first, last = brute_index(ev, 6), brute_index(ev, 7)
    assert ds.event_window(2) == ("zurich_city_99_a", first, last)
    np.testing.assert_allclose(e[0].numpy(), expected_events(ev, first, last, 48, 64), atol=1e-6)
    assert tuple(s["ori_size"].tolist()) == (48, 64)
    # the event tensor rides through the joint geometry with the image
    ds.transform = Compose([RandomCrop((40, 40)), RandomFlip(1.0), Resize((32, 32), keep_ratio=False)])
    torch.manual_seed(0)
    out = ds[2]
    assert out["image"].shape == (3, 32, 32) and out["events"].shape == (3, 32, 32)
    assert out["events"].dtype == torch.float32


def test_test_sample_label_and_crop(dsec_root):
    root, _ = dsec_root
    prepare_dsec(root)
    full = DSECNightSemantic(root, "test", crop_rows=None)
    cropped = DSECNightSemantic(root, "test", crop_rows=40)
    assert len(full) == 4
    a, b = full[2], cropped[2]  # zurich_city_99_a frame 5
    assert a["label"].shape == (48, 64) and a["label"].dtype == torch.int64
    assert b["image"].shape == (3, 40, 64) and b["label"].shape == (40, 64)
    assert b["events"].shape == (3, 40, 64) and tuple(b["ori_size"].tolist()) == (40, 64)
    assert torch.equal(b["image"], a["image"][:, :40]) and torch.equal(b["label"], a["label"][:40])
    assert torch.equal(b["events"], a["events"][:, :40])
    # the frame after the last event has an all-zero tensor (index -1)
    last = full[3]
    assert full.event_window(3)[2] == -1 and not last["events"].any()
    # images only
    plain = DSECNightSemantic(root, "test", views=())
    assert "events" not in plain[0]


def test_default_crop_is_440_rows_at_dsec_size(tmp_path):
    root = tmp_path / "dsec"
    make_sequence(root, "zurich_city_98_a", 4, [1, 2], [2], h=480, w=640, seed=3)
    prepare_dsec(root)
    s = DSECNightSemantic(root, "test")[0]
    assert s["image"].shape == (3, 440, 640) and s["events"].shape == (3, 440, 640)
    assert s["label"].shape == (440, 640)
    train = DSECNightSemantic(root, "train", labels=False)  # the train split is never cropped
    assert len(train) == 1 and train[0]["events"].shape == (3, 480, 640)


def test_bins_give_b_channels(dsec_root):
    root, _ = dsec_root
    prepare_dsec(root)
    s = DSECNightSemantic(root, "train", labels=False, events_bins=5)[0]
    assert s["events"].shape == (5, 48, 64)


# -- errors -------------------------------------------------------------------------------------


def test_missing_index_file_names_file_and_fix(dsec_root):
    root, _ = dsec_root
    prepare_dsec(root)
    (root / "zurich_city_99_a/images/images_to_events_index.txt").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"zurich_city_99_a/images/images_to_events_index.txt.*udaseg prepare dsec"):
        DSECNightSemantic(root, "train", labels=False)


def test_missing_list_and_sequences(dsec_root, tmp_path):
    root, _ = dsec_root
    with pytest.raises(FileNotFoundError, match=r"night_dataset_warp.txt.*udaseg prepare dsec"):
        DSECNightSemantic(root, "train", labels=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no sequence folder zurich_city_\*"):
        DSECNightSemantic(empty, "train")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        DSECNightSemantic(tmp_path / "nowhere", "train")
    prepare_dsec(root)
    import shutil

    shutil.rmtree(root / "zurich_city_09_b")
    with pytest.raises(FileNotFoundError, match=r"zurich_city_09_b.*do not exist.*udaseg prepare dsec"):
        DSECNightSemantic(root, "test")


def test_broken_events_file_names_file(dsec_root):
    root, seqs = dsec_root
    prepare_dsec(root)
    ev = seqs["zurich_city_99_a"]
    bad = root / "zurich_city_99_a/events/left/events.h5"
    write_events_file(bad, ev["x"], ev["y"], ev["t"], ev["p"], t_offset=T_OFFSET, skip=("ms_to_idx",))
    with pytest.raises(DataError, match=r"zurich_city_99_a/events/left/events.h5 lacks ms_to_idx"):
        DSECNightSemantic(root, "train", labels=False)
    DSECNightSemantic(root, "train", labels=False, views=())  # images only: events not needed
    bad.unlink()
    with pytest.raises(DataError, match=r"(?s)DSEC event files are missing.*events.h5"):
        DSECNightSemantic(root, "train", labels=False)


def test_train_labels_and_stale_list(dsec_root):
    root, _ = dsec_root
    prepare_dsec(root)
    with pytest.raises(DataError, match=r"(?s)lack their warp image or label.*labels: false"):
        DSECNightSemantic(root, "train")  # train frames have no labels
    lst = root / TRAIN_LIST
    lines = lst.read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 7"
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"stale.*udaseg prepare dsec"):
        DSECNightSemantic(root, "train", labels=False)
    lst.write_text("garbage\n")
    with pytest.raises(DataError, match=r"cannot parse line 'garbage'"):
        DSECNightSemantic(root, "train", labels=False)


def test_reads_cmda_absolute_list_paths(dsec_root):
    root, _ = dsec_root
    prepare_dsec(root)
    lst = root / TEST_LIST
    lines = [f"/data/DSEC_Night/{line}" for line in lst.read_text().splitlines()]
    lst.write_text("\n".join(lines) + "\n")
    ds = DSECNightSemantic(root, "test", views=())
    assert len(ds) == 4 and ds.records[0].image == root / "zurich_city_09_b/warp_images/000140.png"


def test_event_tensor_at_full_size_is_fast_enough(dsec_root):
    # the same call the dataset makes, on a crafted dense window: a smoke check of vectorisation
    rng = np.random.default_rng(9)
    from udaseg.data.events import EventArrays

    n = 200_000
    ev = EventArrays(x=rng.integers(0, 640, n), y=rng.integers(0, 480, n),
                     t=np.sort(rng.integers(0, 50_000, n)), p=rng.integers(0, 2, n))
    out = event_tensor(ev, rectify_map=rect_map(480, 640))
    assert out.shape == (480, 640, 3)
