"""Resuming a DACS run restores teacher, optimiser, scheduler, step counter and the RCS stream."""

import lightning as L
import torch

from udaseg.adapt.self_training import DACSConfig
from udaseg.data.rcs import RCSConfig
from udaseg.data.transforms import PipelineConfig
from udaseg.engine.datamodule import DatasetSpec, UDADataModule
from udaseg.engine.module import UDAModule
from udaseg.engine.optim import OptimConfig


def make(cs, dz):
    pipe = PipelineConfig(scale=(64, 32), crop_size=(32, 32))
    dm = UDADataModule(
        source=DatasetSpec("cityscapes", str(cs), "train"),
        target=DatasetSpec("cityscapes", str(cs), "train", labels=False),
        val={"night_val": DatasetSpec("dark_zurich", str(dz), "val")},
        source_pipeline=pipe, target_pipeline=pipe, batch_size=2, num_workers=0,
        rcs=RCSConfig(min_pixels=10),
    )
    module = UDAModule(
        backbone="mit_tiny", head="segformer", head_channels=16, drop_path_rate=0.0,
        optim=OptimConfig(lr=1e-3, warmup_iters=2), self_training=DACSConfig(),
        methods={"fd": {}},
    )
    return module, dm


def trainer(tmp_path, steps, **kw):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=tmp_path, **kw,
    )


def test_checkpoint_holds_and_restores_everything(tiny_cityscapes, tiny_dark_zurich, tmp_path):
    L.seed_everything(0)
    module, dm = make(tiny_cityscapes, tiny_dark_zurich)
    t = trainer(tmp_path, 2)
    t.fit(module, datamodule=dm)
    ckpt = tmp_path / "two.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    keys = saved["state_dict"].keys()
    assert any(k.startswith("algorithm.teacher.model.") for k in keys)
    assert any("imnet_backbone" in k for k in keys)
    assert saved["global_step"] == 2
    assert saved["lr_schedulers"][0]["last_epoch"] == 2
    assert "rcs" in saved["UDADataModule"]

    L.seed_everything(1)
    module2, dm2 = make(tiny_cityscapes, tiny_dark_zurich)
    t2 = trainer(tmp_path, 3)
    restored = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            if not restored:
                restored["teacher"] = {
                    k: v.clone() for k, v in pl_module.algorithm.teacher.state_dict().items()
                }
                restored["step"] = trainer.global_step
                restored["opt_steps"] = max(
                    int(s["step"]) for s in trainer.optimizers[0].state_dict()["state"].values()
                )
                restored["rcs"] = trainer.datamodule.source_set.state_dict()

    t2.callbacks.append(Probe())
    t2.fit(module2, datamodule=dm2, ckpt_path=ckpt)
    assert restored["step"] == 2 and restored["opt_steps"] == 2
    teacher_saved = {
        k[len("algorithm.teacher."):]: v for k, v in saved["state_dict"].items()
        if k.startswith("algorithm.teacher.")
    }
    for k, v in teacher_saved.items():
        assert torch.equal(restored["teacher"][k], v), k
    assert restored["rcs"] == saved["UDADataModule"]["rcs"]
    assert t2.global_step == 3
