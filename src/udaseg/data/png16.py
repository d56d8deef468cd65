"""Reading (and, for tests, writing) 16-bit PNGs without losing the low byte.

SYNTHIA's ``GT/LABELS/*.png`` are 16-bit-per-channel colour PNGs that hold the class ID in the
first (R) channel. Pillow opens 16-bit RGB(A) PNGs as 8-bit ``RGB``/``RGBA`` by keeping only the
high byte of each sample, which turns every SYNTHIA class ID (< 256) into 0 without any warning.

:func:`read_png16` therefore uses OpenCV (``cv2.imread(..., IMREAD_UNCHANGED)``, BGR(A) turned
into RGB(A)) when it is installed and otherwise its own small decoder written with numpy and
:mod:`zlib`. The decoder handles non-interlaced greyscale, grey+alpha, RGB and RGBA PNGs with 8
or 16 bits per sample, and all five row filters of the PNG specification (section 9.2):

====  =======  =====================================================================
type  name     reconstruction of byte x (a: byte one pixel to the left, b: above,
               c: above-left; 0 outside the image)
====  =======  =====================================================================
0     None     Recon(x) = Filt(x)
1     Sub      Recon(x) = Filt(x) + a
2     Up       Recon(x) = Filt(x) + b
3     Average  Recon(x) = Filt(x) + floor((a + b) / 2)
4     Paeth    Recon(x) = Filt(x) + PaethPredictor(a, b, c)
====  =======  =====================================================================

(all modulo 256). None and Sub rows do not depend on other rows, so they are decoded all at once
(Sub as a cumulative sum along the row); Up rows are added to the row above, one numpy operation
per row. Average and Paeth depend on the reconstructed left neighbour through a non-linear step,
so they cannot be written as a cumulative sum; when an image has such rows it is decoded along
anti-diagonals ("wavefront"): every pixel (y, x) with y + x = k depends only on pixels with
y + x < k, so each anti-diagonal is one vectorised step and the loop runs H + W - 1 times.

Palette, low-bit-depth and interlaced (Adam7) PNGs are rejected with a :class:`DataError` that
names the file; convert such a file with OpenCV or install ``opencv-python-headless``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: PNG colour type -> number of channels (palette images, type 3, are not supported)
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}

FILTER_NONE, FILTER_SUB, FILTER_UP, FILTER_AVERAGE, FILTER_PAETH = range(5)


def read_png16(path: str | Path, backend: str = "auto") -> np.ndarray:
    """Read a PNG with all its bits as a ``uint16`` array of shape (H, W) or (H, W, C).

    Channels are in the file's order (RGB / RGBA, not OpenCV's BGR). 8-bit files are returned
    with their values unchanged (0..255) as ``uint16``.

    Args:
        path: the PNG file.
        backend: ``"cv2"`` (OpenCV, must be installed), ``"numpy"`` (the built-in decoder) or
            ``"auto"`` (OpenCV when it can be imported, else the built-in decoder).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: the file is damaged, truncated, not a PNG, or (built-in decoder) a PNG kind
            that is not supported; the message names the file.
    """
    path = Path(path)
    if backend not in ("auto", "cv2", "numpy"):
        raise ValueError(f"read_png16: backend must be 'auto', 'cv2' or 'numpy', got {backend!r}")
    if not path.is_file():
        raise FileNotFoundError(f"PNG file not found: {path}")
    if backend != "numpy":
        try:
            import cv2
        except ImportError:
            if backend == "cv2":
                raise ImportError(
                    "read_png16(backend='cv2') needs OpenCV: pip install opencv-python-headless"
                ) from None
        else:
            return _read_cv2(cv2, path)
    return decode_png(path.read_bytes(), name=str(path))


def _read_cv2(cv2, path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(
            f"cannot read PNG {path}: OpenCV could not decode it. The file is damaged or not an "
            "image; re-extract it from the dataset archive."
        )
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(arr).astype(np.uint16, copy=False)


# --------------------------------------------------------------------------------------------
# decoder


def decode_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of a PNG file (see :func:`read_png16`); ``name`` is used in errors."""

    def fail(why: str) -> DataError:
        return DataError(
            f"cannot read PNG {name}: {why}. Re-extract the file from the dataset archive "
            "(or install opencv-python-headless, which reads every PNG kind)."
        )

    if data[:8] != PNG_SIGNATURE:
        raise fail("not a PNG file (bad signature)")
    pos, header, idat = 8, None, []
    while True:
        if pos + 8 > len(data):
            raise fail("the file is truncated (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise fail(f"the file is truncated (inside chunk {ctype!r})")
        body = data[pos + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(ctype + body) != crc:
            raise fail(f"chunk {ctype!r} has a bad CRC (the file is damaged)")
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos = end + 4
    if header is None or not idat:
        raise fail("missing IHDR or IDAT chunk")
    width, height, depth, ctype_, comp, filt, interlace = header
    if ctype_ not in _CHANNELS or depth not in (8, 16):
        raise fail(
            f"unsupported PNG kind (colour type {ctype_}, bit depth {depth}); the built-in decoder "
            "reads 8/16-bit grey, grey+alpha, RGB and RGBA"
        )
    if interlace != 0:
        raise fail("interlaced (Adam7) PNGs are not supported by the built-in decoder")
    if comp != 0 or filt != 0:
        raise fail(f"unknown compression/filter method {comp}/{filt}")
    channels = _CHANNELS[ctype_]
    bpp = channels * depth // 8  # bytes per pixel: the filters' left-neighbour distance
    stride = width * bpp
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise fail(f"the compressed image data is damaged ({exc})") from None
    if len(raw) != height * (stride + 1):
        raise fail(f"image data has {len(raw)} bytes, expected {height * (stride + 1)}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    ftypes = rows[:, 0]
    if ftypes.size and int(ftypes.max()) > 4:
        bad = int(np.flatnonzero(ftypes > 4)[0])
        raise fail(f"row {bad} has unknown filter type {int(ftypes[bad])}")
    recon = unfilter(rows[:, 1:].reshape(height, width, bpp), ftypes)
    if depth == 16:
        out = recon.reshape(height, width * bpp).view(">u2").astype(np.uint16)
    else:
        out = recon.astype(np.uint16)
    out = out.reshape(height, width, channels)
    return out[..., 0] if channels == 1 else out


def unfilter(filtered: np.ndarray, ftypes: np.ndarray) -> np.ndarray:
    """Undo the PNG row filters.

    Args:
        filtered: (H, W, bpp) uint8, the filtered bytes of each pixel (filter-type byte removed).
        ftypes: (H,) filter type (0..4) of each row.

    Returns:
        (H, W, bpp) uint8 reconstructed bytes.
    """
    ftypes = np.asarray(ftypes, dtype=np.uint8)
    if np.any(ftypes >= FILTER_AVERAGE):
        return _unfilter_wavefront(filtered, ftypes)
    out = filtered.copy()
    sub = ftypes == FILTER_SUB
    if sub.any():  # rows independent of the others: one cumulative sum (wraps modulo 256)
        out[sub] = np.cumsum(filtered[sub], axis=1, dtype=np.uint8)
    for y in np.flatnonzero(ftypes == FILTER_UP):
        if y > 0:  # the row above is final: rows are visited top to bottom
            out[y] += out[y - 1]
    return out


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PNG Paeth predictor on int16 arrays (ties: a, then b, then c)."""
    pa = np.abs(b - c)
    pb = np.abs(a - c)
    pc = np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter_wavefront(filtered: np.ndarray, ftypes: np.ndarray) -> np.ndarray:
    """Undo any mix of filters, one anti-diagonal (y + x = k) per step.

    The image is stored "skewed": ``sk[k + 2, y + 1] = pixel(y, x = k - y)``. In that layout the
    left neighbour of a pixel on diagonal k is at ``sk[k + 1, y + 1]``, the one above at
    ``sk[k + 1, y]`` and the above-left one at ``sk[k, y]``; the two leading diagonals and the
    leading row are zero, which is exactly the PNG rule "0 outside the image".
    """
    h, w, bpp = filtered.shape
    n_diag = h + w - 1
    ys, xs = np.indices((h, w))
    filt_sk = np.zeros((n_diag + 2, h + 1, bpp), dtype=np.int16)
    filt_sk[ys + xs + 2, ys + 1] = filtered
    sk = np.zeros_like(filt_sk)
    types = np.concatenate([[0], ftypes]).astype(np.int16)  # indexed like the skewed rows
    has_paeth = bool(np.any(ftypes == FILTER_PAETH))
    for k in range(n_diag):
        lo, hi = max(0, k - w + 1) + 1, min(h - 1, k) + 2  # skewed rows y+1 on this diagonal
        t = types[lo:hi, None]
        a = sk[k + 1, lo:hi]
        b = sk[k + 1, lo - 1 : hi - 1]
        pred = np.where(t == FILTER_SUB, a, 0)
        pred = np.where(t == FILTER_UP, b, pred)
        pred = np.where(t == FILTER_AVERAGE, (a + b) >> 1, pred)
        if has_paeth:
            pred = np.where(t == FILTER_PAETH, _paeth(a, b, sk[k, lo - 1 : hi - 1]), pred)
        sk[k + 2, lo:hi] = (filt_sk[k + 2, lo:hi] + pred) & 0xFF
    return sk[ys + xs + 2, ys + 1].astype(np.uint8)


# --------------------------------------------------------------------------------------------
# encoder (small and unoptimised: for tests and fixtures)


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def encode_png(array: np.ndarray, filters: int | Sequence[int] = FILTER_NONE) -> bytes:
    """Encode a uint16 (16-bit) or uint8 (8-bit) array as PNG bytes.

    Args:
        array: (H, W) grey, (H, W, 2) grey+alpha, (H, W, 3) RGB or (H, W, 4) RGBA.
        filters: the filter type (0..4) of every row, or one type per row.
    """
    array = np.asarray(array)
    if array.dtype == np.uint16:
        depth = 16
    elif array.dtype == np.uint8:
        depth = 8
    else:
        raise ValueError(f"encode_png: dtype must be uint8 or uint16, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"encode_png: shape must be (H, W) or (H, W, 1..4), got {array.shape}")
    h, w, channels = array.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = channels * depth // 8
    ft = np.broadcast_to(np.asarray(filters, dtype=np.int16), (h,)).copy()
    if ft.min(initial=0) < 0 or ft.max(initial=0) > 4:
        raise ValueError(f"encode_png: filter types must be 0..4, got {sorted(set(ft.tolist()))}")
    raw = np.ascontiguousarray(array.astype(">u2" if depth == 16 else np.uint8))
    x = raw.view(np.uint8).reshape(h, w, bpp).astype(np.int16)
    a = np.zeros_like(x)
    a[:, 1:] = x[:, :-1]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, 1:] = x[:-1, :-1]
    preds = [np.zeros_like(x), a, b, (a + b) >> 1, _paeth(a, b, c)]
    pred = np.choose(ft[:, None, None], preds)
    filt = ((x - pred) & 0xFF).astype(np.uint8).reshape(h, w * bpp)
    body = np.concatenate([ft.astype(np.uint8)[:, None], filt], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(body, 6))
        + _chunk(b"IEND", b"")
    )


def write_png16(
    path: str | Path, array: np.ndarray, filters: int | Sequence[int] = FILTER_NONE
) -> Path:
    """Write ``array`` as a PNG (16-bit for uint16, 8-bit for uint8); see :func:`encode_png`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array, filters))
    return path
