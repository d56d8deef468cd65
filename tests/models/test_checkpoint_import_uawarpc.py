"""``udaseg convert`` on Refign's UAWarpC aligner (udaseg.models.checkpoint_import.aligner).

The fake checkpoints are built from ``UAWarpC().state_dict()`` / ``VGG16Features().state_dict()``
key names and shapes (the upstream module tree) with distinct random values, under the Lightning
prefixes of Refign's ``AlignmentModel`` (``alignment_head.*``, ``alignment_backbone.*``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.test_checkpoint_import_refign import hrda_star_checkpoint
from udaseg.errors import CheckpointError
from udaseg.models.alignment.uawarpc import UAWarpC, UAWarpCAligner
from udaseg.models.alignment.vgg import VGG16Features
from udaseg.models.checkpoint_import import (
    ALIGNER_FORMAT,
    UnsupportedCheckpointError,
    convert_aligner,
    convert_main,
    detect_format,
    import_aligner,
    import_checkpoint,
    read_checkpoint,
)


def randomized(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 1000, (), generator=g, dtype=v.dtype)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = 0.05 * torch.randn(v.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def weights():
    head = randomized(UAWarpC().state_dict(), 1)
    vgg = randomized(VGG16Features().state_dict(), 2)
    vgg["features.28.weight"] = torch.randn(512, 512, 3, 3)  # conv5_3 of the full torchvision VGG
    vgg["features.28.bias"] = torch.randn(512)
    return head, vgg


def alignment_model_checkpoint(head, vgg, with_vgg=True):
    """A Lightning checkpoint of Refign's AlignmentModel (uawarpc_megadepth.ckpt layout)."""
    sd = {f"alignment_head.{k}": v for k, v in head.items()}
    if with_vgg:
        sd.update({f"alignment_backbone.{k}": v for k, v in vgg.items()})
    return {"epoch": 40, "global_step": 400000, "pytorch-lightning_version": "1.5.10",
            "state_dict": sd}


def assert_aligner_holds(aligner: UAWarpCAligner, head, vgg) -> None:
    own = aligner.alignment_head.state_dict()
    assert set(own) == set(head)
    for k, v in head.items():
        assert torch.equal(own[k], v), k
    for k, v in aligner.alignment_backbone.state_dict().items():
        assert torch.equal(v, vgg[k]), k


def test_uawarpc_checkpoint_converts_for_from_files(tmp_path: Path, weights, capsys):
    head, vgg = weights
    src, dst = tmp_path / "uawarpc_megadepth.ckpt", tmp_path / "uawarpc.safetensors"
    torch.save(alignment_model_checkpoint(head, vgg), src)

    assert convert_main([str(src), str(dst)]) == 0  # picked automatically
    out = capsys.readouterr().out
    assert "UAWarpCAligner" in out and "36.8 PCK-5" in out and "(N >= 24) (2 tensors)" in out
    raw = read_checkpoint(dst)
    assert raw.metadata["udaseg_format"] == ALIGNER_FORMAT and raw.metadata["vgg"] == "1"
    ref = UAWarpC().state_dict()
    got = {k[len("alignment_head."):]: v for k, v in raw.tensors.items()
           if k.startswith("alignment_head.")}
    shapes = {k: tuple(v.shape) for k, v in got.items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.items()}
    assert not any(k.startswith("alignment_backbone.features.28") for k in raw.tensors)

    aligner = UAWarpCAligner.from_files(dst)  # VGG16 from the file
    assert_aligner_holds(aligner, head, vgg)
    direct = UAWarpCAligner.from_files(src)  # the source itself (tensors-only fake)
    trg, refimg = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    a, b = aligner(trg, refimg), direct(trg, refimg)
    torch.testing.assert_close(a.flow, b.flow, rtol=0, atol=0)
    torch.testing.assert_close(a.certainty, b.certainty, rtol=0, atol=0)

    # our own output is recognised as an aligner file and converts again (e.g. to .pt)
    assert detect_format(raw) == "refign-uawarpc"
    assert convert_main([str(dst), str(tmp_path / "again.pt")]) == 0
    assert_aligner_holds(UAWarpCAligner.from_files(tmp_path / "again.pt"), head, vgg)

    # as a segmentor it is still refused, with the way to convert it
    with pytest.raises(UnsupportedCheckpointError, match="UAWarpCAligner.from_files"):
        import_checkpoint(src)


def test_full_refign_checkpoint_with_what_aligner(tmp_path: Path, weights):
    head, vgg = weights
    ckpt = hrda_star_checkpoint()[0]
    for k in [k for k in ckpt["state_dict"] if k.startswith("alignment_")]:
        del ckpt["state_dict"][k]
    ckpt["state_dict"].update(alignment_model_checkpoint(head, vgg)["state_dict"])
    src = tmp_path / "refign_hrda_star.ckpt"
    torch.save(ckpt, src)

    dst = tmp_path / "aligner.pt"
    assert convert_main([str(src), str(dst), "--what", "aligner"]) == 0
    assert_aligner_holds(UAWarpCAligner.from_files(dst), head, vgg)
    report = import_aligner(src).report
    assert report.format == "lightning-refign" and report.unexpected == []
    assert "segmentation networks" in report.dropped
    # without --what the same file converts to the segmentor, dropping the aligner
    seg = import_checkpoint(src).report
    assert seg.target == "HRDASegmentor"
    assert "alignment_backbone.*, alignment_head.*" in seg.dropped
    # the aligner is a single frozen copy
    assert convert_main([str(src), str(tmp_path / "t.pt"), "--what", "aligner",
                         "--which", "teacher"]) == 1
    assert not (tmp_path / "t.pt").exists()
    # a segmentor cannot be written as .pt
    assert convert_main([str(src), str(tmp_path / "seg.pt")]) == 1


def test_aligner_errors_name_keys_and_shapes(tmp_path: Path, weights, capsys):
    head, vgg = weights
    ckpt = alignment_model_checkpoint(head, vgg, with_vgg=False)
    key = next(k for k in head if k.endswith("conv.weight"))
    ckpt["state_dict"][f"alignment_head.{key}"] = torch.randn(3, 3, 1, 1)
    src = tmp_path / "broken.ckpt"
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError, match=rf"shape mismatches.*{key}.*\(3, 3, 1, 1\)"):
        import_aligner(src)
    assert convert_main([str(src), str(tmp_path / "x.safetensors")]) == 1
    assert key in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()

    ckpt = alignment_model_checkpoint(head, vgg, with_vgg=False)
    del ckpt["state_dict"][f"alignment_head.{key}"]
    ckpt["state_dict"]["alignment_head.decoder9.conv.weight"] = torch.randn(2)
    torch.save(ckpt, src)
    with pytest.raises(CheckpointError, match=rf"missing.*{key}.*unexpected.*decoder9"):
        import_aligner(src)

    # no VGG16 in the file: converted with a note; from_files then needs vgg=
    ckpt = alignment_model_checkpoint(head, vgg, with_vgg=False)
    nbt = [k for k in ckpt["state_dict"] if k.endswith("num_batches_tracked")]
    for k in nbt:
        del ckpt["state_dict"][k]
    torch.save(ckpt, src)
    dst = tmp_path / "head_only.safetensors"
    report = convert_aligner(src, dst)
    assert any("vgg16-397923af" in n for n in report.notes)
    assert any("num_batches_tracked" in n for n in report.notes)
    assert read_checkpoint(dst).metadata["vgg"] == "0"
    with pytest.raises(CheckpointError, match="vgg"):
        UAWarpCAligner.from_files(dst)
    # a segmentor checkpoint has no aligner
    seg = tmp_path / "seg.ckpt"
    torch.save({"state_dict": {"backbone.patch_embed1.proj.weight": torch.randn(2, 3, 7, 7),
                               "decode_head.conv_seg.weight": torch.randn(19, 2, 1, 1)}}, seg)
    assert convert_main([str(seg), str(tmp_path / "y.safetensors"), "--what", "aligner"]) == 1
    assert "has no UAWarpC aligner" in capsys.readouterr().err
