"""CDDA source bank: opening time, resident memory and one iteration's search time of a bank
at GTA (N = 24,966) and SYNTHIA (N = 9,400) size.

Writes a synthetic bank per N in the on-disk format of :mod:`udaseg.data.cdda_bank` (header.json,
hist.npy (N, 19, 256) float32 raw counts, records.npy (N, 9) int32; sparse random counts, as a
512x512 crop gives) into ``--dir``, then measures :meth:`SourceBank.open` (the histograms are
memory-mapped: nothing is read yet), the process's resident set (``VmRSS``) growth after opening
and after reading every histogram once (``hist.sum()``: the pages a full bank search touches), and
that full pass's time; then the time of one iteration's histogram + search (``--batch`` target
crops against the whole bank, resident on ``--device``). The file was just written, so it is in
the OS page cache: the pass measures memory bandwidth, not the disk (a cold first search reads 463
MiB for GTA once).

    python benchmarks/bench_cdda_bank.py                 # N = 24966 and 9400
    python benchmarks/bench_cdda_bank.py --n 9400 --dir /tmp/banks
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Figure


def rss_bytes() -> int:
    """The process's resident set size (Linux ``/proc/self/status``; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_synthetic_bank(out: Path, n: int, crop: int = 512, seed: int = 0) -> Path:
    """A valid bank folder with N random rows (each: ~6 classes over ~40 depth bins, summing to
    about crop^2 pixels); records point at no real dataset (crop() is not measured)."""
    import numpy as np

    from udaseg.data import cdda_bank as cb
    from udaseg.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hist = np.lib.format.open_memmap(out / cb.HIST_FILE, mode="w+", dtype=np.float32,
                                     shape=(n, cb.NUM_CLASSES, cb.NUM_BINS))
    chunk = 512
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        block = np.zeros((m, cb.NUM_CLASSES, cb.NUM_BINS), np.float32)
        rows = np.repeat(np.arange(m), 240)
        cls = rng.integers(0, cb.NUM_CLASSES, size=(m, 6))[np.arange(m)[:, None], rng.integers(0, 6, (m, 240))]
        bins = rng.integers(0, cb.NUM_BINS, size=(m, 240))
        np.add.at(block, (rows, cls.ravel(), bins.ravel()), crop * crop / 240)
        hist[s : s + m] = block
    hist.flush()
    recs = np.lib.format.open_memmap(out / cb.RECORDS_FILE, mode="w+", dtype=np.int32,
                                     shape=(n, len(cb.RECORD_COLUMNS)))
    recs[:] = 0
    recs.flush()
    del hist, recs
    atomic_write_json(out / cb.HEADER_FILE, {
        "format": cb.FORMAT, "version": cb.VERSION, "n": n, "done": n, "crop_size": [crop, crop],
        "seed": seed, "rcs": None, "source": {"name": "synthetic"}, "num_classes": cb.NUM_CLASSES,
        "bins": cb.NUM_BINS, "pipeline": {"crop_size": [crop, crop]},
    })
    return out


def run(args) -> Iterator[Figure]:
    from udaseg.data.cdda_bank import SourceBank

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cdda_bank_bench_"))
    try:
        for n in args.n:
            path = write_synthetic_bank(base / f"bank_{n}", n, args.crop)
            size = (path / "hist.npy").stat().st_size + (path / "records.npy").stat().st_size
            rss0 = rss_bytes()
            t0 = time.perf_counter()
            bank = SourceBank.open(path)
            t_open = time.perf_counter() - t0
            rss_open = rss_bytes() - rss0
            t0 = time.perf_counter()
            total = float(bank.hist.sum())
            t_pass = time.perf_counter() - t0
            rss_read = rss_bytes() - rss0
            assert total > 0
            setting = (f"N={n}, {args.crop}x{args.crop} crops, hist (N,19,256) float32 memory-"
                       f"mapped, files {common.fmt_bytes(size)}")
            extras = {"RSS after open": common.fmt_bytes(rss_open),
                      "RSS after reading every row": common.fmt_bytes(rss_read),
                      "full pass (hist.sum)": f"{t_pass * 1000:.0f} ms"}
            numbers = {"open_s": t_open, "rss_open_bytes": rss_open, "rss_read_bytes": rss_read,
                       "pass_s": t_pass, "file_bytes": size}
            yield Figure(f"cdda_bank/open/N{n}", t_open * 1000, "ms", setting, False, extras, numbers)
            yield search_figure(bank, n, args)
            del bank
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


def search_figure(bank, n: int, args) -> Figure:
    """One CDDA iteration's histogram + bank search (:func:`udaseg.adapt.methods.cdda.search`)
    for a batch of ``--batch`` target crops against the resident bank, on ``--device``."""
    import torch

    from udaseg.adapt.methods.cdda import BankIndex, search
    from udaseg.data.cdda_bank import class_depth_histogram

    device = args.torch_device
    t0 = time.perf_counter()
    index = BankIndex(torch.as_tensor(bank.hist[:]), device=device)
    t_index = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    h = w = args.crop
    labels = torch.randint(0, 19, (args.batch, h // 32, w // 32), generator=g)
    labels = labels.repeat_interleave(32, 1).repeat_interleave(32, 2).to(device)
    depth = torch.randint(0, 256, (args.batch, h, w), generator=g).float().to(device)

    def step():
        search(index, class_depth_histogram(labels, depth), chunk_size=args.chunk)

    timing = common.time_it(step, args.iters, 1, device)
    setting = (f"N={n}, batch {args.batch} target crops {h}x{w}, chunk {args.chunk}, "
               f"{device.type} fp32")
    extras = {"median": f"{timing.median * 1000:.0f} ms",
              "bank to device once": f"{t_index * 1000:.0f} ms",
              "resident": common.fmt_bytes(sum(t.numel() * t.element_size() for t in (
                  index.hist, index.n, index.norm, index.cnorm)))}
    return Figure(f"cdda_bank/search/N{n}", timing.mean * 1000, "ms", setting, False, extras,
                  {"search_s": timing.mean, "index_s": t_index})


def notes(args) -> list[str]:
    return ["synthetic banks in the real format; RSS = VmRSS growth of this process (the "
            "memory-mapped histograms count once their pages are read); files in the page cache"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, nargs="+", default=[24966, 9400], help="bank sizes")
    p.add_argument("--crop", type=int, default=512, help="crop side (header and counts)")
    p.add_argument("--dir", default=None, help="where the banks go (default: a temporary folder)")
    p.add_argument("--batch", type=int, default=2, help="target crops per search (2: the papers')")
    p.add_argument("--chunk", type=int, default=2048, help="bank entries per chunk (CDDAConfig)")
    p.add_argument("--iters", type=int, default=5, help="timed searches")
    common.add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> list[Figure]:
    return common.main(parser(), run, "CDDA bank (bench_cdda_bank.py)", __file__, notes, argv)


if __name__ == "__main__":
    main()
