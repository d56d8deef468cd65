import torch

from udaseg.data.transforms import Normalize, Pad, RandomCrop, RandomFlip, Resize, denormalize


def sample(h=20, w=40):
    img = torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w) % 255
    lab = (torch.arange(h * w).view(h, w) % 19).long()
    return {"image": img, "label": lab, "ref": img.clone(), "name": "x"}


def test_resize_keep_ratio_mmseg_rule():
    # factor = min(long_max/long, short_max/short) = min(1024/2048, 512/1024) = 0.5
    assert Resize((1024, 512)).target_size(1024, 2048) == (512, 1024)
    # GTA 1914x1052 into (1280, 720): min(1280/1914, 720/1052) = 0.6687 -> 1280x704 (spec 4.4)
    assert Resize((1280, 720)).target_size(1052, 1914) == (703, 1280) or Resize((1280, 720)).target_size(
        1052, 1914
    ) == (704, 1280)
    s = Resize((20, 10))(sample())
    assert s["image"].shape == (3, 10, 20) and s["label"].shape == (10, 20)
    assert set(s["label"].unique().tolist()) <= set(range(19))  # nearest keeps label values


def test_resize_keys_keeps_label_resolution():
    s = Resize((20, 10), keys=("image",))(sample())
    assert s["image"].shape == (3, 10, 20) and s["label"].shape == (20, 40)


def test_crop_and_flip_are_joint():
    torch.manual_seed(3)
    s = RandomFlip(1.0)(RandomCrop((8, 16))(sample()))
    assert torch.equal(s["image"], s["ref"])
    top, left, bottom, right = s["crop_box"].tolist()
    full = sample()
    assert torch.equal(s["label"], full["label"][top:bottom, left:right].flip(-1))
    assert bool(s["flipped"])


def test_cat_max_ratio_rejects_single_class_crops():
    s = sample(40, 40)
    s["label"][:] = 0
    s["label"][:, 30:] = 1  # only crops reaching x >= 30 have two classes
    torch.manual_seed(0)
    out = RandomCrop((10, 12), cat_max_ratio=0.75, max_tries=50)(s)
    counts = torch.bincount(out["label"].flatten(), minlength=2)
    assert (counts > 0).sum() == 2 and counts.max() / counts.sum() < 0.75


def test_pad_values():
    s = Pad((24, 44))(sample())
    assert s["image"].shape == (3, 24, 44)
    assert (s["label"][20:] == 255).all() and (s["image"][:, 20:] == 0).all()


def test_normalize_roundtrip():
    s = sample()
    img = s["image"].clone()
    out = Normalize()(s)
    assert torch.equal(denormalize(out["image"]), img.round().to(torch.uint8))


def test_pl_crop_v2_view_follows_the_geometry_and_pads_invalid():
    from udaseg.data.transforms import PipelineConfig, pl_crop_v2_mask

    sample = {"image": torch.zeros(3, 10, 20), "label": torch.zeros(10, 20, dtype=torch.int64)}
    pipe = PipelineConfig(scale=(20, 10), crop_size=(12, 20), flip_prob=1.0,
                          pseudo_label_crop=(1, 2, 3, 4)).train()
    out = pipe(sample)
    expected = torch.zeros(12, 20)
    expected[:10] = pl_crop_v2_mask(10, 20, 1, 2, 3, 4).flip(-1)  # flipped, then padded with 0
    assert torch.equal(out["valid_pseudo"], expected)
    assert out["valid_pseudo"][1:8, 4:17].eq(1).all() and out["label"][10:].eq(255).all()


def test_center_crop_offsets_and_views():
    from udaseg.data.transforms import CenterCrop

    s = sample(20, 40)
    s["stylized"] = s["image"] + 1
    full = sample(20, 40)
    out = CenterCrop((11, 30))(s)  # top = floor(9 / 2) = 4, left = 5
    assert torch.equal(out["image"], full["image"][:, 4:15, 5:35])
    assert torch.equal(out["label"], full["label"][4:15, 5:35])
    assert torch.equal(out["stylized"], full["image"][:, 4:15, 5:35] + 1)
    assert CenterCrop((50, 50))(sample(20, 40))["image"].shape == (3, 20, 40)  # at most the image


def test_normalize_covers_the_stylized_view_and_train_stages_compose_to_train():
    from udaseg.data.transforms import Compose, PipelineConfig

    s = sample()
    s["stylized"] = s["image"].clone()
    out = Normalize()(s)
    assert torch.equal(out["stylized"], out["image"])
    cfg = PipelineConfig(scale=(40, 20), crop_size=(8, 16), cat_max_ratio=0.75,
                         pseudo_label_crop=(1, 1, 1, 1))
    before, after = cfg.train_stages()
    assert [type(t).__name__ for t in before.transforms] == ["AddPseudoLabelCrop", "Resize"]
    names = [type(t).__name__ for t in after.transforms]
    assert names == ["RandomCrop", "RandomFlip", "Normalize", "Pad"]
    assert repr(cfg.train()) == repr(Compose([*before.transforms, *after.transforms]))
    torch.manual_seed(1)
    a = cfg.train()(sample())
    torch.manual_seed(1)
    b = after(before(sample()))
    assert all(torch.equal(a[k], b[k]) for k in ("image", "label", "valid_pseudo", "crop_box"))
