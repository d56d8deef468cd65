"""Shared machinery of the benchmark scripts (``bench_*.py``): figures, timers, memory, the
machine record, ``results.md`` sections and the comparison of two git revisions.

A benchmark is a generator ``run(args) -> Iterator[Figure]``; :func:`main` parses the common
switches, prints one line per figure as it comes, appends a section to ``results.md`` (machine,
versions, date, git revision, load average, the exact command) and, with ``--compare REV_A
REV_B``, runs the same script once per revision in a ``git worktree`` of it with ``PYTHONPATH``
pointing at that worktree's ``src/`` and prints both lines and the ratio B / A.

Common switches: ``--device cpu|cuda``, ``--precision fp32|bf16`` (bf16 = autocast),
``--threads N``, ``--compare REV_A REV_B`` (``.`` = the working tree as it is, uncommitted
changes included), ``--rounds N`` (comparison: alternate A, B, A, B, ... and keep the median of
each figure, for a loaded machine), ``--results PATH``, ``--no-append``, ``--json-out PATH``.

Timers synchronise the device before they are read (CUDA); peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set size (``VmHWM``,
reset per figure through ``/proc/self/clear_refs`` where Linux allows it) on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.md"
# set by --compare for the child runs: the checkout whose src/ is on PYTHONPATH
ENV_REPO = "UDASEG_BENCH_REPO"


# ---------------------------------------------------------------------------------- figures
@dataclass
class Figure:
    """One measured number: ``name [setting]: value unit, extras``.

    ``name`` identifies the figure across runs and revisions (the comparison pairs figures by
    it); ``extras`` are further formatted numbers (seconds per iteration, peak memory, ...) and
    ``numbers`` their raw values (for JSON and for the comparison's ratio of extras).
    """

    name: str
    value: float
    unit: str
    setting: str = ""
    higher_is_better: bool = True
    extras: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)

    def line(self, prefix: str = "") -> str:
        setting = f" [{self.setting}]" if self.setting else ""
        extras = "".join(f", {k} {v}" for k, v in self.extras.items())
        return f"{prefix}{self.name}{setting}: {fmt(self.value)} {self.unit}{extras}"


def fmt(x: float) -> str:
    """A number with about 3 significant digits, trailing zeros kept (0.940, 1.20, 12.3)."""
    if x == 0 or math.isnan(x):
        return str(x)
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------- device
def resolve_device(name: str):
    import torch

    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device on this machine")
        return torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    return torch.device("cpu")


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to do on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, a no-op context for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise SystemExit(f"--precision must be fp32 or bf16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def speed_config(args) -> dict | None:
    """``model.speed`` settings from ``--channels-last`` / ``--compile`` (None when neither is
    given, so revisions without the switch still run under ``--compare``)."""
    if not (args.channels_last or args.compile):
        return None
    return {"channels_last": bool(args.channels_last), "compile": args.compile is not None,
            "compile_mode": None if args.compile in (None, "default") else args.compile,
            "compile_backend": args.compile_backend}


def speed_label(args) -> str:
    """`` fp32`` / `` bf16`` plus the speed switches, for a figure's setting."""
    parts = [args.precision]
    if args.channels_last:
        parts.append("channels-last")
    if args.compile:
        parts.append(f"compiled ({args.compile}, {args.compile_backend})")
    return " ".join(parts)


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window (CUDA peak stats; Linux: the process's RSS high-water
    mark, through ``/proc/self/clear_refs``, where allowed)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory(device) -> tuple[float, str]:
    """(bytes, what) since the last :func:`reset_peak_memory`: CUDA max allocated, or the
    process's peak RSS (whole process: Python, torch and the model included)."""
    import resource

    import torch

    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    hwm = _vm_hwm()
    if hwm is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS), never reset
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"
    return float(hwm), "process peak RSS"


def memory_extras(device) -> tuple[dict[str, str], dict[str, float]]:
    value, what = peak_memory(device)
    return {"peak memory": f"{fmt_bytes(value)} ({what})"}, {"peak_memory_bytes": value}


@dataclass
class Timing:
    """Timed repetitions: ``total`` seconds over ``n`` and each repetition's seconds (``each``;
    on CUDA only the total is read, so the queue is not drained between repetitions)."""

    n: int
    total: float
    each: list[float]

    @property
    def rate(self) -> float:
        return self.n / self.total

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def median(self) -> float:
        return statistics.median(self.each) if self.each else self.mean


def time_it(fn: Callable[[], object], iters: int, warmup: int, device) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed (device synchronised
    before the clock is read)."""
    for _ in range(warmup):
        fn()
    sync(device)
    each: list[float] = []
    t0 = time.perf_counter()
    last = t0
    for _ in range(iters):
        fn()
        if device.type != "cuda":
            now = time.perf_counter()
            each.append(now - last)
            last = now
    sync(device)
    return Timing(iters, time.perf_counter() - t0, each)


# ---------------------------------------------------------------------------------- FLOPs
# Dense peak TFLOP/s per GPU from the vendors' data sheets (no sparsity), for model FLOPs
# utilisation; the first name contained in torch.cuda.get_device_name() wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(args) -> float | None:
    """``--peak-tflops`` if given, else the data-sheet peak of the CUDA device for the
    precision (TF32 when ``--tf32``), else None (CPU: no MFU)."""
    if getattr(args, "peak_tflops", None):
        return float(args.peak_tflops)
    device = args.torch_device
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    kind = "bf16" if args.precision == "bf16" else ("tf32" if args.tf32 else "fp32")
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[kind]
    return None


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None,
                        **kwargs) -> int:
    """Backward of a convolution = the forward's FLOPs once per gradient asked for (input,
    weight): each multiply-add of the forward appears once in each. torch's own formula counts
    the weight gradient of a grouped convolution as if it were dense (``groups`` x too much:
    1000x for the depthwise 3x3 of the DAFormer head)."""
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter`` (matmuls,
    convolutions, attention; element-wise work is not counted), backward included if ``fn``
    runs it (grouped-convolution backward corrected, see :func:`_conv_backward_flop`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return float(counter.get_total_flops())


def flop_extras(flops: float, seconds: float, args) -> tuple[dict[str, str], dict[str, float]]:
    """GFLOP per call, achieved TFLOP/s and, where the peak is known, MFU."""
    achieved = flops / seconds / 1e12
    extras = {"GFLOP/call": fmt(flops / 1e9), "TFLOP/s": fmt(achieved)}
    numbers = {"flops": flops, "tflops_per_s": achieved}
    peak = peak_tflops(args)
    if peak:
        extras["MFU"] = f"{100 * achieved / peak:.1f}% of {fmt(peak)}"
        numbers["mfu"] = achieved / peak
    return extras, numbers


# ---------------------------------------------------------------------------------- machine
def repo_root() -> Path:
    """The checkout being measured: the worktree of a --compare child, else this repository."""
    return Path(os.environ.get(ENV_REPO, REPO))


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd or REPO, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_revision(root: Path | None = None) -> str:
    """Short commit of ``root`` (default: the checkout being measured), ``+dirty`` when its
    ``src/`` has uncommitted changes."""
    root = root or repo_root()
    rev = _git("rev-parse", "--short", "HEAD", cwd=root) or "unknown"
    dirty = _git("status", "--porcelain", "--", "src", cwd=root)
    return rev + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    """What the figures were measured on."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(
            f"{torch.cuda.get_device_name(i)} ({fmt_bytes(torch.cuda.get_device_properties(i).total_memory)})"
            for i in range(torch.cuda.device_count())
        )
    import udaseg

    return {
        "cpu": cpu_model(),
        "cores": cores,
        "gpu": gpu,
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "python": platform.python_version(),
        "udaseg": str(Path(udaseg.__file__).resolve().parent),
        "revision": git_revision(),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0),
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, with the script path relative to the repository."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    with contextlib.suppress(ValueError):
        argv[0] = str(script.relative_to(REPO))
    return "python " + " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------------- results.md
def _load(load) -> str:
    return f"{load[0]:.2f}"


def section(title: str, info: dict, figures: list[Figure], command: str, notes: list[str],
            load_after) -> str:
    lines = [
        f"\n### {title}, {info['date']} ({info['host']})\n",
        f"`{command}`\n",
        (f"- machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}; device "
         f"{info['device']}, {info['threads']} torch threads; load average (1 min) "
         f"{_load(info['load'])} before, {_load(load_after)} after"),
        (f"- versions: torch {info['torch']} (CUDA {info['cuda']}), Python {info['python']}, "
         f"udaseg {info['revision']}"),
        *[f"- {n}" for n in notes],
        "",
        "| figure | setting | value | details |",
        "|---|---|---|---|",
    ]
    for f in figures:
        details = "; ".join(f"{k} {v}" for k, v in f.extras.items())
        lines.append(f"| {f.name} | {f.setting} | {fmt(f.value)} {f.unit} | {details} |")
    return "\n".join(lines) + "\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


# ---------------------------------------------------------------------------------- CLI
def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common benchmark switches")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: torch.autocast(bfloat16) around the measured work")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    g.add_argument("--channels-last", action="store_true",
                   help="model.speed.channels_last: channels-last convolution weights and images")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="model.speed.compile: torch.compile the networks (MODE: default, "
                        "reduce-overhead, max-autotune); compilation happens in the warm-up")
    g.add_argument("--compile-backend", default="inductor")
    g.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls/convolutions")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: data sheet of known GPUs)")
    g.add_argument("--compare", nargs=2, metavar=("REV_A", "REV_B"),
                   help="run this benchmark on two git revisions ('.' = the working tree) and "
                        "print both lines and the ratio B / A")
    g.add_argument("--rounds", type=int, default=1,
                   help="--compare: alternate A, B this many times, keep each figure's median")
    g.add_argument("--results", default=str(RESULTS), help="markdown file the section goes to")
    g.add_argument("--no-append", action="store_true", help="do not write to --results")
    g.add_argument("--json-out", default=None, help="also write the figures as JSON here")
    g.add_argument("--note", action="append", default=[],
                   help="a line added to the results.md section (repeatable)")


def _strip_args(argv: list[str], drop: dict[str, int]) -> list[str]:
    """``argv`` without the options in ``drop`` (option -> number of values it takes)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in drop:
            i += 1 + (0 if "=" in a else drop[name])
            continue
        out.append(a)
        i += 1
    return out


def main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Iterator[Figure]],
         title: str, script: str, notes: Callable[[argparse.Namespace], list[str]] | None = None,
         argv: list[str] | None = None) -> list[Figure]:
    """Parse ``argv`` (default ``sys.argv[1:]``), run (or compare), print one line per figure,
    append the results section; ``script`` is the benchmark's own file (``__file__``)."""
    args = parser.parse_args(argv)
    if args.compare:
        return compare(Path(script).resolve(), args, title, argv)
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, run, title, script, notes, argv)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (tests) keeps its own


def _run(args, run, title, script, notes, argv) -> list[Figure]:
    import torch

    device = resolve_device(args.device)
    args.torch_device = device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    info = machine(device)
    expect = os.environ.get(ENV_REPO)
    if expect and not info["udaseg"].startswith(str(Path(expect).resolve())):
        raise SystemExit(f"udaseg was imported from {info['udaseg']}, not from {expect}/src: "
                         "PYTHONPATH did not take effect")
    figures: list[Figure] = []
    for fig in run(args):
        print(fig.line(), flush=True)
        figures.append(fig)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"machine": info, "load_after": load_after,
             "figures": [dataclasses.asdict(f) for f in figures]}, indent=1))
    if not args.no_append:
        extra = (notes(args) if notes else []) + list(args.note)
        append(Path(args.results), section(title, info, figures, command_line(
            None if argv is None else [script, *argv]), extra, load_after))
        print(f"(appended to {args.results})")
    return figures


# ---------------------------------------------------------------------------------- compare
@contextlib.contextmanager
def checkout(rev: str, tmp: Path) -> Iterator[tuple[Path, str]]:
    """(root, label) of ``rev``: a detached ``git worktree`` (removed afterwards), or this
    checkout itself for ``.``."""
    if rev == ".":
        yield REPO, f"working tree ({git_revision(REPO)})"
        return
    sha = _git("rev-parse", "--verify", "--short", f"{rev}^{{commit}}")
    if not sha:
        raise SystemExit(f"--compare: {rev!r} is not a git revision of {REPO}")
    path = tmp / f"rev-{sha}"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), sha], cwd=REPO,
                   check=True)
    try:
        yield path, f"{rev} ({sha})" if rev != sha else sha
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)


def _run_child(script: Path, argv: list[str], root: Path, out: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env[ENV_REPO] = str(root)
    cmd = [sys.executable, str(script), *argv, "--no-append", "--json-out", str(out)]
    print(f"$ PYTHONPATH={root / 'src'} {command_line(cmd[1:])}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def compare(script: Path, args, title: str, argv: list[str] | None) -> list[Figure]:
    argv = list(sys.argv[1:] if argv is None else argv)
    child_argv = _strip_args(argv, {"--compare": 2, "--rounds": 1, "--results": 1,
                                    "--no-append": 0, "--json-out": 1, "--note": 1})
    rev_a, rev_b = args.compare
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="udaseg-bench-") as tmp_s:
        tmp = Path(tmp_s)
        with checkout(rev_a, tmp) as (root_a, label_a), checkout(rev_b, tmp) as (root_b, label_b):
            for r in range(max(1, args.rounds)):
                for key, root in (("A", root_a), ("B", root_b)):
                    runs[key].append(_run_child(script, child_argv, root, tmp / f"{key}{r}.json"))

    def median_figures(results: list[dict]) -> dict[str, Figure]:
        figs: dict[str, Figure] = {}
        for res in results:
            for d in res["figures"]:
                figs.setdefault(d["name"], []).append(d)  # type: ignore[arg-type]
        out = {}
        for name, ds in figs.items():  # type: ignore[assignment]
            ds = sorted(ds, key=lambda d: d["value"])
            out[name] = Figure(**ds[len(ds) // 2])
        return out

    fa, fb = median_figures(runs["A"]), median_figures(runs["B"])
    print(f"\nA = {label_a}, B = {label_b}" + (f"; median of {args.rounds} alternating rounds"
                                                 if args.rounds > 1 else ""))
    figures, rows = [], []
    for name in list(dict.fromkeys([*fa, *fb])):
        a, b = fa.get(name), fb.get(name)
        for tag, f in (("A", a), ("B", b)):
            if f is not None:
                print(f.line(prefix=f"{tag} "))
                figures.append(dataclasses.replace(f, name=f"{tag}: {f.name}"))
        if a is not None and b is not None and a.value:
            ratio = b.value / a.value
            gain = ratio if a.higher_is_better else 1 / ratio
            better = f"B {'faster' if gain >= 1 else 'slower'} by {abs(gain - 1) * 100:.1f}%"
            mem = ""
            ma, mb = a.numbers.get("peak_memory_bytes"), b.numbers.get("peak_memory_bytes")
            if ma and mb:
                mem = f", peak memory B / A = {mb / ma:.3f}"
            line = f"ratio {name}: B / A = {ratio:.3f} ({better}){mem}"
            print(line)
            rows.append(line)
    info = runs["A"][0]["machine"]
    info["revision"] = f"A = {label_a}, B = {label_b}"
    if not args.no_append:
        notes = ["comparison, PYTHONPATH at each revision's src/ (git worktrees)"
                 + (f", median of {args.rounds} alternating rounds" if args.rounds > 1 else ""),
                 *[f"{r}" for r in rows], *args.note]
        load_after = runs["B"][-1]["load_after"]
        append(Path(args.results), section(title + " (comparison)", info, figures,
                                           command_line([str(script), *argv]), notes, load_after))
        print(f"(appended to {args.results})")
    return figures
