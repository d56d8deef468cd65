"""Training throughput: iterations/s and peak memory of one full adaptation iteration.

One iteration is exactly what ``UDAModule.training_step`` does, without the Lightning loop:
``zero_grad`` -> :meth:`udaseg.adapt.self_training.SelfTraining.step` (EMA update, source
pass + backward, teacher pseudo-labels, mixing, strong augmentation, mixed pass + backward, the
methods' hooks) -> AdamW step -> poly/warm-up schedule step. The model, the methods and the
optimiser are udaseg's own (``UDAModule``, ``build_optimizer``), configured from
``configs/base/model_mitb5_daformer.yaml`` and ``configs/benchmarks/gta2cs/*.yaml`` of the
checkout being measured; the batches are random tensors (no dataset, no loader), the same
every iteration. Warm-up iterations are excluded from the timing and from the peak memory.

Presets (paper settings):

* ``daformer``: MiT-B5 + DAFormer head, 512x512, batch 2 source + 2 target, DACS + FD.
* ``hrda``: the same on 1024x1024 crops, HRDA context x0.5 + 512 detail crop.
* ``mic``: ``hrda`` + MIC (masked image consistency).
* ``source_only``: MiT-B5 + DAFormer head, 512x512, batch 2 source.
* ``refign``: Refign-DAFormer (``configs/benchmarks/cs2dz/refign_daformer.yaml``): DACS + FD, the
  teacher on target + day reference in one pass, UAWarpC alignment of the reference and the
  refinement. UAWarpC has random weights unless its configured files exist (same cost).
  ``adapt_to_ref`` is off here, so every iteration aligns (the run's average is ~half of that).
* ``refign_identity``: the same with the identity aligner: ``refign`` minus this is the
  alignment's cost (the issue's target: at most 15 % of a Refign-DAFormer iteration).

``--backbone``, ``--crop`` and ``--batch`` override a preset (e.g. ``mit_b0`` at 256 for a
CPU figure: the full B5 at 512 takes minutes per iteration on a small CPU).

    python benchmarks/bench_train_step.py --presets daformer source_only \\
        --backbone mit_b0 --crop 256 --iters 5 --warmup 2
    python benchmarks/bench_train_step.py --device cuda --precision bf16 --iters 50
    python benchmarks/bench_train_step.py --device cuda --precision bf16 --channels-last --compile

``--channels-last`` and ``--compile`` are ``model.speed`` (:class:`udaseg.engine.module.SpeedConfig`);
``--precision bf16`` is what ``--trainer.precision bf16-mixed`` does in a run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Figure

BASE = "configs/base/model_mitb5_daformer.yaml"
PRESETS: dict[str, list[str]] = {
    "daformer": ["configs/benchmarks/gta2cs/daformer.yaml"],
    "hrda": ["configs/benchmarks/gta2cs/hrda.yaml"],
    "mic": ["configs/benchmarks/gta2cs/hrda.yaml", "configs/benchmarks/gta2cs/mic.yaml"],
    "source_only": ["configs/benchmarks/gta2cs/source_only.yaml"],
    "refign": ["configs/benchmarks/cs2dz/refign_daformer.yaml"],
    "refign_identity": ["configs/benchmarks/cs2dz/refign_daformer.yaml"],
}
MODEL_KEYS = ("backbone", "head", "head_channels", "drop_path_rate", "optim", "ce_reduction",
              "self_training", "methods", "hrda")


def merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, dicts merged recursively (as jsonargparse stacks ``--config`` files)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_config(name: str, root: Path | None = None) -> dict:
    """``{"model": {...}, "data": {...}}`` of a preset, read from the checkout's configs."""
    import yaml

    root = root or common.repo_root()
    cfg: dict = {}
    for rel in [BASE, *PRESETS[name]]:
        cfg = merge(cfg, yaml.safe_load((root / rel).read_text()) or {})
    return cfg


def parse_size(text: str) -> tuple[int, int]:
    """``512`` or ``512x1024`` (H x W)."""
    h, _, w = str(text).lower().partition("x")
    return int(h), int(w or h)


def random_batch(b: int, h: int, w: int, num_classes: int, device, generator, labels: bool = True,
                 valid_pseudo: bool = False) -> dict:
    """Normalised N(0, 1) images and block-wise labels (1/32-resolution class blocks, ~5% of
    the blocks ignored), so ClassMix/FD see several classes with realistic region sizes."""
    import torch
    import torch.nn.functional as F

    batch = {"image": torch.randn(b, 3, h, w, generator=generator)}
    if labels:
        lh, lw = max(1, h // 32), max(1, w // 32)
        low = torch.randint(0, num_classes, (b, 1, lh, lw), generator=generator).float()
        low[torch.rand(b, 1, lh, lw, generator=generator) < 0.05] = 255
        batch["label"] = F.interpolate(low, size=(h, w), mode="nearest")[:, 0].long()
    if valid_pseudo:
        batch["valid_pseudo"] = torch.ones(b, h, w)
    return {k: v.to(device) for k, v in batch.items()}


def use_random_uawarpc() -> None:
    """Refign's refiner builds UAWarpC from its weight files; for timing, random weights cost the
    same, so the benchmark runs without the files."""
    import udaseg.adapt.methods.refign as refign_method
    from udaseg.models.alignment.uawarpc import UAWarpCAligner

    def random_aligner(cfg):
        if cfg.aligner != "uawarpc":
            return original(cfg)
        aligner = UAWarpCAligner(**cfg.aligner_options).eval()
        for p in aligner.parameters():
            p.requires_grad_(False)
        return aligner

    original = refign_method.build_aligner
    if getattr(original, "__name__", "") != "random_aligner":
        refign_method.build_aligner = random_aligner


def build(name: str, args, device):
    """(module, optimizer, scheduler, source, target, setting) for a preset and overrides."""
    import torch

    from udaseg.engine.module import UDAModule
    from udaseg.engine.optim import build_optimizer

    cfg = preset_config(name)
    model_cfg = {k: v for k, v in cfg.get("model", {}).items() if k in MODEL_KEYS}
    refign = (model_cfg.get("methods") or {}).get("refign")
    aligner_label = None
    if refign is not None:
        refign = model_cfg["methods"]["refign"] = {**refign, "adapt_to_ref": False}
        if name == "refign_identity":
            refign["aligner"] = "identity"
        elif not all(Path(refign.get(k) or "").is_file() for k in ("weights", "vgg")):
            use_random_uawarpc()
            aligner_label = "UAWarpC, random weights"
    if args.backbone:
        model_cfg["backbone"] = args.backbone
    if args.head:
        model_cfg["head"] = args.head
    if args.head_channels:
        model_cfg["head_channels"] = args.head_channels
    data = cfg.get("data", {})
    crop = parse_size(args.crop) if args.crop else tuple(
        (data.get("source_pipeline") or {}).get("crop_size", (512, 512)))
    batch = args.batch or int(data.get("batch_size", 2))
    adapt = model_cfg.get("self_training") is not None
    speed = common.speed_config(args)
    if speed is not None:
        model_cfg["speed"] = speed
    torch.manual_seed(args.seed)
    module = UDAModule(pretrained=None, **model_cfg).to(device).train()
    module.configure_model()  # channels-last / compile (as the Trainer does)
    opt, sched = build_optimizer(module.model, module.optim_cfg, args.total_iters)
    gen = torch.Generator().manual_seed(args.seed)
    k = module.hparams.num_classes
    h, w = crop
    source = random_batch(batch, h, w, k, device, gen)
    target = None
    if adapt:
        pl_crop = (data.get("target_pipeline") or {}).get("pseudo_label_crop") is not None
        target = random_batch(batch, h, w, k, device, gen, labels=False, valid_pseudo=pl_crop)
        if refign is not None:  # the day reference view: the target shifted by 8 px plus noise
            ref = torch.roll(target["image"], shifts=(8, 8), dims=(-2, -1))
            target["ref"] = ref + 0.1 * torch.randn(ref.shape, generator=gen).to(device)
    methods = "+".join(["DACS"] * adapt + [m.upper() for m in model_cfg.get("methods") or {}])
    if refign is not None:
        methods += f" ({aligner_label or refign.get('aligner')} aligner)"
    hrda = ""
    if model_cfg.get("hrda") is not None:
        dh, dw = module.model.detail_crop_size(h, w)
        hrda = f", HRDA context x{module.model.cfg.context_scale} detail {dh}x{dw}"
    setting = (f"{model_cfg['backbone']}+{model_cfg['head']}, {h}x{w}, batch {batch}"
               f"{'+' + str(batch) if adapt else ''}, {methods or 'source only'}{hrda}, "
               f"{device.type} {common.speed_label(args)}")
    return module, opt, sched, source, target, setting


def count_host_syncs(step, iters: int) -> float:
    """Synchronising CUDA operations per iteration, counted from the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` over ``iters`` untimed iterations."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(iters):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()  # (not counted)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    for w in {str(w.message).splitlines()[0] for w in syncs}:
        print(f"  host sync: {w}", flush=True)
    return len(syncs) / iters


def measure(name: str, args) -> Figure:
    """One preset: build, warm up, count FLOPs, time ``--iters`` iterations."""

    device = args.torch_device
    module, opt, sched, source, target, setting = build(name, args, device)
    state = {"t": 0}

    def step():
        opt.zero_grad(set_to_none=True)
        with common.autocast(device, args.precision):
            module.algorithm.step(module.model, source, target, state["t"],
                                  lambda loss: loss.backward())
        opt.step()
        sched.step()
        state["t"] += 1

    for _ in range(args.warmup):
        step()
    flops = common.count_flops(step) if args.flops else None
    common.reset_peak_memory(device)
    timing = common.time_it(step, args.iters, 0, device)
    extras = {"s/it": common.fmt(timing.mean)}
    if device.type == "cuda" and args.sync_debug:
        extras["host syncs/it"] = common.fmt(count_host_syncs(step, 2))
    if device.type != "cuda":
        extras["s/it median"] = common.fmt(timing.median)
    mem, mem_n = common.memory_extras(device)
    extras.update(mem)
    numbers = {"s_per_it": timing.mean, "iters": timing.n, **mem_n}
    if flops:
        fe, fn = common.flop_extras(flops, timing.mean, args)
        extras.update(fe)
        numbers.update(fn)
    return Figure(f"train_step/{name}", timing.rate, "it/s", setting, True, extras, numbers)


def run(args) -> Iterator[Figure]:
    for name in args.presets:
        yield measure(name, args)


def notes(args) -> list[str]:
    return [(f"{args.iters} timed iterations after {args.warmup} warm-up; random tensors, no "
             "loader; model/methods from configs/base/model_mitb5_daformer.yaml + "
             "the preset's configs (gta2cs/<preset>.yaml; refign: cs2dz/refign_daformer.yaml), "
             "random init (no ImageNet weights)")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--presets", nargs="+", default=["daformer", "hrda", "mic", "source_only"],
                   choices=sorted(PRESETS))
    p.add_argument("--backbone", default=None, help="override, e.g. mit_b0 (preset: mit_b5)")
    p.add_argument("--head", default=None, choices=["daformer", "segformer"])
    p.add_argument("--head-channels", type=int, default=None)
    p.add_argument("--crop", default=None, help="override the crop, N or HxW (preset 512/1024)")
    p.add_argument("--batch", type=int, default=None, help="override the per-domain batch (2)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--total-iters", type=int, default=40000, help="schedule length (40k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip counting FLOPs (one extra untimed iteration)")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: count synchronising operations per iteration "
                        "(torch.cuda.set_sync_debug_mode('warn'), 2 extra untimed iterations)")
    common.add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> list[Figure]:
    return common.main(parser(), run, "Train step (bench_train_step.py)", __file__, notes, argv)


if __name__ == "__main__":
    main()
