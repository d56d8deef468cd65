"""Dense alignment of a reference image onto a target image (Refign and its followers).

Every aligner implements :class:`~udaseg.models.alignment.base.DenseAligner`:
``aligner(target, reference) -> Alignment(flow, certainty, valid)``; :func:`warp` and
:func:`warp_nearest` move a reference-frame tensor onto the target grid with Refign's semantics.
Nothing heavy is imported here; the networks live in their own modules.
"""

from .base import Alignment, DenseAligner, IdentityAligner, warp, warp_nearest

__all__ = ["Alignment", "DenseAligner", "IdentityAligner", "warp", "warp_nearest"]
