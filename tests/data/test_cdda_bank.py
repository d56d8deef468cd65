"""CDDA source bank: `udaseg prepare cdda-bank` on a tiny SynthNight copy, the file round trip,
histograms against a naive loop, crops equal to the training pipeline's, resume, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from udaseg.data.cdda_bank import (HEADER_FILE, HIST_FILE, RECORDS_FILE, SourceBank,
                                   class_depth_histogram)
from udaseg.data.synthnight import SynthNightConfig, generate
from udaseg.engine.cli import main
from udaseg.errors import ConfigError

N = 10
CROP = [16, 24]
RCS = {"class_temp": 0.5, "min_pixels": 20, "min_crop_ratio": 0.5, "max_crop_tries": 3}
SEED = 5


def _config(tmp: Path, sn: Path, views=("depth",), crop=CROP) -> Path:
    source = {"name": "cityscapes", "root": str(sn / "cityscapes"), "split": "train"}
    if views is not None:
        source["views"] = list(views)
    cfg = {
        "data": {
            "source": source,
            "source_pipeline": {"scale": [64, 32], "crop_size": list(crop), "cat_max_ratio": 0.75},
            "rcs": RCS,
            "seed": SEED,
            "num_workers": 0,
        }
    }
    path = tmp / f"train_{'x'.join(map(str, crop))}_{len(views or ())}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _build(cfg: Path, out: Path, n: int = N, *extra: str) -> None:
    rc = main(["prepare", "cdda-bank", "--config", str(cfg), "--out", str(out), "--n", str(n),
               "--workers", "0", "--quiet", *extra])
    assert rc == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cdda_bank")
    sn = generate(tmp / "sn", SynthNightConfig(
        seed=3, width=64, height=32, n_day_train=4, n_day_val=1, n_night_train=1, n_night_val=1,
        with_events=False, with_refs=False), workers=0, progress=False)
    cfg = _config(tmp, sn)
    out = tmp / "bank"
    _build(cfg, out)
    return tmp, sn, cfg, out


def test_header_round_trip(built):
    _, sn, _, out = built
    bank = SourceBank.open(out)
    h = bank.header
    assert len(bank) == N == h["n"] == h["done"]
    assert h["crop_size"] == CROP and h["seed"] == SEED
    assert {k: h["rcs"][k] for k in RCS} == RCS
    assert h["source"]["name"] == "cityscapes" and h["source"]["len"] == 4
    assert Path(h["source"]["root"]) == (sn / "cityscapes").resolve()
    assert h["pipeline"]["cat_max_ratio"] == 0.75 and h["pipeline"]["scale"] == [64, 32]
    assert bank.hist.dtype == torch.float32 and tuple(bank.hist.shape) == (N, 19, 256)
    assert sorted(p.name for p in out.iterdir()) == sorted([HEADER_FILE, HIST_FILE, RECORDS_FILE])
    assert not out.with_name(out.name + ".partial").exists()
    assert len(SourceBank.open(out / HEADER_FILE)) == N  # the header file names the bank too


def test_hist_rows_equal_naive_loop(built):
    bank = SourceBank.open(built[3])
    for i in range(len(bank)):
        s = bank.sample(i)
        label, depth = s["label"], s["depth"][0]
        assert s["image"].shape == (3, *CROP) and label.shape == tuple(CROP)
        naive = np.zeros((19, 256), np.float32)
        for y in range(label.shape[0]):
            for x in range(label.shape[1]):
                c, b = int(label[y, x]), int(depth[y, x])
                if c < 19 and b < 256:
                    naive[c, b] += 1
        np.testing.assert_array_equal(bank.hist[i].numpy(), naive)
        assert bank.hist[i].sum() == int((label < 19).sum())


def test_crops_equal_the_training_pipeline(built):
    from udaseg.data.rcs import RCSConfig
    from udaseg.data.transforms import PipelineConfig
    from udaseg.engine.datamodule import DatasetSpec, UDADataModule

    _, sn, _, out = built
    dm = UDADataModule(
        source=DatasetSpec("cityscapes", str(sn / "cityscapes"), views=["depth"]), val={},
        source_pipeline=PipelineConfig(scale=(64, 32), crop_size=tuple(CROP), cat_max_ratio=0.75),
        rcs=RCSConfig(**RCS), seed=SEED, batch_size=2, num_workers=0,
    )
    dm.setup("fit")
    bank = SourceBank.open(out, cache_size=2)
    seen = 0
    for batch in dm.train_dataloader()["source"]:  # stream positions 0, 1, 2, 3 (no trainer)
        for j in range(batch["image"].shape[0]):
            image, label = bank.crop(seen)
            torch.testing.assert_close(image, batch["image"][j], rtol=0, atol=0)
            assert torch.equal(label, batch["label"][j]) and label.dtype == torch.int64
            torch.testing.assert_close(bank.sample(seen)["depth"], batch["depth"][j], rtol=0, atol=0)
            assert int(bank.records[seen][1]) == int(batch["rcs_class"][j])
            seen += 1
    assert seen == 4
    again, _ = bank.crop(0)  # past the LRU cache: regenerated identically
    torch.testing.assert_close(again, bank.crop(0)[0], rtol=0, atol=0)


def test_interrupted_build_resumes_to_identical_files(built, tmp_path, monkeypatch):
    from udaseg.data import cdda_bank
    from udaseg.data.stream import SampleStream

    _, _, cfg, out = built
    real = SampleStream.__getitem__
    calls = {"n": 0}

    def flaky(self, p):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real(self, p)

    resumed = tmp_path / "bank"
    monkeypatch.setattr(SampleStream, "__getitem__", flaky)
    monkeypatch.setattr(cdda_bank, "build_bank", _flush_every(cdda_bank.build_bank, 4))
    with pytest.raises(KeyboardInterrupt):
        _build(cfg, resumed)
    partial = tmp_path / "bank.partial"
    assert not resumed.exists() and partial.is_dir()
    import json

    assert json.loads((partial / HEADER_FILE).read_text())["done"] == 6
    with pytest.raises(ConfigError, match="prepare cdda-bank"):
        SourceBank.open(partial)  # incomplete: says how to finish it
    monkeypatch.setattr(SampleStream, "__getitem__", real)
    positions = []
    monkeypatch.setattr(SampleStream, "__getitem__", lambda s, p: positions.append(p) or real(s, p))
    _build(cfg, resumed)
    assert positions == list(range(6, N))  # continued, not restarted
    for name in (HEADER_FILE, HIST_FILE, RECORDS_FILE):
        assert (resumed / name).read_bytes() == (out / name).read_bytes(), name
    positions.clear()
    _build(cfg, resumed)  # complete and same settings: nothing to do
    assert positions == []


def _flush_every(fn, k):
    def wrapped(*args, **kwargs):
        return fn(*args, **{**kwargs, "flush_every": k})

    return wrapped


def test_check_crop_size_refuses_other_crop(built):
    bank = SourceBank.open(built[3])
    bank.check_crop_size(tuple(CROP), "model.methods.cdda")
    with pytest.raises(ConfigError) as e:
        bank.check_crop_size([512, 512], "model.methods.cdda")
    msg = str(e.value)
    assert "16x24" in msg and "512x512" in msg and "udaseg prepare cdda-bank" in msg
    assert str(built[3]) in msg


def test_other_settings_need_force(built, tmp_path):
    tmp, sn, _, out = built
    other = _config(tmp_path, sn, crop=[16, 16])
    with pytest.raises(ConfigError, match="--force"):
        from udaseg.engine.prepare import prepare_cdda_bank

        prepare_cdda_bank([other], out, n=2, progress=False, log=lambda s: None)


def test_source_without_depth_view_is_refused(built, tmp_path, capsys):
    _, sn, _, _ = built
    cfg = _config(tmp_path, sn, views=None)
    rc = main(["prepare", "cdda-bank", "--config", str(cfg), "--out", str(tmp_path / "b"),
               "--n", "2", "--workers", "0", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no depth view" in err and "views: [depth]" in err
    assert not (tmp_path / "b").exists()


def test_open_missing_or_corrupt_is_one_clear_error(built, tmp_path):
    import shutil

    with pytest.raises(ConfigError, match="does not exist.*prepare cdda-bank"):
        SourceBank.open(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(built[3], bad)
    (bad / HIST_FILE).write_bytes(b"not an npy file")
    with pytest.raises(ConfigError, match=f"{HIST_FILE} is corrupt.*prepare cdda-bank"):
        SourceBank.open(bad)
    (bad / HEADER_FILE).write_text("{ truncated")
    with pytest.raises(ConfigError, match="corrupt.*prepare cdda-bank"):
        SourceBank.open(bad)
    (bad / HEADER_FILE).write_text('{"format": "udaseg-cdda-bank", "version": 99}')
    with pytest.raises(ConfigError, match="version 99.*prepare cdda-bank"):
        SourceBank.open(bad)


def test_from_arrays_and_batched_histogram():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (3, 8, 8), generator=g)
    labels[:, 0] = 255
    depth = torch.rand(3, 1, 8, 8, generator=g) * 300  # some bins >= 256: skipped
    hist = class_depth_histogram(labels, depth)
    for i in range(3):
        np.testing.assert_array_equal(hist[i].numpy(), class_depth_histogram(labels[i], depth[i]).numpy())
    assert hist[0].sum() == int(((labels[0] < 19) & (depth[0, 0] < 256)).sum())
    bank = SourceBank.from_arrays(hist, torch.zeros(3, 3, 8, 8), labels, {"seed": 1})
    assert len(bank) == 3 and bank.header["crop_size"] == [8, 8] and bank.header["seed"] == 1
    image, label = bank.crop(2)
    assert image.shape == (3, 8, 8) and torch.equal(label, labels[2])
    with pytest.raises(ConfigError, match="8x8"):
        bank.check_crop_size((16, 16), "cdda")
