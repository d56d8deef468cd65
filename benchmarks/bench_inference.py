"""Inference throughput: images/s of whole-image and HR sliding-window inference.

Runs ``UDAModule.predict_logits`` (which calls :func:`udaseg.eval.inference.whole_inference` or
:func:`~udaseg.eval.inference.slide_inference` as configured) plus the argmax, in eval mode
under ``torch.inference_mode``, on random normalised images; the model is udaseg's own, built
from ``configs/base/model_mitb5_daformer.yaml`` and ``configs/benchmarks/gta2cs/*.yaml`` of the
checkout being measured (random init). Warm-up calls are excluded.

Presets (paper settings):

* ``daformer``: MiT-B5 + DAFormer head, whole image at 1024x512 (Cityscapes at DAFormer's test
  scale).
* ``hrda``: the same segmentor wrapped in HRDA, sliding windows of 1024x1024 with stride 512 over
  a 2048x1024 image, each window a 0.5 context pass plus overlapping 512 detail crops (HRDA and
  MIC test alike).

``--backbone`` and ``--scale F`` (image, window and stride sizes x F) or ``--size``/``--window``/
``--stride`` override a preset, e.g. ``--backbone mit_b0 --scale 0.25`` on a small CPU.

    python benchmarks/bench_inference.py --backbone mit_b0 --scale 0.25 --iters 3
    python benchmarks/bench_inference.py --device cuda --precision bf16 --iters 20
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from bench_train_step import MODEL_KEYS, parse_size, preset_config
from common import Figure

PRESETS = {
    # preset: (training preset whose configs build the model, image size H x W)
    "daformer": ("daformer", (512, 1024)),
    "hrda": ("hrda", (1024, 2048)),
}


def build(name: str, args, device):
    import torch

    from udaseg.engine.module import UDAModule

    train_preset, size = PRESETS[name]
    cfg = preset_config(train_preset)
    model_cfg = {k: v for k, v in cfg.get("model", {}).items()
                 if k in MODEL_KEYS and k not in ("self_training", "methods")}
    if args.backbone:
        model_cfg["backbone"] = args.backbone
    if args.head:
        model_cfg["head"] = args.head
    inference = dict(cfg.get("model", {}).get("inference") or {"mode": "whole"})
    h, w = parse_size(args.size) if args.size else (round(size[0] * args.scale),
                                                      round(size[1] * args.scale))
    if inference["mode"] == "slide":
        inference["crop"] = list(parse_size(args.window)) if args.window else [
            round(c * args.scale) for c in inference["crop"]]
        inference["stride"] = list(parse_size(args.stride)) if args.stride else [
            round(s * args.scale) for s in inference["stride"]]
    torch.manual_seed(args.seed)
    speed = common.speed_config(args)
    if speed is not None:
        model_cfg["speed"] = speed
    module = UDAModule(pretrained=None, inference=inference, **model_cfg).to(device).eval()
    module.configure_model()  # channels-last / compile (as the Trainer does)
    images = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(args.seed))
    images = images.to(device)
    mode = "whole image"
    if inference["mode"] == "slide":
        ch, cw = inference["crop"]
        mode = f"slide {ch}x{cw} stride {inference['stride'][0]}x{inference['stride'][1]}"
        if model_cfg.get("hrda") is not None:
            dh, dw = module.model.detail_crop_size(ch, cw)
            mode += f", HRDA context x{module.model.cfg.context_scale} detail {dh}x{dw}"
    setting = (f"{model_cfg['backbone']}+{model_cfg['head']}, {w}x{h} (WxH), {mode}, "
               f"batch {args.batch}, {device.type} {common.speed_label(args)}")
    return module, images, setting


def measure(name: str, args) -> Figure:
    """One preset: build, warm up, count FLOPs, time ``--iters`` calls."""
    import torch

    device = args.torch_device
    module, images, setting = build(name, args, device)
    out_size = tuple(images.shape[-2:])

    def infer():
        with torch.inference_mode(), common.autocast(device, args.precision):
            return module.predict_logits(images, out_size=out_size).argmax(1)

    for _ in range(args.warmup):
        infer()
    flops = common.count_flops(infer) if args.flops else None
    common.reset_peak_memory(device)
    timing = common.time_it(infer, args.iters, 0, device)
    extras = {"s/image": common.fmt(timing.mean / args.batch)}
    if device.type != "cuda":
        extras["s/call median"] = common.fmt(timing.median)
    mem, mem_n = common.memory_extras(device)
    extras.update(mem)
    numbers = {"s_per_call": timing.mean, "calls": timing.n, **mem_n}
    if flops:
        fe, fn = common.flop_extras(flops, timing.mean, args)
        extras.update(fe)
        numbers.update(fn)
    label = "whole" if name == "daformer" else "hr_slide"
    return Figure(f"inference/{name}_{label}", timing.rate * args.batch, "images/s", setting,
                  True, extras, numbers)


def run(args) -> Iterator[Figure]:
    for name in args.presets:
        yield measure(name, args)


def notes(args) -> list[str]:
    return [(f"{args.iters} timed calls after {args.warmup} warm-up; eval mode, "
             "torch.inference_mode, UDAModule.predict_logits + argmax; random init and images")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--presets", nargs="+", default=["daformer", "hrda"], choices=sorted(PRESETS))
    p.add_argument("--backbone", default=None, help="override, e.g. mit_b0 (preset: mit_b5)")
    p.add_argument("--head", default=None, choices=["daformer", "segformer"])
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the image, window and stride sizes (e.g. 0.25 on a CPU)")
    p.add_argument("--size", default=None, help="image size HxW (overrides --scale)")
    p.add_argument("--window", default=None, help="slide window HxW (overrides --scale)")
    p.add_argument("--stride", default=None, help="slide stride HxW (overrides --scale)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--iters", type=int, default=10, help="timed calls")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flops", dest="flops", action="store_false")
    common.add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> list[Figure]:
    return common.main(parser(), run, "Inference (bench_inference.py)", __file__, notes, argv)


if __name__ == "__main__":
    main()
