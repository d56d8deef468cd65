"""Every shipped config composes and instantiates (backbone shrunk to keep the test fast)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = ["configs/base/trainer_40k.yaml", "configs/base/model_mitb5_daformer.yaml", "configs/base/data_cs2dz.yaml"]
COMPOSITIONS = {
    "cs2dz/source_only": [*BASE, "configs/benchmarks/cs2dz/source_only.yaml"],
    "cs2dz/daformer": [*BASE, "configs/benchmarks/cs2dz/daformer.yaml"],
    "cs2dz/hrda": [*BASE, "configs/benchmarks/cs2dz/hrda.yaml"],
    "cs2dz/mic": [*BASE, "configs/benchmarks/cs2dz/hrda.yaml", "configs/benchmarks/cs2dz/mic.yaml"],
    "synthnight/source_only": ["configs/synthnight/source_only.yaml"],
    "synthnight/dacs": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml"],
    "synthnight/hrda": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                        "configs/synthnight/hrda.yaml"],
    "synthnight/mic": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                       "configs/synthnight/hrda.yaml", "configs/synthnight/mic.yaml"],
}


def test_every_config_file_is_used():
    used = {p for files in COMPOSITIONS.values() for p in files}
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped - used <= {"configs/synthnight/calibration.yaml"}


def instantiate(files):
    from lightning.pytorch.cli import LightningCLI

    from udaseg.engine.datamodule import UDADataModule
    from udaseg.engine.module import UDAModule

    args = []
    for f in files:
        args += ["--config", str(REPO / f)]
    args += ["--model.backbone", "mit_tiny", "--model.pretrained", "null", "--model.head_channels", "32"]
    return LightningCLI(UDAModule, UDADataModule, args=args, run=False)


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_config_instantiates(name):
    cli = instantiate(COMPOSITIONS[name])
    module, dm = cli.model, cli.datamodule
    algo = module.algorithm
    hooks = {h.name for h in algo.aux_losses}
    if name == "cs2dz/source_only":
        assert algo.cfg is None and dm.target_spec is None
    if name == "cs2dz/daformer":
        assert algo.cfg.pseudo_weight_ignore_bottom == 120 and hooks == {"fd"}
        assert dm.rcs.min_crop_ratio == 0.5
    if name in ("cs2dz/hrda", "cs2dz/mic"):
        assert type(module.model).__name__ == "HRDASegmentor"
        assert module.inference_cfg.mode == "slide" and dm.rcs.min_crop_ratio == 2.0
    if name == "cs2dz/mic":
        assert hooks == {"fd", "mic"}
    if name.startswith("cs2dz"):
        assert cli.config.trainer.max_steps == 40000
    if name == "synthnight/mic":
        assert hooks == {"mic"} and type(module.model).__name__ == "HRDASegmentor"
    if name == "synthnight/dacs":
        assert algo.cfg.alpha == 0.999 and dm.target_spec.labels is False
