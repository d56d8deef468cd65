"""Keep udaseg's terminal output to udaseg's own lines.

Lightning prints hardware summaries ("GPU available: ...", "TPU available: ..."), a tip to install a
logging product, and some of its own deprecation warnings on every run. :func:`quiet_lightning`
silences those (INFO records of Lightning's loggers and the listed upstream warnings); warnings
and errors of Lightning still show. ``UDASEG_DEBUG=1`` keeps everything.

Lightning sets its loggers' level when it is imported, so this imports it first and is called
right before a Trainer is built, never at udaseg import time.
"""

from __future__ import annotations

import logging
import os
import warnings

#: upstream messages that say nothing to a udaseg user (regular expressions, any category)
UPSTREAM_NOISE: tuple[str, ...] = (
    r".*LeafSpec.*",  # torch pytree deprecation raised from inside Lightning
    r".*does not have many workers.*",  # the demo's deliberate worker count
    r".*litlogger.*",
)

LOGGERS: tuple[str, ...] = ("lightning.pytorch", "lightning.fabric", "lightning",
                            "pytorch_lightning", "lightning_fabric")


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def debug_output() -> bool:
    """True when ``UDASEG_DEBUG`` asks for every line (set and not "0")."""
    return os.environ.get("UDASEG_DEBUG", "") not in ("", "0")


def quiet_lightning() -> None:
    """Silence Lightning's informational lines and known upstream warnings (module docstring)."""
    if debug_output():
        return
    import lightning.pytorch  # noqa: F401  (sets its loggers up; we override them after)

    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropInfo) for f in logger.filters):
            logger.addFilter(_DropInfo())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropInfo) for f in handler.filters):
                handler.addFilter(_DropInfo())
    for pattern in UPSTREAM_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
