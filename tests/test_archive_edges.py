"""What a real hospital archive holds: hostile and compressed DICOM, other modalities, CSVs that
list missing files, folders renamed in case, symbolic links, files rewritten with their mtime kept."""

from __future__ import annotations

import io
import json
import os
import shutil
import tracemalloc

import fsspec
import numpy as np
import pyarrow as pa
import pydicom
import pytest
from dicom_files import dicom_bytes, gradient
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from mura_ray.archive.catalog import scan_archive
from mura_ray.archive.sample import write_sample
from mura_ray.imaging import decode, preprocess
from mura_ray.imaging.decode import DecodeError, NotScored, decode_gray
from tests.readers import scores

TEST_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")


def test_multi_frame_dicom_over_the_pixel_limit_is_refused_before_any_decoding(monkeypatch):
    frame = gradient(256, 256)
    data = dicom_bytes(frame, frames=40)  # 40 x 256 x 256 values, 5 MB of pixel data
    monkeypatch.setattr(decode, "MAX_PIXELS", 1_000_000)  # one frame is well under it, all 40 are not
    tracemalloc.start()
    with pytest.raises(DecodeError, match="40 frame"):
        decode_gray(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, peak  # no frame was decoded: 40 frames as float would be 10 MB


def test_of_a_multi_frame_dicom_only_the_first_frame_is_decoded():
    frame = gradient(256, 256)
    single = decode_gray(dicom_bytes(frame))
    data = dicom_bytes(frame, frames=30)  # 3.9 MB of pixel data
    tracemalloc.start()
    first = decode_gray(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(first, single)
    assert peak < 10 * frame.nbytes, peak  # a few copies of one frame, not of all 30


def test_a_file_over_the_byte_cap_is_an_error_row_and_is_not_read_whole(monkeypatch, tmp_path):
    big, small = tmp_path / "big.dcm", tmp_path / "small.dcm"
    big.write_bytes(dicom_bytes(gradient(512, 512)))
    small.write_bytes(dicom_bytes(gradient(16, 16)))
    monkeypatch.setattr(preprocess, "MAX_BYTES", 100_000)
    fs = fsspec.filesystem("file")
    out = preprocess.read_and_decode({"image_uri": np.array([str(big), str(small)])}, side=16, fs=fs)
    assert "over the limit" in out["error"][0] and "MURA_RAY_MAX_BYTES" in out["error"][0]
    assert out["error"][1] == "" and out["pixels"][1].any()
    assert len(preprocess.read_capped(fs, str(small), 100_000)) == os.path.getsize(small)
    with pytest.raises(DecodeError):
        preprocess.read_capped(fs, str(big), 1000)


def test_dicom_of_other_modalities_is_recognised_from_the_header_and_not_decoded(tmp_path):
    files = {"cr.dcm": "CR", "dx.dcm": "DX", "ct.dcm": "CT", "mr.dcm": "MR", "rtdose.dcm": "RTDOSE"}
    for name, modality in files.items():
        (tmp_path / name).write_bytes(dicom_bytes(gradient(32, 32), modality=modality))
    uris = np.array([str(tmp_path / n) for n in files])
    fs = fsspec.filesystem("file")
    out = preprocess.read_and_decode({"image_uri": uris}, side=16, fs=fs, modalities=("CR", "DX", "RG"))
    assert list(out["modality"]) == ["", "", "CT", "MR", "RTDOSE"]
    assert list(out["error"]) == [""] * 5
    assert out["pixels"][:2].any() and not out["pixels"][2:].any()
    everything = preprocess.read_and_decode({"image_uri": uris}, side=16, fs=fs, modalities=None)
    assert list(everything["modality"]) == [""] * 5 and everything["pixels"].any(axis=(1, 2)).all()
    with pytest.raises(NotScored):
        decode_gray(dicom_bytes(gradient(32, 32), modality="CT"), modalities=frozenset({"CR"}))


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_transfer_syntaxes_of_pacs_exports_decode_out_of_the_box(syntax):
    g = gradient(96, 80, top=4095)
    plain = decode_gray(dicom_bytes(g, bits=12))
    packed = dicom_bytes(g, bits=12, syntax=syntax)
    assert pydicom.dcmread(io.BytesIO(packed)).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(decode_gray(packed), plain)


def test_lossless_jpeg_decodes_to_the_same_pixels_as_rle():
    # pydicom's own test files: one image stored as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) and as RLE.
    with open(os.path.join(TEST_FILES, "SC_rgb_jpeg_gdcm.dcm"), "rb") as f:
        jpeg = f.read()
    with open(os.path.join(TEST_FILES, "SC_rgb_rle.dcm"), "rb") as f:
        rle = f.read()
    assert pydicom.dcmread(os.path.join(TEST_FILES, "SC_rgb_jpeg_gdcm.dcm")).file_meta.TransferSyntaxUID.endswith(
        ".4.70"
    )
    assert np.array_equal(decode_gray(jpeg), decode_gray(rle))


def _csv(root, split="valid"):
    return os.path.join(root, "MURA-v1.1", f"{split}_image_paths.csv")


def test_files_the_csvs_list_but_that_are_missing_are_counted_not_catalogued(tmp_path):
    root = str(tmp_path / "archive")
    write_sample(root, studies=6, seed=3)
    before = scan_archive(root).table
    with open(_csv(root), "a") as f:
        f.write("MURA-v1.1/valid/XR_HAND/patient99999/study1_positive/image1.png\n")
    scan = scan_archive(root)
    assert scan.table.num_rows == before.num_rows
    assert scan.missing == [f"{root}/MURA-v1.1/valid/XR_HAND/patient99999/study1_positive/image1.png"]


def test_a_mura_folder_renamed_in_case_is_catalogued_once(tmp_path):
    root = str(tmp_path / "archive")
    write_sample(root, studies=6, seed=3)
    before = scan_archive(root).table
    os.rename(os.path.join(root, "MURA-v1.1"), os.path.join(root, "mura-v1.1"))
    for where in (root, os.path.join(root, "mura-v1.1")):  # the archive's root, or the MURA folder itself
        after = scan_archive(where)
        assert after.table.num_rows == before.num_rows and not after.missing
        assert len(set(after.table["image_uri"].to_pylist())) == after.table.num_rows
        assert after.table["label"].to_pylist() == before["label"].to_pylist()
        assert after.table["split"].to_pylist() == before["split"].to_pylist()


def test_links_to_files_are_scored_links_to_nowhere_counted_and_folder_loops_harmless(tmp_path):
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.png").write_bytes(b"not really a png")
    os.symlink("../a/x.png", root / "b" / "linked.png")
    os.symlink("../a/nowhere.png", root / "b" / "broken.png")
    os.symlink("..", root / "a" / "loop")
    scan = scan_archive(str(root))
    assert sorted(scan.table["image_uri"].to_pylist()) == [str(root / "a" / "x.png"), str(root / "b" / "linked.png")]
    assert scan.table["source_size"].to_pylist() == [16, 16]
    assert scan.broken_links == [str(root / "b" / "broken.png")]


def test_a_rewrite_that_keeps_size_and_mtime_still_changes_the_fingerprint(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    image = root / "x.dcm"
    image.write_bytes(dicom_bytes(gradient(32, 32)))
    st = os.stat(image)
    tag = scan_archive(str(root)).table["source_etag"][0].as_py()
    changed = root / "new.dcm"
    data = bytearray(image.read_bytes())
    data[-512:] = bytes(255 - b for b in data[-512:])  # other pixel values, same header, same size
    changed.write_bytes(bytes(data))
    assert os.path.getsize(changed) == st.st_size
    shutil.copyfile(changed, image)  # as cp -p or rsync -a do: new content ...
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime put back
    changed.unlink()
    assert os.stat(image).st_mtime_ns == st.st_mtime_ns and os.path.getsize(image) == st.st_size
    after = scan_archive(str(root)).table
    assert after["source_size"][0].as_py() == st.st_size
    assert after["source_etag"][0].as_py() != tag


def _batch(table):
    """A catalog's rows as the decode task gets them: the key and the listing's fingerprint."""
    return {c: table[c].to_numpy(zero_copy_only=False) for c in ("image_uri", "source_size", "source_etag")}


def test_a_file_rewritten_between_listing_and_reading_is_a_read_error_retried_next_night(tmp_path):
    from mura_ray.imaging.decode import READ_ERROR
    from mura_ray.scoring.run import plan_run

    root = tmp_path / "tree"
    root.mkdir()
    for name in ("kept", "same_size", "longer"):
        (root / f"{name}.dcm").write_bytes(dicom_bytes(gradient(32, 32)))
    catalog = scan_archive(str(root)).table  # the night's listing ...
    data = bytearray((root / "same_size.dcm").read_bytes())
    data[-512:] = bytes(255 - b for b in data[-512:])
    (root / "new.dcm").write_bytes(bytes(data))
    os.replace(root / "new.dcm", root / "same_size.dcm")  # ... then other pixels under the same name and size
    (root / "longer.dcm").write_bytes(dicom_bytes(gradient(40, 40)))
    out = preprocess.read_and_decode(_batch(catalog), side=16, fs=fsspec.filesystem("file"))
    errors = dict(zip(catalog["image_uri"].to_pylist(), out["error"]))
    assert errors[str(root / "kept.dcm")] == ""
    for name in ("same_size", "longer"):
        assert (
            errors[str(root / f"{name}.dcm")].startswith(f"{READ_ERROR}: ")
            and "changed" in errors[str(root / f"{name}.dcm")]
        ), errors
    assert not out["pixels"][1:].any()  # nothing of the new bytes is scored under the old fingerprint
    # The next night finds such a row and reads the file again.
    earlier = catalog.append_column("error", pa.array([None, errors[str(root / "longer.dcm")], None], pa.string()))
    todo, _ = plan_run(catalog, earlier, full=False)
    assert todo["image_uri"].to_pylist() == [str(root / "longer.dcm")]


@pytest.mark.timeout(600)
def test_a_scoring_run_errors_a_file_rewritten_after_listing_retries_it_and_counts_links_out(
    ray_cluster, untrained_models, small_archive, tmp_path, monkeypatch
):
    from mura_ray.config import ScoreConfig
    from mura_ray.imaging.decode import READ_ERROR
    from mura_ray.scoring import run

    (model, _), _ = untrained_models
    root, plan = small_archive
    archive, elsewhere = tmp_path / "archive", tmp_path / "elsewhere"
    (archive / "s1").mkdir(parents=True)
    elsewhere.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(root, plan[i].rel_path), archive / "s1" / f"image{i}.png")
    shutil.copy(os.path.join(root, plan[3].rel_path), elsewhere / "secret.png")
    os.symlink(elsewhere / "secret.png", archive / "s1" / "linked.png")
    rewritten = archive / "s1" / "image0.png"
    listed = run.scan_archive

    def scan_then_rewrite(*args, **kwargs):
        scan = listed(*args, **kwargs)
        shutil.copy(os.path.join(root, plan[4].rel_path), tmp_path / "new.png")
        os.replace(tmp_path / "new.png", rewritten)  # after the listing, before any read
        return scan

    monkeypatch.setattr(run, "scan_archive", scan_then_rewrite)
    cfg = ScoreConfig(model=model, data=str(archive), out=str(tmp_path / "scores"))
    first = run.run_scoring(cfg)
    assert (first["images"], first["errors"], first["links_not_followed"]) == (3, 1, 1)
    rows = scores(str(tmp_path / "scores"), "image").to_pylist()
    errors = {r["image_uri"]: r["error"] for r in rows}
    assert set(errors) == {str(archive / "s1" / f"image{i}.png") for i in range(3)}  # the link is not scored
    assert (
        errors[str(rewritten)].startswith(f"{READ_ERROR}: ") and "changed since it was listed" in errors[str(rewritten)]
    )
    (run_row,) = scores(str(tmp_path / "scores"), "run", where=f"run_id = '{first['run_id']}'").to_pylist()
    totals = json.loads(run_row["totals"])
    assert run_row["final"] and totals["run"]["links_not_followed"] == 1 and totals["run"]["unreadable_folders"] == 0

    monkeypatch.setattr(run, "scan_archive", listed)
    second = run.run_scoring(cfg)  # the next night reads it again, as it is now
    assert (second["images"], second["errors"], second["skipped"]) == (1, 0, 2)
