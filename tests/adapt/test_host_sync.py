"""The training iteration queues device work without waiting for it: no host synchronisation.

A PyTorch dispatch mode sees every aten operator of one iteration of :meth:`SelfTraining.step`
(EMA update, source pass and FD, teacher pseudo-labels, ClassMix, strong augmentation, mixed
pass and MIC or CISS, both backward passes) and records the operators that read device data on the
host or whose output shape depends on the data: on a GPU each of those waits for the device.
The test runs on the CPU (where nothing waits), so it finds them by operator, not by timing.
On a GPU, ``benchmarks/bench_train_step.py --device cuda --sync-debug`` checks the same with
``torch.cuda.set_sync_debug_mode``.
"""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from udaseg.adapt.self_training import DACSConfig, SelfTraining
from udaseg.catalog import build_methods
from udaseg.models.hrda import HRDAConfig, HRDASegmentor
from udaseg.models.segmentor import build_segmentor

# host reads (.item(), bool(), float(), int()) and data-dependent output shapes
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "is_nonzero", "equal", "bincount", "repeat_interleave",
            # a tensor made from Python data (torch.tensor / as_tensor): a host-to-device copy
            "lift_fresh", "lift_fresh_copy"}
INDEX_OPS = {"index", "index_put", "index_put_"}  # sync when indexed by a boolean mask
# draws made on the host on purpose, from the CPU generator (never from device tensors), and
# constants built once per device and cached
HOST_DRAWS = {"_host_uniform", "_host_randperm", "random_crop_box", "_mean_std"}


class SyncFinder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        syncs = name in SYNC_OPS or (
            name in INDEX_OPS and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
            )
        )
        if syncs:
            frames = traceback.extract_stack()
            if not any(f.name in HOST_DRAWS for f in frames):
                ours = [f for f in frames if "udaseg" in f.filename]
                where = f"{ours[-1].filename.split('src/')[-1]}:{ours[-1].lineno}" if ours else "?"
                self.found.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


def make(hrda: bool, methods: dict):
    torch.manual_seed(0)
    s = build_segmentor("mit_tiny", "daformer", head_channels=16, drop_path_rate=0.1)
    if hrda:
        s = HRDASegmentor(s, HRDAConfig())
    hooks = build_methods(methods, s)
    algo = SelfTraining(s, DACSConfig(), refiners=hooks.refiners, mixer=hooks.mixer,
                        aux_losses=hooks.aux_losses)
    return s, algo


@pytest.mark.parametrize("hrda,methods", [
    (False, {"fd": {"classes": "things"}}),
    (True, {"fd": {"classes": "things"}, "mic": {"block_size": 16}}),
    (True, {"fd": {"views": ["image", "stylized"]}, "ciss": {}}),
])
def test_one_iteration_has_no_host_sync(hrda, methods):
    s, algo = make(hrda, methods)
    g = torch.Generator().manual_seed(0)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "label": torch.randint(0, 19, (2, 64, 64), generator=g)}
    src["label"][:, :8] = 255
    tgt = {"image": torch.randn(2, 3, 64, 64, generator=g),
           "valid_pseudo": torch.ones(2, 64, 64)}
    if "ciss" in methods:  # the data pipeline's stylised views
        src["stylized"] = torch.randn(2, 3, 64, 64, generator=g)
        tgt["stylized"] = torch.randn(2, 3, 64, 64, generator=g)
    finder = SyncFinder()
    for step in range(2):  # step 0 copies the teacher, step 1 averages it
        with finder:
            losses = algo.step(s, src, tgt, step, lambda loss: loss.backward())
    assert set(losses) >= {"src", "mix", "fd"}
    assert finder.found == []


def test_the_finder_sees_a_host_read_and_a_boolean_mask():
    finder = SyncFinder()
    x = torch.randn(8)
    with finder:
        _ = float(x.sum())
        _ = x[x > 0]
        _ = torch.tensor([1.0, 2.0])
    assert any(f.startswith("_local_scalar_dense") for f in finder.found)
    assert any(f.startswith(("index", "nonzero")) for f in finder.found)
    assert any(f.startswith("lift_fresh") for f in finder.found)
