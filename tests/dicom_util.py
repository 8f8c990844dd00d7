"""Building small DICOM files for tests (import with `from dicom_util import make_dicom`; tests/ is on
sys.path because it holds conftest.py and no __init__.py).

Each file carries a planted PatientName/PatientID so tests can prove no message leaks them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

PLANTED_NAME = "Leaky^Patricia"
PLANTED_ID = "PID-7734-LEAK"


def make_dicom(path: str | Path, arr: np.ndarray, *, bits: int | None = None, signed: bool = False,
               monochrome1: bool = False, window: tuple[float, float] | None = None,
               voi_function: str | None = None, slope: float | None = None, intercept: float | None = None,
               voi_lut: np.ndarray | None = None, rgb: bool = False, ybr: bool = False,
               palette: np.ndarray | None = None, photometric: str | None = None, frames: int = 1,
               patient_name: str | None = PLANTED_NAME, patient_id: str | None = PLANTED_ID,
               compress: str | None = None, transfer_syntax: str | None = None,
               encapsulated: Sequence[bytes] | None = None, preamble: bool = True) -> Path:
    """Write `arr` (the STORED values) as a DICOM Part 10 file and return its path.

    arr: (H, W) grey, (H, W, 3) with rgb=True, or (F, H, W) multi-frame. dtype follows the storage:
    uint8/int8 for bits <= 8, uint16/int16 above; `signed` casts to the signed type (PixelRepresentation 1).
    bits: BitsStored (default: the dtype's size). frames > 1 with a 2-D arr stacks arr and rolled copies.
    window: (center, width) of the first window (voi_function: LINEAR, LINEAR_EXACT or SIGMOID).
    voi_lut: a VOI LUT Sequence item mapping stored value i to voi_lut[i] (8-bit entries when all <= 255).
    slope/intercept: the modality rescale.
    rgb: arr is RGB; ybr=True stores it converted to YBR_FULL. palette: (256, 3) uint16 colour LUT, arr the
    indices (PALETTE COLOR).
    compress: a transfer syntax UID pydicom can encode (RLELossless, JPEG2000Lossless).
    encapsulated + transfer_syntax: put these frames (e.g. a JPEG file's bytes, or junk) as encapsulated
    pixel data under that transfer syntax, without checking them.
    photometric: override the Photometric Interpretation written (e.g. to plant an unmappable one).
    preamble=False leaves out the 128-byte preamble and 'DICM' prefix (pydicom refuses such files unless forced).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.asarray(arr)
    if frames > 1 and arr.ndim == 2:
        arr = np.stack([np.roll(arr, 7 * k, axis=1) for k in range(frames)])
    if signed:
        arr = arr.astype(np.int8 if arr.dtype.itemsize == 1 else np.int16)
    elif arr.dtype not in (np.uint8, np.uint16):
        arr = arr.astype(np.uint8 if (bits or 8) <= 8 else np.uint16)
    bits = bits or arr.dtype.itemsize * 8
    pi = ("YBR_FULL" if ybr else "RGB") if rgb else "PALETTE COLOR" if palette is not None else (
        "MONOCHROME1" if monochrome1 else "MONOCHROME2")
    if ybr:
        from pydicom.pixels import convert_color_space
        arr = convert_color_space(arr, "RGB", "YBR_FULL")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "DX"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if patient_name is not None:
        ds.PatientName = patient_name
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-LEAK-1"
    ds.set_pixel_data(arr, pi, bits)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
        if voi_function:
            ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        lut = np.asarray(voi_lut)
        item = Dataset()
        item.add_new(0x00283002, "US", [len(lut) % 65536, 0, 8 if lut.max() <= 255 else 16])  # LUTDescriptor
        item.add_new(0x00283006, "US", [int(v) for v in lut])                               # LUTData
        ds.VOILUTSequence = [item]
    if palette is not None:
        lut = np.asarray(palette, np.uint16)
        for i, colour in enumerate(("Red", "Green", "Blue")):
            ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [len(lut) % 65536, 0, 16])
            ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", lut[:, i].astype("<u2").tobytes())
    if slope is not None or intercept is not None:
        ds.RescaleSlope = 1 if slope is None else slope
        ds.RescaleIntercept = 0 if intercept is None else intercept
        ds.RescaleType = "US"
    if compress is not None:
        ds.compress(UID(compress))
    if encapsulated is not None:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax or ExplicitVRLittleEndian)
        ds.PixelData = encapsulate(list(encapsulated))
        ds["PixelData"].VR = "OB"
    elif transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path
