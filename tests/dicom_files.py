"""DICOM test files made with pydicom, carrying identifying header values that must not leak."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

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
    corrupt: bool = False,
    modality: str = "CR",
    frames: int = 1,
) -> bytes:
    """A grayscale DICOM file holding ``pixels`` (uint16), with PHI in its header.

    ``syntax``: the transfer syntax, compressed by pydicom's own encoders;
    ``corrupt``: declared compressed with bytes no decoder reads; ``frames``:
    that many frames, the first ``pixels`` and each next one brighter."""
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
    ds.Modality = modality
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
    if frames > 1:
        ds.NumberOfFrames = frames
    stack = [np.minimum(pixels.astype(np.uint32) + 10 * i, (1 << bits) - 1) for i in range(frames)]
    ds.PixelData = np.stack(stack).astype(np.uint16).tobytes()
    if corrupt:
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def gradient(h: int = 96, w: int = 80, top: int = 4095) -> np.ndarray:
    """A left-to-right ramp 0..top, with a bright square (bone) in the middle."""
    ramp = np.tile(np.linspace(0, top // 2, w), (h, 1))
    ramp[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = top
    return ramp.astype(np.uint16)
