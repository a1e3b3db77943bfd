"""DICOM test files made with pydicom, carrying identifying header values that must not leak."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PHI-4711-ID",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC-99887766",
}


def dicom_bytes(
    pixels: np.ndarray,
    *,
    bits: int = 16,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    syntax=ExplicitVRLittleEndian,
) -> bytes:
    """A single-frame grayscale DICOM file holding ``pixels`` (uint16), with PHI in its header."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == JPEG2000Lossless:
        # Declared compressed, with bytes no installed decoder reads.
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def gradient(h: int = 96, w: int = 80, top: int = 4095) -> np.ndarray:
    """A left-to-right ramp 0..top, with a bright square (bone) in the middle."""
    ramp = np.tile(np.linspace(0, top // 2, w), (h, 1))
    ramp[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = top
    return ramp.astype(np.uint16)
