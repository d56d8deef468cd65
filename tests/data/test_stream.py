"""The training data stream: position p is a pure function of (seed, rank, p)."""

import numpy as np
import torch
from torch.utils.data import Dataset

from udaseg.data.stream import SampleStream, StreamSampler


class Probe(Dataset):
    """Returns its index and one draw from torch's global generator and from the given rng."""

    def __len__(self):
        return 5

    def get(self, index, rng):
        return index, float(torch.rand(())), float(rng.random())


def test_each_pass_is_a_permutation_and_positions_are_pure():
    s = SampleStream(Probe(), seed=3)
    passes = [[s.index(p) for p in range(k * 5, k * 5 + 5)] for k in range(3)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes)
    assert passes[0] != passes[1] or passes[1] != passes[2]  # a new order per pass
    # reading position 7 first, out of order, in a fresh stream gives the same sample
    assert SampleStream(Probe(), seed=3)[7] == s[7]
    assert s[7] != SampleStream(Probe(), seed=3, rank=1)[7]  # ranks read their own streams
    assert s[7] != SampleStream(Probe(), seed=4)[7]


def test_the_global_generator_is_untouched():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    SampleStream(Probe(), seed=0)[2]
    assert torch.equal(torch.get_rng_state(), before)


def test_sampler_start_is_read_when_iterating():
    done = {"steps": 0}
    sampler = StreamSampler(lambda: done["steps"] * 2, 10)
    assert list(sampler) == list(range(10))
    done["steps"] = 3  # e.g. a resumed run at iteration 3 re-creating its iterator
    assert list(sampler) == [6, 7, 8, 9] and len(sampler) == 4
    epochs = StreamSampler(0, 4, epochs=True)
    epochs.set_epoch(2)
    assert list(epochs) == [8, 9, 10, 11]


def test_plain_datasets_are_indexed():
    class Plain(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return i

    s = SampleStream(Plain(), seed=0)
    assert sorted(s[p] for p in range(3)) == [0, 1, 2]
    assert np.isscalar(s[4])
