"""Decode image bytes (PNG, JPEG, DICOM) to 8-bit grayscale. No Ray, no storage.

DICOM goes through pydicom: the modality LUT (rescale) first, then the VOI
LUT or the first window, MONOCHROME1 inverted so that bone is bright as in
MURA's PNGs, and 12/16-bit values mapped onto 0..255. The transfer syntaxes
of PACS exports decode with the decoders installed with mura-ray: RLE
(pydicom), JPEG baseline and extended 8-bit (Pillow), JPEG-LS (pyjpegls),
JPEG 2000 (pylibjpeg-openjpeg) and lossless JPEG (GDCM). The header is read
first: a file whose Modality is not one of the radiograph modalities asked
for raises ``NotScored``, and one whose frames x rows x columns x samples
exceed the pixel limit, or whose sides are further apart than the aspect
limit, is refused, both before any pixel is decoded; so is a compressed one
whose stream's own frame header (``imaging.streams``) disagrees with the
header, one whose RLE segments expand past it, and a deflated one that
inflates past ``MAX_BYTES``. Of a multi-frame file only the first frame is decoded. A header
number that is empty counts as absent, one that is not a number fails the
file. No header value but the modality is returned, so none can reach the
output.

PNG and JPEG go through Pillow, opened only as the format their name says.
Each file is decoded under an address-space bound (``memory_bound``,
``MURA_RAY_DECODE_MEMORY_MB``), so a decoder that sizes its output from the
data past every check here raises MemoryError for that file.
Whatever goes wrong with one file raises ``DecodeError`` (or ``NotScored``):
the caller turns it into that file's error row.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import posixpath
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from mura_ray.imaging.streams import StreamError, check_rle, frame_size

# Decompression-bomb guard: an image with more pixels than this is refused
# before its pixels are decoded. MURA's largest images are about 4 megapixels.
MAX_PIXELS = int(os.environ.get("MURA_RAY_MAX_PIXELS", 50_000_000))
# Pillow's own guard, at the same limit (it warns above it, which decode_gray turns into an error, and
# raises above twice it), for every image this process opens.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Longest side over shortest side above which an image is refused before its pixels are decoded:
# radiographs are at most about 1:4 (a stitched long leg or spine), and a 1 x 1,000,000 image, tiny
# as a file, would otherwise be blown up to a square's side before it is cropped or padded.
MAX_ASPECT = 20
# The Pillow formats the package reads, and which of them each image extension may hold.
PILLOW_FORMATS = ("PNG", "JPEG")
_FORMATS_BY_SUFFIX = {".png": ("PNG",), ".jpg": ("JPEG",), ".jpeg": ("JPEG",)}
# No file larger than this is read whole: MURA's images are well under 10 MB, and an
# uncompressed 16-bit radiograph of 4300 x 3500 pixels about 30 MB.
MAX_BYTES = int(os.environ.get("MURA_RAY_MAX_BYTES", 256 * 2**20))

# Address space one file's decoding may add to its process (Linux), so that a decoder that sizes its
# output from the data past every check above fails its file with MemoryError, not the worker by the
# kernel's OOM killer; 0 turns the bound off.
DECODE_MEMORY = int(os.environ.get("MURA_RAY_DECODE_MEMORY_MB", 2048)) * 2**20

# Prefix of the error of a file that could not be read (as opposed to decoded):
# such a failure may pass, so the next scoring run tries the file again.
READ_ERROR = "cannot read file"


@contextlib.contextmanager
def memory_bound(extra: int = DECODE_MEMORY) -> Iterator[None]:
    """Within the block, this process may map at most ``extra`` bytes more than it has mapped now
    (``RLIMIT_AS``, Linux); an allocation past it raises MemoryError. A tighter limit already set is kept."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        mapped = 0
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if extra <= 0 or not mapped or (soft != resource.RLIM_INFINITY and soft <= limit):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


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


def _number(ds: Any, keyword: str, default: float) -> float:
    """The header's ``keyword`` as a finite number (its first value when it has several); ``default`` when
    the element is absent or empty. Raises ``DecodeError`` naming the element, not its value."""
    try:
        value = ds.get(keyword)
        if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else None  # a multi-valued element
        if value is None or str(value).strip() == "":
            return default
        number = float(value)
    except Exception:
        raise DecodeError(f"DICOM {keyword} is not a number") from None
    if not math.isfinite(number):
        raise DecodeError(f"DICOM {keyword} is not a finite number")
    return number


def _check_aspect(width: int, height: int) -> None:
    """Raise ``DecodeError`` for an empty image or one longer than ``MAX_ASPECT`` times its width."""
    if min(width, height) < 1:
        raise DecodeError(f"image of {width}x{height} pixels is empty")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        shown = f"{ratio:.1f}".rstrip("0").rstrip(".")
        raise DecodeError(f"image of {width}x{height} pixels: aspect ratio 1:{shown} is over the limit 1:{MAX_ASPECT}")


def _header(data: bytes, modalities: frozenset[str] | None) -> tuple[Any, int]:
    """A DICOM file's header (no pixels), checked against the modalities, the pixel limit and the aspect limit;
    and its number of frames."""
    import pydicom

    _check_inflated(data)
    try:
        head = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(head.Rows), int(head.Columns)
    except Exception as exc:
        raise DecodeError(f"cannot read DICOM: {type(exc).__name__}: {exc}") from None
    modality = str(head.get("Modality", "") or "").strip().upper()
    if modalities is not None and modality and modality not in modalities:
        raise NotScored(modality)
    frames, samples = _number(head, "NumberOfFrames", 1), _number(head, "SamplesPerPixel", 1)
    if frames != int(frames) or frames < 1:
        raise DecodeError(f"DICOM NumberOfFrames {frames:g} is not a positive whole number")
    if samples not in (1, 3):
        raise DecodeError(f"DICOM SamplesPerPixel {samples:g} is not 1 or 3")
    frames, samples = int(frames), int(samples)
    values = frames * rows * cols * samples
    if rows * cols > MAX_PIXELS or values > MAX_PIXELS:
        raise DecodeError(
            f"image of {frames} frame(s) of {cols}x{rows} pixels x {samples} sample(s) ({values} values) "
            f"is over the limit of {MAX_PIXELS} (MURA_RAY_MAX_PIXELS)"
        )
    _check_aspect(cols, rows)
    return head, frames


_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian


def _syntax(ds: Any) -> Any:
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _check_inflated(data: bytes) -> None:
    """A file of the deflated transfer syntax is inflated whole by pydicom, header and all, before any
    header value can be checked, and deflate expands up to about 1000 times: here its inflated size is
    counted, 16 MiB at a time, and refused over ``MAX_BYTES``, the limit of a file read whole."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
    except Exception:
        return  # no file meta to read: dcmread says why
    if syntax != _DEFLATED:
        return
    inflater, left, total = zlib.decompressobj(-zlib.MAX_WBITS), fp.read(), 0
    try:
        while left and total <= MAX_BYTES:
            total += len(inflater.decompress(left, 16 << 20))
            left = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DecodeError(f"cannot inflate DICOM (deflated transfer syntax): {exc}") from None
    if total > MAX_BYTES:
        raise DecodeError(
            f"deflated DICOM inflates to more than {MAX_BYTES} bytes, over the limit (MURA_RAY_MAX_BYTES)"
        )


def _check_stream(data: bytes, head: Any) -> None:
    """For a compressed transfer syntax, check the first frame's size as its stream says against the header
    (and so against the pixel limit), before any decoder sizes its output from the stream. Raises
    ``DecodeError``; a transfer syntax whose streams cannot be checked (``streams.frame_size``) is refused.
    RLE segments are counted against the header's size instead (``streams.check_rle``)."""
    import pydicom
    from pydicom.uid import RLELossless

    syntax = head.file_meta.get("TransferSyntaxUID") if hasattr(head, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
        return
    try:
        pixel_data = pydicom.dcmread(io.BytesIO(data)).PixelData
        if syntax == RLELossless:
            check_rle(pixel_data, int(head.Rows) * int(head.Columns))
            return
        size = frame_size(syntax, pixel_data)
    except StreamError as exc:
        raise DecodeError(f"cannot read DICOM pixel stream ({syntax.name}): {exc}") from None
    if size is None:
        return
    columns, rows, samples = size
    expected = (int(head.Columns), int(head.Rows), int(_number(head, "SamplesPerPixel", 1)))
    if size != expected:  # the header's size is under the pixel limit, so a stream that matches it is too
        raise DecodeError(
            f"DICOM pixel stream ({syntax.name}) of {columns}x{rows} pixels x {samples} sample(s) does not match "
            f"the header's {expected[0]}x{expected[1]} x {expected[2]}"
        )


def _to_values(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored pixel values -> modality values (float32): the Modality LUT, else Rescale Slope and Intercept."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds).astype(np.float32)
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def _window(values: np.ndarray, ds: Any) -> np.ndarray:
    """Modality values -> 0..255: the first linear window (PS3.3 C.11.2.1.2) when the header has one,
    else its VOI LUT, else the values' own range."""
    from pydicom.pixels import apply_voi_lut

    center, width = _number(ds, "WindowCenter", math.nan), _number(ds, "WindowWidth", math.nan)
    if "VOILUTSequence" not in ds and not math.isnan(center) and not math.isnan(width):
        width = max(width, 1.0)
        return _stretch(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds).astype(np.float32)
    return _stretch(values, float(values.min()), float(values.max()))


def decode_dicom(data: bytes, modalities: frozenset[str] | None = None) -> np.ndarray:
    """DICOM bytes -> (H, W) uint8, bone bright. Raises ``DecodeError`` or ``NotScored``, nothing else:
    whatever a header value or a decoder raises becomes a ``DecodeError``."""
    try:
        return _decode_dicom(data, modalities)
    except (DecodeError, NotScored):
        raise
    except Exception as exc:
        raise DecodeError(f"cannot decode DICOM: {type(exc).__name__}: {exc}") from None


def _decode_dicom(data: bytes, modalities: frozenset[str] | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    ds, frames = _header(data, modalities)
    _check_stream(data, ds)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if _syntax(ds) == _DEFLATED:  # read from the inflated dataset, whose size _check_inflated bounded
            import pydicom

            arr = pydicom.dcmread(io.BytesIO(data)).pixel_array
            arr = arr[0] if frames > 1 else arr
        else:  # from the buffer, pydicom reads only the frame asked for; the header's LUTs apply below
            arr = pixel_array(io.BytesIO(data), index=0 if frames > 1 else None)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DecodeError(f"cannot decode DICOM pixels ({name}): {type(exc).__name__}: {exc}") from None
    if arr.ndim == 3:  # colour (pydicom gives RGB): luminance
        return _to_gray(Image.fromarray(arr.astype(np.uint8), mode="RGB"))
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise DecodeError(f"unsupported DICOM pixel array of shape {arr.shape}")
    out = _window(_to_values(arr, ds), ds)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def pillow_formats(name: str | None) -> tuple[str, ...]:
    """The Pillow formats a file named ``name`` may be opened as: PNG for ``.png``, JPEG for ``.jpg`` and
    ``.jpeg``, none for ``.dcm`` and ``.dicom`` (DICOM only), both PNG and JPEG when there is no name."""
    if name is None:
        return PILLOW_FORMATS
    suffix = posixpath.splitext(name.lower())[1]
    return _FORMATS_BY_SUFFIX.get(suffix, ())


def decode_gray(
    data: bytes, *, target: int | None = None, modalities: frozenset[str] | None = None, name: str | None = None
) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes to an (H, W) uint8 array.

    ``target`` lets JPEG decoding use DCT scaling down to about that short
    side. ``modalities``: the DICOM modalities to decode (None: all).
    ``name``: the file's name or URI; its extension decides which format
    Pillow may open it as (``pillow_formats``), so that no other decoder, and
    no program such as Ghostscript, ever runs. DICOM is known by its
    ``DICM`` prefix whatever the name.
    Raises ``DecodeError`` with the reason for unreadable input, ``NotScored``
    for a DICOM file of another modality, nothing else.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if is_dicom(data):
        return decode_dicom(data, modalities)
    formats = pillow_formats(name)
    if not formats:
        raise DecodeError("not a DICOM file (no DICM prefix) and not named as a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise DecodeError(f"image of {w}x{h} pixels is over the limit of {MAX_PIXELS} pixels")
            _check_aspect(w, h)
            if target and image.format == "JPEG":
                image.draft("L", (target, target))
            image.load()
            return _to_gray(image)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"image over the pixel limit: {exc}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError(f"cannot decode image: not a {' or '.join(formats)} file") from None
    except Exception as exc:  # PIL raises many types for bad input
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
