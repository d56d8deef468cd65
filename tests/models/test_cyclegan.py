"""CycleGAN ResNet-9 generator: upstream key names and shapes, strict loading, loud errors.

The expected state dict below is written out from pytorch-CycleGAN-and-pix2pix's
``ResnetGenerator`` layer order (as in ``XiaRho/CMDA:mmseg/models/cyclegan/cyclegan_model.py``,
``define_G`` defaults: 1 -> 1 channels, ngf 64, 9 blocks, instance norm without affine), not
taken from our module, so a renamed layer fails here. No file is downloaded.
"""

import pytest
import torch

from udaseg.errors import CheckpointError
from udaseg.models.cyclegan import ResnetGenerator, generator_shape_of, load_cyclegan_generator


def upstream_state_shapes(in_nc=1, out_nc=1, ngf=64, n_blocks=9):
    """{key: shape} of upstream ``ResnetGenerator(in_nc, out_nc, ngf, InstanceNorm, n_blocks)``."""
    shapes = {"model.1.weight": (ngf, in_nc, 7, 7), "model.1.bias": (ngf,)}
    shapes.update({"model.4.weight": (2 * ngf, ngf, 3, 3), "model.4.bias": (2 * ngf,)})
    shapes.update({"model.7.weight": (4 * ngf, 2 * ngf, 3, 3), "model.7.bias": (4 * ngf,)})
    for i in range(10, 10 + n_blocks):
        for j in (1, 5):
            shapes[f"model.{i}.conv_block.{j}.weight"] = (4 * ngf, 4 * ngf, 3, 3)
            shapes[f"model.{i}.conv_block.{j}.bias"] = (4 * ngf,)
    up = 10 + n_blocks  # ConvTranspose2d weights are (in, out, k, k)
    shapes.update({f"model.{up}.weight": (4 * ngf, 2 * ngf, 3, 3), f"model.{up}.bias": (2 * ngf,)})
    shapes.update({f"model.{up + 3}.weight": (2 * ngf, ngf, 3, 3), f"model.{up + 3}.bias": (ngf,)})
    last = up + 7
    shapes.update({f"model.{last}.weight": (out_nc, ngf, 7, 7), f"model.{last}.bias": (out_nc,)})
    return shapes


def fake_checkpoint(tmp_path, name="cityscapes_ICD_to_dsec_EN.pth", **kw):
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in upstream_state_shapes(**kw).items()}
    path = tmp_path / name
    torch.save(sd, path)
    return path, sd


def test_key_names_and_shapes_are_upstreams():
    own = {k: tuple(v.shape) for k, v in ResnetGenerator().state_dict().items()}
    assert own == upstream_state_shapes()
    assert "model.26.weight" in own and len(own) == 48  # no InstanceNorm parameters or buffers


def expected_params(in_nc, out_nc, ngf=64, n_blocks=9):
    first = ngf * in_nc * 49 + ngf
    down = (2 * ngf * ngf * 9 + 2 * ngf) + (4 * ngf * 2 * ngf * 9 + 4 * ngf)
    blocks = n_blocks * 2 * (4 * ngf * 4 * ngf * 9 + 4 * ngf)
    up = (4 * ngf * 2 * ngf * 9 + 2 * ngf) + (2 * ngf * ngf * 9 + ngf)
    last = out_nc * ngf * 49 + out_nc
    return first + down + blocks + up + last


def test_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert expected_params(3, 3) == 11_378_179  # the standard 3 -> 3 ResNet-9 generator
    assert count(ResnetGenerator(3, 3)) == 11_378_179
    assert count(ResnetGenerator()) == expected_params(1, 1) == 11_365_633  # CMDA's 1 -> 1


def test_forward_shape_range_and_norm():
    net = ResnetGenerator(base_channels=8, num_blocks=2).eval()
    x = torch.rand(2, 1, 36, 52) * 2 - 1
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 1, 36, 52) and y.min() >= -1 and y.max() <= 1
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(not m.affine and not m.track_running_stats for m in norms)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.zeros(1, 3, 8, 8))


def test_released_layout_loads_strictly_and_frozen(tmp_path):
    path, sd = fake_checkpoint(tmp_path)
    net = load_cyclegan_generator(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        y = net(torch.zeros(1, 1, 16, 16))
    assert y.shape == (1, 1, 16, 16) and torch.isfinite(y).all()


def test_dataparallel_prefix_is_accepted(tmp_path):
    _, sd = fake_checkpoint(tmp_path)
    path = tmp_path / "dp.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    assert isinstance(load_cyclegan_generator(path), ResnetGenerator)


def test_wrong_channels_names_key_and_shapes(tmp_path):
    path, _ = fake_checkpoint(tmp_path, name="rgb.pth", in_nc=3, out_nc=3)
    with pytest.raises(CheckpointError) as e:
        load_cyclegan_generator(path)
    msg = str(e.value)
    assert "rgb.pth" in msg and "'model.1.weight'" in msg
    assert "(64, 3, 7, 7)" in msg and "(64, 1, 7, 7)" in msg and "in=3, out=3" in msg
    assert load_cyclegan_generator(path, in_channels=3, out_channels=3).in_channels == 3


def test_six_block_generator_reports_missing_keys(tmp_path):
    path, _ = fake_checkpoint(tmp_path, name="r6.pth", n_blocks=6)
    with pytest.raises(CheckpointError, match="blocks=6"):
        load_cyclegan_generator(path)
    assert generator_shape_of(torch.load(path, weights_only=True))["num_blocks"] == 6


def test_missing_and_extra_keys_are_named(tmp_path):
    _, sd = fake_checkpoint(tmp_path)
    sd = dict(sd)
    del sd["model.26.bias"]
    sd["model.2.running_mean"] = torch.zeros(64)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_cyclegan_generator(path)
    msg = str(e.value)
    assert "model.26.bias" in msg and "model.2.running_mean" in msg and "PyTorch < 0.4" in msg


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_cyclegan_generator(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_cyclegan_generator(bad)
