"""Resuming a DACS run restores teacher, optimiser, scheduler, step counter, the data stream
position and the random generators: N + M iterations in one go equal N, then M after resume."""

import lightning as L
import pytest
import torch

from udaseg.adapt.self_training import DACSConfig
from udaseg.data.rcs import RCSConfig
from udaseg.data.transforms import PipelineConfig
from udaseg.engine.datamodule import DatasetSpec, UDADataModule
from udaseg.engine.module import UDAModule
from udaseg.engine.optim import OptimConfig


def cdda_bank(monkeypatch, size=32, n=5):
    """An in-memory CDDA bank of ``size``-pixel crops, served for any bank path."""
    from udaseg.adapt.methods import cdda
    from udaseg.data.cdda_bank import SourceBank, class_depth_histogram

    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 19, (n, size, size), generator=g)
    depth = torch.randint(0, 256, (n, size, size), generator=g).float()
    bank = SourceBank.from_arrays(class_depth_histogram(labels, depth),
                                  torch.randn(n, 3, size, size, generator=g), labels)
    monkeypatch.setattr(cdda, "open_bank", lambda *a, **k: bank)
    return bank


def make(cs, dz, num_workers=0, refign=False, dsrnss=False, icda=False, cdda=False):
    pipe = PipelineConfig(scale=(64, 32), crop_size=(32, 32))
    target = DatasetSpec("cityscapes", str(cs), "train", labels=False)
    source = DatasetSpec("cityscapes", str(cs), "train")
    methods = {"fd": {}}
    if icda:  # CEM view rendered from the source (torch draws), the DAR on the student and the
        # EMA teacher, prototypes (a buffer), adapt_to_ref's coin, references with the target
        source = DatasetSpec("cityscapes_cem", str(cs), "train")
        target = DatasetSpec("dark_zurich", str(dz), "val", labels=False, views=["ref"])
        methods["icda"] = {"pseudo_weight_ignore_top": 2, "pseudo_weight_ignore_bottom": 2}
    if refign:  # night images with day references; adapt_to_ref draws from Python's random
        target = DatasetSpec("dark_zurich", str(dz), "val", labels=False, views=["ref"])
        methods["refign"] = {"aligner": "identity", "adapt_to_ref": True}
    if cdda:  # depth with the target; every gate open: bank crops replace sources, guidance runs
        target = DatasetSpec("dark_zurich", str(dz), "val", labels=False, views=["depth"])
        methods["cdda"] = {"bank": "in-memory", "tau_rw": -1.0, "tau_rl": -1.0}
    if dsrnss:  # on Refign: per-image ClassMix draws, the long-tail bank (pasted at step 5 from
        # steps 3, 4, 5: two of them banked before the checkpoint) and FPA from step 2
        methods["dsrnss"] = {"fpa_start_step": 2}
    dm = UDADataModule(
        source=source,
        target=target,
        val={"night_val": DatasetSpec("dark_zurich", str(dz), "val")},
        source_pipeline=pipe, target_pipeline=pipe, batch_size=2, num_workers=num_workers,
        rcs=RCSConfig(min_pixels=10),
    )
    module = UDAModule(
        backbone="mit_tiny", head="segformer", head_channels=16, drop_path_rate=0.0,
        optim=OptimConfig(lr=1e-3, warmup_iters=2),
        self_training=DACSConfig(teacher_stochastic=refign or icda), methods=methods,
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
    assert saved["UDADataModule"] == {"seed": 0, "batch_size": 2}
    assert set(saved["udaseg_rng"]) >= {"torch", "numpy", "python"}

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

    t2.callbacks.append(Probe())
    t2.fit(module2, datamodule=dm2, ckpt_path=ckpt)
    assert restored["step"] == 2 and restored["opt_steps"] == 2
    teacher_saved = {
        k[len("algorithm.teacher."):]: v for k, v in saved["state_dict"].items()
        if k.startswith("algorithm.teacher.")
    }
    for k, v in teacher_saved.items():
        assert torch.equal(restored["teacher"][k], v), k
    assert t2.global_step == 3


class StopAt(L.Callback):
    """Interrupt a run after ``step`` iterations (as a preemption would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("workers, refign, dsrnss, icda, cdda",
                         [(0, False, False, False, False), (2, False, False, False, False),
                          (0, True, False, False, False), (0, True, True, False, False),
                          (0, False, False, True, False), (0, False, False, False, True)])
def test_resume_is_bit_exact(tiny_cityscapes, tiny_dark_zurich, tmp_path, monkeypatch, workers,
                             refign, dsrnss, icda, cdda):
    """4 + 3 iterations in one go == 4 iterations, checkpoint, resume for 3 (student, teacher,
    FD's frozen copy): RCS draws, crops, ClassMix and augmentation included, with and without
    loader workers (the data stream has no per-worker state); with Refign (references, the
    adapt_to_ref coin, the stochastic teacher); with DSRNSS on Refign (its long-tail bank is
    in the checkpoint and is compared like the weights); with ICDA (the DAR of student and
    teacher and the class prototypes are in the checkpoint and compared like the weights); with
    CDDA (bank crops replace the ClassMix sources, the guidance pass runs; its gate counters are
    in the checkpoint and compared like the weights)."""
    if cdda:
        cdda_bank(monkeypatch)
    torch.use_deterministic_algorithms(True)
    try:
        L.seed_everything(0)
        module, dm = make(tiny_cityscapes, tiny_dark_zurich, workers, refign, dsrnss, icda, cdda)
        trainer(tmp_path / "a", 7).fit(module, datamodule=dm)
        straight = _weights(module)

        L.seed_everything(0)
        module, dm = make(tiny_cityscapes, tiny_dark_zurich, workers, refign, dsrnss, icda, cdda)
        t = trainer(tmp_path / "b", 7, callbacks=[StopAt(4)])  # the same 7-step schedule, cut at 4
        t.fit(module, datamodule=dm)
        assert t.global_step == 4
        ckpt = tmp_path / "four.ckpt"
        t.save_checkpoint(ckpt)

        L.seed_everything(123)  # a different seed at start-up must not matter
        module, dm = make(tiny_cityscapes, tiny_dark_zurich, workers, refign, dsrnss, icda, cdda)
        trainer(tmp_path / "c", 7).fit(module, datamodule=dm, ckpt_path=ckpt)
        resumed = _weights(module)
    finally:
        torch.use_deterministic_algorithms(False)
    assert straight.keys() == resumed.keys()
    assert any(k.startswith("algorithm.teacher.") for k in straight)
    if dsrnss:  # the bank holds steps 4, 5, 6 of both runs
        bank = [k for k in straight if k.endswith("bank_mask")]
        assert len(bank) == 1 and straight[bank[0]].shape[0] == 3
    if icda:
        protos = [k for k in straight if k.endswith("prototypes.proto")]
        assert len(protos) == 1 and straight[protos[0]].abs().sum() > 0
        assert any(k.startswith("model.train_only.dar.") for k in straight)
        assert any(k.startswith("algorithm.teacher.model.train_only.dar.") for k in straight)
    if cdda:  # 7 steps x 2 crops, every gate open
        names = ("rw_open", "rl_open", "guide_steps", "crops", "steps")
        counts = {k.rsplit(".", 1)[1]: int(v) for k, v in straight.items()
                  if ".hook_modules." in k and k.rsplit(".", 1)[1] in names}
        assert counts == {"rw_open": 14, "rl_open": 14, "guide_steps": counts["guide_steps"],
                          "crops": 14, "steps": 7}
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
