"""Source/target pairs processed by one joint pipeline, so each can be stylised towards the other.

CISS (spec ``ciss_cmda_spec.md`` 1.2, 1.3; Sakaridis et al., TPAMI 2025,
https://arxiv.org/abs/2305.17349) stylises the source image towards the paired target image and
vice versa inside the data loader. The stylisation needs both images at once, so instead of two
independent loaders there is ONE dataset of pairs. Per item:

1. pick the pair: without RCS, index i -> source i // N_t, target i % N_t (length N_s * N_t, as
   the reference's "dual" dataset); with RCS, the source (class c and file) comes from the
   :class:`~udaseg.data.rcs.RareClassDataset` sampler and the target is drawn uniformly by this
   dataset's own generator (checkpointable, :meth:`PairedDataset.state_dict`); the index is ignored;
2. load both; per domain the part of its train pipeline before the crop
   (:meth:`PipelineConfig.train_stages`: [PL-crop mask,] Resize to the domain's scale);
3. central crop both to the common size (:func:`~udaseg.data.stylize.center_crop_size`;
   CISS: 1024 x 1920) on every view, so the two FDA spectra have the same size;
4. stylise from the ORIGINAL (resized, centrally cropped, un-normalised 0..255) images:
   ``source["stylized"]`` = source in target style, ``target["stylized"]`` = target in source
   style (:func:`~udaseg.data.stylize.stylize_pair`). Reinhard stylises before step 3 (it needs no
   equal sizes, spec 1.5) and is only cropped when ``common_size`` is given;
5. per domain independently the rest of its pipeline: RandomCrop (source with ``cat_max_ratio``
   and, with RCS, re-drawn until the crop holds enough pixels of c), RandomFlip, Normalize (image
   AND stylized), Pad. ``stylized`` is one more view of the sample, so it gets exactly the same
   crop and flip as ``image`` (pixel-aligned) and the same mean/std normalisation.

Each item is ``{"source": sample, "target": sample}``; the default collate turns a list of them
into the training batch ``{"source": batch, "target": batch}`` of the UDA loop, with
``batch[d]["stylized"]`` a (B, 3, H, W) float tensor next to ``batch[d]["image"]``.

The datasets' own ``transform`` is not used (the pipelines are given as :class:`PipelineConfig`).
In training the pair draws and the random crops/flips come from the per-position generators of
:class:`udaseg.data.stream.SampleStream` (:meth:`PairedDataset.get`); used on its own the
dataset draws from its own numpy generators (:meth:`PairedDataset.seed_worker`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets.base import SegmentationDataset
from .rcs import RareClassDataset
from .stylize import StylizeConfig, center_crop_size, stylize_pair
from .transforms import CenterCrop, PipelineConfig, Sample, _hw

#: last entropy word of the target generator's seed, so it never equals the RCS stream
_TARGET_STREAM = 0x7A26E7


def _target_rng(base_seed: int, rank: int = 0, worker_id: int = 0) -> np.random.Generator:
    entropy = [int(base_seed), int(rank), int(worker_id), _TARGET_STREAM]
    if min(entropy) < 0:
        raise ValueError(f"seed_worker: seeds must be >= 0, got {entropy[:3]}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


class PairedDataset(Dataset):
    """Pairs of (source, target) samples with stylised views (module docstring).

    Args:
        source: the labelled source split (its ``transform`` is ignored).
        target: the unlabelled target split (its ``transform`` is ignored).
        stylize: which stylisation, common size and directions.
        source_pipeline / target_pipeline: each domain's train pipeline.
        rcs: rare class sampling of the source: a :class:`RareClassDataset` over ``source``
            (its class/file generator draws the source; None = index pairing).
        seed: seed of the target generator used with RCS.
    """

    def __init__(
        self,
        source: SegmentationDataset,
        target: SegmentationDataset,
        stylize: StylizeConfig,
        source_pipeline: PipelineConfig,
        target_pipeline: PipelineConfig,
        rcs: RareClassDataset | None = None,
        seed: int = 0,
    ):
        if rcs is not None and rcs.source is not source:
            raise ValueError(
                "PairedDataset: rcs must be a RareClassDataset over the same source split"
            )
        self.source = source
        self.target = target
        self.stylize = stylize
        self.rcs = rcs
        self.source_before, self.source_after = source_pipeline.train_stages()
        self.target_before, self.target_after = target_pipeline.train_stages()
        self._rng = _target_rng(seed)

    def __len__(self) -> int:
        return len(self.source) * len(self.target)

    def pair(self, idx: int, rng: np.random.Generator | None = None) -> tuple[int | None, int, int]:
        """(RCS class or None, source index, target index) of item ``idx``; with RCS the draws
        come from ``rng`` (default: the dataset's own generators)."""
        if self.rcs is not None:
            c, si = self.rcs.draw(rng)
            return c, si, int((self._rng if rng is None else rng).integers(len(self.target)))
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"PairedDataset index {idx} out of range for length {n}")
        si, ti = divmod(idx % n, len(self.target))
        return None, si, ti

    def stylize_views(self, src: Sample, trg: Sample) -> tuple[Sample, Sample]:
        """Steps 3-4: central crop to the common size and add the ``stylized`` views."""
        cfg = self.stylize
        size = center_crop_size(cfg, _hw(src), _hw(trg))
        crop = CenterCrop(size) if size is not None else None
        crop_first = cfg.method == "fda"
        if crop is not None and crop_first:
            src, trg = crop(src), crop(trg)
        s_sty, t_sty = stylize_pair(src["image"], trg["image"], cfg)
        if s_sty is not None:
            src["stylized"] = s_sty
        if t_sty is not None:
            trg["stylized"] = t_sty
        if crop is not None and not crop_first:
            src, trg = crop(src), crop(trg)
        return src, trg

    def __getitem__(self, idx: int) -> dict[str, Sample]:
        return self.get(idx)

    def get(self, idx: int, rng: np.random.Generator | None = None) -> dict[str, Sample]:
        """Item ``idx`` with its pair draws from ``rng`` (see :class:`udaseg.data.stream.SampleStream`)."""
        c, si, ti = self.pair(idx, rng)
        src = self.source_before(self.source.load(si))
        trg = self.target_before(self.target.load(ti))
        src, trg = self.stylize_views(src, trg)
        if self.rcs is not None:
            src = self.rcs.transform_with_retries(src, c, self.source_after)
            src["rcs_class"] = torch.tensor(c, dtype=torch.int64)
        else:
            src = self.source_after(src)
        trg = self.target_after(trg)
        return {"source": src, "target": trg}

    # ---- generator state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"target": <target generator>, "rcs": <RCS generator>}`` (``rcs`` only with RCS)."""
        state = {"target": {"bit_generator": self._rng.bit_generator.state}}
        if self.rcs is not None:
            state["rcs"] = self.rcs.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        bg = state.get("target", {}).get("bit_generator") if isinstance(state, dict) else None
        kind = type(self._rng.bit_generator).__name__
        if not isinstance(bg, dict) or bg.get("bit_generator") != kind:
            raise ValueError(
                "PairedDataset.load_state_dict: expected {'target': {'bit_generator': <numpy "
                f"{kind} state>}}, ...}}, got {state!r:.200}"
            )
        self._rng.bit_generator.state = bg
        if self.rcs is not None and "rcs" in state:
            self.rcs.load_state_dict(state["rcs"])

    def seed_worker(self, worker_id: int, rank: int = 0, base_seed: int | None = 0) -> None:
        """One stream per (base_seed, rank, worker) for the RCS draws and the target draws; usable
        as ``worker_init_fn`` (see :meth:`RareClassDataset.seed_worker`)."""
        base = torch.initial_seed() if base_seed is None else int(base_seed)
        if self.rcs is not None:
            self.rcs.seed_worker(worker_id, rank=rank, base_seed=base)
        self._rng = _target_rng(base, rank, worker_id)
