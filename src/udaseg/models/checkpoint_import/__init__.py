"""Import the seed repositories' released checkpoints into udaseg's segmentors.

``udaseg convert SRC DST.safetensors`` (:func:`convert_main`, :func:`convert_checkpoint`) reads a
checkpoint of one of the formats below, picks the student (default: the papers evaluate the
student) or the EMA teacher, maps every tensor onto our :class:`~udaseg.models.segmentor.
EncoderDecoder` or :class:`~udaseg.models.hrda.HRDASegmentor` names, checks that every target
tensor is filled with the right shape, and writes our weights format: a ``.safetensors`` file of
the segmentor's ``state_dict`` plus string metadata (``udaseg_format``, ``backbone``, ``head``,
``head_channels``, ``num_classes``, ``hrda`` (``0``, ``1`` = HRDA defaults, or a JSON dict of
:class:`~udaseg.models.hrda.HRDAConfig` settings for HRDA*), ``hrda_attention_classwise``,
``hrda_attention_head`` (HRDA* only), ``source_format``, ``source_model``, ``source_file``).
:func:`load_converted` loads such a file into a model (or builds
the model from the metadata); :func:`import_checkpoint` does the same conversion in memory (for
loading a foreign file directly, e.g. by ``--ckpt_path``).

Every file is read with ``torch.load(weights_only=True)``. Checkpoints that pickle Python objects
besides tensors (mmcv ``meta`` with config objects, Lightning-1.x hyper-parameters) fail that
check; the error then names the offending globals and tells the user about ``--allow-unsafe``
(``allow_unsafe=True``), which loads with ``weights_only=False`` and therefore *executes code
pickled in the file*. Only then are missing classes (mmcv, pytorch_lightning 1.x, the seeds' own
packages) replaced by inert placeholders, so the tensors can be read without installing them.

Formats (the key layouts are those of the udaseg specs; "spec X" = ``daformer_hrda_mic_spec.md``,
"ciss/cmda X" = ``ciss_cmda_spec.md``, "refign X" = ``refign_dsrnss_icda_spec.md``):

=====================  ======================================================  ===================
format                 what is mapped                                          target
=====================  ======================================================  ===================
``mmseg-uda``          DACS checkpoints of DAFormer, MIC, CDDA (single scale)  EncoderDecoder
                       and HRDA, MIC(HRDA), CISS, CDDA(HRDA/MIC) (HRDA):
                       ``state_dict`` with ``model.*`` (student, default) /
                       ``ema_model.*`` (teacher); ``imnet_model.*`` (FD's
                       frozen ImageNet model) is dropped as info.
                       ``backbone.*`` (MiT, spec 1.7) -> ``backbone.*``;
                       DAFormer head ``decode_head.*`` (spec 2.2) or the
                       DAFormer-repo SegFormer head ``decode_head.linear_c.N``
                       (spec 2.3) -> ``decode_head.*``; HRDA (spec 7.2):
                       ``decode_head.head.*`` -> ``model.decode_head.*``,      HRDASegmentor
                       ``decode_head.scale_attention.*`` ->
                       ``scale_attention_head.*``, ``backbone.*`` ->
                       ``model.backbone.*``.
``mmseg-segmentor``    a bare mmseg segmentor dict (``backbone.*`` /           EncoderDecoder /
                       ``decode_head.*``, optionally under ``state_dict``),    HRDASegmentor
                       same head layouts, plus the NVlabs SegFormer head
                       (``linear_c{1..4}``, [c4..c1] concatenation: renamed
                       and ``linear_fuse`` input channels permuted to our
                       [c1..c4] order, spec 2.3).
``lightning-refign``   Lightning checkpoints of Refign / DSRNSS / ICDA with a  EncoderDecoder
                       MiT + DAFormer head (refign 1.3): ``backbone.*`` /
                       ``head.*`` (student) or ``m_backbone.*`` / ``m_head.*``
                       (teacher) -> ``backbone.*`` / ``decode_head.*``;
                       ``imnet_backbone.*``, ``alignment_backbone.*``,
                       ``alignment_head.*`` (UAWarpC, training only) dropped.
                       HRDA* (Refign / DSRNSS, ``use_hrda``): also            HRDASegmentor
                       ``[m_]hrda_scale_attention.*``, Refign's SegFormerHead
                       (``linear_c{1..4}``, ``linear_fuse``, ``linear_pred``,
                       256 channels, [c4..c1] concatenation) ->
                       ``scale_attention_head.linear_c.{0..3}`` etc. (order
                       kept), ``head.*`` -> ``model.decode_head.*``,
                       ``backbone.*`` -> ``model.backbone.*``; metadata
                       ``hrda`` = JSON HRDAConfig with
                       ``attention_head="segformer"``.
``udaseg-lightning``   our own Lightning checkpoints (``model.*`` student,     as saved
                       ``algorithm.teacher.model.*`` teacher).
``udaseg-weights``     a file written by this module or ``export-weights``.    as saved
``cmda-fusion``        detected, **not yet supported**: needs the CMDA         --
                       two-encoder fusion model (cmda 2.7).
``refign-uawarpc``     Refign's UAWarpC matcher (``AlignmentModel``, e.g.      UAWarpCAligner
                       ``uawarpc_megadepth.ckpt``; refign 2.2, 2.3):           weights
                       ``alignment_head.*`` checked strictly against
                       ``UAWarpC().state_dict()`` (names and shapes) and
                       written with that prefix, plus ``alignment_backbone.
                       features.N`` (VGG16 up to pool4) when present; output
                       ``.safetensors`` (metadata ``udaseg_format`` =
                       ``udaseg-uawarpc-v1``) or ``.pt``/``.pth``, for
                       ``UAWarpCAligner.from_files``. Picked automatically by
                       ``udaseg convert``; ``--what aligner`` takes the same
                       weights out of a ``lightning-refign`` checkpoint.
=====================  ======================================================  ===================

Numbers a user should then see with our evaluation (from the specs; "val" numbers can be checked
locally with ``udaseg test``, "test" numbers need the benchmark server; evaluate with the seeds'
protocol: DAFormer-type models whole-image at 1024x512 on Cityscapes and 960x540 on ACDC/DZ, HRDA-type
models at full resolution with 1024x1024 slide windows, stride 512, spec 4.4 and 7.5):

=========================================  ==========================================================
checkpoint                                 expected mIoU (%)
=========================================  ==========================================================
DAFormer GTA->CS (released, mmseg-uda)     **68.85** CS val (paper mean of 3 seeds 68.3; Synthia->CS
                                           60.9 mIoU16, CS->ACDC test 55.4, CS->DZ test 53.8)
HRDA GTA->CS (released, mmseg-uda, HRDA)   **73.79** CS val (paper mean 73.8; Synthia->CS 65.8,
                                           CS->ACDC test 68.0, CS->DZ test 55.9)
MIC(HRDA) (mmseg-uda, HRDA)                GTA->CS 75.9 (README: mean of 3 seeds; the spec gives no
                                           number for the single released checkpoint), Synthia->CS
                                           67.3, CS->ACDC test 70.4, CS->DZ test 60.2;
                                           MIC(DAFormer) GTA->CS 70.6 [paper]
CISS (mmseg-uda, HRDA)                     ``csHR2acdcHR_ciss_9fcab``: **68.67 ACDC val**, 69.6 ACDC
                                           test; ``csHR2dzurHR_ciss_1d68e``: 60.7 DZ test;
                                           ``csHR2acdcrefHR_ciss_5b929``: 78.1 ACDC-normal test
CDDA (mmseg-uda, DAFormer/HRDA/MIC)        GTA->CS 69.6 / 75.1 / 76.9, Synthia->CS 63.2 / 67.3 /
                                           68.7 (best-on-val single-seed checkpoints; the spec does
                                           not say that checkpoints are released)
Refign-DAFormer (lightning-refign)         ACDC test 65.5, DZ test 56.2, RobotCar test 60.5 (eval
                                           inputs resized to 540x960, refign 2.7)
ICDA (lightning-refign)                    DZ test 58.2
DSRNSS DAFormer (lightning-refign)         no number in the spec (tables unverified)
CMDA (not supported)                       DSEC-Night test 60.05 mIoU18 (56.89 mIoU19)
UAWarpC (refign-uawarpc, aligner)          36.8 PCK-5 on the RobotCar matching test (not a
                                           segmentation number; the aligner is used only for
                                           Refign's pseudo-label refinement in training)
Refign-HRDA* (lightning-refign, HRDA)      ACDC test 72.1, DZ test 63.9 (full resolution, slide
                                           inference 1080x1080 stride 420, refign 2.7)
DSRNSS HRDA* (lightning-refign, HRDA)      no number in the spec (tables unverified)
=========================================  ==========================================================

Layouts the specs do not document (the importer reports them by name instead of guessing):

* the sub-module names inside Refign/DSRNSS/ICDA's ``head.*`` (assumed equal to the mmseg DAFormer
  head names and verified tensor by tensor: any difference fails with the names), the prefix of
  ICDA's DAR/DAT module (reported as leftover keys; it is training-only, refign 4.3), and
  DSRNSS's extra modules, if any (reported as leftover keys). Refign's HRDA*
  ``hrda_scale_attention`` names and concat order were taken from the upstream code
  (``models/segmentation_model.py``, ``models/heads/segformer.py``, ``models/modules.py``);
* the exact names inside HRDA's ``decode_head.scale_attention.*``: spec 7.2 gives the prefix and
  the architecture; the ``fuse_layer.conv`` / ``fuse_layer.bn`` names follow from the
  ``daformer_conv1`` fusion (a ConvModule, spec 2.1/2.2) and are checked by shape;
* the unused ``conv_seg.*`` that mmseg's BaseDecodeHead gives the HRDA wrapper head and the
  SegFormer heads: dropped as info when present (not in the spec);
* CMDA's fusion modules and ``DAFormerHeadFusion`` names (cmda 2.7 gives only ``backbone_image``
  and ``backbone_events``), UAWarpC's full tree (refign 2.3 gives ``alignment_head.*`` only; the
  names are those of :mod:`udaseg.models.alignment.uawarpc`, which follows the upstream module
  tree, and every tensor is checked by name and shape), and the
  MIC masking module's extra teacher (only built in ablations, spec 8.2).
"""

from .aligner import ALIGNER_FORMAT, ImportedAligner, convert_aligner, import_aligner
from .api import convert_checkpoint, import_checkpoint, lightning_state_dict, load_converted
from .cli import convert_main
from .common import (
    CONVERTED_FORMAT,
    FORMATS,
    SEED_RESULTS,
    ImportedCheckpoint,
    ImportReport,
    UnsupportedCheckpointError,
    build_from_metadata,
)
from .detection import detect_format
from .reading import RawCheckpoint, read_checkpoint

__all__ = [
    "ALIGNER_FORMAT",
    "CONVERTED_FORMAT",
    "FORMATS",
    "SEED_RESULTS",
    "ImportReport",
    "ImportedAligner",
    "ImportedCheckpoint",
    "RawCheckpoint",
    "UnsupportedCheckpointError",
    "build_from_metadata",
    "convert_aligner",
    "convert_checkpoint",
    "convert_main",
    "detect_format",
    "import_aligner",
    "import_checkpoint",
    "lightning_state_dict",
    "load_converted",
    "read_checkpoint",
]
