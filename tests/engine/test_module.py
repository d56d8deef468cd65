"""The Lightning module and data module train and evaluate end to end on tiny real-layout data."""

import math

import lightning as L
import pytest
import torch

from udaseg.data.transforms import PipelineConfig
from udaseg.engine.datamodule import DatasetSpec, UDADataModule
from udaseg.engine.module import InferenceConfig, UDAModule
from udaseg.engine.optim import OptimConfig


def make_dm(cs_root, dz_root):
    pipe = PipelineConfig(scale=(64, 32), crop_size=(32, 32))
    return UDADataModule(
        source=DatasetSpec("cityscapes", str(cs_root), "train"),
        val={
            "day_val": DatasetSpec("cityscapes", str(cs_root), "val"),
            "night_val": DatasetSpec("dark_zurich", str(dz_root), "val"),
        },
        source_pipeline=pipe,
        target_pipeline=pipe,
        batch_size=2,
        val_batch_size=2,
        num_workers=0,
    )


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_fit_then_validate(tiny_cityscapes, tiny_dark_zurich, tmp_path, mode):
    L.seed_everything(0)
    dm = make_dm(tiny_cityscapes, tiny_dark_zurich)
    module = UDAModule(
        backbone="mit_tiny", head="segformer", head_channels=16, drop_path_rate=0.0,
        optim=OptimConfig(lr=1e-3, warmup_iters=0),
        inference=InferenceConfig(mode=mode, crop=(32, 32), stride=(16, 16)),
    )
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("block1" in k for k in changed) and any("linear_pred" in k for k in changed)
    # the poly schedule was stepped once per iteration: lr factor (1 - 3/3) = 0 at the end
    assert all(g["lr"] == 0.0 for g in trainer.optimizers[0].param_groups)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert set(module.val_results) == {"day_val", "night_val"}
    for name, res in module.val_results.items():
        # labels are scored at full resolution: every labelled pixel of the split is counted once
        ds = dm.val_sets[name]
        labelled = sum((ds[i]["label"] != 255).sum().item() for i in range(len(ds)))
        assert res.confmat.sum() == labelled
        assert 0.0 <= res.miou("cityscapes19") <= 1.0 and not math.isnan(res.miou("cityscapes19"))


def test_unknown_label_set_fails_early():
    with pytest.raises(ValueError, match="known label sets"):
        UDAModule(backbone="mit_tiny", head="segformer", label_set="cityscape19")


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="mit_b0"):
        UDAModule(backbone="mit_b9")


def test_init_weights_from_checkpoint_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    from udaseg.engine.module import UDAModule

    kw = dict(backbone="mit_tiny", head="segformer", head_channels=16)
    a = UDAModule(**kw)
    ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in a.model.state_dict().items()}}, ckpt)
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, tmp_path / "a.safetensors")
    for path in (ckpt, tmp_path / "a.safetensors"):
        b = UDAModule(**kw, init_weights=str(path))
        for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="does not fit this model"):
        UDAModule(backbone="mit_tiny", head="segformer", head_channels=32, init_weights=str(ckpt))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        UDAModule(**kw, init_weights=str(tmp_path / "missing.ckpt"))
