"""Decode image bytes (PNG, JPEG, DICOM) to 8-bit grayscale. No Ray, no storage.

DICOM goes through pydicom: the modality LUT (rescale) first, then the VOI
LUT or the first window, MONOCHROME1 inverted so that bone is bright as in
MURA's PNGs, and 12/16-bit values mapped onto 0..255. Compressed transfer
syntaxes decode where an installed decoder handles them (RLE always; JPEG
through Pillow; others need pylibjpeg or GDCM), and fail as an error row
otherwise. No header value is returned, so none can reach the output.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image

# Decompression-bomb guard: an image with more pixels than this is refused
# before its pixels are decoded. MURA's largest images are about 4 megapixels.
MAX_PIXELS = int(os.environ.get("MURA_RAY_MAX_PIXELS", 50_000_000))

# Prefix of the error of a file that could not be read (as opposed to decoded):
# such a failure may pass, so the next scoring run tries the file again.
READ_ERROR = "cannot read file"


def one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


class DecodeError(ValueError):
    """The bytes are not an image this package can read."""


def _to_gray(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: stretch the used range onto 0..255.
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        return ((arr - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    if mode == "CMYK":
        image = image.convert("RGB")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then ``DICM``."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return (np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else value)


def decode_dicom(data: bytes) -> np.ndarray:
    """DICOM bytes -> (H, W) uint8, bone bright. Raises ``DecodeError``."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as exc:
        raise DecodeError(f"cannot read DICOM: {type(exc).__name__}: {exc}") from None
    if rows * cols > MAX_PIXELS:
        raise DecodeError(f"image of {cols}x{rows} pixels is over the limit of {MAX_PIXELS} pixels")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DecodeError(f"cannot decode DICOM pixels ({name}): {type(exc).__name__}: {exc}") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if arr.ndim == 3:  # colour (pydicom gives RGB): luminance
        return _to_gray(Image.fromarray(arr.astype(np.uint8), mode="RGB"))
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise DecodeError(f"unsupported DICOM pixel array of shape {arr.shape}")
    values = apply_modality_lut(arr, ds).astype(np.float32)
    if "WindowCenter" in ds and "WindowWidth" in ds and "VOILUTSequence" not in ds:
        # Linear window as in PS3.3 C.11.2.1.2, straight onto 0..255.
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        out = _stretch(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    else:
        if "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds).astype(np.float32)
        out = _stretch(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def decode_gray(data: bytes, *, target: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes to an (H, W) uint8 array.

    ``target`` lets JPEG decoding use DCT scaling down to about that short
    side. Raises ``DecodeError`` with the reason for unreadable input.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if is_dicom(data):
        return decode_dicom(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise DecodeError(f"image of {w}x{h} pixels is over the limit of {MAX_PIXELS} pixels")
            if target and image.format == "JPEG":
                image.draft("L", (target, target))
            image.load()
            return _to_gray(image)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"image over the pixel limit: {exc}") from None
    except Exception as exc:  # PIL raises many types for bad input
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
