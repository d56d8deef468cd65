"""EncoderDecoder, build_segmentor and the AdamW parameter groups."""

from __future__ import annotations

import pytest
import torch

from udaseg.models import EncoderDecoder, SegOutput, build_segmentor, param_groups
from udaseg.models.daformer_head import DAFormerHead
from udaseg.models.segformer_head import SegFormerHead


@pytest.mark.parametrize("head", ["daformer", "segformer"])
def test_encoder_decoder_output(head):
    model = build_segmentor("mit_tiny", head, head_channels=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 19, 16, 16)
    assert len(out.features) == 4
    assert [f.shape[1] for f in out.features] == [16, 32, 64, 128]
    assert model.num_classes == 19


def test_build_segmentor_options():
    model = build_segmentor(
        "mit_tiny", "daformer", num_classes=5, drop_path_rate=0.0, head_channels=24
    )
    assert isinstance(model, EncoderDecoder)
    assert isinstance(model.decode_head, DAFormerHead)
    assert model.decode_head.channels == 24 and model.decode_head.embed_dim == 24
    assert model.num_classes == 5
    seg = build_segmentor("mit_tiny", "segformer")
    assert isinstance(seg.decode_head, SegFormerHead) and seg.decode_head.embed_dim == 768
    assert set(k.split(".")[0] for k in model.state_dict()) == {"backbone", "decode_head"}


def test_build_segmentor_unknown_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'.*mit_b5.*mit_tiny"):
        build_segmentor("resnet18")
    with pytest.raises(ValueError, match="unknown head 'uper'.*daformer, segformer"):
        build_segmentor("mit_tiny", "uper")


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_segmentor("mit_tiny", "daformer", drop_path_rate=0.0, head_channels=16).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_param_groups():
    model = build_segmentor("mit_tiny", "daformer", head_channels=16)
    model.backbone.block1[0].norm1.bias.requires_grad_(False)  # frozen params are left out
    groups = param_groups(model, lr=6e-5, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == pytest.approx(6e-4) and by_name["head"]["weight_decay"] == 0.01
    assert by_name["no_decay"]["lr"] == 6e-5 and by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["decay"]["lr"] == 6e-5 and by_name["decay"]["weight_decay"] == 0.01

    assert all(n.startswith("decode_head.") for n in by_name["head"]["param_names"])
    assert "decode_head.fuse_layer.bottleneck.bn.weight" in by_name["head"]["param_names"]
    no_decay = set(by_name["no_decay"]["param_names"])
    assert all(n.startswith("backbone.") and "norm" in n for n in no_decay)
    for n in (
        "backbone.patch_embed1.norm.weight",
        "backbone.block1.0.attn.norm.bias",
        "backbone.block4.0.norm2.weight",
        "backbone.norm4.bias",
    ):
        assert n in no_decay
    decay = set(by_name["decay"]["param_names"])
    assert {"backbone.block1.0.attn.sr.bias", "backbone.patch_embed2.proj.weight"} <= decay

    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert set(ids) == {id(p) for p in trainable}
    assert "backbone.block1.0.norm1.bias" not in no_decay

    opt = torch.optim.AdamW(groups, lr=6e-5)  # the groups are accepted as-is
    model(torch.randn(2, 3, 32, 32)).logits.mean().backward()
    opt.step()
