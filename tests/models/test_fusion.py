"""CMDA fusion segmentor: fusion modules, branches, prediction switch, weights, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.errors import CheckpointError, ConfigError
from udaseg.models.fusion import (
    AttentionAvgFusion,
    AttentionFusion,
    FusionConfig,
    FusionOutput,
    FusionSegmentor,
    build_fusion_segmentor,
    remap_cmda_keys,
)
from udaseg.models.mit import MixTransformer
from udaseg.models.segmentor import SegOutput

TINY = (16, 32, 64, 128)  # mit_tiny widths


def _model(**kw) -> FusionSegmentor:
    torch.manual_seed(0)
    kw.setdefault("head_channels", 16)
    return build_fusion_segmentor("mit_tiny", **kw)


def _inputs(b: int = 2, size: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, 3, size, size, generator=g) for _ in range(3))


# ------------------------------------------------------------------ hand-written references


def _block_ref(blk, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One MiT block with 1 head, written out: x + Attn(LN1 x); x + MixFFN(LN2 x)."""
    c = x.shape[-1]
    y = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    at = blk.attn
    q = y @ at.q.weight.T + at.q.bias
    if at.sr_ratio > 1:
        m = y.transpose(1, 2).reshape(-1, c, h, w)
        m = F.conv2d(m, at.sr.weight, at.sr.bias, stride=at.sr_ratio)
        r = F.layer_norm(m.flatten(2).transpose(1, 2), (c,), at.norm.weight, at.norm.bias, 1e-5)
    else:
        r = y
    kv = r @ at.kv.weight.T + at.kv.bias
    k, v = kv[..., :c], kv[..., c:]
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
    x = x + (a @ at.proj.weight.T + at.proj.bias)
    y = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    return x + _mixffn_ref(blk.mlp, y, h, w)


def _mixffn_ref(mlp, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    z = x @ mlp.fc1.weight.T + mlp.fc1.bias
    d = z.shape[-1]
    conv = mlp.dwconv.dwconv
    z = z.transpose(1, 2).reshape(-1, d, h, w)
    z = F.conv2d(z, conv.weight, conv.bias, padding=1, groups=d)
    z = F.gelu(z.flatten(2).transpose(1, 2))
    return z @ mlp.fc2.weight.T + mlp.fc2.bias


def _tok(x):
    return x.flatten(2).transpose(1, 2)


def _map(t, h, w):
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


def _levels(seed: int, chans=(4, 8), sizes=(8, 4), b: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g) for c, s in zip(chans, sizes)]


def _zero_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


# ------------------------------------------------------------------ fusion modules


def test_attention_avg_fusion_identity_blocks_average():
    """Blocks with zero weights are the identity (both residual branches give 0): the fusion is
    exactly the mean of the two inputs."""
    fus = AttentionAvgFusion((4, 8), (2, 1)).eval()
    _zero_(fus)
    fi, fe = _levels(0), _levels(1)
    out = fus(fi, fe)
    for o, a, b in zip(out, fi, fe):
        torch.testing.assert_close(o, (a + b) / 2, rtol=0, atol=0)


def test_attention_fusion_hand_set_weights():
    """Zero block = identity; fc1 = [I I], dwconv = centre tap 1, fc2 = I -> GELU(f_img + f_evt)."""
    fus = AttentionFusion((4, 8), (2, 1)).eval()
    _zero_(fus)
    with torch.no_grad():
        for c, mlp in zip((4, 8), fus.linear_block):
            eye = torch.eye(c)
            mlp.fc1.weight.copy_(torch.cat([eye, eye], dim=1))
            mlp.dwconv.dwconv.weight[:, 0, 1, 1] = 1.0
            mlp.fc2.weight.copy_(eye)
    fi, fe = _levels(2), _levels(3)
    for o, a, b in zip(fus(fi, fe), fi, fe):
        torch.testing.assert_close(o, F.gelu(a + b), rtol=1e-6, atol=1e-6)


def test_fusion_modules_match_written_out_equations():
    torch.manual_seed(0)
    fi, fe = _levels(4), _levels(5)
    avg = AttentionAvgFusion((4, 8), (2, 1)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in avg.parameters():
            p.add_(0.1 * torch.randn_like(p))
        out = avg(fi, fe)
    for i, (a, b) in enumerate(zip(fi, fe)):
        h, w = a.shape[-2:]
        ref = (_block_ref(avg.basic_block[2 * i], _tok(a), h, w)
               + _block_ref(avg.basic_block[2 * i + 1], _tok(b), h, w)) / 2
        torch.testing.assert_close(out[i], _map(ref, h, w), rtol=1e-5, atol=1e-5)

    cat = AttentionFusion((4, 8), (2, 1)).eval()
    with torch.no_grad():
        for p in cat.parameters():
            p.add_(0.1 * torch.randn_like(p))
        out = cat(fi, fe)
    for i, (a, b) in enumerate(zip(fi, fe)):
        h, w = a.shape[-2:]
        z = _block_ref(cat.basic_block[i], _tok(torch.cat([a, b], 1)), h, w)
        ref = _mixffn_ref(cat.linear_block[i], z, h, w)  # no residual
        assert out[i].shape == a.shape
        torch.testing.assert_close(out[i], _map(ref, h, w), rtol=1e-5, atol=1e-5)


def _blk_params(c: int, r: int) -> int:
    """Spec 2.7 block: LN, q, kv, proj, SR conv + LN (R > 1), LN, Mix-FFN 4C with dw 3x3."""
    return 12 * c * c + 53 * c + ((r * r * c * c + 3 * c) if r > 1 else 0)


def test_fusion_parameter_counts_mit_b5():
    dims, srs = (64, 128, 320, 512), (8, 4, 2, 1)
    with torch.device("meta"):
        avg, cat = AttentionAvgFusion(dims, srs), AttentionFusion(dims, srs)
    n_avg = sum(p.numel() for p in avg.parameters())
    n_cat = sum(p.numel() for p in cat.parameters())
    assert n_avg == sum(2 * _blk_params(c, r) for c, r in zip(dims, srs)) == 11_219_968
    # (the release's own comment: the pickled module is "43,902 K" = 11.2M float32 + overhead)
    assert n_cat == sum(_blk_params(2 * c, r) + 3 * c * c + 12 * c
                        for c, r in zip(dims, srs)) == 23_495_680
    names = {n.split(".")[0] for n, _ in avg.named_parameters()}
    assert names == {"basic_block"} and len(avg.basic_block) == 8
    assert {n.split(".")[0] for n, _ in cat.named_parameters()} == {"basic_block", "linear_block"}
    assert "linear_block.0.dwconv.dwconv.weight" in dict(cat.named_parameters())
    blk = avg.basic_block[0]
    assert blk.attn.num_heads == 1 and blk.attn.sr_ratio == 8 and blk.norm1.eps == 1e-6
    assert blk.drop_path.drop_prob == pytest.approx(0.05)
    assert avg.basic_block[7].drop_path.drop_prob == pytest.approx(0.05)  # constant, no ramp


def test_fusion_rejects_mismatched_levels():
    fus = AttentionAvgFusion((4, 8), (2, 1))
    with pytest.raises(ValueError, match="differ"):
        fus(_levels(0), _levels(1, sizes=(8, 2)))
    with pytest.raises(ValueError, match="2 feature levels"):
        fus(_levels(0)[:1], _levels(1)[:1])


# ------------------------------------------------------------------ segmentor


def test_every_branch_shape_and_output_type():
    model = _model().eval()
    x, e, r = _inputs()
    with torch.no_grad():
        out = model(x, e, r)
    assert isinstance(out, FusionOutput) and isinstance(out, SegOutput)
    assert set(out.extras) == {"image", "events", "fusion", "isr"}
    for name, logits in out.extras.items():
        assert logits.shape == (2, 19, 16, 16), name
    for name, feats in out.branch_features.items():
        assert [tuple(f.shape) for f in feats] == [
            (2, c, 64 // s, 64 // s) for c, s in zip(TINY, (4, 8, 16, 32))
        ], name
    assert out.predicted == "fusion" and out.logits is out.extras["fusion"]
    assert out.features is out.branch_features["fusion"]
    assert model.num_classes == 19 and model.out_channels == TINY
    keys = {k.split(".")[0] for k in model.state_dict()}
    assert keys == {"backbone_image", "backbone_events", "fusion_module", "decode_head"}


def test_prediction_branch_switch_and_fallbacks():
    x, e, r = _inputs()
    full = _model().eval()
    for predict in ("fusion", "image", "events"):
        m = _model(predict=predict).eval()
        m.load_state_dict(full.state_dict())
        with torch.no_grad():
            out = m(x, e)
        assert out.predicted == predict
        torch.testing.assert_close(out.logits, out.extras[predict])
        assert out.features is out.branch_features[predict]
    with torch.no_grad():
        only_isr = full(x, isr=r)  # ISR is not fused: no events, no fusion -> image
        image_only = full(x)
    assert set(only_isr.extras) == {"image", "isr"} and only_isr.predicted == "image"
    assert set(image_only.extras) == {"image"} and image_only.predicted == "image"
    # DZ: ISR as the second modality goes in ``events`` and is fused
    dz = _model(fusion="attention", predict="image").eval()
    with torch.no_grad():
        out = dz(x, events=r)
    assert set(out.extras) == {"image", "events", "fusion"} and out.predicted == "image"


def test_image_only_forward_is_a_plain_segmentor():
    model = _model(predict="fusion").eval()
    x, e, r = _inputs()
    with torch.no_grad():
        alone = model(x)
        full = model(x, e, r)
        plain = model.decode_head(model.extract_features(x))  # the DAFormerHead's own forward
    torch.testing.assert_close(alone.logits, full.extras["image"], rtol=0, atol=0)
    torch.testing.assert_close(alone.logits, plain, rtol=1e-6, atol=1e-6)
    assert alone.features[0].shape == (2, 16, 16, 16)
    with torch.no_grad():  # any input size, like a plain segmentor (slide/whole inference)
        assert model(torch.randn(1, 3, 40, 72)).logits.shape == (1, 19, 10, 18)


def test_shared_decoder_dropout_on_image_branch_only():
    model = _model().train()
    model.decode_head.dropout.p = 1.0  # drops every channel: image logits = classifier bias
    x, e, r = _inputs()
    out = model(x, e, r)
    bias = model.decode_head.conv_seg.bias.view(1, -1, 1, 1).expand_as(out.extras["image"])
    torch.testing.assert_close(out.extras["image"], bias, rtol=0, atol=0)
    for name in ("events", "fusion", "isr"):
        assert out.extras[name].std() > 0, name
    # one decoder, one classifier for all branches
    assert sum(1 for n, _ in model.named_modules() if n.endswith("conv_seg")) == 1


def _write_mit_tiny(path, seed: int = 7) -> dict:
    torch.manual_seed(seed)
    sd = MixTransformer("mit_tiny").state_dict()
    sd["head.weight"] = torch.randn(1000, 128)  # the ImageNet classifier is in the real files
    sd["head.bias"] = torch.randn(1000)
    torch.save(sd, path)
    return sd


def test_both_encoders_load_mit_weights(tmp_path):
    path = tmp_path / "mit_tiny.pth"
    sd = _write_mit_tiny(path)
    assert "block1.0.attn.kv.weight" in sd and "patch_embed1.proj.weight" in sd
    model = build_fusion_segmentor("mit_tiny", head_channels=16, pretrained=str(path))
    for enc in (model.backbone_image, model.backbone_events):
        for k, v in enc.state_dict().items():
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    with pytest.raises(CheckpointError, match="mit_b0|mit_tiny"):
        bad = tmp_path / "mit_b0.pth"
        torch.save(MixTransformer("mit_b0").state_dict(), bad)
        build_fusion_segmentor("mit_tiny", pretrained=str(bad))


def test_one_channel_events_encoder_equals_replicated_input(tmp_path):
    path = tmp_path / "mit_tiny.pth"
    _write_mit_tiny(path)
    three = build_fusion_segmentor("mit_tiny", head_channels=16, pretrained=str(path)).eval()
    one = build_fusion_segmentor(
        "mit_tiny", head_channels=16, pretrained=str(path), events_channels=1
    ).eval()
    ev = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        f3 = three.backbone_events(ev.repeat(1, 3, 1, 1))
        f1 = one.backbone_events(ev)
    for a, b in zip(f3, f1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_loss_reaches_both_encoders_and_the_fusion():
    model = _model(drop_path_rate=0.0, fusion_drop_path=0.0).train()
    x, e, r = _inputs()
    x.requires_grad_(True)
    out = model(x, e)
    out.extras["fusion"].square().mean().backward()
    for prefix in ("backbone_image.", "backbone_events.", "fusion_module.", "decode_head."):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix)]
        assert params, prefix
        for n, p in params:
            if n.startswith("decode_head.") and "dropout" in n:
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n
    assert x.grad is None  # inputs are detached, as in the release

    model.zero_grad(set_to_none=True)
    model(x, e).extras["image"].mean().backward()  # the image loss leaves fusion/events alone
    assert all(p.grad is None for p in model.fusion_module.parameters())
    assert all(p.grad is None for p in model.backbone_events.parameters())


def test_attention_fusion_segmentor_gradients():
    model = _model(fusion="attention", predict="image", drop_path_rate=0.0, fusion_drop_path=0.0)
    x, e, _ = _inputs(size=32)
    model.train()(x, e).extras["fusion"].square().mean().backward()
    for n, p in model.fusion_module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert model.backbone_image.patch_embed1.proj.weight.grad.abs().sum() > 0
    assert model.backbone_events.patch_embed1.proj.weight.grad.abs().sum() > 0


def test_build_errors():
    with pytest.raises(ConfigError, match="MiT variant"):
        build_fusion_segmentor("resnet_tiny")
    with pytest.raises(ConfigError, match="unknown fusion 'concat'"):
        build_fusion_segmentor("mit_tiny", fusion="concat")
    with pytest.raises(ConfigError, match="predict"):
        build_fusion_segmentor("mit_tiny", predict="isr")
    with pytest.raises(ConfigError, match="events_channels"):
        FusionConfig(events_channels=0)
    assert FusionConfig() == FusionConfig("attention_avg", "fusion", 3, 0.05)


def test_remap_release_keys():
    ours = _model().state_dict()
    release = {}
    for k, v in ours.items():
        if k.startswith(("decode_head.embed_layers.", "decode_head.fuse_layer.")):
            name, rest = k[len("decode_head."):].split(".", 1)
            for branch in ("image", "events", "fusion"):  # share_decoder aliases
                release[f"decode_head.{name}_{branch}.{rest}"] = v.clone()
        else:
            release[k] = v.clone()
    release["fusion_isr_module.basic_block.0.norm1.weight"] = torch.ones(32)
    mapped = remap_cmda_keys(release)
    assert set(mapped) == set(ours)
    model = _model()
    model.load_state_dict(mapped, strict=True)
    release["decode_head.fuse_layer_events.bottleneck.conv.weight"] = torch.zeros_like(
        release["decode_head.fuse_layer_image.bottleneck.conv.weight"]
    )
    with pytest.raises(CheckpointError, match="share_decoder"):
        remap_cmda_keys(release)


def test_param_groups_and_channels_last():
    from udaseg.models.optim_groups import param_groups

    model = _model()
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(model, 6e-5, 0.01)}
    assert all(n.startswith("decode_head.") for n in groups["head"])  # x10 lr: decoder only
    assert "fusion_module.basic_block.0.attn.q.weight" in groups["decay"]
    assert "fusion_module.basic_block.0.norm1.weight" in groups["no_decay"]
    assert "backbone_events.block1.0.attn.kv.weight" in groups["decay"]
    x, e, r = _inputs(size=32)
    model.eval()
    with torch.no_grad():
        ref = model(x, e, r)
        model.to(memory_format=torch.channels_last)
        out = model(x, e, r)
    for name in ref.extras:
        torch.testing.assert_close(out.extras[name], ref.extras[name], rtol=1e-4, atol=1e-5)
