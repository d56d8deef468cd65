"""Importing Refign / DSRNSS HRDA* Lightning checkpoints (udaseg.models.checkpoint_import).

The fake checkpoints use the upstream key names (brdav/refign: ``models/segmentation_model.py``
attributes ``backbone`` / ``head`` / ``hrda_scale_attention`` and their ``m_`` EMA copies;
``models/heads/segformer.py``: ``linear_c1..4.proj``, ``linear_fuse.conv`` / ``.bn``,
``linear_pred``, 256 channels, concatenation ``[c4, c3, c2, c1]``) with ``mit_tiny`` widths and
16-channel DAFormer heads; every tensor holds distinct random values.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_checkpoint_import import (
    E,
    K,
    assert_round_trip,
    bn,
    materialize,
    prefixed,
    refign_checkpoint,
)
from udaseg.errors import CheckpointError
from udaseg.models.checkpoint_import import (
    convert_checkpoint,
    convert_main,
    import_checkpoint,
    load_converted,
    read_checkpoint,
)
from udaseg.models.hrda import HRDAConfig, HRDASegmentor
from udaseg.models.mit import MIT_VARIANTS
from udaseg.models.segmentor import build_segmentor

IN_CH = MIT_VARIANTS["mit_tiny"].embed_dims
ATT = 256  # Refign's SegFormerHead default width (channels=256)


def refign_segformer_shapes(k: int = K) -> dict[str, tuple[int, ...]]:
    """brdav/refign models/heads/segformer.py (MLP ``proj``, ConvBNReLU without conv bias)."""
    out: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(IN_CH, start=1):
        out[f"linear_c{i}.proj.weight"] = (ATT, c)
        out[f"linear_c{i}.proj.bias"] = (ATT,)
    out["linear_fuse.conv.weight"] = (ATT, 4 * ATT, 1, 1)
    out.update(bn("linear_fuse.bn", ATT))
    out["linear_pred.weight"] = (k, ATT, 1, 1)
    out["linear_pred.bias"] = (k,)
    return out


def hrda_star_checkpoint(with_teacher: bool = True):
    att_s = materialize(refign_segformer_shapes())
    att_t = materialize(refign_segformer_shapes())
    extra = prefixed("hrda_scale_attention.", att_s)
    if with_teacher:
        extra.update(prefixed("m_hrda_scale_attention.", att_t))
    ckpt, student, teacher = refign_checkpoint(with_teacher=with_teacher, extra=extra)
    ckpt["hyper_parameters"].update(use_hrda=True, hrda_output_stride=4)
    return ckpt, student, teacher, att_s, att_t


def our_key(src: str) -> str | None:
    """Refign segmentor key (without the m_ prefix) -> our HRDASegmentor key."""
    if src.startswith("backbone."):
        return "model." + src
    if src.startswith("decode_head."):
        return "model." + src
    if m := re.match(r"^linear_c(\d)\.(.+)$", src):
        return f"scale_attention_head.linear_c.{int(m.group(1)) - 1}.{m.group(2)}"
    return "scale_attention_head." + src


def refign_attention_reference(sd: dict[str, torch.Tensor], feats) -> torch.Tensor:
    """Refign's SegFormerHead.forward (eval: no dropout), written from the upstream code."""
    c1 = feats[0]
    parts = []
    for i in (4, 3, 2, 1):
        f = feats[i - 1]
        n, _, h, w = f.shape
        x = f.flatten(2).transpose(1, 2)
        x = F.linear(x, sd[f"linear_c{i}.proj.weight"], sd[f"linear_c{i}.proj.bias"])
        x = x.permute(0, 2, 1).reshape(n, -1, h, w)
        if i != 1:
            x = F.interpolate(x, size=c1.shape[2:], mode="bilinear", align_corners=False)
        parts.append(x)
    x = F.conv2d(torch.cat(parts, dim=1), sd["linear_fuse.conv.weight"])
    x = F.batch_norm(
        x,
        sd["linear_fuse.bn.running_mean"],
        sd["linear_fuse.bn.running_var"],
        sd["linear_fuse.bn.weight"],
        sd["linear_fuse.bn.bias"],
        training=False,
    )
    x = F.relu(x)
    return F.conv2d(x, sd["linear_pred.weight"], sd["linear_pred.bias"])


def test_refign_hrda_star_converts_to_segformer_attention_hrda(tmp_path: Path):
    ckpt, student, teacher, att_s, att_t = hrda_star_checkpoint()
    src, dst = tmp_path / "refign_hrda_star.ckpt", tmp_path / "refign_hrda_star.safetensors"
    torch.save(ckpt, src)

    report = convert_checkpoint(src, dst)
    assert report.format == "lightning-refign" and report.target == "HRDASegmentor"
    assert report.config["hrda_attention_head"] == "segformer"
    assert report.mapping["model.decode_head.conv_seg.weight"] == "head.conv_seg.weight"
    assert (
        report.mapping["scale_attention_head.linear_c.3.proj.weight"]
        == "hrda_scale_attention.linear_c4.proj.weight"
    )
    assert "m_backbone.*, m_head.*, m_hrda_scale_attention.*" in report.dropped
    assert report.unexpected == []
    assert any("72.1" in r and "63.9" in r for r in report.expected_results)
    meta = read_checkpoint(dst).metadata
    assert meta["hrda_attention_head"] == "segformer"

    # strict load into a fresh model built from the metadata: every tensor in its place
    model = load_converted(None, dst)
    assert isinstance(model, HRDASegmentor) and model.cfg.attention_head == "segformer"
    source = {**student, **att_s}
    assert_round_trip(model, source, our_key)

    # the same weights in the HRDASegmentor that our HRDA* config builds (refign_hrda.yaml)
    ours = HRDASegmentor(
        build_segmentor(backbone="mit_tiny", head="daformer", num_classes=K, head_channels=E),
        HRDAConfig(
            context_scale=0.5,
            detail_crop_ratio=0.5,
            detail_loss_weight=0.1,
            attention_head="segformer",
        ),
    )
    load_converted(ours, dst)
    model.eval()
    ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours(x).logits, rtol=0, atol=0)

    # the attention head computes Refign's SegFormerHead (proves the [c4..c1] concatenation)
    model.double()
    feats = [torch.randn(1, c, 16 >> i, 16 >> i, dtype=torch.float64) for i, c in enumerate(IN_CH)]
    ref = refign_attention_reference({k: v.double() for k, v in att_s.items()}, feats)
    with torch.no_grad():
        torch.testing.assert_close(model.scale_attention_head(feats), ref)

    # udaseg segment / export rebuild the HRDA* segmentor from the file alone
    from udaseg.eval.onnx_export import load_segmentor_for_export

    exported, info = load_segmentor_for_export(dst)
    assert isinstance(exported, HRDASegmentor)
    assert info["hrda"]["attention_head"] == "segformer"
    assert info["hrda_settings"] == "checkpoint"
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, ours(x).logits, rtol=0, atol=0)


def test_refign_hrda_star_teacher(tmp_path: Path):
    ckpt, _, teacher, _, att_t = hrda_star_checkpoint()
    src = tmp_path / "dsrnss_hrda.ckpt"
    torch.save(ckpt, src)
    imported = import_checkpoint(src, which="teacher")
    assert (
        imported.report.mapping["scale_attention_head.linear_pred.weight"]
        == "m_hrda_scale_attention.linear_pred.weight"
    )
    assert "backbone.*, head.*, hrda_scale_attention.*" in imported.report.dropped
    assert_round_trip(imported.build_model(), {**teacher, **att_t}, our_key)
    assert convert_main([str(src), str(tmp_path / "t.safetensors"), "--which", "teacher"]) == 0


def test_refign_hrda_star_without_teacher_and_broken_attention(tmp_path: Path):
    ckpt, _, _, _, _ = hrda_star_checkpoint(with_teacher=False)
    src = tmp_path / "refign_hrda.ckpt"
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError, match="no m_backbone.*m_hrda_scale_attention"):
        import_checkpoint(src, which="teacher")

    # an attention head of another width than Refign's 256 channels is named with its shapes
    ckpt["state_dict"]["hrda_scale_attention.linear_c1.proj.weight"] = torch.randn(128, IN_CH[0])
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError, match=r"linear_c1\.proj\.weight.*\(128, 16\)"):
        import_checkpoint(src)
    assert convert_main([str(src), str(tmp_path / "x.safetensors")]) == 1
