"""Checkpoint loading for MiT: NVlabs and HuggingFace layouts on synthetic state dicts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from udaseg.models.mit import MIT_VARIANTS, MixTransformer
from udaseg.models.segmentor import build_segmentor
from udaseg.models.weights import (
    detect_layout,
    guess_mit_variant,
    load_backbone_weights,
    remap_hf_mit,
    remap_nvlabs_mit,
    to_hf_mit,
)


def nvlabs_shapes(variant: str, num_imagenet_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an NVlabs ``mit_b*.pth`` file, from spec table 1.7 (not from our model)."""
    cfg = MIT_VARIANTS[variant]
    shapes: dict[str, tuple[int, ...]] = {}
    prev = 3
    stages = zip(cfg.embed_dims, cfg.depths, cfg.sr_ratios, strict=True)
    for i, (c, depth, r) in enumerate(stages, start=1):
        k = 7 if i == 1 else 3
        shapes[f"patch_embed{i}.proj.weight"] = (c, prev, k, k)
        shapes[f"patch_embed{i}.proj.bias"] = (c,)
        shapes[f"patch_embed{i}.norm.weight"] = (c,)
        shapes[f"patch_embed{i}.norm.bias"] = (c,)
        for j in range(depth):
            b = f"block{i}.{j}"
            for name, wshape, bshape in [
                ("norm1", (c,), (c,)),
                ("attn.q", (c, c), (c,)),
                ("attn.kv", (2 * c, c), (2 * c,)),
                ("attn.proj", (c, c), (c,)),
                *([("attn.sr", (c, c, r, r), (c,)), ("attn.norm", (c,), (c,))] if r > 1 else []),
                ("norm2", (c,), (c,)),
                ("mlp.fc1", (4 * c, c), (4 * c,)),
                ("mlp.dwconv.dwconv", (4 * c, 1, 3, 3), (4 * c,)),
                ("mlp.fc2", (c, 4 * c), (c,)),
            ]:
                shapes[f"{b}.{name}.weight"] = wshape
                shapes[f"{b}.{name}.bias"] = bshape
        shapes[f"norm{i}.weight"] = (c,)
        shapes[f"norm{i}.bias"] = (c,)
        prev = c
    shapes["head.weight"] = (num_imagenet_classes, cfg.embed_dims[-1])
    shapes["head.bias"] = (num_imagenet_classes,)
    return shapes


def synthetic_nvlabs(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in nvlabs_shapes(variant).items():
        t = torch.randn(s, generator=g) * 0.05
        if (
            k.endswith("norm.weight")
            or k.endswith(("norm1.weight", "norm2.weight"))
            or k.startswith("norm")
        ):
            t = t + 1.0
        out[k] = t
    return out


@pytest.fixture(scope="module")
def b0_sd() -> dict[str, torch.Tensor]:
    return synthetic_nvlabs("mit_b0")


def forward_b0(model: MixTransformer) -> list[torch.Tensor]:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(1, 3, 64, 96))


def test_model_keys_equal_nvlabs_layout():
    for variant in ("mit_b0", "mit_tiny"):
        expected = {k: s for k, s in nvlabs_shapes(variant).items() if not k.startswith("head.")}
        model = MixTransformer(variant)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_nvlabs_checkpoint_loads_fully(tmp_path: Path, b0_sd):
    path = tmp_path / "mit_b0.pth"
    torch.save(b0_sd, path)
    model = MixTransformer("mit_b0")
    report = load_backbone_weights(model, path)
    assert report.layout == "nvlabs"
    assert report.missing == [] and report.unexpected == []
    assert report.ignored == ["head.bias", "head.weight"]
    assert report.loaded == len(b0_sd) - 2 == 176
    sd = model.state_dict()
    for key in (
        "patch_embed1.proj.weight",
        "block2.1.attn.kv.weight",
        "block3.0.attn.sr.bias",
        "block4.1.mlp.dwconv.dwconv.weight",
        "norm4.bias",
    ):
        assert torch.equal(sd[key], b0_sd[key]), key


@pytest.mark.parametrize("wrap", ["state_dict", "model", "backbone_prefix"])
def test_nvlabs_wrappers(tmp_path: Path, b0_sd, wrap):
    if wrap == "backbone_prefix":
        obj = {
            "state_dict": {
                **{f"backbone.{k}": v for k, v in b0_sd.items()},
                "decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1),
            },
            "meta": {"iter": 3},
        }
    else:
        obj = {wrap: b0_sd}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    model = MixTransformer("mit_b0")
    report = load_backbone_weights(model, path, strict=True)
    assert report.complete
    assert torch.equal(
        model.state_dict()["block1.0.attn.q.weight"], b0_sd["block1.0.attn.q.weight"]
    )


def test_remap_nvlabs_is_identity_without_head(b0_sd):
    out = remap_nvlabs_mit({"model": b0_sd})
    assert set(out) == set(b0_sd) - {"head.weight", "head.bias"}


def test_hf_names_and_kv_split(b0_sd):
    hf = to_hf_mit(b0_sd)
    p = "segformer.encoder."
    c = 160
    assert hf[f"{p}patch_embeddings.0.proj.weight"] is b0_sd["patch_embed1.proj.weight"]
    assert f"{p}patch_embeddings.3.layer_norm.bias" in hf
    assert f"{p}block.2.1.attention.self.sr.weight" in hf
    assert f"{p}block.2.1.attention.self.layer_norm.weight" in hf
    assert f"{p}block.0.0.attention.output.dense.weight" in hf
    assert f"{p}block.1.1.layer_norm_2.weight" in hf
    assert f"{p}block.3.0.mlp.dense1.weight" in hf and f"{p}block.3.0.mlp.dwconv.dwconv.bias" in hf
    assert f"{p}layer_norm.3.bias" in hf
    assert "classifier.weight" in hf
    kv = b0_sd["block3.1.attn.kv.weight"]
    torch.testing.assert_close(hf[f"{p}block.2.1.attention.self.key.weight"], kv[:c])
    torch.testing.assert_close(hf[f"{p}block.2.1.attention.self.value.weight"], kv[c:])
    assert not any(".kv." in k or "attn" in k for k in hf)
    assert detect_layout(hf) == "hf"
    assert detect_layout(b0_sd) == "nvlabs"


@pytest.mark.parametrize("prefix", ["segformer.encoder.", "encoder."])
def test_hf_round_trip(b0_sd, prefix):
    back = remap_hf_mit(to_hf_mit(b0_sd, prefix=prefix))
    expected = {k: v for k, v in b0_sd.items() if not k.startswith("head.")}
    assert set(back) == set(expected)
    for k in expected:
        assert torch.equal(back[k], expected[k]), k


@pytest.mark.parametrize(
    "suffix",
    [
        ".bin",
        ".pth",
        ".safetensors",  # safetensors is a dependency of udaseg
    ],
)
def test_hf_file_loads_to_identical_model(tmp_path: Path, b0_sd, suffix):
    nv_path = tmp_path / "mit_b0.pth"
    torch.save(b0_sd, nv_path)
    ref = MixTransformer("mit_b0")
    load_backbone_weights(ref, nv_path, strict=True)

    hf = to_hf_mit(b0_sd)
    hf["decode_head.classifier.weight"] = torch.zeros(19, 256, 1, 1)  # full-segmentor HF file
    hf_path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in hf.items()}, str(hf_path))
    else:
        torch.save(hf, hf_path)
    model = MixTransformer("mit_b0")
    report = load_backbone_weights(model, hf_path)
    assert report.layout == "hf"
    assert report.complete
    assert report.ignored == [
        "classifier.bias",
        "classifier.weight",
        "decode_head.classifier.weight",
    ]
    for a, b in zip(forward_b0(ref), forward_b0(model), strict=True):
        assert torch.equal(a, b)


def test_safetensors_missing_gives_install_hint(tmp_path: Path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_backbone_weights(MixTransformer("mit_tiny"), path)


def test_wrong_variant_raises_with_shapes(tmp_path: Path):
    path = tmp_path / "mit_b2.pth"
    torch.save({k: torch.zeros(s) for k, s in nvlabs_shapes("mit_b2").items()}, path)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(MixTransformer("mit_b0"), path)
    msg = str(err.value)
    assert str(path) in msg
    assert "patch_embed1.proj.weight" in msg
    assert "(64, 3, 7, 7)" in msg and "(32, 3, 7, 7)" in msg
    assert "checkpoint is for mit_b2 but the model is mit_b0" in msg


def test_guess_variant(b0_sd):
    assert guess_mit_variant(b0_sd) == "mit_b0"
    assert guess_mit_variant({}) is None


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope" / "mit_b5.pth"
    with pytest.raises(FileNotFoundError, match="mit_b5.pth"):
        load_backbone_weights(MixTransformer("mit_tiny"), path)
    with pytest.raises(FileNotFoundError, match="mit_b5.pth"):
        build_segmentor("mit_tiny", pretrained=str(path))


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path: Path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": NotATensor()}, path)
    with pytest.raises(ValueError, match="unsafe.pth.*weights_only=True"):
        load_backbone_weights(MixTransformer("mit_tiny"), path)


def test_garbage_file_is_reported(tmp_path: Path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.bin"):
        load_backbone_weights(MixTransformer("mit_tiny"), path)


def test_unknown_layout(tmp_path: Path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="other.pth.*layout"):
        load_backbone_weights(MixTransformer("mit_tiny"), path)


def test_missing_keys_reported_and_strict(tmp_path: Path, b0_sd):
    partial = dict(b0_sd)
    del partial["block2.0.attn.q.weight"]
    partial["block9.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    report = load_backbone_weights(MixTransformer("mit_b0"), path)
    assert report.missing == ["block2.0.attn.q.weight"]
    assert report.unexpected == ["block9.0.extra.weight"]
    with pytest.raises(ValueError, match="1 missing keys"):
        load_backbone_weights(MixTransformer("mit_b0"), path, strict=True)


def test_build_segmentor_pretrained(tmp_path: Path, b0_sd):
    path = tmp_path / "mit_b0.pth"
    torch.save(b0_sd, path)
    model = build_segmentor("mit_b0", pretrained=str(path))
    assert torch.equal(model.backbone.norm2.weight, b0_sd["norm2.weight"])
