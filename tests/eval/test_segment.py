"""`udaseg segment`: your own images, folders and videos through a trained model.

One tiny model (``mit_tiny`` + SegFormer head, with an EMA teacher that differs from the
student) is saved once per module as a Lightning-style ``.ckpt`` (the state dict and
hyper-parameters of a real :class:`UDAModule`) and as an ``export-weights`` ``.safetensors``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from udaseg.data.classes import palette_array
from udaseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from udaseg.engine.cli import main
from udaseg.eval.inference import slide_inference, whole_inference
from udaseg.eval.segment import collect_inputs

KINDS = ("labelTrainIds", "color", "overlay", "confidence")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(UDAModule, .ckpt, .safetensors, source-only .ckpt without a teacher)."""
    from udaseg.engine.module import UDAModule
    from udaseg.models.segmentor import build_segmentor

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    m = UDAModule(backbone="mit_tiny", head="segformer", head_channels=16, self_training={})
    torch.manual_seed(1)  # a teacher that differs from the student
    other = build_segmentor("mit_tiny", "segformer", num_classes=19, head_channels=16)
    m.algorithm.teacher.model.load_state_dict(other.state_dict())
    m.eval()
    state = m.state_dict()
    assert any(k.startswith("algorithm.teacher.model.") for k in state)
    ckpt = root / "last.ckpt"
    # the layout Lightning writes: the whole module state and the saved hyper-parameters
    torch.save({"state_dict": state, "hyper_parameters": dict(m.hparams), "global_step": 0}, ckpt)
    source_only = root / "source_only.ckpt"
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("algorithm.")},
                "hyper_parameters": dict(m.hparams)}, source_only)
    weights = root / "model.safetensors"
    assert main(["export-weights", str(ckpt), str(weights)]) == 0
    return m, ckpt, weights, source_only


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Mixed sizes and modes, a subfolder, a stem used twice, a tiny image, a corrupt file."""
    root = tmp_path_factory.mktemp("in") / "photos"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    Image.fromarray(rgb(70, 100)).save(root / "street.jpg", quality=90)
    Image.fromarray(rgb(64, 96)).save(root / "street.png")
    Image.fromarray(rng.integers(0, 256, (48, 80), dtype=np.uint8)).save(root / "sub/grey.png")
    Image.fromarray(rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)).save(root / "sub/alpha.png")
    Image.fromarray(rgb(33, 130)).convert("P").save(root / "sub/palette.png")
    Image.fromarray(rgb(20, 24)).save(root / "sub/tiny.png")
    (root / "sub/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


# name in photos -> output name (street.jpg and street.png share a stem, so keep the suffix)
EXPECTED = {
    "street.jpg": "street.jpg.png", "street.png": "street.png.png", "sub/grey.png": "sub/grey.png",
    "sub/alpha.png": "sub/alpha.png", "sub/palette.png": "sub/palette.png",
    "sub/tiny.png": "sub/tiny.png",
}


def as_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def normalised(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def reference(segmentor: torch.nn.Module, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's own whole-image inference: (labels, max softmax)."""
    with torch.no_grad():
        probs = whole_inference(segmentor.eval(), normalised(rgb)).softmax(1)[0]
    conf, labels = probs.max(0)
    return labels.numpy(), conf.numpy()


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_help_lists_segment(capsys):
    assert main(["--help"]) == 0
    assert "\n  segment " in capsys.readouterr().out


def test_folder_outputs_skip_and_overwrite(model_files, photos, tmp_path, capsys):
    m, _, weights, _ = model_files
    out = tmp_path / "out"
    args = ["segment", str(photos), "--ckpt", str(weights), "--out", str(out), "--confidence"]
    assert main([*args, "--batch-size", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    broken = [line for line in err.splitlines() if "broken.jpg" in line]
    assert len(broken) == 1 and str(photos / "sub/broken.jpg") in broken[0]
    pal = palette_array()
    for src, name in EXPECTED.items():
        h, w = as_rgb(photos / src).shape[:2]
        label = read(out / "labelTrainIds" / name)
        assert label.dtype == np.uint8 and label.shape == (h, w), src
        assert label.max() <= 18
        np.testing.assert_array_equal(read(out / "color" / name), pal[label])
        assert read(out / "overlay" / name).shape == (h, w, 3)
        with Image.open(out / "confidence" / name) as im:
            assert im.mode == "I;16"
            conf = np.asarray(im).astype(np.uint16)
        assert conf.shape == (h, w) and conf.min() >= 65535 // 19
        if src != "sub/tiny.png":  # (upscaled for the network: no plain reference)
            ref_label, ref_conf = reference(m.model, as_rgb(photos / src))
            np.testing.assert_array_equal(label, ref_label, err_msg=src)
            assert np.abs(conf.astype(np.int64) - np.rint(ref_conf * 65535)).max() <= 2
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{k}/{n}" for k in KINDS for n in EXPECTED.values())

    # again without --overwrite: nothing is rewritten, and it says so
    files = [p for p in out.rglob("*") if p.is_file()]
    for p in files:
        os.utime(p, ns=(10**9, 10**9))
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipped 6 input(s) whose outputs exist" in printed and "failed 1" in printed
    assert all(p.stat().st_mtime_ns == 10**9 for p in files)
    # a missing output is added, the others kept
    (out / "color/sub/grey.png").unlink()
    assert main([*args, "--quiet"]) == 0
    assert (out / "color/sub/grey.png").exists()
    assert all(p.stat().st_mtime_ns == 10**9 for p in files if p != out / "color/sub/grey.png")
    assert main([*args, "--overwrite", "--quiet"]) == 0
    assert all(p.stat().st_mtime_ns > 10**9 for p in files)


def test_lightning_checkpoint_student_teacher_and_slide(model_files, photos, tmp_path, capsys):
    m, ckpt, weights, source_only = model_files
    inputs = [str(photos / "street.png"), str(photos / "sub/grey.png")]
    labels = {}
    for which, net in (("student", m.model), ("teacher", m.algorithm.teacher.model)):
        out = tmp_path / which
        assert main(["segment", *inputs, "--ckpt", str(ckpt), "--out", str(out), "--weights", which,
                     "--quiet"]) == 0
        labels[which] = [read(out / "labelTrainIds" / n) for n in ("street.png", "sub/grey.png")]
        for path, got in zip(inputs, labels[which]):
            np.testing.assert_array_equal(got, reference(net, as_rgb(Path(path)))[0])
    assert any((a != b).any() for a, b in zip(labels["student"], labels["teacher"]))

    # sliding windows (given on the command line: this checkpoint's inference mode is whole)
    out = tmp_path / "slide"
    assert main(["segment", inputs[0], "--ckpt", str(ckpt), "--out", str(out), "--mode", "slide",
                 "--crop", "32", "48", "--stride", "16", "24", "--quiet"]) == 0
    with torch.no_grad():
        logits = slide_inference(m.model.eval(), normalised(as_rgb(Path(inputs[0]))), (32, 48),
                                 (16, 24), num_classes=19)
    np.testing.assert_array_equal(read(out / "labelTrainIds/street.png"),
                                  logits.argmax(1)[0].numpy())

    # no teacher to load: one clear line, nothing written
    capsys.readouterr()
    for ckpt_file, hint in ((weights, "not the EMA teacher"), (source_only, "no EMA teacher")):
        bad = tmp_path / f"bad_{ckpt_file.stem}"
        assert main(["segment", inputs[0], "--ckpt", str(ckpt_file), "--out", str(bad),
                     "--weights", "teacher"]) == 1
        err = capsys.readouterr().err
        assert hint in err and str(ckpt_file) in err and "Traceback" not in err
        assert not bad.exists()


def test_same_names_in_two_folders_do_not_collide(model_files, tmp_path):
    _, _, weights, _ = model_files
    for folder, value in (("a", 0), ("b", 255)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((32, 40, 3), value, np.uint8)).save(tmp_path / folder / "x.png")
    out = tmp_path / "out"
    items = collect_inputs([tmp_path / "a", tmp_path / "b" / "x.png"], out)
    assert [i.rel.as_posix() for i in items] == ["a/x", "b/x"]
    assert main(["segment", str(tmp_path / "a"), str(tmp_path / "b/x.png"), "--ckpt", str(weights),
                 "--out", str(out), "--quiet"]) == 0
    a, b = (read(out / "overlay" / f / "x.png") for f in ("a", "b"))
    assert not np.array_equal(a, b)
    # the output folder inside an input folder is not read back as input
    assert main(["segment", str(tmp_path), "--ckpt", str(weights), "--out", str(out),
                 "--quiet"]) == 0
    assert not (out / "overlay" / "out").exists()


def test_bad_inputs_are_one_line(model_files, tmp_path, capsys):
    _, _, weights, _ = model_files
    assert main(["segment", str(tmp_path / "nope.png"), "--ckpt", str(weights), "--out",
                 str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "input not found" in err and "nope.png" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["segment", str(tmp_path / "empty"), "--ckpt", str(weights), "--out",
                 str(tmp_path / "o")]) == 1
    assert "no image or video files" in capsys.readouterr().err
    # nothing readable at all: exit status 1, the failure listed
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert main(["segment", str(tmp_path / "junk.png"), "--ckpt", str(weights), "--out",
                 str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "junk.png" in captured.err and "failed 1 input(s)" in captured.out


def test_video_gives_an_overlay_video(model_files, tmp_path, capsys):
    av = pytest.importorskip("av")
    _, _, weights, _ = model_files
    clip = tmp_path / "clips" / "drive.mp4"
    clip.parent.mkdir()
    rng = np.random.default_rng(0)
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 96, 3), np.uint8), "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    (clip.parent / "broken.mov").write_bytes(b"not a video" * 50)
    out = tmp_path / "out"
    assert main(["segment", str(clip.parent), "--ckpt", str(weights), "--out", str(out),
                 "--batch-size", "2", "--quiet"]) == 0
    assert str(clip.parent / "broken.mov") in capsys.readouterr().err
    result = out / "overlay" / "drive.mp4"
    # no temporary file, nothing for the broken file
    assert sorted(p.name for p in result.parent.iterdir()) == ["drive.mp4"]
    with av.open(str(result)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and all(f.shape == (64, 96, 3) for f in frames)


def test_converted_and_hrda_weight_files(model_files, photos, tmp_path):
    """`udaseg convert` outputs (single-scale and HRDA) and HRDA `export-weights` files load
    like the checkpoint they came from; HRDA gets inputs padded to its strides
    (70x100 -> 72x104)."""
    from udaseg.engine.module import UDAModule

    m, ckpt, _, _ = model_files
    image = photos / "street.jpg"  # 70x100: not a multiple of HRDA's stride 8
    converted = tmp_path / "converted.safetensors"
    assert main(["convert", str(ckpt), str(converted)]) == 0
    teacher = tmp_path / "teacher.safetensors"
    assert main(["convert", str(ckpt), str(teacher), "--which", "teacher"]) == 0
    for name, file, extra, net in (("conv", converted, [], m.model),
                                   ("conv_t", teacher, ["--weights", "teacher"],
                                    m.algorithm.teacher.model)):
        assert main(["segment", str(image), "--ckpt", str(file), "--out", str(tmp_path / name),
                     "--quiet", *extra]) == 0
        np.testing.assert_array_equal(read(tmp_path / name / "labelTrainIds/street.png"),
                                      reference(net, as_rgb(image))[0])

    torch.manual_seed(2)
    h = UDAModule(backbone="mit_tiny", head="segformer", head_channels=16,
                  hrda={"context_scale": 0.5})
    hrda_ckpt = tmp_path / "hrda.ckpt"
    torch.save({"state_dict": h.state_dict(), "hyper_parameters": dict(h.hparams)}, hrda_ckpt)
    files = [hrda_ckpt, tmp_path / "hrda_export.safetensors", tmp_path / "hrda_conv.safetensors"]
    assert main(["export-weights", str(hrda_ckpt), str(files[1])]) == 0
    assert main(["convert", str(hrda_ckpt), str(files[2])]) == 0
    labels = []
    for i, file in enumerate(files):
        out = tmp_path / f"hrda{i}"
        assert main(["segment", str(image), "--ckpt", str(file), "--out", str(out), "--quiet"]) == 0
        labels.append(read(out / "labelTrainIds/street.png"))
    assert labels[0].shape == (70, 100)
    np.testing.assert_array_equal(labels[0], labels[1])
    np.testing.assert_array_equal(labels[0], labels[2])
    x = torch.nn.functional.pad(normalised(as_rgb(image)), (0, 4, 0, 2))  # to 72x104
    with torch.no_grad():
        ref = whole_inference(h.model.eval(), x)[:, :, :70, :100].argmax(1)[0].numpy()
    np.testing.assert_array_equal(labels[0], ref)


def test_segment_does_not_import_lightning(model_files, photos, tmp_path):
    import subprocess
    import sys

    _, _, weights, _ = model_files
    code = (
        "import sys; from udaseg.engine.cli import main; "
        f"rc = main(['segment', {str(photos / 'street.png')!r}, '--ckpt', {str(weights)!r}, "
        f"'--out', {str(tmp_path / 'o')!r}, '--quiet']); print(rc, 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["0", "False"]
