"""``udaseg align``: align a reference image (e.g. the GPS-matched day frame) onto a target image
(e.g. the night frame) with one of Refign's dense aligners, and write what it found.

::

    udaseg align TARGET REFERENCE --out DIR [--aligner similarity|uawarpc|identity]
                 [--weights FILE] [--vgg FILE] [--save-flow] [--device cpu|cuda]

``TARGET`` and ``REFERENCE`` are two image files, or two folders. Folders are searched
recursively for images (:data:`udaseg.eval.segment.IMAGE_SUFFIXES`; names starting with ``.``
left out) and paired **by equal relative stem** when every target has a reference of the same
relative path without suffix; otherwise **by sorted relative path** when both hold the same number
of images (Dark Zurich's ``GOPR0001/x_rgb_anon.png`` and ``GOPR0001_ref/x_ref_rgb_anon.png`` pair
this way); otherwise it is an error. The pairing used is printed.

Aligners (:mod:`udaseg.models.alignment`): ``similarity`` (default; global scale + translation,
no weights: :class:`~udaseg.models.alignment.similarity.SimilarityAligner`), ``uawarpc``
(Refign's UAWarpC; ``--weights`` = Refign's ``uawarpc_megadepth.ckpt``, ``--vgg`` = torchvision's
``vgg16-397923af.pth`` unless the checkpoint holds the VGG16 weights) and ``identity`` (zero flow).

Images are read with :func:`udaseg.data.io.read_image` and normalised with the ImageNet mean and
std as in training (:class:`udaseg.data.transforms.Normalize`). A reference of another size than
its target is resized to the target's size (bilinear; a note is printed). The aligner sees the
pair at the target's size, except ``uawarpc``, which gets it resized to multiples of 8; the flow
is then resized back (bilinear) and its values scaled to target pixels. Outputs for target
``sub/a.jpg`` (path relative to the TARGET folder, or the file's name)::

    DIR/warped/sub/a.png       the reference warped onto the target (black where invalid)
    DIR/flow/sub/a.png         the flow as colours (hue = direction, saturation = length relative
                               to the image's largest valid length; black = invalid)
    DIR/certainty/sub/a.png    uint8 certainty x 255 (0 where invalid)
    DIR/npz/sub/a.npz          with --save-flow: flow (2, H, W), certainty (H, W), valid (H, W),
                               float32, full target resolution, flow in target pixels,
                               channel 0 = x (target (x, y) matches reference (x + fx, y + fy))
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError

__all__ = ["ALIGNERS", "align_images", "align_main", "build_aligner", "flow_to_color",
           "pair_inputs"]

ALIGNERS = ("similarity", "uawarpc", "identity")


def build_aligner(name: str, weights: str | None = None, vgg: str | None = None,
                  device: str = "cpu"):
    """The DenseAligner ``name`` on ``device`` (UAWarpC is imported only when asked for)."""
    import torch

    if name == "similarity":
        from ..models.alignment.similarity import SimilarityAligner

        aligner = SimilarityAligner()
    elif name == "identity":
        from ..models.alignment import IdentityAligner

        aligner = IdentityAligner()
    elif name == "uawarpc":
        if not weights:
            raise ConfigError(
                "udaseg align --aligner uawarpc needs --weights FILE (Refign's "
                "uawarpc_megadepth.ckpt) and, unless that file holds the VGG16 weights, "
                "--vgg FILE (torchvision's vgg16-397923af.pth); or use --aligner similarity, "
                "which needs no weights")
        for flag, path in (("--weights", weights), ("--vgg", vgg)):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(
                    f"UAWarpC {flag} file not found: {path!r}; pass --weights FILE (Refign's "
                    "uawarpc_megadepth.ckpt) and --vgg FILE (torchvision's "
                    "vgg16-397923af.pth), or use --aligner similarity (no weights)")
        from ..models.alignment.uawarpc import UAWarpCAligner

        aligner = UAWarpCAligner.from_files(weights, vgg=vgg)
    else:
        raise ConfigError(f"unknown aligner {name!r}; choose one of {', '.join(ALIGNERS)}")
    return aligner.to(torch.device(device)).eval()


def _images(folder: Path) -> list[Path]:
    from .segment import IMAGE_SUFFIXES

    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def pair_inputs(target: str | os.PathLike[str], reference: str | os.PathLike[str]
                ) -> tuple[list[tuple[Path, Path, Path]], str]:
    """``([(target file, reference file, output stem relative to DIR)], how)``: two files, or two
    folders paired by equal relative stem, else by sorted order (module docstring)."""
    t, r = Path(target), Path(reference)
    for p, what in ((t, "TARGET"), (r, "REFERENCE")):
        if not p.exists():
            raise FileNotFoundError(f"udaseg align: {what} not found: {p}")
    if t.is_file() and r.is_file():
        return [(t, r, Path(t.stem))], "files"
    if t.is_dir() != r.is_dir():
        raise ConfigError(f"udaseg align: TARGET and REFERENCE must be two image files or two "
                          f"folders, got {t} and {r}")
    ts, rs = _images(t), _images(r)
    if not ts:
        raise ConfigError(f"udaseg align: no images in the TARGET folder {t}")
    stems = {p.relative_to(r).with_suffix(""): p for p in rs}
    rel = [p.relative_to(t).with_suffix("") for p in ts]
    if all(s in stems for s in rel):
        return [(p, stems[s], s) for p, s in zip(ts, rel)], "equal relative stem"
    if len(ts) == len(rs):
        return [(p, q, s) for p, q, s in zip(ts, rs, rel)], "sorted order"
    raise ConfigError(
        f"udaseg align: cannot pair {len(ts)} target images in {t} with {len(rs)} reference "
        f"images in {r}: neither equal relative stems nor equal counts (pairing by sorted order)")


def flow_to_color(flow: np.ndarray, valid: np.ndarray | None = None,
                  max_norm: float | None = None) -> np.ndarray:
    """(2, H, W) flow -> (H, W, 3) uint8 on the HSV colour wheel: hue = direction, saturation =
    length / ``max_norm`` (default the largest valid length), value 1; invalid pixels black."""
    fx, fy = flow[0].astype(np.float64), flow[1].astype(np.float64)
    mag = np.hypot(fx, fy)
    ok = np.ones(mag.shape, bool) if valid is None else valid.astype(bool)
    if max_norm is None:
        max_norm = float(mag[ok].max()) if ok.any() else 0.0
    hue = (np.arctan2(-fy, -fx) / np.pi + 1.0) / 2.0  # [0, 1]
    sat = np.clip(mag / max(max_norm, 1e-9), 0.0, 1.0)
    h6 = (hue * 6.0) % 6.0
    i = np.floor(h6).astype(int)
    f = h6 - i
    p, q, t = 1.0 - sat, 1.0 - sat * f, 1.0 - sat * (1.0 - f)
    v = np.ones_like(sat)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    rgb = np.stack((r, g, b), axis=-1) * ok[..., None]
    return np.round(rgb * 255).astype(np.uint8)


def _normalise(rgb: np.ndarray):
    import torch

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)


def _input_size(aligner_name: str, h: int, w: int) -> tuple[int, int]:
    if aligner_name == "uawarpc":
        return max(8, round(h / 8) * 8), max(8, round(w / 8) * 8)
    return h, w


def align_images(aligner, aligner_name: str, target: np.ndarray, reference: np.ndarray,
                 device: str = "cpu") -> dict[str, np.ndarray]:
    """Align (H, W, 3) uint8 ``reference`` onto ``target`` (same size). Returns ``flow``
    (2, H, W), ``certainty`` (H, W), ``valid`` (H, W) as float32 and ``warped`` (H, W, 3) uint8,
    all at the target's full resolution."""
    import torch
    import torch.nn.functional as F

    from ..models.alignment.base import sample_grid, warp

    h, w = target.shape[:2]
    if reference.shape[:2] != (h, w):
        raise ValueError(f"align_images: reference {reference.shape[:2]} and target {(h, w)} "
                         "differ in size; resize the reference first")
    dev = torch.device(device)
    t, r = _normalise(target).to(dev), _normalise(reference).to(dev)
    hi, wi = _input_size(aligner_name, h, w)
    if (hi, wi) != (h, w):
        t_in = F.interpolate(t, size=(hi, wi), mode="bilinear", align_corners=False)
        r_in = F.interpolate(r, size=(hi, wi), mode="bilinear", align_corners=False)
    else:
        t_in, r_in = t, r
    with torch.no_grad():
        out = aligner(t_in, r_in)
    flow, cert = out.flow.float(), out.certainty.float()
    if (hi, wi) != (h, w):
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        flow = flow * flow.new_tensor([w / wi, h / hi]).view(1, 2, 1, 1)
        cert = F.interpolate(cert, size=(h, w), mode="bilinear", align_corners=False)
        _, valid = sample_grid(flow)
    else:
        valid = out.valid
    ref_full = torch.from_numpy(np.ascontiguousarray(reference)).permute(2, 0, 1)[None].float()
    warped, _ = warp(ref_full.to(dev), flow)
    warped = warped * valid[:, None]
    return {
        "flow": flow[0].cpu().numpy().astype(np.float32),
        "certainty": cert[0, 0].clamp(0, 1).cpu().numpy().astype(np.float32),
        "valid": valid[0].cpu().numpy().astype(np.float32),
        "warped": warped[0].permute(1, 2, 0).round().clamp(0, 255).byte().cpu().numpy(),
    }


def _resize_rgb(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _with(stem: Path, suffix: str) -> Path:
    return stem.parent / (stem.name + suffix)  # keeps dots inside the name


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udaseg align",
        description="Align a reference image onto a target image (Refign's dense alignment) and "
                    "write the warped reference, a flow picture and the certainty.",
        epilog="TARGET/REFERENCE: two image files or two folders (paired by equal relative stem, "
               "else by sorted order). Outputs under DIR: warped/, flow/, certainty/ (PNG) and "
               "with --save-flow npz/ (flow (2,H,W), certainty (H,W), valid (H,W), float32, "
               "target pixels).")
    p.add_argument("target", metavar="TARGET", help="target image or folder (e.g. night frames)")
    p.add_argument("reference", metavar="REFERENCE",
                   help="reference image or folder (e.g. GPS-matched day frames)")
    p.add_argument("--aligner", default="similarity", choices=ALIGNERS,
                   help="similarity (no weights, global scale + shift), uawarpc (Refign's "
                        "network, needs --weights), identity (zero flow); default similarity")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="uawarpc: Refign's uawarpc_megadepth.ckpt (or a converted file)")
    p.add_argument("--vgg", default=None, metavar="FILE",
                   help="uawarpc: torchvision's vgg16-397923af.pth (unless --weights holds VGG16)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--save-flow", action="store_true",
                   help="also write npz/<name>.npz with flow, certainty and valid (float32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    return p


def align_main(argv: Sequence[str]) -> int:
    """``udaseg align TARGET REFERENCE --out DIR ...``; returns the exit status."""
    from ..data.io import read_image

    a = _build_parser().parse_args(list(argv))
    pairs, how = pair_inputs(a.target, a.reference)
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("udaseg align: --device cuda but no CUDA GPU is available")
    aligner = build_aligner(a.aligner, a.weights, a.vgg, a.device)
    out = Path(a.out)
    print(f"udaseg align: {len(pairs)} pair(s) ({how}), aligner {a.aligner} -> {out}")
    for t_path, r_path, stem in pairs:
        target, reference = read_image(t_path), read_image(r_path)
        h, w = target.shape[:2]
        if reference.shape[:2] != (h, w):
            rh, rw = reference.shape[:2]
            print(f"note: reference {r_path} is {rw}x{rh}, target {t_path} is {w}x{h}: the "
                  "reference is resized to the target's size")
            reference = _resize_rgb(reference, h, w)
        res = align_images(aligner, a.aligner, target, reference, a.device)
        valid = res["valid"] > 0.5
        _save_png(out / "warped" / _with(stem, ".png"), res["warped"])
        _save_png(out / "flow" / _with(stem, ".png"), flow_to_color(res["flow"], valid))
        cert8 = np.round(res["certainty"] * valid * 255).astype(np.uint8)
        _save_png(out / "certainty" / _with(stem, ".png"), cert8)
        if a.save_flow:
            path = out / "npz" / _with(stem, ".npz")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, flow=res["flow"], certainty=res["certainty"], valid=res["valid"])
        fx, fy = res["flow"][0], res["flow"][1]
        print(f"{t_path.name} <- {r_path.name}: mean flow ({fx.mean():+.2f}, {fy.mean():+.2f}) px, "
              f"certainty {res['certainty'].mean():.2f}, valid {100 * valid.mean():.1f} %")
    return 0
