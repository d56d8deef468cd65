"""Reading images and label maps with errors that name the file and the fix.

Every loader goes through these two functions, so a truncated PNG, a label of the wrong size
or a label value outside the class table ends in one :class:`DataError` that says which file
and what to do, instead of a stack trace from deep inside Pillow or the collate function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .classes import IGNORE_INDEX, NUM_CLASSES


from ..errors import DataError  # noqa: F401  (re-exported: the loaders raise it)


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as a (H, W, 3) uint8 array."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(
            f"cannot read image {path}: {exc}. The file is damaged or not an image; "
            "re-extract it from the dataset archive (or regenerate SynthNight with `udaseg synth`)."
        ) from None


def read_label(
    path: str | Path,
    *,
    expected_size: tuple[int, int] | None = None,
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """Read a train-ID label map as a (H, W) uint8 array and validate it.

    Args:
        path: a single-channel PNG holding train IDs 0..num_classes-1 and 255 (ignore).
        expected_size: (H, W) of the matching image; a mismatch is an error.
        num_classes: number of valid train IDs.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(
                    f"label {path} has image mode {im.mode!r}; expected a single-channel train-ID "
                    "PNG (mode 'L'). Colour-coded labels must be converted: run `udaseg prepare`."
                )
            label = np.array(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(
            f"cannot read label {path}: {exc}. The file is damaged; re-extract it from the "
            "dataset archive or re-run `udaseg prepare`."
        ) from None
    if expected_size is not None and tuple(label.shape[:2]) != tuple(expected_size):
        raise DataError(
            f"label {path} has size {label.shape[0]}x{label.shape[1]} (HxW) but its image has "
            f"{expected_size[0]}x{expected_size[1]}; the label does not belong to this image or "
            "was resized. Restore it from the dataset archive."
        )
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"label {path} holds values {bad[:10].tolist()} outside the train IDs "
            f"0..{num_classes - 1} and {IGNORE_INDEX} (ignore). It is probably a raw labelIds "
            "file: convert it to train IDs with `udaseg prepare`."
        )
    return label.astype(np.uint8, copy=False)


def read_grey(
    path: str | Path, what: str, modes: tuple[str, ...] = ("1", "L", "P", "RGB"), fix: str = ""
) -> np.ndarray:
    """Read a single-channel 8-bit map (depth, validity mask, IC image) as (H, W, 1) uint8.

    ``what`` names the map in errors; files whose mode is not in ``modes`` are a DataError.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    fix = fix or "Re-extract it from the dataset archive."
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in modes:
                raise DataError(f"{what} {path} has mode {im.mode!r}; expected an 8-bit grey PNG. {fix}")
            arr = np.array(im.convert("L"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}. {fix}") from None
    return arr[..., None]


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w
