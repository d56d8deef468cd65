"""Alignment on SynthNight: end-point error of dense aligners on the night/day-reference pairs,
against SynthNight's exact flow (:func:`udaseg.data.synthnight.writer.reference_flow`).

For every night image of the chosen splits (train and val by default) the aligner maps the night
image (target) to its day reference; the end-point error ``|F - F_gt|`` (pixels) is taken over
the pixels whose true match lies inside the reference (the shared warp rule on ``F_gt``) and whose
night label is a static class (road .. sky, train IDs 0-10: the traffic is re-drawn in the
reference, so it has no true match). Per aligner and split: mean, median and share < 1 px of the
pooled pixels, mean of the per-pair means, mean certainty and milliseconds per pair (the
aligner's call only, batch 1, after one warm-up pair).

Aligners: ``identity`` (zero flow, Refign's "no alignment" row), ``similarity``
(:class:`~udaseg.models.alignment.similarity.SimilarityAligner`, no weights) and, with
``--uawarpc FILE [--vgg FILE]``, ``uawarpc`` (Refign's network). Images are read from the PNGs of
a SynthNight copy (``--data-dir``; its ``synthnight.json`` gives seed and size) or of a night-only
copy generated into a temporary folder (``--seed``; the night images and references of a copy do
not depend on its day counts or on the event/depth switches).

    python benchmarks/bench_alignment_synthnight.py --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Figure

STATIC_MAX = 10  # Cityscapes train IDs 0..10: road, sidewalk, building .. vegetation, terrain, sky


def synthnight_config(args):
    """The SynthNightConfig of ``--data-dir`` (from its synthnight.json) or of ``--seed``."""
    from udaseg.data.synthnight import SynthNightConfig

    if args.data_dir:
        meta = json.loads((Path(args.data_dir) / "synthnight.json").read_text())
        w, h = meta["size"]
        counts = meta["counts"]
        return SynthNightConfig(
            seed=int(meta["seed"]), width=int(w), height=int(h),
            n_day_train=counts["day_train"], n_day_val=counts["day_val"],
            n_night_train=counts["night_train"], n_night_val=counts["night_val"],
            with_events=meta["with_events"], with_depth=meta["with_depth"],
            with_refs=meta["with_refs"],
        )
    d = SynthNightConfig()

    def count(n: int) -> int:  # generate only what is measured
        return n if args.limit is None else min(n, args.limit)

    return SynthNightConfig(
        seed=args.seed, width=args.width or d.width, height=args.height or d.height,
        n_day_train=0, n_day_val=0,
        n_night_train=count(d.n_night_train) if "night_train" in args.splits else 0,
        n_night_val=count(d.n_night_val) if "night_val" in args.splits else 0,
        with_events=False, with_depth=False,
    )


def night_label(config, split: str, index: int):
    """The night image's label map (rasterised again: train labels are not written)."""
    from udaseg.data.synthnight.scene import rasterize, sample_layout
    from udaseg.data.synthnight.writer import _DYNAMIC, _STATIC, _rng

    layout = sample_layout(_rng(config, split, index, _STATIC), _rng(config, split, index, _DYNAMIC),
                           config.width, config.height)
    return rasterize(layout).label


def build_aligners(args) -> dict:
    from udaseg.models.alignment import IdentityAligner
    from udaseg.models.alignment.similarity import SimilarityAligner

    aligners = {}
    if "identity" in args.aligners:
        aligners["identity"] = IdentityAligner()
    if "similarity" in args.aligners:
        aligners["similarity"] = SimilarityAligner()
    if args.uawarpc:
        from udaseg.models.alignment.uawarpc import UAWarpCAligner

        aligners["uawarpc"] = UAWarpCAligner.from_files(args.uawarpc, vgg=args.vgg).eval()
    return {k: v.to(args.torch_device) for k, v in aligners.items()}


def to_input(rgb, device):
    import torch

    from udaseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def run(args) -> Iterator[Figure]:
    import numpy as np
    import torch

    from udaseg.data.io import read_image
    from udaseg.data.synthnight import generate, sample_paths
    from udaseg.data.synthnight.writer import reference_flow
    from udaseg.models.alignment.base import sample_grid

    config = synthnight_config(args)
    tmp = None
    if args.data_dir:
        root = Path(args.data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="synthnight_align_")
        root = Path(tmp.name) / "synthnight"
        t0 = time.perf_counter()
        generate(root, config, workers=args.workers, progress=False)
        print(f"generated night pairs of SynthNight seed {config.seed} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    device = args.torch_device
    aligners = build_aligners(args)
    try:
        for split in args.splits:
            n = config.count(split)
            if args.limit:
                n = min(n, args.limit)
            pairs = []
            for i in range(n):
                paths = sample_paths(split, i)
                pairs.append((i, read_image(root / paths["image"]),
                              read_image(root / paths["reference"])))
            gts = {i: torch.from_numpy(reference_flow(config, split, i))[None] for i, _, _ in pairs}
            masks = {}
            for i, _, _ in pairs:
                _, valid = sample_grid(gts[i])
                static = torch.from_numpy(night_label(config, split, i) <= STATIC_MAX)[None]
                masks[i] = valid & static
            for name, aligner in aligners.items():
                errs, per_pair, certs, times = [], [], [], []
                with torch.no_grad():
                    _, t_img, r_img = pairs[0]
                    aligner(to_input(t_img, device), to_input(r_img, device))  # warm-up
                    for i, t_img, r_img in pairs:
                        tgt, ref = to_input(t_img, device), to_input(r_img, device)
                        common.sync(device)
                        t0 = time.perf_counter()
                        out = aligner(tgt, ref)
                        common.sync(device)
                        times.append(time.perf_counter() - t0)
                        e = (out.flow.float().cpu() - gts[i]).norm(dim=1)[masks[i]]
                        errs.append(e.numpy())
                        per_pair.append(float(e.mean()))
                        certs.append(float(out.certainty.float().mean()))
                pooled = np.concatenate(errs)
                setting = (f"SynthNight seed {config.seed} {split}, {len(pairs)} pairs "
                           f"{config.width}x{config.height}, valid static pixels")
                yield Figure(
                    f"align_epe/{name}/{split}", float(pooled.mean()), "px EPE", setting,
                    higher_is_better=False,
                    extras={
                        "median px": common.fmt(float(np.median(pooled))),
                        "< 1 px": f"{100 * float((pooled < 1).mean()):.1f} %",
                        "worst pair px": common.fmt(max(per_pair)),
                        "certainty": f"{np.mean(certs):.2f}",
                        "ms/pair": common.fmt(1000 * float(np.mean(times))),
                    },
                    numbers={
                        "median": float(np.median(pooled)),
                        "lt1": float((pooled < 1).mean()),
                        "worst_pair": max(per_pair),
                        "certainty": float(np.mean(certs)),
                        "seconds_per_pair": float(np.mean(times)),
                    },
                )
    finally:
        if tmp is not None:
            tmp.cleanup()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="a SynthNight copy (default: generate the night pairs of --seed into a "
                        "temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="generated copy only (default 512)")
    p.add_argument("--height", type=int, default=None, help="generated copy only (default 256)")
    p.add_argument("--workers", type=int, default=2, help="generator processes")
    p.add_argument("--splits", nargs="+", default=["night_train", "night_val"],
                   choices=["night_train", "night_val"])
    p.add_argument("--limit", type=int, default=None, help="at most this many pairs per split")
    p.add_argument("--aligners", nargs="+", default=["identity", "similarity"],
                   choices=["identity", "similarity"])
    p.add_argument("--uawarpc", default=None, metavar="FILE",
                   help="also measure UAWarpC with these weights (Refign's uawarpc_megadepth.ckpt)")
    p.add_argument("--vgg", default=None, metavar="FILE",
                   help="UAWarpC's VGG16 weights (torchvision's vgg16-397923af.pth)")
    common.add_common_args(p)
    return p


def notes(args) -> list[str]:
    return [
        "EPE = |F - F_gt| in pixels over the night pixels of static classes (train IDs 0-10) "
        "whose true match lies inside the reference; F_gt = reference_flow (exact); "
        "pooled mean / median / share < 1 px; worst pair = largest per-pair mean; "
        "certainty = mean predicted certainty; ms/pair = aligner call, batch 1",
    ]


def main(argv: list[str] | None = None) -> list[Figure]:
    return common.main(parser(), run, "Alignment on SynthNight (bench_alignment_synthnight.py)",
                       __file__, notes, argv)


if __name__ == "__main__":
    main()
