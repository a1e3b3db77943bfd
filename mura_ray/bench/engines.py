"""What ``bench score`` measures per inference engine and per image format. No Ray here.

- forward alone, per engine installed here (``backends.all_engines``), on the
  same pre-decoded batch, with every core;
- decode + preprocess per core, per format: the benchmark's PNGs, the same
  pixels as JPEG (quality 90) and as 12-bit DICOM (CR, uncompressed), which is
  how radiographs leave a PACS.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from mura_ray.imaging.decode import decode_gray
from mura_ray.imaging.preprocess import EvalPreset, cache_side, load_square
from mura_ray.model import backends
from mura_ray.model.resnet import build_model, for_inference

DECODE_SAMPLE = 200  # images per format for the per-core decode figure


def forward_ips(pixels: np.ndarray, n: int, batch_size: int, threads: int) -> dict[str, float]:
    """images/s of the forward pass alone, per engine, over ``n`` images cycled from ``pixels``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    graph = backends.ProbabilityOf(for_inference(build_model())).eval()
    batch = np.ascontiguousarray(np.resize(pixels, (batch_size, *pixels.shape[1:])))
    side = batch.shape[-1]
    out = {}
    for name, precision in backends.all_engines(torch.device("cpu")):
        engine = backends.BUILDERS[name](graph, precision, torch.device("cpu"), side, "bench-random-weights")
        engine(batch)  # warm-up: first-call compilation and allocation
        done, t0 = 0, time.perf_counter()
        while done < n:
            engine(batch)
            done += batch_size
        out[engine.name] = done / (time.perf_counter() - t0)
    return out


def as_jpeg(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def as_dicom(gray: np.ndarray) -> bytes:
    """A 12-bit MONOCHROME2 CR file, uncompressed, of ``gray`` scaled to 0..4095."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (gray.astype(np.uint16) * 16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def decode_per_core(paths: list[str], image_size: int) -> dict[str, Any]:
    """images/s of decode + preprocess on one core, per format, and the formats' mean sizes."""
    pngs = []
    for path in paths[:DECODE_SAMPLE]:
        with open(path, "rb") as f:
            pngs.append(f.read())
    grays = [decode_gray(data) for data in pngs]
    formats = {"PNG": pngs, "JPEG": [as_jpeg(g) for g in grays], "DICOM": [as_dicom(g) for g in grays]}
    side, crop = cache_side(image_size), EvalPreset(size=image_size)
    torch.set_num_threads(1)
    out: dict[str, Any] = {"mean_pixels": float(np.mean([g.size for g in grays]))}
    for name, files in formats.items():
        t0 = time.perf_counter()
        crop({"pixels": np.stack([load_square(data, side) for data in files])})
        out[name] = len(files) / (time.perf_counter() - t0)
    return out
