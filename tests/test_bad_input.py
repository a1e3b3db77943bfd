"""Every image-like file gives exactly one row, whatever is in it; DICOM decodes; nothing identifying leaks."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from dicom_files import PHI, dicom_bytes, gradient
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from mura_ray import cli
from mura_ray.imaging.decode import DecodeError, decode_gray
from tests.readers import connect


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(side: int = 20000) -> bytes:
    """A valid PNG header claiming side x side pixels, with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def _bad_archive(root, good_png: bytes) -> tuple[dict[str, bool], list[str]]:
    """Files under root: {relative name: decodes?} and the names of non-image files."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (120, 100), dtype=np.uint8)
    cmyk = io.BytesIO()
    Image.fromarray(noise).convert("CMYK").save(cmyk, format="JPEG")
    files = {
        "ok/plain.png": (good_png, True),
        "ok/UPPER.PNG": (good_png, True),
        "ok/Bild ä 1.png": (good_png, True),
        "ok/画像 2.JPG": (_jpeg(noise), True),
        "modes/16bit.png": (_png(Image.fromarray(noise.astype(np.uint16) * 257)), True),
        "modes/rgba.png": (_png(Image.fromarray(np.dstack([noise] * 4))), True),
        "modes/palette.png": (_png(Image.fromarray(noise).convert("P")), True),
        "modes/cmyk.jpg": (cmyk.getvalue(), True),
        "modes/one-pixel.png": (_png(Image.new("L", (1, 1), 200)), True),
        "dicom/mono1.dcm": (dicom_bytes(gradient(), bits=12, photometric="MONOCHROME1", window=(1024, 2048)), True),
        "dicom/rle.DCM": (dicom_bytes(gradient(), bits=16, syntax=RLELossless), True),
        "dicom/jpeg-ls.dcm": (dicom_bytes(gradient(), bits=12, syntax=JPEGLSLossless), True),
        "dicom/jpeg2000.dcm": (dicom_bytes(gradient(), bits=12, syntax=JPEG2000Lossless), True),
        "bad/truncated.png": (good_png[: len(good_png) // 2], False),
        "bad/empty.png": (b"", False),
        "bad/text.png": (b"this is a note, not an image\n" * 5, False),
        "bad/bomb.png": (_bomb_png(), False),
        "bad/jpeg2000-undecodable.dcm": (dicom_bytes(gradient(), syntax=JPEG2000Lossless, corrupt=True), False),
        "bad/not-dicom.dcm": (b"\x00" * 300, False),
    }
    others = {"notes.txt": b"hello", ".DS_Store": b"\x00\x01", "ok/report.pdf": b"%PDF-1.4"}
    for name, (data, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for name, data in others.items():
        (root / name).write_bytes(data)
    # A PACS export's other modalities are not radiographs; links lead to an image, or nowhere.
    (root / "dicom" / "ct.dcm").write_bytes(dicom_bytes(gradient(), modality="CT"))
    (root / "links").mkdir()
    os.symlink("../ok/plain.png", root / "links" / "linked.png")
    os.symlink("../ok/gone.png", root / "links" / "broken.png")
    expected = {k: ok for k, (_, ok) in files.items()}
    expected["links/linked.png"] = True
    return expected, sorted(others)


def _jpeg(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.timeout(600)
def test_bad_files_become_rows_and_the_error_rate_sets_the_exit(
    ray_cluster, small_archive, untrained_models, tmp_path, capsys
):
    root, plan = small_archive
    archive = tmp_path / "archive"
    with open(os.path.join(root, plan[0].rel_path), "rb") as f:
        expected, others = _bad_archive(archive, f.read())
    out = tmp_path / "scores"
    (model, model_id), _ = untrained_models

    rc = cli.main(["-q", "score", "--model", model, "--data", str(archive), "--out", str(out)])
    captured = capsys.readouterr()
    n_bad = sum(not ok for ok in expected.values())
    assert rc == 3, captured.err
    assert f"{n_bad} of {len(expected)} images could not be scored" in captured.err
    assert f"errors {n_bad}, ignored {len(others)} non-image files" in captured.out
    assert "not radiographs (DICOM modality not in --modalities): CT 1; 0 found by earlier runs" in captured.out
    assert f"broken links: 1 lead nowhere, e.g. {archive}/links/broken.png" in captured.out

    rows = connect(str(out)).execute("SELECT image_uri, prob_abnormal, error FROM images").fetchall()
    by_name = {os.path.relpath(uri, archive): (prob, err) for uri, prob, err in rows}
    assert sorted(by_name) == sorted(expected)  # one row per image-like file, names intact
    for name, ok in expected.items():
        prob, err = by_name[name]
        if ok:
            assert err is None and 0.0 <= prob <= 1.0, (name, err)
        else:
            assert prob is None and err and "\n" not in err, name
    assert "pixel limit" in by_name["bad/bomb.png"][1] or "over the limit" in by_name["bad/bomb.png"][1]
    assert "0 bytes" in by_name["bad/empty.png"][1]

    # Nothing from a DICOM header reaches any output file (the table's data files and its log alike).
    assert any(n.endswith(".json") for n in os.listdir(out / "scores" / "_delta_log"))
    for dirpath, _, names in os.walk(out):
        for name in names:
            data = open(os.path.join(dirpath, name), "rb").read()
            for value in PHI.values():
                assert value.encode() not in data, (name, value)

    # Undecodable files are final for their bytes: the next run skips them too, and a looser limit exits 0.
    # With --vacuum (as the nightly CronJob runs) it then deletes an overlay no row names, 8 days old.
    orphan = out / "heatmaps" / "run_date=2026-01-01" / "run_id=killed" / "x.png"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"png")
    old = time.time() - 8 * 24 * 3600
    os.utime(orphan, (old, old))
    rc = cli.main(
        ["-q", "score", "--model", model, "--data", str(archive), "--out", str(out), "--max-error-rate", "0.5"]
        + ["--vacuum"]
    )
    assert rc == 0
    again = capsys.readouterr().out
    assert "vacuum: deleted 0 data files of the table and 1 orphan heatmaps (older than 168 h)" in again
    assert not orphan.exists()
    assert f"scored 0, skipped {len(expected)} " in again
    assert "CT 1" not in again and "none new; 1 found by earlier runs" in again  # not read again
    rc = cli.main(
        [
            "-q",
            "score",
            "--model",
            model,
            "--data",
            str(archive),
            "--out",
            str(out),
            "--full",
            "--max-error-rate",
            "0.5",
        ]
    )
    assert rc == 0
    assert f"scored {len(expected)}, skipped 0" in capsys.readouterr().out
    # Asked to score CT too, the next run scores the CT file it set aside.
    rc = cli.main(["-q", "score", "--model", model, "--data", str(archive), "--out", str(out), "--modalities", "CR,CT"])
    assert rc == 0
    assert f"scored 1, skipped {len(expected)} " in capsys.readouterr().out


def test_dicom_windows_inverts_and_scales():
    g = gradient(top=4095)
    plain = decode_gray(dicom_bytes(g, bits=12))
    assert plain.dtype == np.uint8 and plain.shape == g.shape
    assert plain.min() == 0 and plain.max() == 255  # 12 bits stretched onto 8
    inverted = decode_gray(dicom_bytes(g, bits=12, photometric="MONOCHROME1"))
    assert np.array_equal(inverted, 255 - plain)
    rle = decode_gray(dicom_bytes(g, bits=12, syntax=RLELossless))
    assert np.array_equal(rle, plain)
    # A narrow window saturates what lies outside it.
    windowed = decode_gray(dicom_bytes(g, bits=12, window=(500, 200)))
    assert windowed[0, 0] == 0 and windowed[g.shape[0] // 2, g.shape[1] // 2] == 255
    inside = (g > 420) & (g < 580)
    assert inside.any() and 0 < windowed[inside].mean() < 255
    # The modality LUT applies before the window: rescaled by 2, the same window sees twice the values.
    rescaled = decode_gray(dicom_bytes(g, bits=12, window=(1000, 400), rescale=(2.0, 0.0)))
    assert np.abs(rescaled.astype(int) - windowed.astype(int)).max() <= 2  # the window's half-pixel offsets
    with pytest.raises(DecodeError, match="JPEG 2000"):
        decode_gray(dicom_bytes(g, syntax=JPEG2000Lossless, corrupt=True))
