"""DINOv2 ViT: configs, taps, position-embedding modes, weight layouts, parity with transformers,
layer-wise lr ids and the simple feature pyramid. Tiny configs and synthetic weights only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from udaseg.errors import CheckpointError, ConfigError
from udaseg.models.dinov2 import (
    DINOV2_VARIANTS,
    RELEASED_CHECKPOINTS,
    DINOv2,
    DINOv2Backbone,
    DINOv2Config,
    SimpleFeaturePyramid,
    apply_token_policy,
    detect_dinov2_layout,
    dinov2_layer_id,
    guess_dinov2_variant,
    interpolate_pos_embed,
    layer_decay_groups,
    load_dinov2_weights,
    policy_input_size,
    pyramid_sizes,
    remap_hf_dinov2,
    remap_official_dinov2,
    to_hf_dinov2,
)

D, DEPTH, HEADS, GRID = 32, 2, 2, 4  # tiny: pos table 4x4 (56 px)


def tiny(reg: int = 0, ffn: str = "mlp", **kw) -> DINOv2Config:
    return DINOv2Config(D, DEPTH, HEADS, ffn=ffn, pretrain_grid=GRID, num_register_tokens=reg,
                        out_indices=(0, 1), **kw)


def official_shapes(dim: int, depth: int, reg: int = 0, grid: int = GRID, ffn: str = "mlp",
                    mask: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official ``dinov2_vit*14[_reg4]_pretrain.pth`` (spec 1.6), written out
    from the spec rather than taken from our model."""
    s: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    if mask:
        s["mask_token"] = (1, dim)
    if reg:
        s["register_tokens"] = (1, reg, dim)
    hidden = 4 * dim if ffn == "mlp" else (int(4 * dim * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            s[b + n + ".weight"] = s[b + n + ".bias"] = (dim,)
        s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"] = (3 * dim, dim), (3 * dim,)
        s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = (dim, dim), (dim,)
        s[b + "ls1.gamma"] = s[b + "ls2.gamma"] = (dim,)
        if ffn == "mlp":
            s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = (hidden, dim), (hidden,)
            s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = (dim, hidden), (dim,)
        else:
            s[b + "mlp.w12.weight"], s[b + "mlp.w12.bias"] = (2 * hidden, dim), (2 * hidden,)
            s[b + "mlp.w3.weight"], s[b + "mlp.w3.bias"] = (dim, hidden), (dim,)
    return s


def synthetic(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.1
        if k.endswith(("norm1.weight", "norm2.weight", "gamma")) or k == "norm.weight":
            t = t + 1.0
        out[k] = t
    return out


# -- configs ------------------------------------------------------------------------------------

def test_variants_and_param_counts():
    """S/B/L parameter counts of spec table 1.1 (22.06 / 86.58 / 304.37 M with the mask token,
    a buffer here)."""
    expected = {"dinov2_s": 22.06, "dinov2_b": 86.58, "dinov2_l": 304.37}
    for name, millions in expected.items():
        for suffix in ("", "_reg"):
            with torch.device("meta"):
                m = DINOv2(name + suffix)
            n = sum(p.numel() for p in m.parameters()) + m.mask_token.numel()
            n -= 4 * m.config.embed_dim if suffix else 0
            assert round(n / 1e6, 2) == millions, (name + suffix, n)
    assert DINOV2_VARIANTS["dinov2_l"].out_indices == (5, 11, 17, 23)
    assert DINOV2_VARIANTS["dinov2_b"].out_indices == (2, 5, 8, 11)
    assert DINOV2_VARIANTS["dinov2_s_reg"].interp_mode == "size_aa"
    assert DINOV2_VARIANTS["dinov2_s"].interp_mode == "offset0.1"
    g = DINOV2_VARIANTS["dinov2_g"]
    got = (g.embed_dim, g.depth, g.num_heads, g.ffn, g.ffn_hidden)
    assert got == (1536, 40, 24, "swiglu", 4096)
    with torch.device("meta"):
        m = DINOv2("dinov2_g_reg")
    assert m.register_tokens.shape == (1, 4, 1536)
    assert m.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    assert RELEASED_CHECKPOINTS["dinov2_l_reg"] == (
        "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth", "facebook/dinov2-with-registers-large")
    assert set(RELEASED_CHECKPOINTS) == set(DINOV2_VARIANTS) - {"dinov2_tiny"}


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, udaseg.models.dinov2; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_our_keys_are_the_official_layout():
    for reg, ffn in [(0, "mlp"), (4, "mlp"), (0, "swiglu")]:
        model = DINOv2(tiny(reg=reg, ffn=ffn))
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(
            D, DEPTH, reg, ffn=ffn
        )
    assert "mask_token" not in dict(DINOv2(tiny()).named_parameters())


def test_bad_configs_are_loud():
    with pytest.raises(ConfigError, match="out_indices"):
        DINOv2(tiny(), out_indices=(0, 5))
    with pytest.raises(ConfigError, match="interp_mode"):
        DINOv2(tiny(), interp_mode="bilinear")
    with pytest.raises(ConfigError, match="unknown DINOv2 config field.*out_index"):
        DINOv2("dinov2_s", out_index=(1,))
    with pytest.raises(ConfigError, match="known variants"):
        DINOv2("dinov2_xl")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        DINOv2(tiny())(torch.zeros(1, 3, 56, 60))


# -- forward, taps ------------------------------------------------------------------------------

def test_taps_shapes_registers_dropped_and_norm():
    torch.manual_seed(0)
    model = DINOv2(tiny(reg=4)).eval()
    x = torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        maps = model(x)
        toks = model.block_tokens(x, [0, 1])[0]
        normed = model.get_intermediate_layers(x, norm=True)
        maps_cls, cls = model.get_intermediate_layers(x, return_cls=True)
    assert [tuple(m.shape) for m in maps] == [(2, D, 5, 3)] * 2
    assert model.out_channels == (D, D) and model.feature_info[1]["reduction"] == 14
    # patch tokens start after CLS + 4 registers, row-major over the 5x3 grid
    assert torch.equal(maps[1][:, :, 2, 1], toks[1][:, 1 + 4 + 2 * 3 + 1])
    assert torch.equal(cls[0], toks[0][:, 0])
    assert torch.allclose(normed[1][:, :, 0, 0], model.norm(toks[1])[:, 5], atol=1e-6)


def test_backward_reaches_every_used_parameter():
    model = DINOv2(tiny(reg=4, drop_path=0.1)).train()
    sum(m.sum() for m in model(torch.randn(2, 3, 56, 28))).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == ["norm.weight", "norm.bias"]  # norm_taps False: the final norm is unused


# -- position embeddings -----------------------------------------------------------------------

def test_pos_embed_modes():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 8)
    for mode in ("offset0.1", "size_aa", "size"):
        assert interpolate_pos_embed(table, (37, 37), mode) is table
    # shapes are exact for every grid (the official scale_factor form floors (g + 0.1))
    for h in range(1, 90, 7):
        for w in (1, 16, 32, 40, 74, 80, 81):
            assert interpolate_pos_embed(table, (h, w), "offset0.1").shape == (1, 1 + h * w, 8)
    a, b, c = (interpolate_pos_embed(table, (80, 40), m) for m in ("offset0.1", "size_aa", "size"))
    assert torch.equal(a[:, 0], table[:, 0])
    assert not torch.allclose(a, c, atol=1e-4) and not torch.allclose(b, c, atol=1e-4)
    # official non-register formula, written out
    ref = torch.nn.functional.interpolate(
        table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2),
        scale_factor=(80.1 / 37, 40.1 / 37), mode="bicubic")
    assert torch.equal(a[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 8))
    out = interpolate_pos_embed(table.half(), (5, 6), "size", torch.bfloat16)
    assert out.dtype == torch.bfloat16


def test_pos_cache_eval_only_and_invalidated_by_loading():
    model = DINOv2(tiny()).eval()
    with torch.no_grad():
        p1 = model.position_embedding((3, 5), torch.float32)
        assert model.position_embedding((3, 5), torch.float32) is p1
        load_dinov2_weights(model, synthetic(official_shapes(D, DEPTH)))
        p2 = model.position_embedding((3, 5), torch.float32)
    assert not torch.equal(p1, p2)
    model.train()
    assert model.position_embedding((3, 5), torch.float32).requires_grad


# -- weight layouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("reg,ffn", [(0, "mlp"), (4, "mlp"), (4, "swiglu")])
def test_official_loads_strict_and_round_trips_through_hf(reg, ffn):
    sd = synthetic(official_shapes(D, DEPTH, reg, ffn=ffn))
    model = DINOv2(tiny(reg=reg, ffn=ffn))
    report = load_dinov2_weights(model, {"model": sd})
    assert report.layout == "official" and report.complete and report.loaded == len(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    for style in ("hf", "hf_v5"):
        hf = to_hf_dinov2(sd, style, prefix="dinov2." if style == "hf" else "")
        assert detect_dinov2_layout(hf) == style
        back = remap_hf_dinov2(hf)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        m2 = DINOv2(tiny(reg=reg, ffn=ffn))
        assert load_dinov2_weights(m2, hf).complete
    hf = to_hf_dinov2(sd, "hf")
    assert "encoder.layer.1.attention.attention.key.weight" in hf
    assert "encoder.layer.0.layer_scale2.lambda1" in hf and "embeddings.position_embeddings" in hf
    assert torch.equal(hf["encoder.layer.0.attention.attention.value.bias"],
                       sd["blocks.0.attn.qkv.bias"][2 * D:])
    if ffn == "swiglu":
        assert "encoder.layer.0.mlp.weights_in.weight" in hf
        assert "encoder.layer.0.mlp.gate_proj.weight" in to_hf_dinov2(sd, "hf_v5")
    assert guess_dinov2_variant(remap_official_dinov2(sd)) is None  # tiny: no named variant


def test_load_from_files(tmp_path: Path):
    from safetensors.torch import save_file

    sd = synthetic(official_shapes(D, DEPTH, 4))
    torch.save(sd, tmp_path / "w.pth")
    save_file(to_hf_dinov2(sd, "hf"), str(tmp_path / "w.safetensors"))
    for name, layout in (("w.pth", "official"), ("w.safetensors", "hf")):
        model = DINOv2(tiny(reg=4))
        report = load_dinov2_weights(model, tmp_path / name)
        assert report.layout == layout and report.complete
        assert torch.equal(model.register_tokens, sd["register_tokens"])
    with pytest.raises(FileNotFoundError, match="local files"):
        load_dinov2_weights(DINOv2(tiny()), tmp_path / "missing.pth")


def test_loud_errors():
    sd = synthetic(official_shapes(D, DEPTH, 4))
    # registers into a plain model: unexpected key named, with what the checkpoint looks like
    with pytest.raises(CheckpointError,
                       match=r"4 registers.*'register_tokens'.*use the _reg variant"):
        load_dinov2_weights(DINOv2(tiny()), sd)
    # wrong width: key, model and checkpoint shapes
    wide = DINOv2(DINOv2Config(48, 2, 2, pretrain_grid=GRID, out_indices=(1,)))
    with pytest.raises(CheckpointError,
                       match=r"'cls_token'.*model \(1, 1, 48\).*checkpoint \(1, 1, 32\)"):
        load_dinov2_weights(wide, sd)
    # pretrain grid differs
    with pytest.raises(CheckpointError, match="pos_embed.*pretrain_grid"):
        load_dinov2_weights(DINOv2(tiny(reg=4), pretrain_grid=5), sd)
    # a missing block tensor
    broken = dict(sd)
    del broken["blocks.1.ls2.gamma"]
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.ls2.gamma'\]"):
        load_dinov2_weights(DINOv2(tiny(reg=4)), broken)
    report = load_dinov2_weights(DINOv2(tiny(reg=4)), broken, strict=False)
    assert report.missing == ["blocks.1.ls2.gamma"]
    # an incomplete HF q/k/v triple
    hf = to_hf_dinov2(sd, "hf")
    del hf["encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(CheckpointError, match="query, key and value"):
        load_dinov2_weights(DINOv2(tiny(reg=4)), hf)
    with pytest.raises(CheckpointError, match="cannot tell"):
        load_dinov2_weights(DINOv2(tiny()), {"foo.weight": torch.zeros(1)})
    # no mask_token (HF use_mask_token=False) is fine; a classifier is ignored, not an error
    extra = {k: v for k, v in sd.items() if k != "mask_token"}
    extra["head.weight"] = torch.zeros(10, D)
    report = load_dinov2_weights(DINOv2(tiny(reg=4)), extra)
    assert report.complete and report.ignored == ["head.weight"]


# -- parity with transformers ------------------------------------------------------------------

def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "embeddings" in name else 0.1
            ones = name.endswith(("norm1.weight", "norm2.weight", "lambda1", "layernorm.weight"))
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if ones else 0.0))


@pytest.mark.parametrize("registers,ffn", [(False, "mlp"), (True, "mlp"), (False, "swiglu")])
def test_parity_with_transformers(registers, ffn):
    transformers = pytest.importorskip("transformers")
    if registers and not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no Dinov2WithRegistersModel")
    common = dict(hidden_size=D, num_hidden_layers=3, num_attention_heads=HEADS,
                  image_size=14 * GRID, patch_size=14, use_swiglu_ffn=ffn == "swiglu",
                  attn_implementation="sdpa")
    if registers:
        hf = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    hf.eval()
    _randomise(hf, seed=3)
    cfg = DINOv2Config(D, 3, HEADS, ffn=ffn, pretrain_grid=GRID,
                       num_register_tokens=4 if registers else 0,
                       interp_mode="size_aa" if registers else "size", out_indices=(0, 2))
    ours = DINOv2(cfg).eval()
    report = load_dinov2_weights(ours, hf.state_dict())
    assert report.layout == "hf_v5" and report.complete
    start = 5 if registers else 1
    torch.manual_seed(0)
    for h, w in [(56, 56), (84, 84), (56, 98), (42, 70), (112, 28)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = hf(pixel_values=x, output_hidden_states=True)
            last = ours.final_tokens(x)
            maps = ours(x)
        assert (last - ref.last_hidden_state).abs().max() < 1e-5, (h, w)
        for tap, idx in zip(maps, (0, 2), strict=True):
            tok = ref.hidden_states[idx + 1][:, start:]  # hidden_states[0] = embeddings
            want = tok.reshape(2, h // 14, w // 14, D).permute(0, 3, 1, 2)
            assert (tap - want).abs().max() < 1e-5, (h, w, idx)
    # the official offset mode differs from HF's at a resampled grid, as spec 5.4 says
    ours_off = DINOv2(cfg, interp_mode="offset0.1").eval()
    load_dinov2_weights(ours_off, hf.state_dict())
    x = torch.randn(1, 3, 84, 112)
    with torch.no_grad():
        assert (ours_off.final_tokens(x) - hf(pixel_values=x).last_hidden_state).abs().max() > 1e-4


# -- layer-wise lr decay ------------------------------------------------------------------------

def test_layer_ids_and_groups():
    assert dinov2_layer_id("pos_embed", 12) == 0
    assert dinov2_layer_id("backbone.patch_embed.proj.weight", 12, "backbone.") == 0
    assert dinov2_layer_id("backbone.blocks.3.attn.qkv.weight", 12, "backbone.") == 4
    assert dinov2_layer_id("backbone.norm.weight", 12, "backbone.") == 13
    assert dinov2_layer_id("decode_head.conv_seg.weight", 12, "backbone.") == 13
    model = torch.nn.ModuleDict(
        {"backbone": DINOv2(tiny(reg=4)), "decode_head": torch.nn.Conv2d(D, 3, 1)}
    )
    groups = layer_decay_groups(
        model, lr=1.0, weight_decay=0.05, decay=0.5, depth=DEPTH, prefix="backbone."
    )
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    by = {g["name"]: g for g in groups}
    assert by["stem.no_decay"]["lr"] == 0.125
    assert "backbone.pos_embed" in by["stem.no_decay"]["param_names"]
    assert by["blocks.1"]["lr"] == 0.5 and by["top"]["lr"] == 1.0
    assert by["blocks.0"]["weight_decay"] == 0.05 and by["blocks.0.no_decay"]["weight_decay"] == 0.0


# -- simple feature pyramid ---------------------------------------------------------------------

def test_pyramid_sizes_match_mit():
    assert pyramid_sizes(512, 512) == [(128, 128), (64, 64), (32, 32), (16, 16)]
    assert pyramid_sizes(500, 1000) == [(125, 250), (63, 125), (32, 63), (16, 32)]


@pytest.mark.parametrize("crop,vit_in", [((512, 512), (448, 448)),    # token16
                                         ((512, 512), (560, 560)),    # x1.09
                                         ((512, 1024), (518, 1036)),  # pad14
                                         ((64, 96), (56, 84))])
def test_simple_pyramid_strides(crop, vit_in):
    torch.manual_seed(0)
    dim = 16
    b = DINOv2(DINOv2Config(dim, 2, 2, pretrain_grid=GRID, out_indices=(0, 1))).eval()
    with torch.no_grad():
        taps = b(torch.randn(1, 3, *vit_in))
        for norm, out_ch, feats in (("ln", None, taps[-1:]), ("bn", (8, 12, 20, 24), taps * 2)):
            neck = SimpleFeaturePyramid(dim, out_ch, norm=norm).eval()
            outs = neck(feats, crop)
            want_c = out_ch or (dim,) * 4
            assert [tuple(o.shape) for o in outs] == [
                (1, c, *hw) for c, hw in zip(want_c, pyramid_sizes(*crop), strict=True)
            ]
            assert neck.out_channels == tuple(want_c)
            for o, s in zip(outs, (4, 8, 16, 32), strict=True):
                assert o.shape[-2] == math.ceil(crop[0] / s) or s > 4  # rounded as MiT


def test_hf_on_disk_names_load_in_transformers(tmp_path: Path):
    """Our ``"hf"`` names are what transformers' own loader reads from a ``facebook/dinov2-*``
    folder: nothing missing or unexpected, and the same outputs."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    for reg in (0, 4):
        cfg = tiny(reg=reg, interp_mode="size_aa" if reg else "size")
        ours = DINOv2(cfg).eval()
        load_dinov2_weights(ours, synthetic(official_shapes(D, DEPTH, reg), seed=reg))
        folder = tmp_path / f"reg{reg}"
        folder.mkdir()
        hf_sd = {k: v.contiguous() for k, v in to_hf_dinov2(ours.state_dict(), "hf").items()}
        save_file(hf_sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        kw = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                  image_size=14 * GRID, patch_size=14)
        if reg:
            hf_cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=reg, **kw)
            cls = transformers.Dinov2WithRegistersModel
        else:
            hf_cfg = transformers.Dinov2Config(**kw)
            cls = transformers.Dinov2Model
        hf_cfg.save_pretrained(folder)
        hf, info = cls.from_pretrained(folder, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        x = torch.randn(1, 3, 84, 56)
        with torch.no_grad():
            diff = (hf.eval()(pixel_values=x).last_hidden_state - ours.final_tokens(x)).abs().max()
        assert diff < 1e-5


def test_bf16_autocast_forward():
    model = DINOv2(tiny(reg=4)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model(torch.randn(1, 3, 56, 70))
    # the residual stream is fp32, as in the reference: fp32 LayerScale gammas promote the bf16
    # branch outputs (official ``x * gamma``, HF ``hidden_state * lambda1``)
    assert maps[0].shape == (1, D, 4, 5) and torch.isfinite(maps[0]).all()


# -- token policies and the segmentation backbone ---------------------------------------------

def test_policy_sizes_spec_table():
    """Spec 5.5: 512 -> 560 / 518 / 448 and 1024 -> 1120 / 1036 / 896."""
    for policy, small, large in (("x1.09", 560, 1120), ("pad14", 518, 1036), ("token16", 448, 896)):
        assert policy_input_size(512, 1024, policy) == (small, large)
    x = torch.randn(1, 3, 20, 30)
    assert apply_token_policy(x, "pad14").shape[-2:] == (28, 42)
    assert torch.equal(apply_token_policy(x, "pad14")[..., :20, :30], x)
    assert apply_token_policy(x, "token16").shape[-2:] == (28, 28)
    with pytest.raises(ConfigError, match="token policy"):
        policy_input_size(512, 512, "x2")  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["x1.09", "pad14", "token16"])
@pytest.mark.parametrize("crop", [(64, 64), (64, 128), (50, 70)])
def test_backbone_contract(policy, crop):
    from udaseg.models.daformer_head import DAFormerHead

    cfg = DINOv2Config(16, 4, 2, pretrain_grid=GRID, out_indices=(0, 1, 2, 3))
    torch.manual_seed(0)
    backbone = DINOv2Backbone(cfg, token_policy=policy, out_channels=(8, 8, 16, 16)).eval()
    assert [f["reduction"] for f in backbone.feature_info] == [4, 8, 16, 32]
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, *crop))
        head = DAFormerHead(backbone.out_channels, num_classes=5, channels=8, embed_dim=8)
        logits = head.eval()(feats)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, *hw) for c, hw in zip((8, 8, 16, 16), pyramid_sizes(*crop), strict=True)
    ]
    assert logits.shape == (2, 5, *pyramid_sizes(*crop)[0])


def test_backbone_options_and_grads():
    cfg = DINOv2Config(16, 2, 2, pretrain_grid=GRID, out_indices=(1,))
    with pytest.raises(ConfigError, match="needs 4 out_indices"):
        DINOv2Backbone(cfg)
    backbone = DINOv2Backbone(cfg, pyramid_input="last", neck_norm="bn").train()
    assert backbone.out_channels == (16,) * 4
    sum(f.mean() for f in backbone(torch.randn(2, 3, 32, 32))).backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert no_grad == ["vit.norm.weight", "vit.norm.bias"]
    assert dinov2_layer_id("backbone.vit.blocks.1.mlp.fc1.weight", 2, "backbone.vit.") == 2
    sd = synthetic(official_shapes(16, 2))
    assert load_dinov2_weights(backbone, sd).complete
    assert torch.equal(backbone.vit.pos_embed, sd["pos_embed"])
