"""Data pipeline throughput: samples/s of loading + augmentation with N workers, against
decode-only.

Both read a SynthNight copy (or any dataset in a real layout) through udaseg's own loaders
(:mod:`udaseg.data.datasets`): ``decode`` is the dataset without a transform (PNG decode of the
image and its label, conversion to tensors; the batch is a list, nothing resized), ``pipeline``
adds the training transform :meth:`udaseg.data.transforms.PipelineConfig.train` (resize, random
crop with ``cat_max_ratio``, flip, normalise, pad) and the default collate. Each runs through a
``DataLoader`` with ``--workers`` processes; the clock starts when the first batch arrives
(worker start-up excluded). After the first pass the files are in the OS page cache, so
``decode`` measures decoding, not the disk.

Pipelines (``--pipeline``): ``daformer`` (resize 1024x512, crop 512, as for Cityscapes),
``hrda`` (2048x1024, crop 1024), ``synthnight`` (256x128, crop 128, configs/synthnight).
SynthNight images are 512x256, so ``daformer``/``hrda`` upsample them (the per-sample work of the
paper pipelines on Cityscapes-sized crops; decode is cheaper than on 2048x1024 PNGs).

    python benchmarks/bench_data.py --data data/synthnight --workers 0 2 --samples 200
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Figure

PIPELINES = {
    "daformer": {"scale": (1024, 512), "crop_size": (512, 512), "cat_max_ratio": 0.75},
    "hrda": {"scale": (2048, 1024), "crop_size": (1024, 1024), "cat_max_ratio": 0.75},
    "synthnight": {"scale": (256, 128), "crop_size": (128, 128), "cat_max_ratio": 0.75},
}
DATASETS = {
    # name: (catalogue name, folder under --data, split, labelled)
    "cityscapes": ("cityscapes", "cityscapes", "train", True),
    "dark_zurich": ("dark_zurich", "dark_zurich", "train", False),
}


def list_collate(batch: list) -> list:
    """Decode-only: keep the samples as they are (no stacking, images may differ in size)."""
    return batch


def build_dataset(args, transform):
    from udaseg.catalog import DATASETS as CATALOG
    from udaseg.catalog import resolve

    name, folder, split, labels = DATASETS[args.dataset]
    cls = resolve(CATALOG, name, "dataset")
    return cls(root=str(Path(args.data) / folder), split=split, labels=labels, transform=transform)


def measure(ds, args, workers: int, collate) -> tuple[float, int, float]:
    """(samples/s, samples timed, seconds) over ``--samples`` samples after the first batch."""
    import torch
    from torch.utils.data import DataLoader

    n = args.samples + args.batch  # the first batch is not timed
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed)).tolist()
    indices = [order[i % len(order)] for i in range(n)]
    loader = DataLoader(ds, batch_size=args.batch, sampler=indices, num_workers=workers,
                        collate_fn=collate, drop_last=True)
    it = iter(loader)
    next(it)
    count, t0 = 0, time.perf_counter()
    for batch in it:
        count += len(batch) if isinstance(batch, list) else int(batch["image"].shape[0])
    seconds = time.perf_counter() - t0
    del it, loader
    return count / seconds, count, seconds


def run(args) -> Iterator[Figure]:
    import torch

    from udaseg.data.transforms import PipelineConfig

    torch.manual_seed(args.seed)
    pipe = PipelineConfig(**PIPELINES[args.pipeline])
    datasets = {"decode": (build_dataset(args, None), list_collate),
                "pipeline": (build_dataset(args, pipe.train()), None)}
    first = next(iter(datasets.values()))[0].load(0)
    h, w = first["image"].shape[-2:]
    decode_rate: dict[int, float] = {}
    for workers in args.workers:
        for mode in args.modes:
            ds, collate = datasets[mode]
            rate, count, seconds = measure(ds, args, workers, collate)
            setting = (f"{args.dataset} {args.data} ({w}x{h} PNG, {len(ds)} samples), "
                       + ("decode only" if mode == "decode" else
                          f"{args.pipeline} pipeline: resize {pipe.scale[0]}x{pipe.scale[1]}, "
                          f"crop {pipe.crop_size[0]}x{pipe.crop_size[1]}, flip, normalise")
                       + f", batch {args.batch}, {workers} workers")
            extras = {"ms/sample": common.fmt(1000 / rate), "samples": str(count)}
            numbers = {"seconds": seconds, "samples": count}
            if mode == "decode":
                decode_rate[workers] = rate
            elif workers in decode_rate:
                extras["vs decode-only"] = f"{rate / decode_rate[workers]:.2f}x"
                numbers["vs_decode"] = rate / decode_rate[workers]
            yield Figure(f"data/{mode}/workers{workers}", rate, "samples/s", setting, True,
                         extras, numbers)


def notes(args) -> list[str]:
    return [(f"{args.samples} timed samples per figure after one untimed batch; files in the OS "
             "page cache; the training step is not running, so this is the loader's own rate")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", default="data/synthnight", help="SynthNight root (or a copy)")
    p.add_argument("--dataset", default="cityscapes", choices=sorted(DATASETS))
    p.add_argument("--pipeline", default="daformer", choices=sorted(PIPELINES))
    p.add_argument("--modes", nargs="+", default=["decode", "pipeline"],
                   choices=["decode", "pipeline"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=200, help="timed samples per figure")
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> list[Figure]:
    return common.main(parser(), run, "Data pipeline (bench_data.py)", __file__, notes, argv)


if __name__ == "__main__":
    main()
