"""Two CPU processes (DDP, gloo) train a few DACS iterations with RCS: both ranks end with the
same student and teacher weights, and each rank drew its own data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import lightning as L
    import torch

    sys.path.insert(0, {tests!r})
    from engine.test_resume import make

    out = Path({out!r})
    L.seed_everything(0)
    module, dm = make(Path({cs!r}), Path({dz!r}))
    poison = {poison!r}  # (iteration, rank): a NaN loss there, or None
    if poison is not None:
        step = module.algorithm.step

        def poisoned(student, source, target, i, backward):
            losses = step(student, source, target, i, backward)
            if (i, torch.distributed.get_rank()) == tuple(poison):
                losses["src"] = torch.tensor(float("nan"))
            return losses

        module.algorithm.step = poisoned

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first = self.__dict__.get("first", batch["source"]["image"].clone())

        def on_train_end(self, trainer, pl_module):
            torch.save({{"student": pl_module.model.state_dict(),
                        "teacher": pl_module.algorithm.teacher.state_dict(),
                        "first_batch": self.first}},
                       out / f"rank{{trainer.global_rank}}.pt")

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches={val_batches},
        num_sanity_val_steps=0, default_root_dir=out, callbacks=[Record()],
    )
    try:
        trainer.fit(module, datamodule=dm)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        (out / f"error{{trainer.global_rank}}.txt").write_text(f"{{type(exc).__name__}}: {{exc}}")
''')


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def run_two_ranks(tmp_path, cs, dz, poison=None, timeout=600, val_batches=0):
    tests = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(tests), out=str(tmp_path), cs=str(cs), dz=str(dz),
                                    poison=poison, val_batches=val_batches))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tests.parent / "src"), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_hold_identical_weights(tiny_cityscapes, tiny_dark_zurich, tmp_path):
    # training ends with a validation (one batch per rank), which averages BN statistics
    run_two_ranks(tmp_path, tiny_cityscapes, tiny_dark_zurich, val_batches=1)
    assert not list(tmp_path.glob("error*.txt"))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("student", "teacher"):
        assert r0[part].keys() == r1[part].keys()
        # weights: identical (DDP all-reduces the gradients; the EMA follows identical students);
        # BatchNorm statistics: identical after validation averaged them over the ranks
        assert len(r0[part]) > 100
        assert any(k.endswith(BN_STATS) for k in r0[part])
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    # each rank read its own data stream (RCS must not draw the same crops on every rank)
    assert not torch.equal(r0["first_batch"], r1["first_batch"])
    # the teacher moved away from its initial copy of the student (EMA updates happened)
    assert any(not torch.equal(r0["teacher"][k], r0["student"][k.removeprefix("model.")])
               for k in r0["teacher"] if k.removeprefix("model.") in r0["student"])


def test_a_nan_on_one_rank_stops_both_ranks(tiny_cityscapes, tiny_dark_zurich, tmp_path):
    """Rank 1's loss is NaN in iteration 1: both ranks stop with the error (neither is left
    waiting in a collective for the other), and no rank trained to the end."""
    run_two_ranks(tmp_path, tiny_cityscapes, tiny_dark_zurich, poison=(1, 1), timeout=300)
    errors = {p.name: p.read_text() for p in tmp_path.glob("error*.txt")}
    assert set(errors) == {"error0.txt", "error1.txt"}, errors
    assert "iteration 1: loss term(s) src=nan" in errors["error1.txt"]
    assert "iteration 1: loss term(s) of another process" in errors["error0.txt"]
    assert not list(tmp_path.glob("rank*.pt"))  # on_train_end's record was never reached


def test_bn_statistics_are_averaged_over_processes(tmp_path):
    """Two gloo processes with different BN statistics end with their mean (hand-checkable)."""
    script = tmp_path / "bn.py"
    script.write_text(textwrap.dedent(f'''
        import os, sys
        import torch, torch.distributed as dist
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "src")!r})
        from udaseg.engine.module import average_bn_statistics

        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}",
                                rank=rank, world_size=2)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
        net[1].running_mean.fill_(1.0 + 2 * rank)   # 1 and 3 -> 2
        net[1].running_var.fill_(4.0 * (rank + 1))  # 4 and 8 -> 6
        assert average_bn_statistics(net) == 1
        torch.save({{"mean": net[1].running_mean, "var": net[1].running_var}},
                   {str(tmp_path)!r} + f"/bn{{rank}}.pt")
        dist.destroy_process_group()
    '''))
    procs = [subprocess.Popen([sys.executable, str(script), str(r)]) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for r in (0, 1):
        got = torch.load(tmp_path / f"bn{r}.pt", weights_only=True)
        assert torch.equal(got["mean"], torch.full((2,), 2.0))
        assert torch.equal(got["var"], torch.full((2,), 6.0))
