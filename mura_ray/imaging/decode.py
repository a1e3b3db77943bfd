"""Decode image bytes (PNG, JPEG, DICOM) to 8-bit grayscale. No Ray, no storage.

DICOM goes through pydicom: the modality LUT (rescale) first, then the VOI
LUT or the first window, MONOCHROME1 inverted so that bone is bright as in
MURA's PNGs, and 12/16-bit values mapped onto 0..255. The transfer syntaxes
of PACS exports decode with the decoders installed with mura-ray: RLE
(pydicom), JPEG baseline and extended 8-bit (Pillow), JPEG-LS (pyjpegls),
JPEG 2000 (pylibjpeg-openjpeg) and lossless JPEG (GDCM). The header is read
first: a file whose Modality is not one of the radiograph modalities asked
for raises ``NotScored``, and one whose frames x rows x columns x samples
exceed the pixel limit is refused, both before any pixel is decoded; of a
multi-frame file only the first frame is decoded. No header value but the
modality is returned, so none can reach the output.
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
# No file larger than this is read whole: MURA's images are well under 10 MB, and an
# uncompressed 16-bit radiograph of 4300 x 3500 pixels about 30 MB.
MAX_BYTES = int(os.environ.get("MURA_RAY_MAX_BYTES", 256 * 2**20))

# Prefix of the error of a file that could not be read (as opposed to decoded):
# such a failure may pass, so the next scoring run tries the file again.
READ_ERROR = "cannot read file"


def one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


class DecodeError(ValueError):
    """The bytes are not an image this package can read."""


class NotScored(Exception):
    """A DICOM file of a modality that is not to be scored (``modality``)."""

    def __init__(self, modality: str) -> None:
        super().__init__(f"modality {modality}")
        self.modality = modality


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


def _header(data: bytes, modalities: frozenset[str] | None) -> tuple[Any, int]:
    """A DICOM file's header (no pixels), checked against the modalities and the pixel limit; and its frames."""
    import pydicom

    try:
        head = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(head.Rows), int(head.Columns)
    except Exception as exc:
        raise DecodeError(f"cannot read DICOM: {type(exc).__name__}: {exc}") from None
    modality = str(head.get("Modality", "") or "").strip().upper()
    if modalities is not None and modality and modality not in modalities:
        raise NotScored(modality)
    frames = int(head.get("NumberOfFrames", 1) or 1)
    samples = int(head.get("SamplesPerPixel", 1) or 1)
    values = frames * rows * cols * samples
    if rows * cols > MAX_PIXELS or values > MAX_PIXELS:
        raise DecodeError(
            f"image of {frames} frame(s) of {cols}x{rows} pixels x {samples} sample(s) ({values} values) "
            f"is over the limit of {MAX_PIXELS} (MURA_RAY_MAX_PIXELS)"
        )
    return head, frames


def decode_dicom(data: bytes, modalities: frozenset[str] | None = None) -> np.ndarray:
    """DICOM bytes -> (H, W) uint8, bone bright. Raises ``DecodeError`` or ``NotScored``."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds, frames = _header(data, modalities)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        # From the buffer, pydicom reads only the frame asked for; the header's LUTs apply below.
        arr = pixel_array(io.BytesIO(data), index=0 if frames > 1 else None)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DecodeError(f"cannot decode DICOM pixels ({name}): {type(exc).__name__}: {exc}") from None
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


def decode_gray(data: bytes, *, target: int | None = None, modalities: frozenset[str] | None = None) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes to an (H, W) uint8 array.

    ``target`` lets JPEG decoding use DCT scaling down to about that short
    side. ``modalities``: the DICOM modalities to decode (None: all).
    Raises ``DecodeError`` with the reason for unreadable input, ``NotScored``
    for a DICOM file of another modality.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if is_dicom(data):
        return decode_dicom(data, modalities)
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
