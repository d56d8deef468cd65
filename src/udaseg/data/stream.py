"""Training data as a deterministic stream: sample ``p`` is a pure function of (seed, rank, p).

Training is counted in iterations, so the training loader reads positions ``p = 0, 1, 2, ...`` of
an endless stream (batch ``t`` holds positions ``t B .. t B + B - 1``). For position ``p``:

* the dataset index is ``perm_k[p mod N]`` with ``k = p div N`` and ``perm_k`` a permutation of
  the N items drawn from a generator seeded by (seed, rank, k): every item once per pass, a new
  order each pass (what a shuffled loader does);
* every random draw of the sample (RCS class and file, the paired target, random crop, flip)
  comes from generators seeded by (seed, rank, p): the numpy generator handed to datasets that
  accept one (``get(index, rng)``), and torch's CPU generator, forked for the call, for the
  transforms.

Hence resuming at iteration t only needs ``t`` (the checkpoint's ``global_step``): the loader
restarts at position ``t B`` and yields exactly the samples the uninterrupted run would have
seen, with any number of workers (no per-worker generator state to save), and every DDP rank
reads its own stream (the rank is part of the seed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

#: distinguishes the permutation generator from the per-sample generators
_PERM_TAG = 0x5EED_BEEF


def _seed_sequence(*words: int) -> np.random.SeedSequence:
    if min(words) < 0:
        raise ValueError(f"stream seeds must be >= 0, got {words}")
    return np.random.SeedSequence([int(w) for w in words])


class SampleStream(Dataset):
    """Wrap ``dataset`` so that item ``p`` is stream position ``p`` (module docstring).

    Args:
        dataset: a map-style dataset; if it has ``get(index, rng)``, it receives the position's
            numpy generator (RCS and paired datasets draw with it), else ``dataset[index]``.
        seed: the stream seed (the data module's seed, plus a domain offset).
        rank: the distributed rank (each rank reads its own stream).
    """

    def __init__(self, dataset, seed: int = 0, rank: int = 0):
        self.dataset = dataset
        self.seed = int(seed)
        self.rank = int(rank)
        self._n = len(dataset)
        if self._n == 0:
            raise ValueError("SampleStream: the dataset is empty")
        self._perm_pass: int | None = None
        self._perm: list[int] = []

    def __len__(self) -> int:
        return self._n

    def index(self, position: int) -> int:
        """The dataset index read at stream ``position``."""
        k, offset = divmod(int(position), self._n)
        if k != self._perm_pass:
            g = torch.Generator().manual_seed(
                int(_seed_sequence(self.seed, self.rank, k, _PERM_TAG).generate_state(1, np.uint64)[0] >> 1)
            )
            self._perm = torch.randperm(self._n, generator=g).tolist()
            self._perm_pass = k
        return self._perm[offset]

    def rng(self, position: int) -> np.random.Generator:
        """The numpy generator of stream ``position``."""
        return np.random.Generator(np.random.PCG64(_seed_sequence(self.seed, self.rank, int(position))))

    def __getitem__(self, position: int):
        rng = self.rng(position)
        index = self.index(position)
        torch_seed = int(rng.integers(0, 2**63 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            get = getattr(self.dataset, "get", None)
            return get(index, rng) if callable(get) else self.dataset[index]


class StreamSampler(DistributedSampler):
    """Yields stream positions ``start .. stop - 1``.

    It is a :class:`~torch.utils.data.DistributedSampler` only by type, so that Lightning does not
    shard it again under DDP: every rank already reads its own stream (the rank is part of the
    stream seed), so all ranks read the same positions of different streams.

    ``start`` may be a callable, evaluated each time an iterator is created: the training loader
    passes "iterations done x batch size", so however often the trainer re-creates the iterator
    (Lightning does so once after resuming), it continues at the next unread position.
    ``epochs=True`` (epoch-based training) instead makes epoch e read ``e * length ..
    (e+1) * length - 1`` (Lightning calls :meth:`set_epoch`), so epochs do not repeat the stream.
    """

    def __init__(self, start: int | Callable[[], int], stop: int, epochs: bool = False):
        # DistributedSampler.__init__ is not called: no dataset, replicas or shuffling here
        self._start = start
        self.stop = int(stop)
        self.epochs = epochs
        self._epoch = 0

    @property
    def start(self) -> int:
        if self.epochs:
            return self._epoch * self.stop
        return int(self._start()) if callable(self._start) else int(self._start)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self.stop if self.epochs else max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[int]:
        start = self.start
        stop = start + self.stop if self.epochs else self.stop
        return iter(range(start, stop))
