"""Speed switches (``model.speed``, ``--trainer.precision bf16-mixed``) keep the maths, and
the progress bar reads the logged losses only every N iterations."""

import lightning as L
import pytest
import torch

from udaseg.adapt.self_training import DACSConfig
from udaseg.engine.callbacks import ProgressBar
from udaseg.engine.module import SpeedConfig, UDAModule, compile_networks
from udaseg.models.weights import read_safetensors, save_segmentor_weights


def module(speed=None, **kw):
    torch.manual_seed(0)
    return UDAModule(backbone="mit_tiny", head="daformer", head_channels=16, drop_path_rate=0.0,
                     self_training=DACSConfig(), methods={"fd": {}}, speed=speed, **kw)


def batches(size=64):
    g = torch.Generator().manual_seed(0)
    src = {"image": torch.randn(2, 3, size, size, generator=g),
           "label": torch.randint(0, 19, (2, size, size), generator=g)}
    return src, {"image": torch.randn(2, 3, size, size, generator=g)}


def one_step(m, src, tgt):
    torch.manual_seed(1)  # same ClassMix / augmentation draws
    return m.algorithm.step(m.model, src, tgt, 0, lambda loss: loss.backward())


def test_channels_last_gives_the_same_iteration_and_weights_file(tmp_path):
    src, tgt = batches()
    ref = one_step(module(), src, tgt)
    m = module(SpeedConfig(channels_last=True))
    m.configure_model()
    m.configure_model()  # idempotent
    conv = m.model.backbone.patch_embed1.proj.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    feats = m.model.backbone(src["image"])  # a plain NCHW batch from the loader
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    assert all(f.is_contiguous() for f in module().model.backbone(src["image"]))
    got = one_step(m, src, tgt)
    for k in ("src", "mix"):
        assert got[k] == pytest.approx(float(ref[k]), rel=1e-5), k
    assert set(m.state_dict()) == set(module().state_dict())
    path = save_segmentor_weights(m.model.state_dict(), tmp_path / "w.safetensors")
    written = read_safetensors(path)[0]
    assert written.keys() == m.model.state_dict().keys()
    assert all(torch.equal(written[k], v) for k, v in m.model.state_dict().items())


def test_compile_covers_student_teacher_and_fd_copy_and_keeps_keys():
    m = module(SpeedConfig(compile=True, compile_backend="aot_eager"))
    keys = list(m.state_dict())
    n = compile_networks(torch.nn.Module(), m.model)  # nothing of that type in an empty module
    assert n == 0
    m.configure_model()
    compiled = [name for name, sub in m.named_modules() if getattr(sub, "_compiled_call_impl", None)]
    # student backbone + head, teacher backbone + head, FD's ImageNet backbone
    assert sorted(compiled) == sorted([
        "model.backbone", "model.decode_head", "algorithm.teacher.model.backbone",
        "algorithm.teacher.model.decode_head", "algorithm.hook_modules.0.imnet_backbone"])
    assert list(m.state_dict()) == keys  # no "_orig_mod." prefixes
    x = batches(32)[0]["image"]
    eager = module()
    m.eval(), eager.eval()  # (dropout in the head)
    with torch.no_grad():
        assert torch.allclose(m(x), eager(x), atol=1e-5)


def test_bf16_autocast_keeps_losses_and_pseudo_label_statistics_in_fp32():
    src, tgt = batches()
    ref = one_step(module(), src, tgt)
    m = module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.model(src["image"])
        got = one_step(m, src, tgt)
    assert out.logits.dtype == torch.bfloat16  # the networks do run in bf16
    assert all(v.dtype == torch.float32 for v in got.values())
    assert got["src"] == pytest.approx(float(ref["src"]), rel=0.02)
    assert got["mix"] == pytest.approx(float(ref["mix"]), rel=0.05)


class Counting(ProgressBar):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.reads: list[int] = []

    def get_metrics(self, trainer, pl_module):
        before = self._shown
        out = super().get_metrics(trainer, pl_module)
        if out is not before:
            self.reads.append(trainer.global_step)
        return out


def test_progress_bar_reads_logged_losses_every_n_iterations(tiny_cityscapes, tmp_path):
    from tests.engine.test_resume import make

    L.seed_everything(0)
    m, dm = make(tiny_cityscapes, tmp_path)
    dm.val_specs = {}
    bar = Counting(metrics_every=3)
    t = L.Trainer(accelerator="cpu", max_steps=7, logger=False, callbacks=[bar],
                  enable_checkpointing=False, enable_model_summary=False,
                  limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                  precision="bf16-mixed")
    t.fit(m, datamodule=dm)
    assert t.global_step == 7
    training_reads = [s for s in bar.reads if 0 < s < 7]
    assert training_reads == [1, 3, 6]  # the first, then every third iteration
    assert {"src", "mix"} <= set(bar._shown)  # shown from the logged values
    # nothing is logged with prog_bar, which Lightning would read on the host every iteration
    assert not any(k.startswith("train/") for k in t.progress_bar_metrics)
    assert "train/src" in t.callback_metrics
    with pytest.raises(ValueError, match="metrics_every"):
        ProgressBar(metrics_every=0)


def test_batched_slide_windows_give_the_same_logits():
    from udaseg.engine.module import InferenceConfig

    m = UDAModule(backbone="mit_tiny", head="daformer", head_channels=16, drop_path_rate=0.0,
                  inference=InferenceConfig(mode="slide", crop=(32, 32), stride=(16, 16))).eval()
    x = batches(64)[0]["image"]
    with torch.no_grad():
        one = m.predict_logits(x, out_size=(64, 64))
        m.inference_cfg.batch_windows = None  # all 9 windows in one call
        calls = []
        hook = m.model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
        together = m.predict_logits(x, out_size=(64, 64))
        hook.remove()
    assert calls == [2 * 9]  # 2 images x 9 windows in one call
    assert torch.allclose(one, together, atol=1e-5)


def test_loaders_pin_memory_only_for_cuda(tiny_cityscapes, tmp_path):
    from types import SimpleNamespace

    from tests.engine.test_resume import make

    _, dm = make(tiny_cityscapes, tmp_path)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                 max_steps=2, global_step=0)
    assert dm._pin() is False
    dm.trainer.strategy.root_device = torch.device("cuda", 0)
    assert dm._pin() is True
    dm.pin_memory = False
    assert dm._pin() is False
