"""Decode image bytes (PNG, JPEG, DICOM) to 8-bit grayscale and resize them for the cache.

No Ray here: these are the functions Ray Data maps, callable on their own.

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

from mura_ray import storage

# Files the catalog and the scorer treat as images (compared lower-case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")

# Decompression-bomb guard: an image with more pixels than this is refused
# before its pixels are decoded. MURA's largest images are about 4 megapixels.
MAX_PIXELS = int(os.environ.get("MURA_RAY_MAX_PIXELS", 50_000_000))

# Ratio of the cached side to the model's input side, as torchvision's
# classification recipe resizes to 256 before a 224 crop.
RESIZE_RATIO = 256 / 224


# Prefix of the error of a file that could not be read (as opposed to decoded):
# such a failure may pass, so the next scoring run tries the file again.
READ_ERROR = "cannot read file"


def one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


class DecodeError(ValueError):
    """The bytes are not an image this package can read."""


def cache_side(image_size: int) -> int:
    """Side of the square uint8 image kept per file for a model input of ``image_size``."""
    return int(round(image_size * RESIZE_RATIO))


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


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


def resize_center_square(gray: np.ndarray, side: int) -> np.ndarray:
    """Resize so the short side is ``side``, then crop the centre square: (side, side) uint8."""
    h, w = gray.shape
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    image = Image.fromarray(gray, mode="L").resize((nw, nh), Image.BILINEAR, reducing_gap=2.0)
    top, left = (nh - side) // 2, (nw - side) // 2
    return np.asarray(image, dtype=np.uint8)[top : top + side, left : left + side]


def load_square(data: bytes, side: int) -> np.ndarray:
    """Bytes of one image -> (side, side) uint8 gray square (the cached form)."""
    return resize_center_square(decode_gray(data, target=side), side)


def read_and_decode(batch: dict[str, np.ndarray], *, side: int, fs: Any) -> dict[str, np.ndarray]:
    """Read each ``image_uri`` through ``fs`` and decode it to a (side, side) uint8 square.

    Adds ``pixels`` (zeros where unreadable), ``error`` (the reason, or ""
    when fine: an all-empty string column keeps its type through Arrow,
    where an all-null one would not) and ``read_size`` (bytes read; -1 when
    the file could not be read). Other columns pass through. A bad file
    never raises: it becomes a row with ``error`` set.
    """
    uris = batch["image_uri"]
    pixels = np.zeros((len(uris), side, side), dtype=np.uint8)
    errors = np.full(len(uris), "", dtype=object)
    sizes = np.full(len(uris), -1, dtype=np.int64)
    for i, uri in enumerate(uris):
        try:
            data = storage.read_bytes(fs, storage.path_in(uri))
        except Exception as exc:  # missing file, permission, network
            errors[i] = one_line(f"{READ_ERROR}: {type(exc).__name__}: {exc}")
            continue
        sizes[i] = len(data)
        try:
            pixels[i] = load_square(data, side)
        except DecodeError as exc:
            errors[i] = one_line(str(exc))
    out = dict(batch)
    out.update(pixels=pixels, error=errors, read_size=sizes)
    return out
