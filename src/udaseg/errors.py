"""Error types for mistakes a user can fix (bad data, bad checkpoint, bad setting).

The ``udaseg`` command prints these as one line naming the file or key and the fix, without a
traceback (set ``UDASEG_DEBUG=1`` to see it). Everything else is a bug and keeps its traceback.
"""


class UdasegError(Exception):
    """Base class of user-fixable errors."""


class DataError(UdasegError, ValueError):
    """A dataset file is missing, unreadable or has unexpected content."""


class CheckpointError(UdasegError, ValueError):
    """A weights file cannot be read or does not fit the model."""


class ConfigError(UdasegError, ValueError):
    """A setting is unknown or out of range."""


class NonFiniteLossError(UdasegError, FloatingPointError):
    """A loss term became NaN or infinite during training."""
