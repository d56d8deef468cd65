"""DSEC event reading, rectification, voxel grid and CMDA normalisation (udaseg.data.events)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from udaseg.data.dsec_index import images_to_events_index
from udaseg.data.events import (
    EventArrays,
    EventFile,
    event_tensor,
    events_to_voxel,
    normalize_events,
    read_rectify_map,
    rectify,
)
from udaseg.data.io import DataError


def ms_index(t: np.ndarray, n_ms: int | None = None) -> np.ndarray:
    """DSEC's ms_to_idx, written independently of the library: first event with t >= 1000 k."""
    if n_ms is None:
        n_ms = int(t[-1]) // 1000 + 1 if len(t) else 1
    return np.array([np.sum(t < 1000 * k) for k in range(n_ms)], dtype=np.uint64)


def write_events_file(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    t_offset: int = 0,
    blosc: bool = True,
    skip: tuple[str, ...] = (),
    n_ms: int | None = None,
) -> Path:
    """An events.h5 in DSEC's layout; ``blosc`` uses hdf5plugin's Blosc filter like real DSEC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    comp = dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE))
    with h5py.File(path, "w") as f:
        g = f.create_group("events")
        for name, arr, dt in (("x", x, np.uint16), ("y", y, np.uint16), ("t", t, np.uint32),
                              ("p", p, np.uint8)):
            if f"events/{name}" in skip:
                continue
            arr = np.asarray(arr, dtype=dt)
            opts = dict(comp, chunks=(max(min(len(arr), 4096), 1),)) if blosc and len(arr) else {}
            g.create_dataset(name, data=arr, **opts)
        if "ms_to_idx" not in skip:
            f.create_dataset("ms_to_idx", data=ms_index(np.asarray(t), n_ms))
        if "t_offset" not in skip:
            f.create_dataset("t_offset", data=np.int64(t_offset))
    return path


def write_rectify_map(path: Path, rmap: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("rectify_map", data=rmap.astype(np.float32))
    return path


def random_events(rng: np.random.Generator, n: int, h: int, w: int, t_max: int):
    t = np.sort(rng.integers(0, t_max, n)).astype(np.int64)
    return (rng.integers(0, w, n), rng.integers(0, h, n), t, rng.integers(0, 2, n))


# -- voxel grid ---------------------------------------------------------------------------------


def test_voxel_bilinear_splat_by_hand():
    v = events_to_voxel(np.array([1.25]), np.array([2.5]), np.array([7]), np.array([1]), 5, 4)
    assert v.shape == (1, 5, 4) and v.dtype == np.float32
    expected = np.zeros((5, 4), np.float32)
    expected[2, 1] = 0.75 * 0.5
    expected[2, 2] = 0.25 * 0.5
    expected[3, 1] = 0.75 * 0.5
    expected[3, 2] = 0.25 * 0.5
    np.testing.assert_array_equal(v[0], expected)
    # p = 0 contributes -1
    v0 = events_to_voxel(np.array([1.25]), np.array([2.5]), np.array([7]), np.array([0]), 5, 4)
    np.testing.assert_array_equal(v0[0], -expected)


def test_voxel_drops_outside_corners_and_events():
    x = np.array([3.5, -2.0, 0.0, 10.0])
    y = np.array([0.0, 1.0, -0.5, 1.0])
    v = events_to_voxel(x, y, np.arange(4), np.ones(4), 2, 4)[0]
    # (3.5, 0): half to column 3, half to column 4 (outside, dropped)
    # (-2, 1) and (10, 1): outside; (0, -0.5): half to row -1 (dropped), half to row 0
    expected = np.array([[0.5, 0, 0, 0.5], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(v, expected)


def test_voxel_sum_equals_signed_count_inside_and_is_order_free():
    rng = np.random.default_rng(0)
    n = 500
    x, y = rng.uniform(0, 15, n), rng.uniform(0, 9, n)  # all four corners inside 10x16
    t, p = np.sort(rng.integers(0, 1000, n)), rng.integers(0, 2, n)
    for bins in (1, 3):
        v = events_to_voxel(x, y, t, p, 10, 16, bins)
        assert v.shape == (bins, 10, 16)
        assert v.sum() == pytest.approx(float(np.sum(2 * p - 1)), abs=1e-3)
        perm = rng.permutation(n)
        v2 = events_to_voxel(x[perm], y[perm], t[perm], p[perm], 10, 16, bins)
        np.testing.assert_allclose(v, v2, atol=1e-6)


def test_voxel_time_bins_linear():
    # t = 0, 5, 10 -> tau = 0, 0.5, 1 -> bin positions 0, 0.5, 1 with two bins
    x = np.array([0.0, 1.0, 2.0])
    v = events_to_voxel(x, np.zeros(3), np.array([0, 5, 10]), np.ones(3), 1, 3, bins=2)
    np.testing.assert_array_equal(v[:, 0], [[1, 0.5, 0], [0, 0.5, 1]])
    # one bin: all time weight in it, whatever the time
    v1 = events_to_voxel(x, np.zeros(3), np.array([0, 5, 10]), np.ones(3), 1, 3, bins=1)
    np.testing.assert_array_equal(v1[0, 0], [1, 1, 1])


# -- normalisation -------------------------------------------------------------------------------


def crafted_voxel() -> np.ndarray:
    # non-zero cells -6, -5, -2, 2, 6: mean -1, std (ddof 1) 5 -> z = -1, -0.8, -0.2, 0.6, 1.4
    v = np.zeros((1, 3, 4), np.float32)
    v[0, 0, 0], v[0, 0, 3], v[0, 1, 1], v[0, 2, 0], v[0, 2, 2] = -6, -5, -2, 2, 6
    return v


CELLS = ((0, 0, 0), (0, 0, 3), (0, 1, 1), (0, 2, 0), (0, 2, 2))


@pytest.mark.parametrize(
    "n_events, expected",
    [
        # c = 1: positive [0.6, 1.0] / 1.0; negative [-1, -0.8, -0.2] / 1
        (10, [-1.0, -0.8, -0.2, 0.6, 1.0]),
        # c = 0.5: positive [0.5, 0.5] / 0.5; negative [-0.5, -0.5, -0.2] / 0.5
        (5, [-1.0, -1.0, -0.4, 1.0, 1.0]),
        # c = 2: positive [0.6, 1.4] / 1.4; negative unchanged
        (20, [-1.0, -0.8, -0.2, 0.6 / 1.4, 1.0]),
    ],
)
def test_normalize_by_hand(n_events, expected):
    out = normalize_events(crafted_voxel(), n_events, clip_scale=0.1)
    got = [out[c] for c in CELLS]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    zero = np.ones(out.shape, bool)
    for c in CELLS:
        zero[c] = False
    assert np.all(out[zero] == 0)
    assert out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1


def test_normalize_default_adaptive_clip():
    # 1e6 events: c = 1e6 * 1.5 / 5e5 = 3 -> nothing clipped
    out = normalize_events(crafted_voxel(), 1_000_000)
    np.testing.assert_allclose([out[c] for c in CELLS], [-1, -0.8, -0.2, 0.6 / 1.4, 1], rtol=1e-6)
    fixed = normalize_events(crafted_voxel(), 1_000_000, clip=0.5)
    np.testing.assert_allclose([fixed[c] for c in CELLS], [-1, -1, -0.4, 1, 1], rtol=1e-6)


def test_normalize_degenerate_inputs():
    assert not normalize_events(np.zeros((1, 2, 2)), 100).any()
    assert not normalize_events(crafted_voxel(), 0).any()  # no events -> clip 0 -> zeros
    one = np.zeros((1, 2, 2), np.float32)
    one[0, 0, 0] = 3.0  # a single non-zero cell: mean removed -> 0, no division by zero
    out = normalize_events(one, 100)
    assert np.isfinite(out).all() and not out.any()
    pos = np.zeros((1, 1, 3), np.float32)
    pos[0, 0] = [1, 1, 4]  # z = -0.577, -0.577, 1.155: both parts present
    out = normalize_events(pos, 10**6)
    np.testing.assert_allclose(out[0, 0], [-1, -1, 1], rtol=1e-6)


# -- events.h5 ---------------------------------------------------------------------------------


def test_slice_time_equals_brute_force_mask(tmp_path):
    rng = np.random.default_rng(3)
    x, y, t, p = random_events(rng, 5000, 48, 64, 20_000)
    t[100:140] = 5000  # many events on one millisecond boundary
    t.sort()
    path = write_events_file(tmp_path / "events.h5", x, y, t, p, t_offset=123, blosc=True)
    with h5py.File(path) as f:
        plist = f["events/t"].id.get_create_plist()  # the real plugin filter is in use
        assert plist.get_filter(plist.get_nfilters() - 1)[0] == hdf5plugin.Blosc.filter_id
    ev = EventFile(path)
    assert len(ev) == 5000 and ev.t_offset == 123
    bounds = [(-500, 300), (0, 1000), (4999, 5000), (5000, 5001), (5000, 7000), (999.5, 3000.2),
              (19_000, 40_000), (7000, 7000), (8000, 2000)]
    bounds += [tuple(sorted(rng.uniform(-100, 21_000, 2))) for _ in range(30)]
    for t0, t1 in bounds:
        got = ev.slice_time(t0, t1)
        mask = (t >= t0) & (t < t1)
        np.testing.assert_array_equal(got.t, t[mask])
        np.testing.assert_array_equal(got.x, x[mask])
        np.testing.assert_array_equal(got.y, y[mask])
        np.testing.assert_array_equal(got.p, p[mask])
    s = ev.slice_index(10, 20)
    np.testing.assert_array_equal(s.t, t[10:20])
    assert s.t.dtype == np.int64 and len(ev.slice_index(4990, 6000)) == 10
    ev.close()


def test_event_file_pickles_and_reopens(tmp_path):
    rng = np.random.default_rng(4)
    path = write_events_file(tmp_path / "e.h5", *random_events(rng, 100, 8, 8, 3000))
    ev = EventFile(path)
    ev.slice_index(0, 5)
    clone = pickle.loads(pickle.dumps(ev))
    np.testing.assert_array_equal(clone.slice_index(0, 100).t, ev.slice_index(0, 100).t)
    np.testing.assert_array_equal(clone.ms_to_idx, ev.ms_to_idx)


@pytest.mark.parametrize("skip", ["events/t", "ms_to_idx", "t_offset"])
def test_missing_entries_name_file_and_fix(tmp_path, skip):
    rng = np.random.default_rng(5)
    path = write_events_file(tmp_path / "bad" / "events.h5", *random_events(rng, 10, 8, 8, 3000),
                             skip=(skip,))
    with pytest.raises(DataError, match=rf"(?s)bad/events.h5 lacks {skip}.*DSEC"):
        EventFile(path)


def test_not_hdf5_and_missing_file(tmp_path):
    bad = tmp_path / "events.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match=r"cannot open events file .*events.h5"):
        EventFile(bad)
    with pytest.raises(FileNotFoundError, match=r"nowhere.h5.*DSEC"):
        EventFile(tmp_path / "nowhere.h5")


def test_reads_synthnight_files(tmp_path):
    from udaseg.data.synthnight.events import EventStream, write_events_h5

    rng = np.random.default_rng(6)
    x, y, t, p = random_events(rng, 300, 16, 32, 50_000)
    stream = EventStream(x=x.astype(np.uint16), y=y.astype(np.uint16), t=t.astype(np.uint32),
                         p=p.astype(np.uint8))
    path = tmp_path / "frame_events.h5"
    write_events_h5(path, stream, t_offset=10**9, frame_timestamp_us=10**9 + 50_000)
    ev = EventFile(path)
    assert ev.t_offset == 10**9 and len(ev) == 300
    whole = ev.slice_time(0, 50_001)
    np.testing.assert_array_equal(whole.t, t)
    np.testing.assert_array_equal(whole.x, x)
    out = event_tensor(ev, 0, len(ev), height=16, width=32)
    assert out.shape == (16, 32, 3) and np.abs(out).max() <= 1


# -- image -> event index ---------------------------------------------------------------------


def test_images_to_events_index_by_hand(tmp_path):
    t = np.array([100, 500, 1500, 1500, 2600, 4000, 7000], np.int64)
    ms = ms_index(t)  # 8 entries, k = 0..7
    np.testing.assert_array_equal(ms, [0, 2, 4, 5, 5, 6, 6, 6])
    off = 10_000
    taus = [0, -5, 50, 100, 1499, 1500, 2599, 2600, 6999, 7000, 7001]
    expected = [-1, -1, -1, 0, 1, 3, 3, 4, 5, 6, -1]
    # 0 and -5: tau <= 0; 50: before the first event; 1500: last of the equal times;
    # 2600: m = 1, window [ms[1], ms[3]] = [2, 5]; 6999: m = 5, window [ms[5], ms[7]] = [6, 6]
    # holds only t = 7000 > tau, so the answer is the event just before the window (5);
    # 7000: m = 6, m + 2 = 8 is past ms_to_idx -> window [ms[6], N - 1] = [6, 6];
    # 7001: after the last event
    got = images_to_events_index(np.array(taus) + off, off, t, ms)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64
    path = write_events_file(tmp_path / "e.h5", np.zeros(7), np.zeros(7), t, np.ones(7))
    with EventFile(path) as ev:  # the lazily-read h5py dataset gives the same answer
        got_h5 = images_to_events_index(np.array(taus) + off, off, ev.t_dataset, ev.ms_to_idx)
    np.testing.assert_array_equal(got_h5, expected)


def test_images_to_events_index_matches_brute_force():
    rng = np.random.default_rng(7)
    t = np.sort(rng.integers(0, 30_000, 3000))
    t[500:600] = t[500]
    ms = ms_index(t)
    taus = np.concatenate([rng.integers(-100, 31_000, 300), t[::37], t[::41] - 1, [t[-1]]])
    got = images_to_events_index(taus + 5, 5, t, ms)
    brute = np.searchsorted(t, taus, side="right") - 1
    brute[(taus <= 0) | (taus > t[-1])] = -1
    np.testing.assert_array_equal(got, brute)
    assert len(images_to_events_index([1, 2], 0, np.zeros(0, np.int64), np.zeros(1))) == 2


# -- rectification and the full tensor ------------------------------------------------------------


def test_rectify_with_crafted_map(tmp_path):
    h, w = 4, 6
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rmap = np.stack([2 * xx + 0.5, yy + 0.25], axis=-1)  # (x, y) -> (2x + 0.5, y + 0.25)
    path = write_rectify_map(tmp_path / "rectify_map.h5", rmap)
    loaded = read_rectify_map(path)
    assert loaded.shape == (4, 6, 2) and loaded.dtype == np.float32
    xr, yr = rectify(np.array([0, 5, 2]), np.array([0, 3, 1]), loaded)
    np.testing.assert_array_equal(xr, [0.5, 10.5, 4.5])
    np.testing.assert_array_equal(yr, [0.25, 3.25, 1.25])
    with pytest.raises(DataError, match="rectify map covers a 6x4 sensor"):
        rectify(np.array([6]), np.array([0]), loaded)


def test_rectify_map_errors(tmp_path):
    p = tmp_path / "m.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("other", data=np.zeros(3))
    with pytest.raises(DataError, match=r"m.h5 lacks the dataset 'rectify_map'"):
        read_rectify_map(p)
    with h5py.File(p, "w") as f:
        f.create_dataset("rectify_map", data=np.zeros((4, 6, 3)))
    with pytest.raises(DataError, match=r"shape \(4, 6, 3\)"):
        read_rectify_map(p)


def test_event_tensor_pipeline(tmp_path):
    h, w = 6, 8
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rmap = np.stack([xx + 0.5, yy], axis=-1)  # every event lands between two columns
    x = np.array([0, 0, 3, 3, 3, 5])
    y = np.array([1, 1, 2, 2, 4, 5])
    t = np.array([0, 10, 20, 30, 40, 50])
    p = np.array([1, 1, 0, 0, 1, 0])
    ev = EventArrays(x=x, y=y, t=t, p=p)
    out = event_tensor(ev, rectify_map=rmap, clip_scale=1.0)
    assert out.shape == (h, w, 3) and out.dtype == np.float32
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    voxel = events_to_voxel(x + 0.5, y, t, p, h, w)
    np.testing.assert_allclose(out[..., 0], normalize_events(voxel, 6, clip_scale=1.0)[0])
    assert out[1, 0, 0] > 0 and out[2, 3, 0] < 0 and out[0, 0, 0] == 0
    assert np.abs(out).max() == pytest.approx(1.0)
    multi = event_tensor(ev, rectify_map=rmap, bins=3, channels=None)
    assert multi.shape == (h, w, 3)
    with pytest.raises(ValueError, match="bins"):
        event_tensor(ev, rectify_map=rmap, bins=2, channels=3)


def test_blosc_file_reads_without_importing_hdf5plugin_first(tmp_path):
    """The reader registers the plugin filters itself (a fresh process that never imports it)."""
    import subprocess
    import sys

    rng = np.random.default_rng(8)
    x, y, t, p = random_events(rng, 200, 8, 8, 3000)
    path = write_events_file(tmp_path / "events.h5", x, y, t, p, blosc=True)
    code = (
        "import sys; from udaseg.data.events import EventFile; "
        "assert 'hdf5plugin' not in sys.modules; "
        f"print(int(EventFile({str(path)!r}).slice_index(0, 200).t.sum()))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == int(t.sum())
