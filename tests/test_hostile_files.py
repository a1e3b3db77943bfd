"""Hostile files cost one error row each, never the decode task, the worker's memory or a foreign program.

Each test reads real files through ``read_and_decode``, the function the
scoring and training pipelines map; the ones about memory or programs run it
in a fresh Python process, under an address-space limit or with a fake
Ghostscript first on PATH.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zlib

import fsspec
import numpy as np
import pydicom
import pytest
from dicom_files import PHI, dicom_bytes, gradient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from mura_ray.imaging import decode
from mura_ray.imaging.decode import READ_ERROR
from mura_ray.imaging.preprocess import read_and_decode

SENTINEL = b"987654"  # a valid DS/IS value, replaced in the file's bytes by the hostile one


def _decode_files(paths, side: int = 32, fit: str = "crop") -> dict[str, np.ndarray]:
    return read_and_decode(
        {"image_uri": np.array([str(p) for p in paths])}, side=side, fs=fsspec.filesystem("file"), fit=fit
    )


def _run_isolated(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh Python (this checkout's package, one thread); returns the JSON it prints last."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- 1. header values that are not numbers ----


def _with_header_value(keyword: str, raw: bytes) -> bytes:
    """A windowed, rescaled 12-bit DICOM whose ``keyword`` holds ``raw`` (written as bytes, as a PACS might)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient(), bits=12, window=(2000, 4000), rescale=(1.0, 0.0))))
    setattr(ds, keyword, SENTINEL.decode())
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    assert data.count(SENTINEL) == 1
    return data.replace(SENTINEL, raw.ljust(len(SENTINEL)))


@pytest.mark.parametrize(
    ("keyword", "raw", "scored"),
    [
        ("WindowCenter", b"abcd", False),
        ("WindowCenter", b"", True),  # empty: as if absent
        ("RescaleSlope", b"xy", False),
        ("RescaleSlope", b"", True),
        ("NumberOfFrames", b"xy", False),
    ],
)
def test_header_values_that_are_not_numbers_fail_their_file_only(tmp_path, keyword, raw, scored):
    hostile = tmp_path / "hostile.dcm"
    hostile.write_bytes(_with_header_value(keyword, raw))
    good = tmp_path / "good.dcm"
    good.write_bytes(dicom_bytes(gradient(), bits=12))
    out = _decode_files([hostile, good, tmp_path / "gone.dcm"])
    assert list(out["error"][1:2]) == [""] and out["pixels"][1].max() > 0
    assert out["error"][2].startswith(READ_ERROR)  # a read failure is retried next night
    error = out["error"][0]
    if scored:
        assert error == "" and out["pixels"][0].max() > 0
    else:
        assert keyword in error and not error.startswith(READ_ERROR)  # a decode failure is not retried
        assert not any(value in error for value in PHI.values())


# ---- 2. tiny files, huge allocations ----

LONG_SIDE = 1_000_000
ISOLATED_DECODE = """
    import json, resource, sys
    import fsspec, numpy as np
    from mura_ray.imaging.preprocess import fit_square, read_and_decode
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a 61 GiB image cannot be made
    fits = {f: fit_square(np.zeros((1, 1_000_000), np.uint8), 256, f).shape for f in ("pad", "stretch", "crop")}
    out = read_and_decode({"image_uri": np.array(sys.argv[1:])}, side=256, fs=fsspec.filesystem("file"))
    print(json.dumps({"errors": list(out["error"]), "fits": {f: list(s) for f, s in fits.items()}}))
"""


def test_a_long_thin_image_is_refused_without_a_large_allocation(tmp_path):
    png = tmp_path / "thin.png"
    Image.new("L", (LONG_SIDE, 1), 128).save(png)
    assert png.stat().st_size < 5000
    dcm = tmp_path / "thin.dcm"
    dcm.write_bytes(dicom_bytes(np.full((1, 65535), 100, np.uint16)))
    report = _run_isolated(ISOLATED_DECODE, str(png), str(dcm))
    assert report["fits"] == {"pad": [256, 256], "stretch": [256, 256], "crop": [256, 256]}
    png_error, dcm_error = report["errors"]
    assert f"aspect ratio 1:{LONG_SIDE} is over the limit 1:{decode.MAX_ASPECT}" in png_error
    assert "aspect ratio 1:65535 is over the limit" in dcm_error


# ---- 3. compressed streams larger than their header says ----


def _encapsulated_dicom(stream: bytes, syntax, rows: int, columns: int) -> bytes:
    """An 8-bit grayscale DICOM whose header says rows x columns and whose one frame is ``stream``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pillow_stream(fmt: str, side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, format=fmt)
    return buf.getvalue()


ISOLATED_GROWTH = """
    import json, sys
    import fsspec, numpy as np
    from mura_ray.imaging.preprocess import read_and_decode

    def kib(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    fs = fsspec.filesystem("file")
    read_and_decode({"image_uri": np.array([sys.argv[1]])}, side=32, fs=fs)  # imports and warms the decoders
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size starts again from here
    before = kib("VmRSS")
    out = read_and_decode({"image_uri": np.array([sys.argv[2]])}, side=32, fs=fs)
    print(json.dumps({"error": out["error"][0], "grew_mib": (kib("VmHWM") - before) / 1024}))
"""


@pytest.mark.parametrize(("fmt", "syntax"), [("JPEG", JPEGBaseline8Bit), ("JPEG2000", JPEG2000)])
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident size on Linux")
def test_a_stream_larger_than_its_header_is_refused_before_it_is_decoded(tmp_path, fmt, syntax):
    small = tmp_path / "small.dcm"
    small.write_bytes(_encapsulated_dicom(_pillow_stream(fmt, 100), syntax, 100, 100))
    hostile = tmp_path / "hostile.dcm"
    hostile.write_bytes(_encapsulated_dicom(_pillow_stream(fmt, 4000), syntax, 100, 100))
    assert hostile.stat().st_size < 300_000
    assert _decode_files([small])["error"][0] == ""  # the same stream at the header's size decodes
    report = _run_isolated(ISOLATED_GROWTH, str(small), str(hostile))
    assert report["grew_mib"] < 8  # a decoded 4000x4000 frame alone is 15 MiB, its decoders' buffers more
    assert "4000x4000" in report["error"] and "the header's 100x100" in report["error"]


def test_a_jpeg_ls_stream_larger_than_its_header_is_refused(tmp_path):
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient(400, 300), bits=12, syntax=JPEGLSLossless)))
    ds.Rows, ds.Columns = 40, 30
    buf = io.BytesIO()
    ds.save_as(buf)
    path = tmp_path / "hostile.dcm"
    path.write_bytes(buf.getvalue())
    error = _decode_files([path])["error"][0]
    assert "300x400" in error and "the header's 30x40" in error


def _rle_dicom(segment: bytes, rows: int, columns: int) -> bytes:
    """An 8-bit RLE DICOM whose header says rows x columns and whose one frame is one ``segment``."""
    header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)
    return _encapsulated_dicom(header + segment, RLELossless, rows, columns)


def _deflated_dicom(extra_zeros: int) -> bytes:
    """A 100x100 deflated DICOM whose dataset ends with a private element of ``extra_zeros`` zero bytes:
    a file of a few hundred kB that inflates to that many bytes more."""
    plain = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient(100, 100))))
    meta = plain.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(head, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    del plain.file_meta
    pydicom.filewriter.write_dataset(body, plain)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [deflater.compress(body.getvalue())]
    if extra_zeros:
        creator = b"\xe1\x7f\x10\x00LO\x08\x00MURATEST"  # (7FE1,0010) LO, the private block's creator
        element = b"\xe1\x7f\x10\x10OB\x00\x00" + extra_zeros.to_bytes(4, "little")  # (7FE1,1010) OB
        out.append(deflater.compress(creator + element))
        zeros = bytes(1 << 20)
        for _ in range(extra_zeros >> 20):
            out.append(deflater.compress(zeros))
    out.append(deflater.flush())
    return b"\x00" * 128 + b"DICM" + head.getvalue() + b"".join(out)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident size on Linux")
def test_an_rle_segment_that_expands_past_its_header_is_refused_before_it_is_decoded(tmp_path):
    small = tmp_path / "small.dcm"
    small.write_bytes(_rle_dicom(b"\xff\x5a" * 5000, 100, 100))  # 5000 runs of 2 bytes: 100 x 100 pixels
    hostile = tmp_path / "hostile.dcm"
    hostile.write_bytes(_rle_dicom(b"\x81\x5a" * 1_000_000, 100, 100))  # runs of 128: 128 MB for 10 kB
    assert hostile.stat().st_size < 2_100_000
    assert _decode_files([small])["error"][0] == ""
    report = _run_isolated(ISOLATED_GROWTH, str(small), str(hostile))
    assert report["grew_mib"] < 16
    assert "RLE segment 1 decodes to more than the header's 10000 bytes" in report["error"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident size on Linux")
def test_a_deflated_dicom_that_inflates_past_the_byte_limit_is_refused_before_it_is_inflated(tmp_path):
    small = tmp_path / "small.dcm"
    small.write_bytes(_deflated_dicom(0))
    hostile = tmp_path / "hostile.dcm"
    hostile.write_bytes(_deflated_dicom(300 << 20))
    assert hostile.stat().st_size < 1_000_000
    assert _decode_files([small])["error"][0] == ""  # a deflated radiograph decodes
    report = _run_isolated(ISOLATED_GROWTH, str(small), str(hostile))
    assert report["grew_mib"] < 48  # pydicom would hold the 300 MiB inflated, and the compressed copy
    assert "inflates to more than" in report["error"] and "MURA_RAY_MAX_BYTES" in report["error"]


ISOLATED_GREEDY = """
    import json, sys
    import fsspec, numpy as np
    from mura_ray.imaging import preprocess

    real = preprocess.decode_gray

    def greedy(data, *args, name=None, **kwargs):  # a decoder that sizes its output from the data, unchecked
        if name.endswith("greedy.png"):
            np.ones(1 << 30, np.uint8)  # 1 GiB, written
        return real(data, *args, name=name, **kwargs)

    preprocess.decode_gray = greedy
    out = preprocess.read_and_decode({"image_uri": np.array(sys.argv[1:])}, side=32, fs=fsspec.filesystem("file"))
    print(json.dumps({"errors": list(out["error"]), "means": [float(p.mean()) for p in out["pixels"]]}))
"""


def test_a_decoder_that_ignores_every_limit_fails_its_file_not_the_process(tmp_path):
    paths = [tmp_path / n for n in ("before.png", "greedy.png", "after.png")]
    for path in paths:
        Image.new("L", (40, 30), 120).save(path)
    report = _run_isolated(ISOLATED_GREEDY, *map(str, paths), env={"MURA_RAY_DECODE_MEMORY_MB": "256"})
    assert report["errors"] == ["", "cannot decode image: MemoryError: over the decode memory bound of 256 MiB", ""]
    assert report["means"][0] == report["means"][2] == pytest.approx(120, abs=1)


# ---- 4. files that are not what their name says ----

FAKE_GS = """#!/bin/sh
echo "$@" >> "{marker}"
exit 0
"""
ISOLATED_FILES = """
    import json, sys
    import fsspec, numpy as np
    from mura_ray.imaging.preprocess import read_and_decode
    out = read_and_decode({"image_uri": np.array(sys.argv[1:])}, side=32, fs=fsspec.filesystem("file"))
    print(json.dumps({"errors": list(out["error"])}))
"""


def test_files_named_png_open_as_png_only_and_start_no_program(tmp_path):
    marker = tmp_path / "gs-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(FAKE_GS.format(marker=marker))
    (bin_dir / "gs").chmod(0o755)
    picture = Image.fromarray(gradient(64, 48).astype(np.uint8))
    files = {}
    for name, fmt in [("eps.png", "EPS"), ("tiff.png", "TIFF"), ("tiff.jpg", "TIFF"), ("png.dcm", "PNG")]:
        files[name] = tmp_path / name
        picture.save(files[name], format=fmt)
    files["real.png"] = tmp_path / "real.png"
    picture.save(files["real.png"], format="PNG")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    errors = dict(zip(files, _run_isolated(ISOLATED_FILES, *map(str, files.values()), env=env)["errors"]))
    assert not marker.exists(), marker.read_text()
    assert errors.pop("real.png") == ""
    assert all(error for error in errors.values()), errors
    assert "not a PNG file" in errors["eps.png"] and "not a JPEG file" in errors["tiff.jpg"]
    assert Image.MAX_IMAGE_PIXELS == decode.MAX_PIXELS
