"""Reliability: atomic checkpoints, SIGTERM (preemption) checkpoints, NaN/inf losses."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch

from udaseg.engine.callbacks import AtomicCheckpointIO, PreemptionCheckpoint
from udaseg.errors import NonFiniteLossError

from .test_resume import make


def trainer(tmp_path, steps, **kw):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()], **kw,
    )


def test_atomic_checkpoint_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    good = path.read_bytes()

    def crash(obj, f, *a, **k):  # a crash in the middle of writing
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == good  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_loading_refuses_pickled_objects_with_a_clear_message(tmp_path):
    from udaseg.errors import CheckpointError

    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {}, "hparams": object()}, path)
    with pytest.raises(CheckpointError, match=r"(?s)legacy.ckpt.*weights_only=True.*Unsupported global.*udaseg convert"):
        AtomicCheckpointIO().load_checkpoint(path)


class Preempt(L.Callback):
    """Sends this process SIGTERM during iteration ``at`` (as a cluster scheduler would)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny_cityscapes, tiny_dark_zurich, tmp_path):
    L.seed_everything(0)
    module, dm = make(tiny_cityscapes, tiny_dark_zurich)
    previous = signal.getsignal(signal.SIGTERM)
    keeper = PreemptionCheckpoint()
    t = trainer(tmp_path, 6, callbacks=[Preempt(2), keeper])
    with pytest.raises(SystemExit) as exit_info:  # Lightning's SIGTERMException
        t.fit(module, datamodule=dm)
    assert exit_info.value.code in (None, 0)
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    saved = torch.load(keeper.saved, map_location="cpu", weights_only=True)
    assert keeper.saved.name == "last.ckpt" and saved["global_step"] == 2
    # the run continues from it
    module, dm = make(tiny_cityscapes, tiny_dark_zurich)
    t2 = trainer(tmp_path / "resumed", 4)
    t2.fit(module, datamodule=dm, ckpt_path=keeper.saved)
    assert t2.global_step == 4


def poison_once(module, at: int):
    """Make the loss term ``src`` NaN in iteration ``at`` (once)."""
    step = module.algorithm.step
    done = []

    def wrapped(student, source, target, i, backward):
        losses = step(student, source, target, i, backward)
        if i == at and not done:
            done.append(i)
            losses["src"] = torch.tensor(float("nan"))
        return losses

    module.algorithm.step = wrapped


def test_nan_loss_stops_naming_iteration_and_term_without_a_poisoned_checkpoint(
        tiny_cityscapes, tiny_dark_zurich, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module, dm = make(tiny_cityscapes, tiny_dark_zurich)
    poison_once(module, at=2)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: loss term\(s\) src=nan.*nonfinite: skip"):
        trainer(tmp_path, 5, callbacks=[ckpts]).fit(module, datamodule=dm)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]  # nothing after the NaN


def test_nan_flag_is_read_one_iteration_later_and_at_the_end(
        tiny_cityscapes, tiny_dark_zurich, tmp_path):
    """The host reads iteration t's finite flag after queueing iteration t + 1 (no wait on
    the iteration just launched); a NaN in the last iteration is still caught at the end."""
    L.seed_everything(0)
    module, dm = make(tiny_cityscapes, tiny_dark_zurich)
    poison_once(module, at=2)
    t = trainer(tmp_path, 8, enable_checkpointing=False)
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: .* stopped after iteration 3"):
        t.fit(module, datamodule=dm)
    assert t.global_step == 4  # iterations 0..3 ran, not 8

    L.seed_everything(0)
    module, dm = make(tiny_cityscapes, tiny_dark_zurich)
    poison_once(module, at=4)
    with pytest.raises(NonFiniteLossError, match=r"iteration 4: .* at the end of training"):
        trainer(tmp_path, 5, enable_checkpointing=False).fit(module, datamodule=dm)


def test_nan_loss_can_skip_the_update(tiny_cityscapes, tiny_dark_zurich, tmp_path):
    L.seed_everything(0)
    module, dm = make(tiny_cityscapes, tiny_dark_zurich)
    module.hparams.nonfinite = "skip"
    poison_once(module, at=2)
    before = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if trainer.global_step == 2 and not before:
                before.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    t = trainer(tmp_path, 4, callbacks=[Watch()])
    t.fit(module, datamodule=dm)
    assert t.global_step == 4 and module._skipped == 1
    assert all(torch.isfinite(v).all() for v in module.model.state_dict().values())
