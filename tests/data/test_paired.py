"""PairedDataset (CISS): pairing, stylised views aligned with the image, RCS, the data module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from udaseg.data.datasets import Cityscapes
from udaseg.data.datasets.dark_zurich import DarkZurich
from udaseg.data.paired import PairedDataset
from udaseg.data.rcs import RareClassDataset, RCSConfig
from udaseg.data.stylize import StylizeConfig, fda, reinhard
from udaseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CenterCrop, PipelineConfig, Resize
from udaseg.engine.datamodule import DatasetSpec, UDADataModule

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)

# source 32x64 stays 32x64; target 32x64 -> 24x48; FDA common size = (24, 48)
SRC_PIPE = PipelineConfig(scale=(64, 32), crop_size=(16, 16), flip_prob=1.0)
TRG_PIPE = PipelineConfig(scale=(48, 24), crop_size=(16, 16), flip_prob=1.0)


def norm(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def crop_flip(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    top, left, bottom, right = box.tolist()
    return x[..., top:bottom, left:right].flip(-1)


@pytest.fixture
def domains(tiny_cityscapes, tiny_dark_zurich):
    return Cityscapes(tiny_cityscapes, "train"), DarkZurich(tiny_dark_zurich, "val", labels=False)


def test_index_pairing_shapes_and_pixel_aligned_stylized_views(domains):
    src_ds, trg_ds = domains
    cfg = StylizeConfig(beta=0.1)
    ds = PairedDataset(src_ds, trg_ds, cfg, SRC_PIPE, TRG_PIPE)
    assert len(ds) == 3 * 2
    torch.manual_seed(0)
    item = ds[3]  # source 3 // 2 = 1, target 3 % 2 = 1
    src, trg = item["source"], item["target"]
    assert src["name"] == src_ds.records[1].name and trg["name"] == trg_ds.records[1].name
    assert {"image", "label", "stylized", "crop_box", "flipped"} <= set(src)
    assert {"image", "stylized"} <= set(trg) and "label" not in trg
    for s in (src, trg):
        assert s["image"].shape == s["stylized"].shape == (3, 16, 16)
        assert s["stylized"].dtype == torch.float32 and bool(s["flipped"])
    assert src["label"].shape == (16, 16)

    # by hand: resize, central crop to (24, 48), FDA both ways from the originals
    full_s = CenterCrop((24, 48))(Resize((64, 32))(src_ds.load(1)))
    full_t = CenterCrop((24, 48))(Resize((48, 24))(trg_ds.load(1)))
    assert full_s["image"].shape == full_t["image"].shape == (3, 24, 48)
    sty_s = fda(full_s["image"], full_t["image"], 0.1)  # source in target style
    sty_t = fda(full_t["image"], full_s["image"], 0.1)  # target in source style
    # the view and its stylised copy got the same crop and flip, and the same normalisation
    torch.testing.assert_close(src["image"], norm(crop_flip(full_s["image"], src["crop_box"])))
    torch.testing.assert_close(src["stylized"], norm(crop_flip(sty_s, src["crop_box"])))
    assert torch.equal(src["label"], crop_flip(full_s["label"], src["crop_box"]))
    torch.testing.assert_close(trg["image"], norm(crop_flip(full_t["image"], trg["crop_box"])))
    torch.testing.assert_close(trg["stylized"], norm(crop_flip(sty_t, trg["crop_box"])))
    assert not torch.allclose(src["stylized"], src["image"])


def test_common_size_directions_and_reinhard(domains):
    src_ds, trg_ds = domains
    no_flip = PipelineConfig(scale=(64, 32), crop_size=(32, 64), flip_prob=0.0)
    small = PipelineConfig(scale=(64, 32), crop_size=(20, 40), flip_prob=0.0)  # Pad would re-grow
    ds = PairedDataset(src_ds, trg_ds, StylizeConfig(common_size=(20, 40), directions="source"),
                       small, small)
    item = ds[0]
    assert item["source"]["image"].shape == item["source"]["stylized"].shape == (3, 20, 40)
    assert "stylized" not in item["target"] and item["target"]["image"].shape == (3, 20, 40)

    # Reinhard without common_size: full images (32x64 and 24x48), no central crop
    ds = PairedDataset(src_ds, trg_ds, StylizeConfig(method="reinhard"), no_flip,
                       PipelineConfig(scale=(48, 24), crop_size=(24, 48), flip_prob=0.0))
    item = ds[0]
    full_s = src_ds.load(0)
    full_t = Resize((48, 24))(trg_ds.load(0))
    torch.testing.assert_close(
        item["source"]["stylized"], norm(reinhard(full_s["image"], full_t["image"]))
    )
    torch.testing.assert_close(
        item["target"]["stylized"], norm(reinhard(full_t["image"], full_s["image"]))
    )

    with pytest.raises(ValueError, match="same H x W"):  # common size bigger than the target
        PairedDataset(src_ds, trg_ds, StylizeConfig(common_size=(32, 64)), no_flip,
                      PipelineConfig(scale=(48, 24)))[0]


def test_rcs_draws_the_source_and_the_target_stream_is_checkpointable(domains):
    src_ds, trg_ds = domains
    cfg = RCSConfig(min_pixels=10)
    rcs = RareClassDataset(src_ds, config=cfg, seed=0)
    ds = PairedDataset(src_ds, trg_ds, StylizeConfig(beta=0.1), SRC_PIPE, TRG_PIPE, rcs=rcs, seed=0)
    state = ds.state_dict()
    assert set(state) == {"target", "rcs"}
    item = ds[5]  # index ignored
    check = RareClassDataset(src_ds, config=cfg, seed=123)
    check.load_state_dict(state["rcs"])
    c, si = check.draw()
    assert int(item["source"]["rcs_class"]) == c
    assert item["source"]["name"] == src_ds.records[si].name
    assert item["source"]["stylized"].shape == (3, 16, 16)

    names = [ds[0]["target"]["name"] for _ in range(12)]
    assert set(names) == {r.name for r in trg_ds.records}  # uniform over the target split
    ds.load_state_dict(state)
    again = [ds[0] for _ in range(13)][1:]
    assert [it["target"]["name"] for it in again] == names
    ds.seed_worker(0, rank=1, base_seed=0)
    other = [ds[0]["target"]["name"] for _ in range(12)]
    ds.seed_worker(0, rank=0, base_seed=0)
    assert [ds[0]["target"]["name"] for _ in range(12)] != other or len(set(other)) == 1
    with pytest.raises(ValueError, match="bit_generator"):
        ds.load_state_dict({"nope": 1})
    with pytest.raises(ValueError, match="same source"):
        PairedDataset(Cityscapes(src_ds.root, "train"), trg_ds, StylizeConfig(), SRC_PIPE, TRG_PIPE,
                      rcs=rcs)


def test_rcs_crop_retries_rerun_only_the_part_after_stylisation(domains, monkeypatch):
    src_ds, trg_ds = domains
    cfg = RCSConfig(min_pixels=10, min_crop_ratio=1000, max_crop_tries=3)  # never enough pixels
    ds = PairedDataset(src_ds, trg_ds, StylizeConfig(beta=0.1), SRC_PIPE, TRG_PIPE,
                       rcs=RareClassDataset(src_ds, config=cfg))
    calls = {"after": 0, "stylize": 0}
    after, stylize = ds.source_after, ds.stylize_views

    def count_after(s):
        calls["after"] += 1
        return after(s)

    def count_stylize(*a):
        calls["stylize"] += 1
        return stylize(*a)

    monkeypatch.setattr(ds, "source_after", count_after)
    monkeypatch.setattr(ds, "stylize_views", count_stylize)
    ds[0]
    assert calls == {"after": 4, "stylize": 1}  # 1 + 3 retries of the random crop, one stylisation


def make_dm(cs, dz, **kw) -> UDADataModule:
    pipe = PipelineConfig(scale=(64, 32), crop_size=(32, 32))
    return UDADataModule(
        source=DatasetSpec("cityscapes", str(cs), "train"),
        target=DatasetSpec("dark_zurich", str(dz), "val", labels=False),
        val={"night_val": DatasetSpec("dark_zurich", str(dz), "val")},
        source_pipeline=pipe, target_pipeline=pipe, batch_size=2, val_batch_size=2,
        num_workers=0, stylize=StylizeConfig(beta=0.1), **kw,
    )


def test_datamodule_yields_one_loader_with_both_domains(tiny_cityscapes, tiny_dark_zurich):
    dm = make_dm(tiny_cityscapes, tiny_dark_zurich, rcs=RCSConfig(min_pixels=10))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.dataset.dataset is dm.train_set
    batch = next(iter(loader))
    assert set(batch) == {"source", "target"}
    for d in ("source", "target"):
        assert batch[d]["image"].shape == batch[d]["stylized"].shape == (2, 3, 32, 32)
    assert batch["source"]["label"].shape == (2, 32, 32) and "label" not in batch["target"]
    assert batch["source"]["rcs_class"].shape == (2,)

    # the stream is a pure function of the seed: the same batch from a fresh data module, a
    # different one from another seed
    dm2 = make_dm(tiny_cityscapes, tiny_dark_zurich, rcs=RCSConfig(min_pixels=10))
    dm2.setup("fit")
    again = next(iter(dm2.train_dataloader()))
    assert torch.equal(again["source"]["stylized"], batch["source"]["stylized"])
    assert torch.equal(again["target"]["image"], batch["target"]["image"])
    dm3 = make_dm(tiny_cityscapes, tiny_dark_zurich, rcs=RCSConfig(min_pixels=10), seed=5)
    dm3.setup("fit")
    other = next(iter(dm3.train_dataloader()))
    assert not torch.equal(other["source"]["image"], batch["source"]["image"])

    plain = make_dm(tiny_cityscapes, tiny_dark_zurich)
    plain.setup("fit")
    assert len(plain.train_set) == 6


def test_fit_two_steps_with_stylized_batches(tiny_cityscapes, tiny_dark_zurich, tmp_path):
    from udaseg.adapt.self_training import DACSConfig
    from udaseg.engine.module import UDAModule
    from udaseg.engine.optim import OptimConfig

    L.seed_everything(0)
    dm = make_dm(tiny_cityscapes, tiny_dark_zurich, rcs=RCSConfig(min_pixels=10))
    module = UDAModule(
        backbone="mit_tiny", head="segformer", head_channels=16, drop_path_rate=0.0,
        optim=OptimConfig(lr=1e-3, warmup_iters=0), self_training=DACSConfig(),
    )
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({d: sorted(batch[d]) for d in batch})

    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[Probe()],
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and len(seen) == 2
    assert "stylized" in seen[0]["source"] and "stylized" in seen[0]["target"]
