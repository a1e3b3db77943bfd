"""The size of a compressed DICOM frame, read from its stream's own header, without decoding it. No Ray.

A DICOM header's Rows and Columns are what the pixel limit is checked
against, but the JPEG, JPEG-LS and JPEG 2000 decoders size their output
from the stream: a 1 kB file whose header says 100x100 can hold a
4000x4000 stream, decoded in full before pydicom notices the mismatch.
``frame_size`` reads the stream's frame header (JPEG and JPEG-LS SOF,
JPEG 2000 SIZ, bare or inside a JP2 file) from the start of the first
frame, so that the caller can compare it with the header before any
decoder runs. RLE has no frame header: its decoder (pydicom's) writes
whatever the segments expand to and compares lengths afterwards, so
``check_rle`` counts each segment's decoded length, stopping at the
header's, before it runs.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.encaps import generate_fragments
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

# How much of the first frame is searched for its header: the header comes before the entropy-coded
# data, after at most a few application segments (ICC profiles, EXIF) or JP2 boxes.
HEAD_BYTES = 1 << 20

# JPEG start-of-frame markers (ITU T.81 table B.1: all of 0xC0..0xCF but DHT, JPG and DAC), the
# hierarchical DHP marker (same layout, the whole image's size) and JPEG-LS's SOF55 (ITU T.87).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class StreamError(ValueError):
    """A compressed stream whose frame header cannot be read."""


def _stream_head(pixel_data: bytes) -> bytes:
    """The first ``HEAD_BYTES`` of the encapsulated frames (the basic offset table left out)."""
    items = generate_fragments(pixel_data)
    next(items, None)  # the basic offset table, empty or not
    head = bytearray()
    for fragment in items:
        head += fragment
        if len(head) >= HEAD_BYTES:
            break
    return bytes(head)


def _u16(data: bytes, at: int) -> int:
    if at + 2 > len(data):
        raise StreamError("stream ends inside its header")
    return int.from_bytes(data[at : at + 2], "big")


def _u32(data: bytes, at: int) -> int:
    if at + 4 > len(data):
        raise StreamError("stream ends inside its header")
    return int.from_bytes(data[at : at + 4], "big")


def jpeg_frame_size(stream: bytes) -> tuple[int, int, int]:
    """(columns, rows, components) of a JPEG or JPEG-LS stream, from its first frame header.

    Raises ``StreamError`` for a stream that does not start with SOI, reaches
    its scan data or its end before a frame header, or leaves its height to a
    later DNL marker."""
    if stream[:2] != b"\xff\xd8":
        raise StreamError("not a JPEG stream (no SOI marker)")
    at = 2
    while at + 2 <= len(stream):
        if stream[at] != 0xFF:
            raise StreamError(f"JPEG stream without a marker at byte {at}")
        marker = stream[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS
            break
        length = _u16(stream, at + 2)
        if marker in _SOF:
            if at + 10 > len(stream):
                raise StreamError("stream ends inside its header")
            rows, columns, components = _u16(stream, at + 5), _u16(stream, at + 7), stream[at + 9]
            if rows == 0:
                raise StreamError("JPEG stream whose height is left to a DNL marker")
            return columns, rows, components
        if length < 2:
            raise StreamError(f"JPEG segment of length {length} at byte {at}")
        at += 2 + length
    raise StreamError("JPEG stream without a frame header before its scan data")


def _jp2_codestream(stream: bytes) -> bytes:
    """The contiguous codestream box (``jp2c``) of a JP2 file (ISO/IEC 15444-1 annex I)."""
    at = 0
    while at + 8 <= len(stream):
        length, kind = _u32(stream, at), stream[at + 4 : at + 8]
        header = 8
        if length == 1:  # the length is in the next 8 bytes
            length, header = int.from_bytes(stream[at + 8 : at + 16], "big"), 16
        elif length == 0:  # the box runs to the end
            length = len(stream) - at
        if kind == b"jp2c":
            return stream[at + header : at + length]
        if length < header:
            raise StreamError(f"JP2 box of length {length} at byte {at}")
        at += length
    raise StreamError("JP2 file without a codestream box")


def j2k_frame_size(stream: bytes) -> tuple[int, int, int]:
    """(columns, rows, components) of a JPEG 2000 codestream or JP2 file, from its SIZ marker segment."""
    if stream.startswith(_JP2_SIGNATURE):
        stream = _jp2_codestream(stream)
    if stream[:4] != b"\xff\x4f\xff\x51":
        raise StreamError("not a JPEG 2000 codestream (no SOC and SIZ markers)")
    width, height = _u32(stream, 8) - _u32(stream, 16), _u32(stream, 12) - _u32(stream, 20)
    if width <= 0 or height <= 0:
        raise StreamError("JPEG 2000 image area is empty")
    return width, height, _u16(stream, 40)


def _names(syntaxes: Iterable[str]) -> frozenset[str]:
    return frozenset(str(s) for s in syntaxes)


_JPEG_LIKE = _names(JPEGTransferSyntaxes) | _names(JPEGLSTransferSyntaxes)
_J2K = _names(JPEG2000TransferSyntaxes)
_RLE = "1.2.840.10008.1.2.5"


def frame_size(syntax: UID, pixel_data: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) of the first frame of encapsulated ``pixel_data`` as its stream says.

    None for RLE, whose decoder sizes its output from the DICOM header.
    Raises ``StreamError`` for a stream that cannot be read, and for any other
    compressed transfer syntax: its size cannot be checked before decoding."""
    if syntax == _RLE:
        return None
    try:
        head = _stream_head(pixel_data)
    except ValueError as exc:
        raise StreamError(f"cannot read the encapsulated pixel data: {exc}") from None
    if syntax in _JPEG_LIKE:
        return jpeg_frame_size(head)
    if syntax in _J2K:
        return j2k_frame_size(head)
    raise StreamError(f"transfer syntax {getattr(syntax, 'name', syntax)} is not one this package decodes")


def check_rle(pixel_data: bytes, segment_length: int) -> None:
    """Raise ``StreamError`` unless every segment of the first RLE frame (PS3.5 annex G) decodes to at most
    ``segment_length`` bytes (plus one byte of padding): a run of 2 bytes expands to 128, so a small
    segment can otherwise decode to many times the header's image. Counts, never decodes."""
    items = generate_fragments(pixel_data)
    next(items, None)  # the basic offset table
    frame = next(items, None)
    if frame is None or len(frame) < 64:
        raise StreamError("no RLE header in the first frame")
    count = int.from_bytes(frame[:4], "little")
    if not 1 <= count <= 15:
        raise StreamError(f"RLE header names {count} segments (1 to 15 are allowed)")
    starts = [int.from_bytes(frame[4 + 4 * k : 8 + 4 * k], "little") for k in range(count)]
    for k, (start, end) in enumerate(zip(starts, starts[1:] + [len(frame)])):
        if not 64 <= start <= end <= len(frame):
            raise StreamError(f"RLE segment {k + 1} lies outside the frame")
        if _rle_length(frame, start, end, segment_length + 1) > segment_length + 1:
            raise StreamError(f"RLE segment {k + 1} decodes to more than the header's {segment_length} bytes")


def _rle_length(frame: bytes, pos: int, end: int, limit: int) -> int:
    """The decoded length of the RLE segment ``frame[pos:end]``, counted until it passes ``limit``."""
    out = 0
    while pos < end and out <= limit:
        n = frame[pos]
        if n < 128:  # the next n + 1 bytes, literally
            out += n + 1
            pos += n + 2
        elif n > 128:  # the next byte, 257 - n times
            out += 257 - n
            pos += 2
        else:  # 128: no operation
            pos += 1
    return out
