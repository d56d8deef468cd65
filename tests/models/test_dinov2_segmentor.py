"""DINOv2 behind the segmentor contract: one config line (``model.backbone: dinov2_*``) puts it
under the DAFormer/SegFormer heads, DACS + FD + MIC, HRDA and slide inference (issue 18)."""

from __future__ import annotations

import pytest
import torch

from udaseg.errors import CheckpointError
from udaseg.models import BACKBONES, build_segmentor
from udaseg.models.dinov2 import DINOv2Backbone, to_hf_dinov2


def test_dinov2_names_are_registered():
    for name in ("dinov2_s", "dinov2_b", "dinov2_l", "dinov2_g", "dinov2_b_reg", "dinov2_tiny"):
        assert name in BACKBONES


@pytest.mark.parametrize("head", ["daformer", "segformer"])
def test_heads_take_the_pyramid_at_mit_strides(head):
    torch.manual_seed(0)
    model = build_segmentor("dinov2_tiny", head, head_channels=16).eval()
    assert isinstance(model.backbone, DINOv2Backbone)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out.logits.shape == (2, 19, 16, 24)  # stride 4, as with MiT
    assert [tuple(f.shape[-2:]) for f in out.features] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_pretrained_path_loads_official_and_hf_layouts_strictly(tmp_path):
    torch.manual_seed(0)
    ref = build_segmentor("dinov2_tiny", "daformer", head_channels=16)
    official = {k: v.clone() for k, v in ref.backbone.vit.state_dict().items()}
    torch.save(official, tmp_path / "official.pth")
    torch.save(to_hf_dinov2(official), tmp_path / "hf.pth")
    for name in ("official.pth", "hf.pth"):
        model = build_segmentor("dinov2_tiny", "daformer", head_channels=16,
                                pretrained=str(tmp_path / name))
        for k, v in official.items():
            assert torch.equal(model.backbone.vit.state_dict()[k], v), (name, k)
    bad = dict(official)
    bad["pos_embed"] = bad["pos_embed"][:, :-1]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="pos_embed"):
        build_segmentor("dinov2_tiny", "daformer", head_channels=16,
                        pretrained=str(tmp_path / "bad.pth"))


def test_dacs_fd_mic_iterations_with_dinov2():
    from udaseg.adapt.self_training import DACSConfig, SelfTraining
    from udaseg.catalog import build_methods

    torch.manual_seed(0)
    student = build_segmentor("dinov2_tiny", "daformer", head_channels=16)
    hooks = build_methods({"fd": {"weight": 0.005, "classes": None},
                           "mic": {"block_size": 8}}, student)
    algo = SelfTraining(student, DACSConfig(pseudo_threshold=0.0), aux_losses=hooks.aux_losses)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "label": torch.randint(0, 19, (2, 64, 64), generator=g)}
    tgt = {"image": torch.randn(2, 3, 64, 64, generator=g)}
    history = []
    for step in range(2):
        opt.zero_grad()
        losses = algo.step(student, src, tgt, step=step, backward=lambda loss: loss.backward())
        assert {"src", "fd", "mix", "mic"} <= set(losses), losses.keys()
        assert all(torch.isfinite(v) for v in losses.values())
        opt.step()
        history.append(losses)
    assert history[1]["fd"].item() > 0  # the student left the frozen copy after one update


def test_hrda_and_slide_inference_with_dinov2():
    from udaseg.eval.inference import slide_inference
    from udaseg.models.hrda import HRDAConfig, HRDASegmentor

    torch.manual_seed(0)
    base = build_segmentor("dinov2_tiny", "daformer", head_channels=16)
    model = HRDASegmentor(base, HRDAConfig())
    out = model.train()(torch.randn(2, 3, 128, 128))
    assert out.logits.shape[1] == 19 and out.detail_logits.shape == (2, 19, 16, 16)
    plain = build_segmentor("dinov2_tiny", "segformer", head_channels=16).eval()
    with torch.no_grad():
        logits = slide_inference(lambda x: plain(x).logits, torch.randn(1, 3, 96, 160), 64, 48,
                                 num_classes=19)
    assert logits.shape == (1, 19, 96, 160) and torch.isfinite(logits).all()


def test_layer_decay_option_scales_backbone_lr_by_layer():
    from udaseg.engine.optim import OptimConfig, build_optimizer
    from udaseg.errors import ConfigError

    model = build_segmentor("dinov2_tiny", "daformer", head_channels=16)
    depth = model.backbone.vit.config.depth
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-4, layer_decay=0.5, warmup_iters=0), 10)
    lr_of = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())
    assert lr_of["backbone.vit.patch_embed.proj.weight"] == pytest.approx(1e-4 * 0.5 ** (depth + 1))
    assert lr_of["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(1e-4 * 0.5 ** depth)
    assert lr_of[f"backbone.vit.blocks.{depth - 1}.mlp.fc1.weight"] == pytest.approx(1e-4 * 0.5)
    assert lr_of["backbone.vit.norm.weight"] == pytest.approx(1e-4)
    head = next(n for n in lr_of if n.startswith("decode_head."))
    assert lr_of[head] == pytest.approx(1e-3)  # head x10, no decay
    with pytest.raises(ConfigError, match="layer_decay"):
        build_optimizer(build_segmentor("mit_tiny", "daformer", head_channels=16),
                        OptimConfig(layer_decay=0.5), 10)
