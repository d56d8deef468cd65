"""mmseg-0.16 checkpoints (DAFormer / HRDA / MIC / CISS / CDDA): picking the model out of a DACS
checkpoint or a bare segmentor dict, and the mmseg-names -> udaseg-names mapping (MiT backbone,
DAFormer / SegFormer heads, HRDA wrapper) that every format goes through."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ...errors import CheckpointError
from .common import (
    Entry,
    ImportReport,
    UnsupportedCheckpointError,
    Which,
    _has,
    _take,
    claim,
)
from .reading import RawCheckpoint


def select_mmseg_uda(
    raw: RawCheckpoint, which: Which, report: ImportReport, used: set[str]
) -> dict[str, Entry]:
    """A DACS checkpoint: ``model.*`` (student) / ``ema_model.*`` (teacher), ``imnet_model.*``."""
    t = raw.tensors
    sel, other = ("model.", "ema_model.") if which == "student" else ("ema_model.", "model.")
    seg = _take(t, sel)
    if not seg:
        raise CheckpointError(
            f"{raw.path!r}: no {sel}* tensors, so there is no {which} to convert; the file "
            f"has: {', '.join(sorted({k.split('.')[0] + '.*' for k in t}))}"
        )
    claim(used, seg)
    report.drop(
        f"{other}*",
        (
            "the EMA teacher, not selected (--which teacher picks it)"
            if which == "student"
            else "the student, not selected (the papers evaluate the student)"
        ),
        sorted(k for k in t if k.startswith(other)),
    )
    report.drop(
        "imnet_model.*",
        "FD's frozen ImageNet model, used only for the training loss (expected)",
        sorted(k for k in t if k.startswith("imnet_model.")),
    )
    used.update(report.dropped_keys)
    return seg


def select_mmseg_segmentor(
    raw: RawCheckpoint, which: Which, report: ImportReport, used: set[str]
) -> dict[str, Entry]:
    """A bare segmentor dict (``backbone.*`` / ``decode_head.*``)."""
    t = raw.tensors
    if which == "teacher":
        raise CheckpointError(
            f"{raw.path!r} is a bare segmentor checkpoint (one model, no EMA teacher); "
            "--which teacher does not apply"
        )
    seg = {k: e for k, e in _take(t, "").items() if k.startswith(("backbone.", "decode_head."))}
    claim(used, seg)
    return seg


# ------------------------------------------------------------------------------ key mapping core
def _permute_nvlabs_fuse(w: Tensor, levels: int) -> Tensor:
    """``linear_fuse`` weight for [cL..c1] input blocks -> the same map for [c1..cL] blocks."""
    blocks = w.chunk(levels, dim=1)
    return torch.cat(blocks[::-1], dim=1).contiguous()


def _map_head(
    head: Mapping[str, Entry],
    where: str,
    report: ImportReport,
    dropped_label: str,
    keep_nvlabs_order: bool = False,
) -> tuple[dict[str, Entry], dict[str, object]]:
    """One decode head in mmseg names -> our names, plus its inferred type and widths.

    ``keep_nvlabs_order``: an NVlabs SegFormer head (``linear_c{1..4}``) is only renamed, its
    ``linear_fuse`` keeps the [c4..c1] input order (for a target head built with
    ``concat_order="nvlabs"``, e.g. Refign's HRDA* scale attention)."""
    keys = list(head)

    def shape(name: str) -> tuple[int, ...]:
        if name not in head:
            raise CheckpointError(
                f"{report.source!r}: {where} has no {name!r} (its keys start with: "
                f"{', '.join(sorted(keys)[:6])})"
            )
        return tuple(head[name][1].shape)

    if _has(keys, "embed_layers."):
        if _has(keys, "fuse_layer.aspp_modules."):
            idx = {
                int(m.group(1))
                for k in keys
                if (m := re.match(r"fuse_layer\.aspp_modules\.(\d+)\.", k))
            }
            if any(k.startswith("fuse_layer.aspp_modules.1.conv.") for k in keys):
                raise UnsupportedCheckpointError(
                    f"{report.source!r}: {where} is the non-separable ASPP decoder "
                    "(daformer_aspp ablation); udaseg implements only the separable (sepaspp) "
                    "DAFormer head"
                )
            if len(idx) != 4:
                raise UnsupportedCheckpointError(
                    f"{report.source!r}: {where} has {len(idx)} ASPP branches; udaseg's DAFormer "
                    "head has 4 (dilations 1, 6, 12, 18)"
                )
            kind = "daformer"
        elif "fuse_layer.conv.weight" in head:
            kind = "daformer_conv1"
        else:
            raise UnsupportedCheckpointError(
                f"{report.source!r}: {where}: DAFormer-style embeddings with an unknown fusion "
                f"(keys: {', '.join(sorted(k for k in keys if k.startswith('fuse_layer'))[:6])}); "
                "only the sepaspp head (and conv1 for HRDA attention) are supported"
            )
        embed = shape("embed_layers.0.proj.weight")[0]
        classes, channels = shape("conv_seg.weight")[:2]
        return dict(head), {
            "head": kind,
            "embed_dim": embed,
            "channels": channels,
            "num_classes": classes,
        }
    if _has(keys, "linear_c.0.", "linear_c1."):
        nvlabs = _has(keys, "linear_c1.")
        out: dict[str, Entry] = {}
        unused = sorted(src for k, (src, _) in head.items() if k.startswith("conv_seg."))
        report.drop(
            dropped_label,
            "unused conv_seg of mmseg's BaseDecodeHead (the SegFormer head "
            "predicts with linear_pred)",
            unused,
        )
        levels = 0
        for k, (src, v) in head.items():
            if k.startswith("conv_seg."):
                continue
            if nvlabs and (m := re.match(r"^linear_c(\d)\.(.+)$", k)):
                levels = max(levels, int(m.group(1)))
                out[f"linear_c.{int(m.group(1)) - 1}.{m.group(2)}"] = (src, v)
            else:
                out[k] = (src, v)
        if nvlabs and keep_nvlabs_order:
            report.notes.append(
                f"{where}: NVlabs SegFormer head: linear_c{{1..{levels}}} renamed to "
                f"linear_c.{{0..{levels - 1}}}; linear_fuse keeps the [c4..c1] concatenation "
                "order (the target head concatenates in that order)"
            )
        elif nvlabs:
            src, w = out.get("linear_fuse.conv.weight", (None, None))
            if w is None:
                raise CheckpointError(f"{report.source!r}: {where} has no linear_fuse.conv.weight")
            out["linear_fuse.conv.weight"] = (src, _permute_nvlabs_fuse(w, levels))
            report.notes.append(
                f"{where}: NVlabs SegFormer head: linear_c{{1..{levels}}} renamed to "
                f"linear_c.{{0..{levels - 1}}} and linear_fuse input channels permuted from the "
                "[c4..c1] to udaseg's [c1..c4] concatenation order"
            )
        embed = (
            int(out["linear_c.0.proj.weight"][1].shape[0]) if "linear_c.0.proj.weight" in out else 0
        )
        classes = int(out["linear_pred.weight"][1].shape[0]) if "linear_pred.weight" in out else 0
        return out, {
            "head": "segformer",
            "embed_dim": embed,
            "channels": embed,
            "num_classes": classes,
        }
    if _has(keys, "aspp_modules.", "conv2d_list."):
        return _map_dlv2_head(head, where, report)
    raise UnsupportedCheckpointError(
        f"{report.source!r}: {where}: unknown decode head (keys: {', '.join(sorted(keys)[:8])}); "
        "udaseg maps the DAFormer (sepaspp), SegFormer and DeepLabV2 heads"
    )


_DLV2_KEY = re.compile(r"^(?:aspp_modules\.(\d+)\.conv|conv2d_list\.(\d+))\.(weight|bias)$")


def _map_dlv2_head(
    head: Mapping[str, Entry], where: str, report: ImportReport
) -> tuple[dict[str, Entry], dict[str, object]]:
    """A DeepLabV2 classifier: DAFormer/HRDA's ``DLV2Head`` (``aspp_modules.{k}.conv.*``, the
    mmseg ASPPModule of ConvModules, no ``conv_seg``) or Refign's ``DeepLabV2Head``
    (``conv2d_list.{k}.*``) -> udaseg's ``aspp_modules.{k}.conv.*``. The dilations are not in the
    weights: 4 branches are taken as (6, 12, 18, 24), 2 as DAFormer's reduced (6, 12)."""
    out: dict[str, Entry] = {}
    refign = False
    for k, (src, v) in head.items():
        m = _DLV2_KEY.match(k)
        if m is None:
            raise UnsupportedCheckpointError(
                f"{report.source!r}: {where}: {k!r} is not a DeepLabV2-head tensor "
                "(expected aspp_modules.<k>.conv.weight/bias or conv2d_list.<k>.weight/bias)"
            )
        refign = refign or m.group(2) is not None
        out[f"aspp_modules.{m.group(1) or m.group(2)}.conv.{m.group(3)}"] = (src, v)
    branches = sorted({int(k.split(".")[1]) for k in out})
    kind = {4: "deeplabv2", 2: "deeplabv2_red"}.get(len(branches))
    if kind is None or branches != list(range(len(branches))):
        raise UnsupportedCheckpointError(
            f"{report.source!r}: {where}: DeepLabV2 head with branches {branches}; udaseg's "
            "DeepLabV2 heads have 4 (dilations 6, 12, 18, 24) or 2 (6, 12)"
        )
    if "aspp_modules.0.conv.weight" not in out:
        raise CheckpointError(f"{report.source!r}: {where} has no DeepLabV2 branch-0 weight")
    report.notes.append(
        f"{where}: DeepLabV2 head with {len(branches)} branches, dilations "
        + ("6, 12, 18, 24" if kind == "deeplabv2" else "6, 12 (DAFormer's reduced head)")
        + " assumed (dilations are not stored in the weights)"
        + ("; Refign's conv2d_list.<k> renamed to aspp_modules.<k>.conv" if refign else "")
    )
    classes = int(out["aspp_modules.0.conv.weight"][1].shape[0])
    return out, {"head": kind, "embed_dim": 0, "channels": None, "num_classes": classes}


_RESNET_DEPTHS = {6: 50, 23: 101}


def _resnet_variant(backbone: Mapping[str, Entry], report: ImportReport) -> str | None:
    """The udaseg ResNet name for a ResNet backbone state dict, None if it is no ResNet.

    Deep stem (``stem.*``) -> ``resnet{50,101}_v1c``; Refign / DSRNSS checkpoints (Lightning
    format) get ``resnet101_v1c_refign`` (their layer3/4 first blocks are not dilation-contracted,
    unlike mmseg/DAFormer's); plain stem (``conv1``) -> ``resnet{50,101}``."""
    if "layer1.0.conv1.weight" not in backbone:
        return None
    blocks = {int(m.group(1)) for k in backbone if (m := re.match(r"^layer3\.(\d+)\.", k))}
    depth = _RESNET_DEPTHS.get(len(blocks))
    if depth is None:
        raise UnsupportedCheckpointError(
            f"{report.source!r}: ResNet backbone with {len(blocks)} layer3 blocks; udaseg builds "
            "ResNet-50 (6) and ResNet-101 (23)"
        )
    if "stem.0.weight" in backbone:
        if depth == 101 and report.format == "lightning-refign":
            return "resnet101_v1c_refign"
        return f"resnet{depth}_v1c"
    return f"resnet{depth}" if "conv1.weight" in backbone else None


def _to_udaseg(seg: Mapping[str, Entry], report: ImportReport) -> tuple[dict[str, Entry], dict]:
    """mmseg segmentor names -> our EncoderDecoder / HRDASegmentor names + the model config."""
    from ..weights import guess_mit_variant

    report.unexpected.extend(
        src for k, (src, _) in seg.items() if not k.startswith(("backbone.", "decode_head."))
    )
    backbone = {k[len("backbone.") :]: e for k, e in seg.items() if k.startswith("backbone.")}
    if not backbone:
        raise CheckpointError(f"{report.source!r}: the selected model has no backbone.* tensors")
    resnet = None
    if "patch_embed1.proj.weight" not in backbone:
        resnet = _resnet_variant(backbone, report)
        if resnet is None:
            raise UnsupportedCheckpointError(
                f"{report.source!r}: the backbone is not a MiT (SegFormer) encoder nor a ResNet "
                f"(its keys start with {', '.join(sorted(backbone)[:4])}); udaseg imports MiT "
                "and ResNet (DeepLabV2) segmentors"
            )
    variant: str | None
    if resnet is not None:
        classifier = sorted(src for k, (src, _) in backbone.items() if k.startswith("fc."))
        report.drop("backbone.fc.*", "the ResNet ImageNet classifier (unused by segmentors)",
                    classifier)
        backbone = {k: e for k, e in backbone.items() if not k.startswith("fc.")}
        variant = resnet
        report.notes.append(
            f"backbone: ResNet -> {resnet} (strides 1,2,1,1, dilations 1,1,2,4; "
            + ("layer3/4 first blocks not dilation-contracted, as Refign builds it)"
               if resnet.endswith("_refign") else
               "mmseg's contract_dilation as DAFormer builds it; --backbone overrides)")
        )
    else:
        classifier = sorted(src for k, (src, _) in backbone.items() if k.startswith("head."))
        report.drop("backbone.head.*", "the MiT ImageNet classifier (unused by segmentors)",
                    classifier)
        backbone = {k: e for k, e in backbone.items() if not k.startswith("head.")}
        variant = guess_mit_variant({k: v for k, (_, v) in backbone.items()})
    if variant is None:
        dims = [
            tuple(backbone[f"patch_embed{i}.proj.weight"][1].shape)
            for i in range(1, 5)
            if f"patch_embed{i}.proj.weight" in backbone
        ]
        depths = [
            1
            + max(
                (int(m.group(1)) for k in backbone if (m := re.match(rf"^block{i}\.(\d+)\.", k))),
                default=-1,
            )
            for i in range(1, 5)
        ]
        from ..mit import MIT_VARIANTS

        raise CheckpointError(
            f"{report.source!r}: the backbone matches no MiT variant: patch_embed{{1..4}}.proj."
            f"weight shapes {dims}, block depths {depths}; known variants: "
            + ", ".join(
                f"{n} (dims {c.embed_dims}, depths {c.depths})" for n, c in MIT_VARIANTS.items()
            )
        )

    decode = {k[len("decode_head.") :]: e for k, e in seg.items() if k.startswith("decode_head.")}
    if not decode:
        raise CheckpointError(f"{report.source!r}: the selected model has no decode_head.* tensors")
    hrda = _has(list(decode), "head.", "scale_attention.")
    out: dict[str, Entry] = {}
    config: dict[str, object] = {"backbone": variant, "hrda": hrda}
    if hrda:
        main = {k[len("head.") :]: e for k, e in decode.items() if k.startswith("head.")}
        att = {
            k[len("scale_attention.") :]: e
            for k, e in decode.items()
            if k.startswith("scale_attention.")
        }
        if not main or not att:
            raise UnsupportedCheckpointError(
                f"{report.source!r}: HRDA decode head with "
                f"{'no decode_head.scale_attention.*' if not att else 'no decode_head.head.*'} "
                "tensors (fixed-attention ablation or incomplete file); udaseg needs both"
            )
        wrapper = sorted(
            src for k, (src, _) in decode.items() if not k.startswith(("head.", "scale_attention."))
        )
        unused = [s for s in wrapper if s.split("decode_head.", 1)[-1].startswith("conv_seg.")]
        report.drop(
            "decode_head.conv_seg.* (HRDA wrapper)",
            "unused classifier that mmseg's BaseDecodeHead gives the HRDA wrapper head",
            unused,
        )
        report.unexpected.extend(s for s in wrapper if s not in unused)
        main_mapped, head_cfg = _map_head(
            main, "decode_head.head", report, "decode_head.head.conv_seg.*"
        )
        # Refign's HRDA* (refign 1.3): a SegFormer MLP attention next to a DAFormer main head;
        # udaseg builds it with HRDAConfig(attention_head="segformer"), [c4..c1] concatenation
        segformer_att = _has(list(att), "linear_c1.", "linear_c.0.") and _has(
            list(main), "embed_layers."
        )
        att_mapped, att_cfg = _map_head(
            att,
            "decode_head.scale_attention",
            report,
            "decode_head.scale_attention.conv_seg.*",
            keep_nvlabs_order=segformer_att,
        )
        if (
            segformer_att
            and _has(list(att), "linear_c.0.")  # DAFormer-repo [c1..c4] naming
            and "linear_fuse.conv.weight" in att_mapped
        ):
            src, w = att_mapped["linear_fuse.conv.weight"]
            levels = len({k.split(".")[1] for k in att_mapped if k.startswith("linear_c.")})
            att_mapped["linear_fuse.conv.weight"] = (src, _permute_nvlabs_fuse(w, levels))
            report.notes.append(
                "decode_head.scale_attention: linear_fuse input channels permuted from the "
                "[c1..c4] to the [c4..c1] order of udaseg's SegFormer attention head"
            )
        if segformer_att:
            config["hrda_attention_head"] = "segformer"
        if head_cfg["head"] == "daformer_conv1":
            raise UnsupportedCheckpointError(
                f"{report.source!r}: the HRDA main head is the daformer_conv1 ablation decoder; "
                "udaseg implements the sepaspp DAFormer head"
            )
        k_att = int(att_cfg["num_classes"])
        if k_att not in (1, int(head_cfg["num_classes"])):
            raise CheckpointError(
                f"{report.source!r}: decode_head.scale_attention predicts {k_att} channels; "
                f"expected {head_cfg['num_classes']} (class-wise) or 1"
            )
        config["hrda_attention_classwise"] = k_att != 1
        out.update({f"model.backbone.{k}": e for k, e in backbone.items()})
        out.update({f"model.decode_head.{k}": e for k, e in main_mapped.items()})
        out.update({f"scale_attention_head.{k}": e for k, e in att_mapped.items()})
        report.notes.append(
            "HRDA: decode_head.head.* -> model.decode_head.*, decode_head.scale_attention.* -> "
            "scale_attention_head.*, backbone.* -> model.backbone.*"
        )
    else:
        main_mapped, head_cfg = _map_head(decode, "decode_head", report, "decode_head.conv_seg.*")
        if head_cfg["head"] == "daformer_conv1":
            raise UnsupportedCheckpointError(
                f"{report.source!r}: the decode head is the daformer_conv1 ablation decoder; "
                "udaseg implements the sepaspp DAFormer head"
            )
        out.update({f"backbone.{k}": e for k, e in backbone.items()})
        out.update({f"decode_head.{k}": e for k, e in main_mapped.items()})
    if head_cfg["head"] == "daformer" and head_cfg["embed_dim"] != head_cfg["channels"]:
        raise UnsupportedCheckpointError(
            f"{report.source!r}: DAFormer head with embedding width {head_cfg['embed_dim']} != "
            f"channels {head_cfg['channels']}; udaseg builds both at the same width"
        )
    config.update(
        head=head_cfg["head"],
        head_channels=None if head_cfg["channels"] is None else int(head_cfg["channels"]),
        num_classes=int(head_cfg["num_classes"]),
    )
    return out, config

