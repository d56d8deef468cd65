"""UDAModule: the LightningModule around a segmentor (Lightning glue only, no method math).

Training uses manual optimisation (one optimiser step per iteration after one or more
backward passes, as DACS does) with the paper's AdamW + poly/warm-up schedule stepped per
iteration. The iteration itself is :meth:`udaseg.adapt.self_training.SelfTraining.step`:
source-only training when ``self_training`` is None, DACS otherwise, with the methods listed
under ``methods`` plugged into its extension points. This module never names a method.

Validation scores each named split with its own confusion matrix (synchronised across
processes) and keeps the last results in :attr:`UDAModule.val_results` for reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch

from ..adapt.self_training import DACSConfig, SelfTraining
from ..errors import CheckpointError, NonFiniteLossError
from ..data.classes import label_set as get_label_set
from ..eval.inference import slide_inference, whole_inference
from ..eval.metrics import IoUResult, SegmentationMetric
from ..models.hrda import HRDAConfig, HRDASegmentor
from ..models.segmentor import build_segmentor
from .optim import OptimConfig, build_optimizer, match_state_layout


@dataclass
class InferenceConfig:
    """Test-time inference: ``whole`` image, or ``slide`` windows of ``crop`` with ``stride``."""

    mode: Literal["whole", "slide"] = "whole"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    batch_windows: int | None = 1
    """Slide windows per network call: 1 (mmseg, least memory) or more / None (all in one call,
    faster on a GPU with memory to spare); the result is the same."""


@dataclass
class SpeedConfig:
    """Speed switches that leave the maths unchanged. The precision is the trainer's flag
    (``--trainer.precision bf16-mixed``: bf16 autocast, losses and softmax statistics in fp32);
    fused AdamW is ``model.optim.fused``. All off by default: on this project's CPU machines
    neither pays (benchmarks/results.md); on GPUs measure with ``benchmarks/bench_train_step.py``.
    """

    channels_last: bool = False
    """Convolution weights channels-last (NHWC); the backbone stores its input images the same
    way and its feature maps stay views of its tokens. Helps cuDNN convolutions under bf16."""
    compile: bool = False
    """``torch.compile`` (in place, :meth:`torch.nn.Module.compile`: state-dict keys unchanged)
    every backbone, decode head and scale-attention head: the student's and their copies (EMA
    teacher, FD's ImageNet backbone). The random HRDA crop and the mixing stay eager."""
    compile_mode: str | None = None
    """``torch.compile`` mode: None (default), ``max-autotune``, or ``reduce-overhead`` (CUDA
    graphs; untested here with networks that run several times per iteration). One compiled
    backbone serves the student, teacher, FD copy and evaluation at several input sizes: check
    for recompilations with ``TORCH_LOGS=recompiles`` (dynamo falls back to eager after its
    recompile limit, with a warning)."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend (``aot_eager`` traces without generating kernels: for tests)."""


def compile_networks(root: torch.nn.Module, student: torch.nn.Module, **kwargs) -> int:
    """Compile in place every submodule of ``root`` whose type is that of ``student``'s
    backbone, decode head or scale-attention head (so the EMA teacher's and FD's copies are
    compiled too, whatever method made them); returns how many were compiled."""
    parts = (getattr(student, name, None)
             for name in ("backbone", "decode_head", "scale_attention_head"))
    kinds = {type(m) for m in parts if isinstance(m, torch.nn.Module)}
    found = [m for m in root.modules() if type(m) in kinds]
    for m in found:
        m.compile(**kwargs)
    return len(found)


def as_config(cls, value):
    """``value`` as a ``cls`` dataclass (accepts an instance, a dict of its fields, or None)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        from ..catalog import config_from_dict

        return config_from_dict(cls, value, cls.__name__)
    raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def read_segmentor_weights(path: str) -> dict[str, torch.Tensor]:
    """Segmentor weights from a udaseg Lightning ``.ckpt`` (its ``model.*`` entries) or from a
    weights file (``export-weights`` / ``udaseg convert`` ``.safetensors``, ``.pth``), whose keys
    are already the segmentor's; read with ``weights_only=True``."""
    from ..models.segmentor import inference_state
    from ..models.weights import load_state_dict_file

    state = load_state_dict_file(path)
    if str(path).endswith(".ckpt"):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return inference_state(state)


def load_segmentor_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load ``state`` into ``model`` (strict); when it does not fit, say how (counts and the first
    keys, and the file's architecture when it records one) instead of torch's full key list."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if not (missing or unexpected or shapes):
        model.load_state_dict(state, strict=True)
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{more}")
    arch = _recorded_architecture(path)
    hint = (
        f" Set model.backbone / model.head / model.head_channels (and model.hrda) to the file's "
        f"({arch})." if arch else
        " The file records no udaseg architecture: a checkpoint released by another code base "
        "(DAFormer, HRDA, MIC, CISS, Refign ...) is imported with `udaseg convert` first."
    )
    raise CheckpointError(
        f"model.init_weights: {path} does not fit this model: {'; '.join(parts)}.{hint}"
    )


def _recorded_architecture(path: str) -> str:
    """The backbone/head/width a udaseg checkpoint or exported file records, as text."""
    keys = ("backbone", "head", "head_channels", "num_classes")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        else:
            meta = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return ", ".join(f"{k}={meta[k]}" for k in keys if k in meta)


def _all_finite(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """One device boolean: every loss term is finite (no host synchronisation by itself)."""
    if not losses:
        return torch.tensor(True)
    return torch.stack([v.detach().float().reshape(()) for v in losses.values()]).isfinite().all()


def _world_size() -> int:
    """Processes in the initialised torch.distributed group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _on_every_rank(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` and-ed over the DDP processes (a MIN all-reduce queued on the device: no host
    synchronisation with NCCL), so that every rank stops or skips the same iteration; ``flag``
    itself when not distributed."""
    import torch.distributed as dist

    if _world_size() == 1:
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def average_bn_statistics(module: torch.nn.Module) -> int:
    """Average the BatchNorm running means and variances of ``module`` over the DDP processes
    (as timm's ``distribute_bn``), so every rank evaluates and checkpoints the same statistics
    gathered from all ranks' batches; returns the number of BatchNorm layers averaged. Nothing
    to do without DDP or with SyncBatchNorm (whose statistics are global already)."""
    import torch.distributed as dist

    if _world_size() == 1:
        return 0
    norms = [m for m in module.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and not isinstance(m, torch.nn.SyncBatchNorm)]
    buffers = [b for m in norms for b in (m.running_mean, m.running_var)]
    if not buffers:
        return 0
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= _world_size()
    for b, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        b.copy_(part.view_as(b))
    return len(norms)


def rng_states() -> dict:
    """torch (CPU and CUDA), numpy and Python generator states as tensors and plain values (so
    checkpoints stay loadable with ``weights_only=True``)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Inverse of :func:`rng_states`."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class UDAModule(L.LightningModule):
    """A segmentor trained on the source only, or adapted with DACS and the configured methods.

    Args:
        backbone: ``mit_b0`` .. ``mit_b5`` (or ``mit_tiny`` for CPU demos).
        head: ``daformer`` or ``segformer``.
        num_classes: output classes (19 Cityscapes train IDs).
        head_channels: decoder width (None = the paper's: 256 DAFormer, 768 SegFormer).
        drop_path_rate: stochastic depth of the backbone (0.1 in the papers).
        pretrained: local path of ImageNet MiT weights (``mit_b5.pth`` or HF ``nvidia/mit-b5``).
        init_weights: a udaseg checkpoint (``.ckpt``) whose segmentor weights initialise the
            student (e.g. a source-only model to adapt); loaded with ``weights_only=True``.
        optim: AdamW + poly/warm-up settings.
        ce_reduction: ``all_pixels`` (mmseg/DAFormer, default) or ``valid_pixels``.
        label_set: evaluation protocol (``cityscapes19``, ``synthia16``, ``dsec18``).
        inference: whole-image or sliding-window evaluation.
        self_training: DACS settings; None trains on the source only.
        hrda: wrap the segmentor in HRDA multi-resolution training/inference (None = single scale).
        speed: channels-last and ``torch.compile`` switches (:class:`SpeedConfig`).
        methods: method name (see ``udaseg.catalog.METHODS``) -> its settings, e.g.
            ``{"fd": {}, "mic": {"block_size": 64}}``; they stack in the order given. Hooks are
            built after ``pretrained``/``init_weights`` are loaded, so FD's frozen copy holds the
            weights training starts from (ImageNet weights in the paper configs).
        nonfinite: what a NaN/inf loss does. ``stop``: the run stops with an error naming the
            iteration and the loss terms, and no checkpoint of the poisoned weights is written.
            The check reads each iteration's flag one iteration later (so the host never waits
            for the iteration it has just queued on the GPU: at most one more iteration runs),
            and reads every pending flag before a checkpoint is saved and when training ends.
            ``skip``: the iteration's update is dropped (optimiser and schedule not stepped)
            and counted in ``train/skipped``; this costs one host synchronisation per iteration.
    """

    def __init__(
        self,
        backbone: str = "mit_b5",
        head: str = "daformer",
        num_classes: int = 19,
        head_channels: int | None = None,
        drop_path_rate: float = 0.1,
        pretrained: str | None = None,
        init_weights: str | None = None,
        optim: OptimConfig | None = None,
        ce_reduction: Literal["all_pixels", "valid_pixels"] = "all_pixels",
        label_set: str = "cityscapes19",
        inference: InferenceConfig | None = None,
        self_training: DACSConfig | None = None,
        methods: dict[str, dict] | None = None,
        hrda: HRDAConfig | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        speed: SpeedConfig | None = None,
    ):
        super().__init__()
        # dataclass settings are stored as plain dicts, so checkpoints load with weights_only=True
        optim, inference = as_config(OptimConfig, optim), as_config(InferenceConfig, inference)
        self_training, hrda = as_config(DACSConfig, self_training), as_config(HRDAConfig, hrda)
        speed = as_config(SpeedConfig, speed) or SpeedConfig()
        # (the plain arguments first: an ``ignore`` list would drop the dicts saved before it)
        self.save_hyperparameters(ignore=["optim", "inference", "self_training", "hrda", "speed"])
        self.save_hyperparameters(
            {
                name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                for name, value in dict(
                    optim=optim, inference=inference, self_training=self_training, hrda=hrda,
                    speed=speed,
                ).items()
            }
        )
        get_label_set(label_set)  # fail early on a typo
        self.optim_cfg = optim or OptimConfig()
        self.speed_cfg = speed
        self._speed_applied = False
        self.inference_cfg = inference or InferenceConfig()
        self.model = build_segmentor(
            backbone=backbone,
            head=head,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            head_channels=head_channels,
            pretrained=pretrained,
        )
        # weights of a single-scale segmentor initialise it before an HRDA wrap; weights of an
        # HRDA segmentor (with its scale-attention head, e.g. a converted HRDA/MIC checkpoint)
        # are loaded into the wrapped model
        init_state = read_segmentor_weights(init_weights) if init_weights is not None else None
        hrda_state = init_state is not None and any(
            k.startswith("scale_attention_head.") for k in init_state
        )
        if init_state is not None and not hrda_state:
            load_segmentor_weights(self.model, init_state, init_weights)
        if hrda is not None:
            self.model = HRDASegmentor(self.model, hrda)
        if hrda_state:
            if hrda is None:
                raise CheckpointError(
                    f"model.init_weights: {init_weights} holds an HRDA segmentor (scale-attention "
                    "head); set model.hrda (e.g. the benchmark's hrda.yaml) to load it"
                )
            load_segmentor_weights(self.model, init_state, init_weights)
        from ..catalog import build_methods

        hooks = build_methods(methods or {}, self.model)
        self.algorithm = SelfTraining(
            self.model, self_training, refiners=hooks.refiners, mixer=hooks.mixer,
            aux_losses=hooks.aux_losses, ce_reduction=ce_reduction,
            target_transforms=hooks.target_transforms, mixed_transforms=hooks.mixed_transforms,
            detail_loss_weight=hrda.detail_loss_weight if hrda is not None else 0.1,
        )
        self.automatic_optimization = False
        self._skipped = 0
        # (iteration, loss terms, finite flag on the device) not read on the host yet
        self._pending: list[tuple[int, dict, torch.Tensor]] = []
        self.val_metrics = torch.nn.ModuleDict()
        self.val_results: dict[str, IoUResult] = {}

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H/4, W/4) of normalised images (B, 3, H, W)."""
        return self.model(images).logits

    def predict_logits(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Logits at ``out_size`` with the configured whole/slide inference."""
        cfg = self.inference_cfg
        if cfg.mode == "slide":
            return slide_inference(
                self, images, crop_size=cfg.crop, stride=cfg.stride,
                num_classes=self.hparams.num_classes, out_size=out_size,
                batch_windows=cfg.batch_windows,
            )
        return whole_inference(self, images, out_size=out_size)

    # ------------------------------------------------------------------ speed switches
    def configure_model(self) -> None:
        """Apply :class:`SpeedConfig` once, before the optimiser and any DDP wrapper exist."""
        if self._speed_applied:
            return
        self._speed_applied = True
        cfg = self.speed_cfg
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)
        if cfg.compile:
            compile_networks(self, self.model, mode=cfg.compile_mode, backend=cfg.compile_backend)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add the random generators' states, so a resumed run draws what the interrupted one
        would have drawn next (ClassMix classes, strong augmentation, MIC masks, dropout).
        Refuses to save weights updated by a non-finite loss (``nonfinite: stop``)."""
        self._check_finite("before saving a checkpoint")  # every pending flag
        checkpoint["udaseg_rng"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "udaseg_rng" in checkpoint:
            set_rng_states(checkpoint["udaseg_rng"])

    def configure_optimizers(self):
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        opt, sched = build_optimizer(self.model, self.optim_cfg, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        step = self.global_step
        losses = self.algorithm.step(
            self.model, batch["source"], batch.get("target"), step, self.manual_backward
        )
        # DDP: a NaN on one rank reaches every rank's gradients through the all-reduce, so the
        # ranks agree on the flag and stop or skip together (none is left waiting for the others)
        finite = _on_every_rank(_all_finite(losses))
        if self.hparams.nonfinite == "skip":
            if not bool(finite):  # host sync
                opt.zero_grad(set_to_none=True)
                self._skipped += 1
                self.log("train/skipped", float(self._skipped))
                return
        else:
            self._pending.append((step, losses, finite))  # read later, no sync here
        opt.step()
        sched.step()
        for name, value in losses.items():
            # no prog_bar: Lightning would read it on the host after every iteration;
            # udaseg.engine.callbacks.ProgressBar shows src/mix every N iterations instead
            self.log(f"train/{name}", value)

    def _check_finite(self, when: str, keep_newest: int = 0) -> None:
        """Read the pending finite flags (all but ``keep_newest``); raise NonFiniteLossError
        naming the iteration and terms of the first NaN/inf one (``nonfinite: stop``)."""
        while len(self._pending) > keep_newest:
            step, losses, finite = self._pending.pop(0)
            if bool(finite):  # host sync (on an iteration the device has finished or nearly so)
                continue
            self._pending.clear()
            bad = {k: float(v) for k, v in losses.items() if not bool(torch.isfinite(v).all())}
            terms = (f"loss term(s) {', '.join(f'{k}={v}' for k, v in bad.items())}" if bad
                     else "loss term(s) of another process")
            raise NonFiniteLossError(
                f"iteration {step}: {terms} "
                f"are not finite; training stopped {when}, no checkpoint of these weights was "
                "written. Lower model.optim.lr, check the inputs of this iteration, or set "
                "model.nonfinite: skip to drop such iterations."
            )

    def on_train_start(self) -> None:
        self._pending.clear()
        for opt in self.trainer.optimizers:  # (after a resume: the restored state's layout)
            match_state_layout(opt)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # the newest flag is read after the next iteration has been queued
        self._check_finite(f"after iteration {self.global_step - 1}", keep_newest=1)

    def on_train_end(self) -> None:
        self._check_finite("at the end of training")

    # ------------------------------------------------------------------ evaluation
    def _split_names(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "val_names", None)
        if names:
            return list(names)
        loaders = self.trainer.val_dataloaders
        n = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        return ["val"] if n == 1 else [f"val{i}" for i in range(n)]

    def _start_eval(self) -> None:
        self.split_names = self._split_names()
        for name in self.split_names:
            if name not in self.val_metrics:
                self.val_metrics[name] = SegmentationMetric(self.hparams.num_classes).to(self.device)
            self.val_metrics[name].reset()

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        name = self.split_names[dataloader_idx]
        labels = batch["label"]
        logits = self.predict_logits(batch["image"], out_size=tuple(labels.shape[-2:]))
        self.val_metrics[name].update(logits.argmax(1), labels)

    def _end_eval(self, prefix: str) -> None:
        ls = self.hparams.label_set
        for name in self.split_names:
            res = self.val_metrics[name].compute()
            self.val_results[name] = res
            self.log(f"{prefix}/{name}/mIoU", float(res.miou(ls)) * 100.0, sync_dist=False)
            if ls not in (None, "cityscapes19"):
                # beside the exact subset mean: the 19-class mean and the seeds' x19/n figure
                self.log(f"{prefix}/{name}/mIoU19", float(res.miou("cityscapes19")) * 100.0)
                self.log(f"{prefix}/{name}/mIoU19_x19/n", float(res.scaled_miou19(ls)) * 100.0)

    def on_validation_epoch_start(self) -> None:
        # DDP: each rank's BatchNorm statistics saw only its own batches; evaluate (and then
        # checkpoint) their average, the same on every rank
        average_bn_statistics(self)
        self._start_eval()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Train IDs and confidence of every image at its original size ``batch["ori_size"]``.

        Returns ``{"name": [str] * B, "pred": ..., "confidence": ...}``: ``pred`` holds uint8
        train IDs (argmax of the configured whole/slide inference, logits resized bilinearly to
        the original size) and ``confidence`` the float32 max softmax probability. Both are
        ``(B, H, W)`` tensors when every sample has the same original size (always with the
        predict loader's batch size 1), else lists of ``(H_i, W_i)`` tensors. Writing files is
        left to a callback (:class:`udaseg.engine.callbacks.SubmissionWriter`).
        """
        names = batch["name"]
        names = [names] if isinstance(names, str) else list(names)
        sizes = [(int(s[0]), int(s[1])) for s in batch["ori_size"].reshape(-1, 2).tolist()]
        images = batch["image"]

        def infer(x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            probs = self.predict_logits(x, out_size=size).float().softmax(1)
            conf, pred = probs.max(1)
            return pred.to(torch.uint8 if self.hparams.num_classes <= 256 else torch.int64), conf

        if all(s == sizes[0] for s in sizes):
            pred, conf = infer(images, sizes[0])
            return {"name": names, "pred": pred, "confidence": conf}
        preds, confs = [], []
        for i, size in enumerate(sizes):  # one original size per sample: infer them one by one
            pred, conf = infer(images[i : i + 1], size)
            preds.append(pred[0])
            confs.append(conf[0])
        return {"name": names, "pred": preds, "confidence": confs}
