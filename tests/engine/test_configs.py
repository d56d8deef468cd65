"""Every shipped config composes and instantiates (backbone shrunk to keep the test fast)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = ("cs2dz", "cs2acdc", "gta2cs", "synthia2cs")


def _paper(bench: str, *names: str) -> list[str]:
    base = ["configs/base/trainer_40k.yaml", "configs/base/model_mitb5_daformer.yaml",
            f"configs/base/data_{bench}.yaml"]
    return base + [f"configs/benchmarks/{bench}/{n}.yaml" for n in names]


def _dlv2(bench: str, *names: str) -> list[str]:
    """The same composition with the ResNet-101 + DeepLabV2 model base."""
    files = _paper(bench, *names)
    files[1] = "configs/base/model_r101_deeplabv2.yaml"
    return files


COMPOSITIONS = {
    **{f"{b}/source_only": _paper(b, "source_only") for b in BENCHMARKS},
    **{f"{b}/daformer": _paper(b, "daformer") for b in BENCHMARKS},
    **{f"{b}/hrda": _paper(b, "hrda") for b in BENCHMARKS},
    **{f"{b}/mic": _paper(b, "hrda", "mic") for b in BENCHMARKS},
    **{f"{b}/ciss": _paper(b, "hrda", "ciss") for b in ("cs2acdc", "cs2dz")},
    **{f"{b}/ciss_zero_shot": [*_paper(b, "hrda", "ciss"), "configs/benchmarks/ciss_zero_shot.yaml"]
       for b in ("cs2acdc", "cs2dz")},
    **{f"{b}/refign_daformer": _paper(b, "refign_daformer") for b in ("cs2acdc", "cs2dz")},
    **{f"{b}/refign_hrda": _paper(b, "refign_hrda") for b in ("cs2acdc", "cs2dz")},
    **{f"cs2acdc/refign_ablation_row{r}": _paper("cs2acdc", "refign_daformer",
                                                 f"refign_ablation_row{r}") for r in range(1, 7)},
    "synthnight/refign": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                          "configs/synthnight/refign.yaml"],
    "cs2dz/icda": _paper("cs2dz", "icda"),
    "synthnight/icda": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                        "configs/synthnight/icda.yaml"],
    **{f"{b}/dsrnss_hrda": _paper(b, "dsrnss_hrda") for b in ("cs2acdc", "cs2dz")},
    "cs2dz/dsrnss_daformer": _paper("cs2dz", "dsrnss_daformer"),
    "synthnight/dsrnss": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                          "configs/synthnight/dsrnss.yaml"],
    **{f"{b}/cdda_daformer": _paper(b, "daformer", "cdda_daformer") for b in ("gta2cs", "synthia2cs")},
    **{f"{b}/cdda_hrda": _paper(b, "hrda", "cdda_hrda") for b in ("gta2cs", "synthia2cs")},
    **{f"{b}/cdda_mic": _paper(b, "hrda", "mic", "cdda_mic") for b in ("gta2cs", "synthia2cs")},
    "synthnight/cdda": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                        "configs/synthnight/cdda.yaml"],
    "predict/dark_zurich_test": [*_paper("cs2dz", "daformer"), "configs/predict/dark_zurich_test.yaml"],
    "predict/acdc_test": [*_paper("cs2acdc", "daformer"), "configs/predict/acdc_test.yaml"],
    "synthnight/source_only": ["configs/synthnight/source_only.yaml"],
    "examples/folder_synthnight": ["configs/synthnight/source_only.yaml",
                                   "configs/examples/folder_synthnight.yaml"],
    "synthnight/dacs": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml"],
    "synthnight/hrda": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                        "configs/synthnight/hrda.yaml"],
    "synthnight/mic": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                       "configs/synthnight/hrda.yaml", "configs/synthnight/mic.yaml"],
    "synthnight/ciss": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                        "configs/synthnight/hrda.yaml", "configs/synthnight/ciss.yaml"],
    "gta2cs/daformer_deeplabv2": _dlv2("gta2cs", "daformer_deeplabv2"),
    **{f"{b}/refign_deeplabv2": _dlv2(b, "refign_deeplabv2") for b in ("cs2acdc", "cs2dz")},
    **{f"{b}/dsrnss_deeplabv2": _dlv2(b, "dsrnss_deeplabv2") for b in ("cs2acdc", "cs2dz")},
    "synthnight/deeplabv2": ["configs/synthnight/source_only.yaml", "configs/synthnight/dacs.yaml",
                             "configs/synthnight/deeplabv2.yaml"],
}


def test_every_config_file_is_used():
    used = {p for files in COMPOSITIONS.values() for p in files}
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped - used <= {"configs/synthnight/calibration.yaml"}


def instantiate(files, tmp_path=None):
    from lightning.pytorch.cli import LightningCLI

    from udaseg.engine.datamodule import UDADataModule
    from udaseg.engine.module import UDAModule

    args = []
    for f in files:
        path = REPO / f
        if f.startswith("configs/predict/"):
            # `return_predictions` belongs to the predict subcommand, which run=False lacks
            import yaml

            cfg = yaml.safe_load(path.read_text())
            assert cfg.pop("return_predictions") is False  # full-size predictions stay on disk
            path = tmp_path / path.name
            path.write_text(yaml.safe_dump(cfg))
        elif "aligner: uawarpc" in path.read_text():
            # the UAWarpC weight files are not here: the same config with the weight-free aligner
            text = path.read_text().replace("aligner: uawarpc", "aligner: identity")
            path = tmp_path / path.name
            path.write_text(text)
        args += ["--config", str(path)]
    # shrink the backbone, keeping its family (the DeepLabV2 configs get the tiny ResNet)
    tiny = "resnet_tiny" if any("deeplabv2" in f for f in files) else "mit_tiny"
    args += ["--model.backbone", tiny, "--model.pretrained", "null", "--model.head_channels", "32"]
    return LightningCLI(UDAModule, UDADataModule, args=args, run=False)


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_config_instantiates(name, tmp_path):
    cli = instantiate(COMPOSITIONS[name], tmp_path)
    module, dm = cli.model, cli.datamodule
    algo = module.algorithm
    hooks = {h.name for h in algo.aux_losses}
    bench, _, method = name.partition("/")
    if bench in BENCHMARKS:
        assert cli.config.trainer.max_steps == 40000
        source = dm.source_spec.name.removesuffix("_cem")  # ICDA: Cityscapes with its CEM view
        assert source == {"gta2cs": "gta", "synthia2cs": "synthia"}.get(bench, "cityscapes")
        assert module.hparams.label_set == ("synthia16" if bench == "synthia2cs" else "cityscapes19")
    if method == "source_only" and bench in BENCHMARKS:
        assert algo.cfg is None and dm.target_spec is None
    if method == "daformer" and bench in BENCHMARKS:
        assert algo.cfg.pseudo_weight_ignore_bottom == 120 and hooks == {"fd"}
        assert dm.rcs.min_crop_ratio == 0.5 and dm.source_pipeline.crop_size == (512, 512)
    if method in ("hrda", "mic", "ciss", "ciss_zero_shot") and bench in BENCHMARKS:
        assert type(module.model).__name__ == "HRDASegmentor"
        assert module.inference_cfg.mode == "slide" and dm.rcs.min_crop_ratio == 2.0
        assert algo.cfg.pseudo_weight_ignore_bottom == 0
        # PL crop v2 only when the target is Cityscapes (spec 7.7)
        want = (30, 240, 30, 30) if bench in ("gta2cs", "synthia2cs") else None
        crop = dm.target_pipeline.pseudo_label_crop
        assert (tuple(crop) if crop else None) == want
    if method == "mic" and bench in BENCHMARKS:
        assert hooks == {"fd", "mic"}
        mic = next(h for h in algo.aux_losses if h.name == "mic")
        assert mic.cfg.mode == ("separate" if bench.startswith("cs2") else "separatetrgaug")
    if method in ("ciss", "ciss_zero_shot") and bench in BENCHMARKS:
        # spec CISS 1.8/1.12: FD on both source views, invariance on LR encoder stages 1-2
        # (0.9/0.1, MSE, no stop-gradient), ACDC 50/20, Dark Zurich 100/10, FDA beta 0.01
        assert hooks == {"fd", "ciss_src", "ciss_trg"} and not algo.refiners
        fd = next(h for h in algo.aux_losses if h.name == "fd")
        assert fd.cfg.views == ("image", "stylized") and fd.cfg.weight == 0.005
        src = next(h for h in algo.aux_losses if h.name == "ciss_src")
        trg = next(h for h in algo.aux_losses if h.name == "ciss_trg")
        assert (src.weight, trg.weight) == ((50.0, 20.0) if bench == "cs2acdc" else (100.0, 10.0))
        for h in (src, trg):
            inv = h.invariance
            assert (inv.levels, inv.level_weights) == ((1, 2), (0.9, 0.1))
            assert inv.norm == "l2" and inv.stop_grad == "none" and not inv.class_average
        assert src.cfg.upstream_name() == (
            "src_ceorig_inv_trg_ceorigorig_invorigorigstylizedstylized")
        assert src.loop_ce.detail_weight == 0.1
        sty = dm.stylize
        assert (sty.method, sty.beta, tuple(sty.common_size)) == ("fda", 0.01, (1024, 1920))
    if method.startswith("refign") and bench in BENCHMARKS:
        # refign spec 1.3 / 2.7: teacher stochastic, AdamW 6e-4 with backbone x0.1 and no decay on
        # 1-D parameters, FD, references loaded with the target, UAWarpC (replaced above)
        assert [type(r).__name__ for r in algo.refiners] == ["RefignRefiner"]
        refign = algo.refiners[0].cfg
        assert refign.gamma == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}.get(
            int(method[-1]) if "row" in method else 0, 0.25)
        assert algo.cfg.teacher_stochastic and algo.cfg.pseudo_weight_ignore_bottom == 0
        assert module.optim_cfg.no_decay == "1d" and module.optim_cfg.lr == 6e-5
        assert module.optim_cfg.head_lr_mult == 10.0 and hooks == {"fd"}
        assert dm.target_spec.views == ["ref"]
        assert bool(algo.target_transforms) == refign.adapt_to_ref
        if method == "refign_hrda":
            assert type(module.model).__name__ == "HRDASegmentor"
            assert module.model.cfg.attention_head == "segformer"  # HRDA*: SegFormer attention
            assert tuple(module.inference_cfg.crop) == (1080, 1080)
            assert tuple(module.inference_cfg.stride) == (420, 420)
            assert dm.rcs.min_crop_ratio == 2.0
        if method == "refign_ablation_row1":
            assert not refign.use_align and refign.disable_M and not refign.adapt_to_ref
    if name == "synthnight/refign":
        assert algo.refiners[0].cfg.aligner == "similarity" and dm.target_spec.views == ["ref"]
    if method.startswith("dsrnss") and bench in BENCHMARKS:
        # refign spec 3.1 / 3.4: Refign + relation-aware ClassMix + long-tail bank + FPA; FPA from
        # epoch 8 (9664 steps on Dark Zurich, 1600 on ACDC-night); 0.8 on L_mix under HRDA only;
        # adapt_to_ref off on Dark Zurich, on for ACDC-night
        dz = bench == "cs2dz"
        assert [type(r).__name__ for r in algo.refiners] == ["RefignRefiner"]
        assert type(algo.mixer).__name__ == "RelationAwareClassMix"
        assert algo.mixer.closures == ((((6, 7), (5,)), ((5,), (6, 7)), ((12,), (17, 18))))
        assert [type(t).__name__ for t in algo.mixed_transforms] == ["LongTailBank"]
        bank = algo.mixed_transforms[0]
        assert bank.tail_classes == (12, 14, 15, 17, 18) and (bank.length, bank.period) == (3, 5)
        assert bank.epoch_length == (1208 if dz else 200)
        assert hooks == {"fd", "fpa"}
        fpa = next(h for h in algo.aux_losses if h.name == "fpa")
        assert fpa.cfg.fpa_start_step == (9664 if dz else 1600) and fpa.retain_source_graph
        assert fpa.cfg.fpa_class_weights is None and fpa.cfg.fpa_align_factor is None
        # the Dark Zurich DeepLabV2 config is the exception that keeps adapt_to_ref (spec 3.4)
        to_ref = not dz or method == "dsrnss_deeplabv2"
        assert algo.refiners[0].cfg.adapt_to_ref == to_ref
        assert bool(algo.target_transforms) == to_ref
        hrda = method == "dsrnss_hrda"
        assert algo.cfg.target_loss_weight == (0.8 if hrda else 1.0)
        assert (type(module.model).__name__ == "HRDASegmentor") == hrda
        assert algo.cfg.teacher_stochastic and dm.target_spec.views == ["ref"]
        assert module.optim_cfg.no_decay == "1d" and module.optim_cfg.head_lr_mult == 10.0
        night = dm.val_specs["acdc_night_val"]
        assert (night.name, night.split, night.options) == ("acdc", "val", {"conditions": ["night"]})
        if dz:
            splits = {n: (v.name, v.split) for n, v in dm.val_specs.items()}
            assert splits == {"dz_val": ("dark_zurich", "val"),
                              "nighttime_driving": ("nighttime_driving", "test"),
                              "acdc_night_val": ("acdc", "val"),
                              "bdd100k_night": ("bdd100k_night", "test")}
        else:
            assert dm.target_spec.options == {"conditions": ["night"]}
    if name == "synthnight/dsrnss":
        assert algo.refiners[0].cfg.aligner == "similarity" and dm.target_spec.views == ["ref"]
        assert type(algo.mixer).__name__ == "RelationAwareClassMix" and hooks == {"fpa"}
        assert len(algo.mixed_transforms) == 1 and algo.cfg.target_loss_weight == 1.0
        assert algo.aux_losses[0].cfg.fpa_start_step == 145
    if method.startswith("cdda") and bench in BENCHMARKS:
        # cdda spec 6 / 10: thresholds per benchmark and method, seeds 0 / 1 / 2, depth views,
        # FD (and MIC) kept, the refiner + source-replacing mixer + guidance loss
        base = method.removeprefix("cdda_")
        gta = bench == "gta2cs"
        core = algo.refiners[0]
        assert [type(r).__name__ for r in algo.refiners] == ["CDDARefiner"]
        assert type(algo.mixer).__name__ == "CDDASourceReplacement" and algo.mixer.core is core
        assert hooks == ({"fd", "mic", "cdda_guide"} if base == "mic" else {"fd", "cdda_guide"})
        want = {("gta2cs", "daformer"): (0.56, 0.54, 0.0025), ("synthia2cs", "daformer"): (0.49, 0.47, 0.001)}
        cfg = core.cfg
        assert (cfg.tau_rw, cfg.tau_rl, cfg.delta) == want.get(
            (bench, base), (0.56, 0.54, 0.003) if gta else (0.49, 0.47, 0.002))
        assert (cfg.schedule_start, cfg.schedule_every, cfg.schedule_count) == (10000, 1000, 30)
        assert cfg.reweight_mask == "class" and cfg.guidance_gate == "any"
        assert cfg.negative_mass == "clamp" and cfg.guidance_hard_term
        assert cfg.bank == f"data/cdda_banks/{'gta' if gta else 'synthia'}_{base}"
        seed = {"daformer": 0, "hrda": 1, "mic": 2}[base]
        assert cli.config.seed_everything == seed and dm.seed == seed
        assert dm.target_spec.views == ["depth"] and dm.source_spec.views == ["depth"]
        assert (type(module.model).__name__ == "HRDASegmentor") == (base != "daformer")
        assert algo.cfg.pseudo_weight_ignore_bottom == (120 if base == "daformer" else 0)
    if name == "synthnight/cdda":
        cfg = algo.refiners[0].cfg
        assert (cfg.schedule_start, cfg.schedule_every, cfg.schedule_count) == (150, 15, 30)
        assert hooks == {"cdda_guide"} and dm.target_spec.views == ["depth"]
        assert cfg.bank == "data/synthnight/cdda_bank"
    if method == "ciss_zero_shot":
        # the zero-shot splits replace the training config's validation splits
        splits = {name: (spec.name, spec.split) for name, spec in dm.val_specs.items()}
        assert splits == {"bdd100k_night": ("bdd100k_night", "test"),
                          "nighttime_driving": ("nighttime_driving", "test")}
    if name == "synthnight/ciss":
        assert hooks == {"ciss_src", "ciss_trg"} and type(module.model).__name__ == "HRDASegmentor"
        assert dm.stylize.method == "fda" and dm.stylize.common_size is None
        src = next(h for h in algo.aux_losses if h.name == "ciss_src")
        assert src.invariance.levels == (1, 2) and src.weight == 50.0
    if bench == "predict":
        fmt = method.removesuffix("_test")
        assert dm.predict_spec.split == "test" and dm.predict_spec.labels is False
        writers = [c for c in cli.trainer.callbacks if type(c).__name__ == "SubmissionWriter"]
        assert len(writers) == 1 and writers[0].fmt == fmt
    if name == "synthnight/mic":
        assert hooks == {"mic"} and type(module.model).__name__ == "HRDASegmentor"
    if "deeplabv2" in method:
        # ResNet-101 v1c + DeepLabV2 (refign spec 1.3): the shipped backbone name is shrunk above,
        # so check what the files ask for; DAFormer's rows use the 6/12 head and mmseg's
        # contracted dilation, Refign/DSRNSS the full ASPP and no contraction
        import yaml

        cfgs = [yaml.safe_load((REPO / f).read_text()) or {} for f in COMPOSITIONS[name]]
        model_cfg: dict = {}
        for c in cfgs:
            model_cfg.update(c.get("model") or {})
        head = type(module.model.decode_head).__name__
        assert head == "DeepLabV2Head" and type(module.model.backbone).__name__ == "ResNet"
        if bench in BENCHMARKS:
            daformer = method == "daformer_deeplabv2"
            want = "resnet101_v1c" if daformer else "resnet101_v1c_refign"
            assert model_cfg["backbone"] == want
            assert model_cfg["pretrained"] == "pretrained/resnet101_v1c-e67eebb6.pth"
            assert module.model.decode_head.dilations == ((6, 12) if daformer else (6, 12, 18, 24))
            assert module.optim_cfg.lr == 6e-5 and module.optim_cfg.head_lr_mult == 10.0
            if daformer:
                assert hooks == {"fd"} and algo.cfg.pseudo_weight_ignore_bottom == 120
                assert dm.rcs.min_crop_ratio == 0.5 and module.optim_cfg.no_decay == "norm"
        else:
            assert model_cfg["backbone"] == "resnet_tiny" and not hooks
    if name == "synthnight/dacs":
        assert algo.cfg.alpha == 0.999 and dm.target_spec.labels is False
