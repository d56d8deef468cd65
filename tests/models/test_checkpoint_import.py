"""Importing the seed repositories' checkpoints (udaseg.models.checkpoint_import).

The source state dicts are built from the key layouts of the specs (MiT: daformer_hrda_mic 1.7,
DAFormer head 2.2, SegFormer heads 2.3, HRDA 7.2, Refign Lightning module refign 1.3, CMDA 2.7),
not from our modules, with scaled-down widths (``mit_tiny`` sizes, 16-channel heads) except where a
test needs the real MiT-B0 shapes. Every tensor holds distinct random values, so the round-trip
checks prove that each tensor lands in the right place.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import pytest
import torch

from udaseg.errors import CheckpointError
from udaseg.models.checkpoint_import import (
    CONVERTED_FORMAT,
    UnsupportedCheckpointError,
    convert_checkpoint,
    convert_main,
    import_checkpoint,
    load_converted,
    read_checkpoint,
)
from udaseg.models.hrda import HRDASegmentor
from udaseg.models.mit import MIT_VARIANTS
from udaseg.models.segformer_head import SegFormerHead
from udaseg.models.segmentor import EncoderDecoder, build_segmentor

E = 16  # head width of the scaled-down heads
K = 19
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------ spec-derived key layouts
def mit_shapes(variant: str, classifier: bool = False) -> dict[str, tuple[int, ...]]:
    """Spec 1.7 names and shapes."""
    cfg = MIT_VARIANTS[variant]
    out: dict[str, tuple[int, ...]] = {}
    prev = 3
    for i, (c, depth, r) in enumerate(zip(cfg.embed_dims, cfg.depths, cfg.sr_ratios), start=1):
        k = 7 if i == 1 else 3
        out[f"patch_embed{i}.proj.weight"] = (c, prev, k, k)
        out[f"patch_embed{i}.proj.bias"] = (c,)
        out[f"patch_embed{i}.norm.weight"] = (c,)
        out[f"patch_embed{i}.norm.bias"] = (c,)
        for j in range(depth):
            b = f"block{i}.{j}"
            layers = [
                ("norm1", (c,), (c,)),
                ("attn.q", (c, c), (c,)),
                ("attn.kv", (2 * c, c), (2 * c,)),
                ("attn.proj", (c, c), (c,)),
            ]
            if r > 1:
                layers += [("attn.sr", (c, c, r, r), (c,)), ("attn.norm", (c,), (c,))]
            layers += [
                ("norm2", (c,), (c,)),
                ("mlp.fc1", (4 * c, c), (4 * c,)),
                ("mlp.dwconv.dwconv", (4 * c, 1, 3, 3), (4 * c,)),
                ("mlp.fc2", (c, 4 * c), (c,)),
            ]
            for name, ws, bs in layers:
                out[f"{b}.{name}.weight"] = ws
                out[f"{b}.{name}.bias"] = bs
        out[f"norm{i}.weight"] = (c,)
        out[f"norm{i}.bias"] = (c,)
        prev = c
    if classifier:
        out["head.weight"] = (1000, cfg.embed_dims[-1])
        out["head.bias"] = (1000,)
    return out


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{p}": (() if p == "num_batches_tracked" else (c,)) for p in BN}


def daformer_head_shapes(in_ch, e=E, k=K, conv1=False) -> dict[str, tuple[int, ...]]:
    """Spec 2.2 (sepaspp) or the conv1 fusion of the HRDA scale attention (spec 7.2)."""
    out: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(in_ch):
        out[f"embed_layers.{i}.proj.weight"] = (e, c)
        out[f"embed_layers.{i}.proj.bias"] = (e,)
    cat = len(in_ch) * e
    if conv1:
        out["fuse_layer.conv.weight"] = (e, cat, 1, 1)
        out.update(bn("fuse_layer.bn", e))
    else:
        out["fuse_layer.aspp_modules.0.conv.weight"] = (e, cat, 1, 1)
        out.update(bn("fuse_layer.aspp_modules.0.bn", e))
        for j in (1, 2, 3):
            p = f"fuse_layer.aspp_modules.{j}"
            out[f"{p}.depthwise_conv.conv.weight"] = (cat, 1, 3, 3)
            out.update(bn(f"{p}.depthwise_conv.bn", cat))
            out[f"{p}.pointwise_conv.conv.weight"] = (e, cat, 1, 1)
            out.update(bn(f"{p}.pointwise_conv.bn", e))
        out["fuse_layer.bottleneck.conv.weight"] = (e, 4 * e, 3, 3)
        out.update(bn("fuse_layer.bottleneck.bn", e))
    out["conv_seg.weight"] = (k, e, 1, 1)
    out["conv_seg.bias"] = (k,)
    return out


def segformer_head_shapes(in_ch, e=E, k=K, nvlabs=False) -> dict[str, tuple[int, ...]]:
    """Spec 2.3: DAFormer-repo ``linear_c.{0..3}`` or NVlabs ``linear_c{1..4}`` (+ unused conv_seg)."""
    out: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(in_ch):
        name = f"linear_c{i + 1}" if nvlabs else f"linear_c.{i}"
        out[f"{name}.proj.weight"] = (e, c)
        out[f"{name}.proj.bias"] = (e,)
    out["linear_fuse.conv.weight"] = (e, len(in_ch) * e, 1, 1)
    out.update(bn("linear_fuse.bn", e))
    out["linear_pred.weight"] = (k, e, 1, 1)
    out["linear_pred.bias"] = (k,)
    out["conv_seg.weight"] = (k, e, 1, 1)
    out["conv_seg.bias"] = (k,)
    return out


def segmentor_shapes(variant="mit_tiny", head="daformer", hrda=False, att_k=K):
    in_ch = MIT_VARIANTS[variant].embed_dims
    out = {f"backbone.{k}": s for k, s in mit_shapes(variant).items()}
    main = daformer_head_shapes(in_ch) if head == "daformer" else segformer_head_shapes(in_ch)
    if hrda:
        out.update({f"decode_head.head.{k}": s for k, s in main.items()})
        att = daformer_head_shapes(in_ch, k=att_k, conv1=True)
        out.update({f"decode_head.scale_attention.{k}": s for k, s in att.items()})
    else:
        out.update({f"decode_head.{k}": s for k, s in main.items()})
    return out


_SEED = [0]


def materialize(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Distinct random values per tensor (and per call)."""
    _SEED[0] += 1
    g = torch.Generator().manual_seed(_SEED[0])
    out = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 10**6, (), generator=g, dtype=torch.int64)
        elif k.endswith("running_var"):
            out[k] = torch.rand(s, generator=g) + 0.5
        else:
            out[k] = torch.randn(s, generator=g)
    return out


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def mmseg_uda(variant="mit_tiny", head="daformer", hrda=False, att_k=K):
    """A DACS checkpoint as mmcv saves it: meta + state_dict (model/ema_model/imnet_model) + optimizer."""
    shapes = segmentor_shapes(variant, head, hrda, att_k)
    student, teacher, imnet = materialize(shapes), materialize(shapes), materialize(shapes)
    sd = {
        **prefixed("model.", student),
        **prefixed("ema_model.", teacher),
        **prefixed("imnet_model.", imnet),
    }
    meta = {
        "CLASSES": ("road", "sidewalk"),
        "PALETTE": [[128, 64, 128]],
        "iter": 40000,
        "mmseg_version": "0.16.0",
        "config": "norm_cfg = dict(type='BN')",
    }
    ckpt = {"meta": meta, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    return ckpt, student, teacher


def assert_round_trip(model, source: dict[str, torch.Tensor], mapping) -> None:
    """Every source tensor equals the model tensor it was mapped to; every model tensor is hit."""
    own = model.state_dict()
    hit = set()
    for src_key, tensor in source.items():
        target = mapping(src_key)
        if target is None:
            continue
        assert target in own, f"{src_key} -> {target} not in the model"
        assert torch.equal(own[target], tensor.to(own[target].dtype)), f"{src_key} -> {target}"
        hit.add(target)
    assert hit == set(own), sorted(set(own) - hit)[:5]


# ------------------------------------------------------------------------------------ tests
def test_daformer_uda_student_round_trip(tmp_path: Path):
    ckpt, student, _ = mmseg_uda()
    src, dst = tmp_path / "iter_40000.pth", tmp_path / "daformer.safetensors"
    torch.save(ckpt, src)
    report = convert_checkpoint(src, dst)
    assert report.format == "mmseg-uda" and report.which == "student"
    assert report.target == "EncoderDecoder"
    assert report.config == {
        "backbone": "mit_tiny",
        "hrda": False,
        "head": "daformer",
        "head_channels": E,
        "num_classes": K,
    }
    assert report.unexpected == []
    assert set(report.dropped) == {"ema_model.*", "imnet_model.*"}
    assert len(report.dropped["imnet_model.*"].keys) == len(student)
    assert "FD" in report.dropped["imnet_model.*"].reason
    assert len(report.mapping) == len(student)
    assert any("68.85" in r for r in report.expected_results)
    text = report.format_text()
    assert "imnet_model.*" in text and "68.85" in text

    raw = read_checkpoint(dst)
    assert raw.metadata["udaseg_format"] == CONVERTED_FORMAT
    assert raw.metadata["backbone"] == "mit_tiny" and raw.metadata["hrda"] == "0"
    assert raw.metadata["source_format"] == "mmseg-uda"
    assert raw.metadata["source_model"] == "student"

    model = load_converted(None, dst)
    assert isinstance(model, EncoderDecoder)
    assert_round_trip(model, student, lambda k: k)
    # the same file loads into a model built the usual way
    target = build_segmentor("mit_tiny", "daformer", head_channels=E)
    load_converted(target, dst)
    assert_round_trip(target, student, lambda k: k)


def test_teacher_selection(tmp_path: Path):
    ckpt, student, teacher = mmseg_uda()
    src = tmp_path / "latest.pth"
    torch.save(ckpt, src)
    imported = import_checkpoint(src, which="teacher")
    assert imported.report.which == "teacher"
    assert "ema_model.backbone.norm4.bias" == imported.report.mapping["backbone.norm4.bias"]
    assert "model.*" in imported.report.dropped
    model = imported.build_model()
    assert_round_trip(model, teacher, lambda k: k)
    assert not torch.equal(
        model.state_dict()["decode_head.conv_seg.weight"], student["decode_head.conv_seg.weight"]
    )
    with pytest.raises(CheckpointError, match="which"):
        import_checkpoint(src, which="ema")  # type: ignore[arg-type]


def test_hrda_scale_attention_mapping(tmp_path: Path):
    ckpt, student, _ = mmseg_uda(hrda=True)
    # mmseg's BaseDecodeHead gives the HRDA wrapper an unused classifier
    wrapper = materialize(
        {"decode_head.conv_seg.weight": (K, E, 1, 1), "decode_head.conv_seg.bias": (K,)}
    )
    ckpt["state_dict"].update(prefixed("model.", wrapper))
    src, dst = tmp_path / "hrda.pth", tmp_path / "hrda.safetensors"
    torch.save(ckpt, src)
    report = convert_checkpoint(src, dst)
    assert report.target == "HRDASegmentor"
    assert report.config["hrda"] is True and report.config["hrda_attention_classwise"] is True
    assert report.mapping["scale_attention_head.fuse_layer.conv.weight"] == (
        "model.decode_head.scale_attention.fuse_layer.conv.weight"
    )
    assert report.mapping["model.decode_head.fuse_layer.bottleneck.conv.weight"] == (
        "model.decode_head.head.fuse_layer.bottleneck.conv.weight"
    )
    assert report.mapping["model.backbone.block1.0.attn.kv.weight"] == (
        "model.backbone.block1.0.attn.kv.weight"
    )
    assert report.dropped["decode_head.conv_seg.* (HRDA wrapper)"].keys == sorted(
        prefixed("model.", wrapper)
    )
    assert report.unexpected == []
    assert any("73.79" in r for r in report.expected_results)
    assert any("68.67" in r for r in report.expected_results)  # CISS ACDC val

    def to_ours(k: str) -> str | None:
        if k.startswith("backbone."):
            return "model." + k
        if k.startswith("decode_head.head."):
            return "model.decode_head." + k[len("decode_head.head.") :]
        if k.startswith("decode_head.scale_attention."):
            return "scale_attention_head." + k[len("decode_head.scale_attention.") :]
        raise AssertionError(k)

    model = load_converted(None, dst)
    assert isinstance(model, HRDASegmentor)
    assert_round_trip(model, student, to_ours)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, K, 16, 16)

    # an HRDA file does not silently load into a single-scale model
    with pytest.raises(CheckpointError, match="HRDA"):
        load_converted(build_segmentor("mit_tiny", "daformer", head_channels=E), dst)


def test_hrda_single_channel_attention(tmp_path: Path):
    ckpt, student, _ = mmseg_uda(hrda=True, att_k=1)
    src, dst = tmp_path / "singleatt.pth", tmp_path / "singleatt.safetensors"
    torch.save(ckpt, src)
    report = convert_checkpoint(src, dst)
    assert report.config["hrda_attention_classwise"] is False
    model = load_converted(None, dst)
    assert model.scale_attention_head.conv_seg.weight.shape[0] == 1
    assert torch.equal(
        model.scale_attention_head.conv_seg.weight,
        student["decode_head.scale_attention.conv_seg.weight"],
    )


def test_daformer_repo_segformer_head(tmp_path: Path):
    """A bare mmseg segmentor dict with the DAFormer-repo SegFormer head (``linear_c.N``)."""
    sd = materialize(segmentor_shapes(head="segformer"))
    src = tmp_path / "segformer.pth"
    torch.save({"state_dict": sd, "meta": {}}, src)
    imported = import_checkpoint(src)
    report = imported.report
    assert report.format == "mmseg-segmentor"
    assert report.config["head"] == "segformer"
    assert report.dropped["decode_head.conv_seg.*"].keys == [
        "decode_head.conv_seg.bias",
        "decode_head.conv_seg.weight",
    ]
    model = imported.build_model()
    assert_round_trip(model, sd, lambda k: None if k.startswith("decode_head.conv_seg") else k)
    with pytest.raises(CheckpointError, match="teacher"):
        import_checkpoint(src, which="teacher")


def test_nvlabs_segformer_head_is_reordered(tmp_path: Path):
    """NVlabs ``linear_c{1..4}`` + [c4..c1] concat -> our ``linear_c.{0..3}`` + [c1..c4]."""
    in_ch = MIT_VARIANTS["mit_tiny"].embed_dims
    head_sd = materialize(segformer_head_shapes(in_ch, nvlabs=True))
    sd = {
        **prefixed("backbone.", materialize(mit_shapes("mit_tiny", classifier=True))),
        **prefixed("decode_head.", head_sd),
    }
    src = tmp_path / "segformer.b0.city.pth"
    torch.save({"state_dict": sd}, src)
    imported = import_checkpoint(src)
    assert "backbone.head.*" in imported.report.dropped  # ImageNet classifier: info only
    assert imported.report.unexpected == []
    model = imported.build_model().eval().double()

    # reference: our head in NVlabs concat order, loaded with the renamed but unpermuted weights
    ref = SegFormerHead(in_ch, num_classes=K, embed_dim=E, concat_order="nvlabs").eval()
    ref_sd = {}
    for k, v in head_sd.items():
        if k.startswith("conv_seg."):
            continue
        if k.startswith("linear_c"):
            i = int(k[len("linear_c")])
            k = f"linear_c.{i - 1}" + k[len("linear_cN") :]
        ref_sd[k] = v
    ref.load_state_dict(ref_sd, strict=True)
    ref.double()
    for i in range(4):
        assert torch.equal(
            model.decode_head.linear_c[i].proj.weight.float(),
            head_sd[f"linear_c{i + 1}.proj.weight"],
        )
    feats = [torch.randn(1, c, 8 >> i, 8 >> i, dtype=torch.float64) for i, c in enumerate(in_ch)]
    with torch.no_grad():
        torch.testing.assert_close(model.decode_head(feats), ref(feats))


def refign_checkpoint(with_teacher=True, extra=None):
    """Lightning checkpoint of DomainAdaptationSegmentationModel (refign spec 1.3)."""
    in_ch = MIT_VARIANTS["mit_tiny"].embed_dims
    student_bb, student_head = (
        materialize(mit_shapes("mit_tiny")),
        materialize(daformer_head_shapes(in_ch)),
    )
    sd = {**prefixed("backbone.", student_bb), **prefixed("head.", student_head)}
    teacher_bb = materialize(mit_shapes("mit_tiny"))
    teacher_head = materialize(daformer_head_shapes(in_ch))
    if with_teacher:
        sd.update(prefixed("m_backbone.", teacher_bb))
        sd.update(prefixed("m_head.", teacher_head))
    sd.update(prefixed("imnet_backbone.", materialize(mit_shapes("mit_tiny"))))
    sd.update(
        materialize(
            {
                "alignment_head.decoder4.conv_0.conv.weight": (128, 256, 3, 3),
                "alignment_backbone.features.0.weight": (64, 3, 3, 3),
            }
        )
    )
    sd.update(extra or {})
    ckpt = {
        "epoch": 3,
        "global_step": 40000,
        "pytorch-lightning_version": "1.5.10",
        "state_dict": sd,
        "hyper_parameters": {"use_refign": True},
        "optimizer_states": [],
    }
    student = {**prefixed("backbone.", student_bb), **prefixed("decode_head.", student_head)}
    teacher = {**prefixed("backbone.", teacher_bb), **prefixed("decode_head.", teacher_head)}
    return ckpt, student, teacher


def test_refign_lightning_student_and_teacher(tmp_path: Path):
    dat = materialize({"dat.stages.0.proj.weight": (8, 8), "m_dat.stages.0.proj.weight": (8, 8)})
    ckpt, student, teacher = refign_checkpoint(extra=dat)
    src = tmp_path / "icda_daformer.ckpt"
    torch.save(ckpt, src)

    imported = import_checkpoint(src)
    report = imported.report
    assert report.format == "lightning-refign"
    assert report.mapping["decode_head.conv_seg.weight"] == "head.conv_seg.weight"
    assert set(report.dropped) == {
        "m_backbone.*, m_head.*",
        "imnet_backbone.*",
        "alignment_backbone.*, alignment_head.*",
    }
    # ICDA's DAR module is not documented: reported by name, not silently dropped
    assert report.unexpected == ["dat.stages.0.proj.weight", "m_dat.stages.0.proj.weight"]
    assert any("DAR" in n for n in report.notes)
    assert any("58.2" in r for r in report.expected_results)
    assert_round_trip(imported.build_model(), student, lambda k: k)

    teacher_import = import_checkpoint(src, which="teacher")
    assert teacher_import.report.mapping["backbone.norm1.weight"] == "m_backbone.norm1.weight"
    assert_round_trip(teacher_import.build_model(), teacher, lambda k: k)

    with pytest.raises(CheckpointError, match="dat.stages.0.proj.weight"):
        import_checkpoint(src, strict=True)


def test_refign_without_teacher(tmp_path: Path):
    ckpt, _, _ = refign_checkpoint(with_teacher=False)
    src = tmp_path / "refign.ckpt"
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError, match="no m_backbone"):
        import_checkpoint(src, which="teacher")


def test_cmda_and_uawarpc_are_detected_but_not_supported(tmp_path: Path, capsys):
    bb = mit_shapes("mit_tiny")
    sd = {
        **prefixed("model.backbone_image.", materialize(bb)),
        **prefixed("model.backbone_events.", materialize(bb)),
        **prefixed("ema_model.backbone_image.", materialize(bb)),
    }
    src = tmp_path / "cmda.pth"
    torch.save({"state_dict": sd, "meta": {}}, src)
    with pytest.raises(UnsupportedCheckpointError, match="needs the CMDA fusion model"):
        import_checkpoint(src)
    assert convert_main([str(src), str(tmp_path / "cmda.safetensors")]) == 1
    assert "needs the CMDA fusion model" in capsys.readouterr().err
    assert not (tmp_path / "cmda.safetensors").exists()

    align = tmp_path / "uawarpc_megadepth.ckpt"
    torch.save(
        {
            "state_dict": materialize({"alignment_head.decoder4.conv_0.conv.weight": (4, 4, 3, 3)}),
            "pytorch-lightning_version": "1.5.10",
        },
        align,
    )
    with pytest.raises(UnsupportedCheckpointError, match="UAWarpC"):
        import_checkpoint(align)


def test_missing_key_is_named(tmp_path: Path):
    ckpt, _, _ = mmseg_uda()
    del ckpt["state_dict"]["model.decode_head.fuse_layer.bottleneck.bn.running_var"]
    src = tmp_path / "broken.pth"
    torch.save(ckpt, src)
    with pytest.raises(
        CheckpointError,
        match=r"broken\.pth.*not in the checkpoint: "
        r"decode_head\.fuse_layer\.bottleneck\.bn\.running_var",
    ):
        import_checkpoint(src)


def test_leftover_keys_are_reported_by_name(tmp_path: Path):
    ckpt, student, _ = mmseg_uda()
    extra = materialize(
        {
            "model.auxiliary_head.conv_seg.weight": (K, 8, 1, 1),
            "mic.teacher.weight": (3,),
            "model.decode_head.extra_proj.weight": (2, 2),
        }
    )
    ckpt["state_dict"].update(extra)
    src, dst = tmp_path / "mic.pth", tmp_path / "mic.safetensors"
    torch.save(ckpt, src)
    report = convert_checkpoint(src, dst)
    assert report.unexpected == sorted(extra)
    text = report.format_text()
    for k in extra:
        assert k in text
    assert_round_trip(load_converted(None, dst), student, lambda k: k)
    with pytest.raises(CheckpointError, match="strict.*mic.teacher.weight"):
        import_checkpoint(src, strict=True)


def test_wrong_variant_fails_naming_key_and_shapes(tmp_path: Path):
    """Real MiT-B0 shapes (16-channel head); expecting MiT-B1 must fail with names and shapes."""
    ckpt, _, _ = mmseg_uda(variant="mit_b0")
    src, dst = tmp_path / "b0.pth", tmp_path / "b0.safetensors"
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError) as info:
        import_checkpoint(src, backbone="mit_b1")
    msg = str(info.value)
    assert "'model.backbone.patch_embed1.proj.weight' -> 'backbone.patch_embed1.proj.weight'" in msg
    assert "checkpoint (32, 3, 7, 7) vs model (64, 3, 7, 7)" in msg
    assert "looks like mit_b0" in msg

    report = convert_checkpoint(src, dst, backbone="mit_b0")
    assert report.config["backbone"] == "mit_b0"
    with pytest.raises(CheckpointError) as info:
        load_converted(build_segmentor("mit_tiny", "daformer", head_channels=E), dst)
    msg = str(info.value)
    assert (
        "'backbone.patch_embed1.proj.weight'" in msg
        and "(32, 3, 7, 7) vs model (16, 3, 7, 7)" in msg
    )
    assert "mit_b0" in msg


def test_unknown_variant_is_reported(tmp_path: Path):
    ckpt, _, _ = mmseg_uda()
    sd = ckpt["state_dict"]
    for k in [k for k in sd if k.startswith("model.backbone.block2.")]:
        sd[k.replace("block2.0.", "block2.1.")] = sd[k]  # depth 2 in stage 2: no such variant
    src = tmp_path / "odd.pth"
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError, match=r"matches no MiT variant.*depths \[1, 2, 1, 1\]"):
        import_checkpoint(src)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "pre-1.6-format"])
def test_legacy_pickle_needs_the_explicit_unsafe_flag(tmp_path: Path, capsys, zip_format):
    ckpt, student, _ = mmseg_uda()
    ckpt["meta"]["config"] = argparse.Namespace(model="daformer")  # a non-tensor pickled object
    src, dst = tmp_path / "legacy.pth", tmp_path / "legacy.safetensors"
    torch.save(ckpt, src, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as info:
        import_checkpoint(src)
    msg = str(info.value)
    assert "legacy.pth" in msg and "--allow-unsafe" in msg and "EXECUTES" in msg
    if zip_format:  # torch can list the offending globals of zip files only
        assert "argparse.Namespace" in msg

    assert convert_main([str(src), str(dst)]) == 1
    assert "--allow-unsafe" in capsys.readouterr().err
    assert not dst.exists()

    assert convert_main([str(src), str(dst), "--allow-unsafe"]) == 0
    out = capsys.readouterr().out
    assert "weights_only=False" in out
    assert_round_trip(load_converted(None, dst), student, lambda k: k)


def test_unsafe_loading_tolerates_missing_packages(tmp_path: Path):
    """A class from a package that is not installed (e.g. mmcv's ConfigDict) becomes a placeholder."""
    fake = types.ModuleType("fake_mmcv_config")

    class ConfigDict(dict):
        pass

    ConfigDict.__module__ = "fake_mmcv_config"
    ConfigDict.__qualname__ = "ConfigDict"
    fake.ConfigDict = ConfigDict
    sys.modules["fake_mmcv_config"] = fake
    try:
        ckpt, student, _ = mmseg_uda()
        cfg = ConfigDict(model={"type": "HRDAEncoderDecoder"})
        cfg.attr = [1, 2]
        ckpt["meta"]["config"] = cfg
        src = tmp_path / "mmcv.pth"
        torch.save(ckpt, src)
    finally:
        del sys.modules["fake_mmcv_config"]
    with pytest.raises(CheckpointError, match="--allow-unsafe"):
        read_checkpoint(src)
    raw = read_checkpoint(src, allow_unsafe=True)
    assert raw.unsafe and raw.placeholders == ["fake_mmcv_config.ConfigDict"]
    imported = import_checkpoint(src, allow_unsafe=True)
    assert any("fake_mmcv_config.ConfigDict" in n for n in imported.report.notes)
    assert_round_trip(imported.build_model(), student, lambda k: k)


def test_garbage_and_backbone_only_files(tmp_path: Path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth") as info:
        import_checkpoint(garbage)
    assert "--allow-unsafe" not in str(info.value)
    mit = tmp_path / "mit_b0.pth"
    torch.save(materialize(mit_shapes("mit_tiny", classifier=True)), mit)
    with pytest.raises(CheckpointError, match="only a MiT backbone.*pretrained"):
        import_checkpoint(mit)
    with pytest.raises(FileNotFoundError):
        import_checkpoint(tmp_path / "nope.pth")
    resnet = tmp_path / "dlv2.pth"
    torch.save(
        {
            "state_dict": materialize(
                {
                    "model.backbone.conv1.weight": (4, 3, 7, 7),
                    "model.decode_head.conv_seg.weight": (K, 4, 1, 1),
                    "ema_model.backbone.conv1.weight": (4, 3, 7, 7),
                }
            )
        },
        resnet,
    )
    with pytest.raises(UnsupportedCheckpointError, match="not a MiT"):
        import_checkpoint(resnet)


def test_udaseg_lightning_checkpoint(tmp_path: Path):
    """Our own checkpoints convert too (student and teacher of an HRDA run)."""
    from udaseg.models.hrda import build_hrda

    student, teacher = (
        build_hrda("mit_tiny", head_channels=E),
        build_hrda("mit_tiny", head_channels=E),
    )
    for p in teacher.parameters():
        torch.nn.init.normal_(p)
    sd = {
        **prefixed("model.", student.state_dict()),
        **prefixed("algorithm.teacher.model.", teacher.state_dict()),
    }
    src, dst = tmp_path / "last.ckpt", tmp_path / "last.safetensors"
    torch.save(
        {
            "state_dict": sd,
            "pytorch-lightning_version": "2.6.0",
            "hyper_parameters": {"backbone": "mit_tiny"},
        },
        src,
    )
    report = convert_checkpoint(src, dst, which="teacher")
    assert report.format == "udaseg-lightning" and report.target == "HRDASegmentor"
    assert report.unexpected == []
    model = load_converted(None, dst)
    assert_round_trip(model, teacher.state_dict(), lambda k: k)
    # and the converted file converts to itself
    again = import_checkpoint(dst)
    assert again.report.format == "udaseg-weights"
    assert_round_trip(again.build_model(), teacher.state_dict(), lambda k: k)
    # a bare HRDASegmentor state dict (no metadata) is recognised as HRDA, not as mmseg-uda
    bare = tmp_path / "hrda_state_dict.pth"
    torch.save(student.state_dict(), bare)
    imported = import_checkpoint(bare)
    assert imported.report.format == "udaseg-weights"
    assert imported.report.target == "HRDASegmentor"
    assert_round_trip(imported.build_model(), student.state_dict(), lambda k: k)


def test_convert_main_dry_run_and_usage(tmp_path: Path, capsys):
    ckpt, _, _ = mmseg_uda(hrda=True)
    src = tmp_path / "hrda.pth"
    torch.save(ckpt, src)
    assert convert_main([str(src), "--dry-run", "--which", "teacher"]) == 0
    out = capsys.readouterr().out
    assert "mmseg-uda" in out and "HRDASegmentor" in out and "selected: teacher" in out
    assert "73.79" in out
    assert list(tmp_path.iterdir()) == [src]
    assert convert_main([str(src)]) == 2
    assert convert_main([str(src), str(tmp_path / "out.pth")]) == 1
    assert ".safetensors" in capsys.readouterr().err
    assert convert_main(["--help"]) == 0


def test_fp16_checkpoint_is_cast(tmp_path: Path):
    ckpt, student, _ = mmseg_uda()
    ckpt["state_dict"] = {
        k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()
    }
    src = tmp_path / "half.pth"
    torch.save(ckpt, src)
    imported = import_checkpoint(src)
    assert any("cast" in n for n in imported.report.notes)
    assert imported.state_dict["backbone.norm1.weight"].dtype == torch.float32
    assert torch.equal(
        imported.state_dict["backbone.norm1.weight"],
        student["backbone.norm1.weight"].half().float(),
    )


def test_plain_files_take_the_safe_path(tmp_path: Path):
    """Plain tensor checkpoints never take the unsafe path."""
    ckpt, _, _ = mmseg_uda()
    src = tmp_path / "plain.pth"
    torch.save(ckpt, src)
    raw = read_checkpoint(src)
    assert not raw.unsafe and raw.top_keys == ["meta", "optimizer"]


def test_converted_hrda_file_initialises_the_training_module(tmp_path: Path):
    """`model.init_weights` with a converted HRDA checkpoint fills the scale-attention head too."""
    from udaseg.engine.module import UDAModule

    ckpt, student, _ = mmseg_uda(hrda=True)
    src, dst = tmp_path / "hrda.pth", tmp_path / "hrda.safetensors"
    torch.save(ckpt, src)
    convert_checkpoint(src, dst)
    module = UDAModule(backbone="mit_tiny", head="daformer", head_channels=E, init_weights=str(dst),
                       hrda={"context_scale": 0.5})
    got = module.model.state_dict()
    att = "decode_head.scale_attention.fuse_layer.conv.weight"
    assert torch.equal(got["scale_attention_head.fuse_layer.conv.weight"], student[att])
    assert torch.equal(got["model.backbone.block1.0.attn.kv.weight"], student["backbone.block1.0.attn.kv.weight"])
    with pytest.raises(CheckpointError, match="set model.hrda"):
        UDAModule(backbone="mit_tiny", head="daformer", head_channels=E, init_weights=str(dst))
