"""Dense alignment (Refign's UAWarpC): local correlation and the full aligner forward.

Figures (random weights and features; eval mode, ``torch.no_grad``; warm-up calls excluded):

* ``alignment/local_corr_ours`` vs ``alignment/local_corr_naive`` (a Python loop over the 81
  offsets, one shifted product + channel sum each) at the shapes UAWarpC's levels 1 and 2 see for
  an S x S crop: (B, 128, S/4, S/4) and (B, 256, S/8, S/8), patch 9. Both are checked to agree.
* ``alignment/uawarpc_forward``: :class:`~udaseg.models.alignment.uawarpc.UAWarpCAligner` on a
  (B, 3, S, S) target/reference pair (VGG16 to pool4 on the full image and on the 256^2 copy,
  the four matcher levels, full-resolution certainty and validity).

Sizes: ``--sizes 512`` by default; ``--device cuda`` adds 1024 (Refign's HRDA crops). 1024 is
refused on the CPU. ``--batch`` defaults to 2 (Refign aligns its 2 target images per step).

    python benchmarks/bench_alignment.py --sizes 128 256 --iters 2 --no-append
    python benchmarks/bench_alignment.py --device cuda --iters 10
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Figure


def naive_local_correlation(target, reference, patch_size: int = 9):
    """Reference implementation: one shifted product per offset (81 Python steps)."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = target.shape
    r = patch_size // 2
    ref = F.pad(reference, (r, r, r, r))
    outs = [(target * ref[:, :, dy:dy + h, dx:dx + w]).sum(1)
            for dy in range(patch_size) for dx in range(patch_size)]
    return torch.stack(outs, 1)


def _timed(fn, args, device) -> tuple[float, dict[str, str], dict[str, float]]:
    common.reset_peak_memory(device)
    timing = common.time_it(fn, args.iters, args.warmup, device)
    extras, numbers = common.memory_extras(device)
    if device.type != "cuda":
        extras["median"] = f"{common.fmt(1e3 * timing.median)} ms"
    return 1e3 * timing.mean, extras, {"s_per_call": timing.mean, **numbers}


def run(args) -> Iterator[Figure]:
    import torch

    from udaseg.models.alignment.correlation import local_correlation
    from udaseg.models.alignment.uawarpc import UAWarpCAligner

    device = args.torch_device
    sizes = args.sizes or ([512, 1024] if device.type == "cuda" else [512])
    if device.type != "cuda" and any(s > 512 for s in sizes):
        raise SystemExit("bench_alignment: sizes above 512 only with --device cuda")
    g = torch.Generator().manual_seed(args.seed)
    rows: list[tuple[str, str, float]] = []
    for s in sizes:
        for level, c, stride in (("level1", 128, 4), ("level2", 256, 8)):
            shape = (args.batch, c, s // stride, s // stride)
            t = torch.randn(*shape, generator=g).to(device)
            r = torch.randn(*shape, generator=g).to(device)
            with torch.no_grad(), common.autocast(device, args.precision):
                diff = (local_correlation(t, r) - naive_local_correlation(t, r)).abs().max().item()
            setting = (f"{s}^2 crop {level}: {tuple(shape)}, patch 9, {device.type} "
                       f"{args.precision}")
            for name, fn in (("ours", local_correlation), ("naive", naive_local_correlation)):
                def call(fn=fn):
                    with torch.no_grad(), common.autocast(device, args.precision):
                        return fn(t, r)

                ms, extras, numbers = _timed(call, args, device)
                if name == "ours":
                    extras["max |ours - naive|"] = f"{diff:.1e}"
                rows.append((f"local_corr_{name}", setting, ms))
                yield Figure(f"alignment/local_corr_{name}", ms, "ms/call", setting, False,
                             extras, numbers)
            del t, r

    torch.manual_seed(args.seed)
    aligner = UAWarpCAligner().to(device)
    for s in sizes:
        trg = torch.randn(args.batch, 3, s, s, generator=g).to(device)
        ref = torch.randn(args.batch, 3, s, s, generator=g).to(device)

        def call():
            with common.autocast(device, args.precision):
                return aligner(trg, ref)

        ms, extras, numbers = _timed(call, args, device)
        setting = f"{s}x{s}, batch {args.batch} pairs, {device.type} {args.precision}"
        extras["per pair"] = f"{common.fmt(ms / args.batch)} ms"
        rows.append(("uawarpc_forward", setting, ms))
        yield Figure("alignment/uawarpc_forward", ms, "ms/call", setting, False, extras, numbers)
        del trg, ref

    width = max(len(r[1]) for r in rows)
    print(f"\n{'figure':<22} {'setting':<{width}} {'ms/call':>10}")
    for name, setting, ms in rows:
        print(f"{name:<22} {setting:<{width}} {common.fmt(ms):>10}")
    print()


def notes(args) -> list[str]:
    return [f"{args.iters} timed calls after {args.warmup} warm-up; random weights and inputs; "
            "local correlation: ours = 9 vectorised column steps, naive = 81 offset steps"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="square crop sizes (default 512; cuda: 512 1024; CPU at most 512)")
    p.add_argument("--batch", type=int, default=2, help="image pairs per call")
    p.add_argument("--iters", type=int, default=5, help="timed calls")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> list[Figure]:
    return common.main(parser(), run, "Alignment (bench_alignment.py)", __file__, notes, argv)


if __name__ == "__main__":
    main()
