"""MiT forward+backward, udaseg's :class:`~udaseg.models.mit.MixTransformer` against
HuggingFace transformers' ``SegformerModel`` with the same weights and the same input.

For each variant: our encoder is built with random init (drop path 0); its weights go to the
HF layout with :func:`udaseg.models.weights.to_hf_mit` (checked to round-trip through
:func:`~udaseg.models.weights.remap_hf_mit`) and are loaded by ``SegformerModel.from_pretrained``
from a temporary local folder (config from a ``SegformerConfig`` matching the variant; HF maps the
hub's transformers-4 key names onto its own modules; nothing is downloaded, the hub is switched
off). Then:

* equality: the four stage outputs of both models (eval, fp32) and their max abs difference.
  HF's LayerNorms use eps 1e-5 where the MiT reference (and udaseg) use 1e-6 in the block and
  stage norms, so the outputs differ slightly; the check is repeated with our eps set to HF's,
  which must agree to float rounding (``--tol``), so any other difference would show;
* speed: forward of all four stages + backward of the sum of their means, alternating ours and
  HF's repetition by repetition (same machine load for both), median seconds of each and the
  ratio ours / HF (below 1: ours is faster). HF returns the four stages through
  ``output_hidden_states=True``.

transformers is a benchmark-only dependency (``pip install transformers``).

    python benchmarks/bench_mit_vs_hf.py --variants mit_b0 mit_b1 mit_b2 --size 256 --reps 5
    python benchmarks/bench_mit_vs_hf.py --variants mit_b3 mit_b4 mit_b5 --reps 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Figure

MISSING = ("bench_mit_vs_hf.py needs HuggingFace transformers, a benchmark-only dependency "
           "(not a udaseg requirement): pip install transformers")


def import_transformers():
    """``(transformers, SegformerConfig, SegformerModel)`` with the hub off; a clear SystemExit
    when transformers is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        from transformers import SegformerConfig, SegformerModel
    except ImportError as exc:
        raise SystemExit(f"{MISSING} ({exc})") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers, SegformerConfig, SegformerModel


def build_pair(variant: str, attn: str, seed: int = 0):
    """(ours, hf, loading report) with identical weights."""
    import torch
    from safetensors.torch import save_file

    from udaseg.models.mit import MixTransformer
    from udaseg.models.weights import remap_hf_mit, to_hf_mit

    _, SegformerConfig, SegformerModel = import_transformers()
    torch.manual_seed(seed)
    ours = MixTransformer(variant, drop_path_rate=0.0)
    ours_sd = ours.state_dict()
    hf_sd = to_hf_mit(ours_sd, prefix="encoder.")  # the hub layout of nvidia/mit-b*
    back = remap_hf_mit(hf_sd)
    if set(back) != set(ours_sd) or any(not torch.equal(back[k], ours_sd[k]) for k in ours_sd):
        raise AssertionError(f"{variant}: remap_hf_mit(to_hf_mit(sd)) != sd")
    c = ours.config
    cfg = SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=list(c.depths), sr_ratios=list(c.sr_ratios),
        hidden_sizes=list(c.embed_dims), num_attention_heads=list(c.num_heads),
        mlp_ratios=list(c.mlp_ratios), patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0, reshape_last_stage=True,
    )
    with tempfile.TemporaryDirectory(prefix="udaseg-hf-") as tmp:
        cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        hf, info = SegformerModel.from_pretrained(
            tmp, attn_implementation=attn, output_loading_info=True, local_files_only=True,
            dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                         "mismatched_keys")}
    if bad:
        raise AssertionError(f"{variant}: HF did not take every tensor: {bad}")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise AssertionError(f"{variant}: {n_ours} parameters in ours, {n_hf} in HF")
    return ours, hf, n_ours


def hf_stages(hf, x):
    out = hf(pixel_values=x, output_hidden_states=True)
    stages = list(out.hidden_states)
    if len(stages) != 4:
        raise AssertionError(f"HF returned {len(stages)} hidden states, expected the 4 stages")
    return stages


def max_diffs(ours_out, hf_out) -> tuple[float, float]:
    """(max abs difference over the four stages, that divided by the max |HF output|)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(ours_out, hf_out, strict=True))
    scale = max(float(b.abs().max()) for b in hf_out)
    return diff, diff / scale


def with_eps(model, eps: float):
    """A copy of ``model`` with every LayerNorm's eps set to ``eps``."""
    import copy

    import torch

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = eps
    return m


def measure(variant: str, args) -> Figure:
    """One variant: equality check, then alternating timed repetitions."""
    import torch

    device = args.torch_device
    ours, hf, n_params = build_pair(variant, args.hf_attn, args.seed)
    ours, hf = ours.to(device), hf.to(device)
    size = args.size
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(device)

    # equality, fp32, eval (dropout and drop path are 0 anyway)
    ours.eval()
    hf.eval()
    with torch.no_grad():
        ref = hf_stages(hf, x)
        got = ours(x)
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in ref]:
            raise AssertionError(f"{variant}: stage shapes differ: "
                                 f"{[tuple(t.shape) for t in got]} vs "
                                 f"{[tuple(t.shape) for t in ref]}")
        diff, rel = max_diffs(got, ref)
        diff_eps, _ = max_diffs(with_eps(ours, 1e-5)(x), ref)
    equal = diff_eps <= args.tol
    del ref, got
    if not equal:
        raise SystemExit(f"{variant}: outputs differ from HF by {diff_eps:.2e} > --tol "
                         f"{args.tol:g} with the same LayerNorm eps")

    # speed: forward + backward, ours and HF alternating
    ours.train()
    hf.train()

    def fwd_bwd(model, stages_fn):
        def fn():
            model.zero_grad(set_to_none=True)
            with common.autocast(device, args.precision):
                outs = stages_fn(x)
            loss = sum(o.float().mean() for o in outs)
            loss.backward()
        return fn

    run_ours = fwd_bwd(ours, ours)
    run_hf = fwd_bwd(hf, lambda t: hf_stages(hf, t))
    reps = args.reps_large if variant in ("mit_b3", "mit_b4", "mit_b5") else args.reps
    for _ in range(args.warmup):
        run_ours()
        run_hf()
    t_ours: list[float] = []
    t_hf: list[float] = []
    for _ in range(reps):
        for fn, times in ((run_ours, t_ours), (run_hf, t_hf)):
            common.sync(device)
            t0 = time.perf_counter()
            fn()
            common.sync(device)
            times.append(time.perf_counter() - t0)
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    setting = (f"{n_params / 1e6:.1f}M params, {args.batch}x3x{size}x{size}, fwd+bwd, "
               f"HF attn {args.hf_attn}, {device.type} {args.precision}")
    extras = {
        "ours ms": common.fmt(1000 * m_ours), "HF ms": common.fmt(1000 * m_hf),
        "reps": str(reps),
        "max abs diff": f"{diff:.2e} (rel {rel:.1e}; {diff_eps:.2e} with HF's LayerNorm eps)",
        "equal": f"yes (tol {args.tol:g})",
    }
    numbers = {"ours_s": m_ours, "hf_s": m_hf, "max_abs_diff": diff,
               "max_abs_diff_same_eps": diff_eps, "equal": float(equal), "params": n_params}
    return Figure(f"mit_vs_hf/{variant}", m_ours / m_hf, "x HF time", setting, False,
                  extras, numbers)


def run(args) -> Iterator[Figure]:
    import_transformers()  # fail first, with the install hint
    for variant in args.variants:
        yield measure(variant, args)


def notes(args) -> list[str]:
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        version = "missing"
    return [(f"transformers {version}; value = our median time / HF's (below 1: ours faster); "
             f"{args.reps} alternating repetitions (b3-b5: {args.reps_large}) after "
             f"{args.warmup} warm-up; same random weights (to_hf_mit) and input")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--variants", nargs="+",
                   default=["mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"])
    p.add_argument("--size", type=int, default=256, help="square input side")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (b0-b2)")
    p.add_argument("--reps-large", type=int, default=2, help="timed repetitions (b3-b5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                   help="HF attention implementation (ours is always SDPA)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="max abs difference allowed with the same LayerNorm eps")
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> list[Figure]:
    return common.main(parser(), run, "MiT vs HF SegformerModel (bench_mit_vs_hf.py)", __file__,
                       notes, argv)


if __name__ == "__main__":
    main()
