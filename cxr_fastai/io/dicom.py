"""Reading DICOM radiographs as one 8-bit grey channel, the way a radiologist's viewer displays them.

Why a module of its own: DICOM pixels are not display values. Stored values go through the modality LUT
(rescale slope/intercept), then the VOI LUT or the first window, then onto the display range;
MONOCHROME1 is shown inverted and colour secondary captures are reduced to luma. Skipping any step gives
an image the model never saw in training (too dark, inverted, clipped).

Privacy: a DICOM header carries patient identifiers. No message, warning or log written here holds a
header value other than technical ones (transfer syntax, photometric interpretation, sizes); header
elements other than the pixel module are never even decoded (pydicom converts elements lazily), and
`patient_key` returns a salted hash, never the id. pydicom is imported inside the functions so that
`import cxr_fastai.io.images` stays light.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageReadError
from .files import access_error

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM_EXTENSIONS = (".dcm", ".dicom")

# Photometric interpretations we can turn into grey; every other one is refused.
_MONO = ("MONOCHROME1", "MONOCHROME2")
# pydicom converts YBR_FULL(_422) to RGB on decoding and the JPEG 2000 plugins return YBR_ICT/RCT as RGB.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PALETTE = "PALETTE COLOR"

# pydicom's read errors; a header cut or garbled anywhere surfaces as one of these.
_READ_ERRORS = (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                NotImplementedError, OverflowError, MemoryError)
_DECODE_ERRORS = (*_READ_ERRORS, RuntimeError)


def _has_dicm_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_data(name: str | Path, data: bytes) -> bool:
    """For bytes in memory (an upload): a .dcm/.dicom name, or the DICOM preamble whatever the name."""
    return Path(name).suffix.lower() in DICOM_EXTENSIONS or data[128:132] == b"DICM"


def is_dicom_file(path: str | Path) -> bool:
    """True for .dcm/.dicom names, and for files without an extension (PACS exports often have none,
    or are named by their UID, e.g. 1.2.840.113619.2.1, whose "extension" is all digits) that start
    with the DICOM preamble: bytes 128..132 are b"DICM". Reads at most 132 bytes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    if suffix and not suffix[1:].isdigit():
        return False
    return _has_dicm_preamble(path)


def _short(value: object, limit: int = 64) -> str:
    """A technical header value made safe for a one-line message."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _read_dataset(path: Path, stop_before_pixels: bool = False, data: bytes | None = None) -> "Dataset":
    """The file at `path`, or `data` (its bytes, already in memory) when given; messages name `path`."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path if data is None else io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as e:
        raise ImageReadError(f"{path}: not a valid DICOM file (no 'DICM' file meta header); "
                             "export it again from the PACS as a DICOM Part 10 file") from e
    except _READ_ERRORS as e:
        # The exception text is left out on purpose: a parse error may quote header bytes.
        raise access_error(path, e, "a DICOM file") or ImageReadError(f"{path}: cannot read the DICOM header ({type(e).__name__}); "
                             "the file is probably truncated or corrupt") from e


def _check_decodable(path: Path, ds: "Dataset") -> str:
    """Refuse, before decoding, what we cannot decode or display; return the photometric interpretation."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        kind = "float pixel data, which is not a radiograph" if (
            "FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no pixel data"
        raise ImageReadError(f"{path}: DICOM file holds {kind} (a report, presentation state or header-only "
                             "export, or a file truncated before its pixels); export the image itself again")
    for name in ("Rows", "Columns"):
        if not ds.get(name):
            raise ImageReadError(f"{path}: DICOM image is missing its {name} element (image size); "
                                 "the file is corrupt or incompletely anonymised: export it again")
    tsyntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if not tsyntax:
        raise ImageReadError(f"{path}: DICOM file meta has no Transfer Syntax UID, so its pixel data cannot be "
                             "decoded; export it again as a DICOM Part 10 file")
    label = f"{_short(tsyntax)} ({_short(tsyntax.name, 100)})" if tsyntax.name != tsyntax else _short(tsyntax)
    hint = ("the pylibjpeg plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle) decode JPEG, "
            "JPEG-LS, JPEG 2000 and RLE; otherwise convert the file to an uncompressed transfer syntax "
            "(e.g. with dcmtk's dcmdjpeg)")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise ImageReadError(f"{path}: unsupported DICOM transfer syntax {label}: no decoder exists for it; "
                             f"{hint}") from e
    if not decoder.is_available:
        raise ImageReadError(f"{path}: no decoder installed for DICOM transfer syntax {label}; {hint}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in (*_MONO, *_COLOUR, _PALETTE):
        raise ImageReadError(f"{path}: DICOM photometric interpretation {_short(photometric, 20)!r} cannot be "
                             "turned into a grey radiograph; convert the image to MONOCHROME2 or RGB")
    return photometric


def _decode_first_frame(path: Path, ds: "Dataset") -> np.ndarray:
    """Frame 0 only: a multi-frame file (tomosynthesis, cine) is not one radiograph; say so."""
    from pydicom.pixels import pixel_array

    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        warnings.warn(f"{path}: multi-frame DICOM ({frames} frames); only the first frame is used",
                      UserWarning, stacklevel=3)
    try:
        # raw=False: pydicom converts YBR_FULL/YBR_FULL_422 to RGB; index=0 decodes one frame only
        return pixel_array(ds, index=0 if frames > 1 else None)
    except _DECODE_ERRORS as e:
        # pixel decoding only sees technical elements (image pixel module, transfer syntax): safe to quote
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data ({type(e).__name__}: {_short(e, 200)}); "
                             "the file is probably truncated or corrupt") from e


def _stored_range(ds: "Dataset") -> tuple[int, int]:
    """Smallest and largest value BitsStored can hold (two's complement when PixelRepresentation is 1)."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _to_unit(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map low -> 0 and high -> 255 (low may exceed high: a negative slope), clip, round to nearest."""
    if high == low:
        return np.zeros(arr.shape, np.uint8)
    scaled = (arr.astype(np.float64) - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _voi_lut_entries(ds: "Dataset") -> np.ndarray:
    """The first VOI LUT's entries. Not pydicom's apply_voi: it indexes through an array of the LUT's
    entry type, so a LUT with 8-bit entries and more than 256 of them (12-bit data) wraps around."""
    item = ds.VOILUTSequence[0]
    entries = int(item.LUTDescriptor[0]) or 2 ** 16
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):        # VR OW: 16 bits an entry, in the dataset's byte order
        little = ds.file_meta.TransferSyntaxUID.is_little_endian
        lut = np.frombuffer(data, dtype="<u2" if little else ">u2").astype(np.int64)
    else:                                           # VR US: one value or a list
        lut = np.atleast_1d(np.asarray(data, dtype=np.int64))
    if lut.size == 0:
        raise ValueError("the VOI LUT Sequence holds an empty LUT")
    return lut[:entries]


def _monochrome_to_grey(arr: np.ndarray, ds: "Dataset", photometric: str) -> np.ndarray:
    """Modality LUT, then VOI LUT or first window, then the output range onto 0..255; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    smin, smax = _stored_range(ds)
    values = apply_modality_lut(arr, ds)
    voi_seq = ds.get("VOILUTSequence")
    has_voi_lut = bool(voi_seq) and all(voi_seq[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_voi_lut:
        # Same choice as pydicom's apply_voi_lut (the LUT wins over a window). The LUT's output range is
        # that of its entries: LUT Descriptor bit depths are often wrong (16 declared, 12 used).
        lut = _voi_lut_entries(ds)
        out = lut[np.clip(np.rint(values).astype(np.int64) - int(voi_seq[0].LUTDescriptor[1]), 0, len(lut) - 1)]
        low, high = float(lut.min()), float(lut.max())
    elif has_window:
        # pydicom's windowing maps the window onto [y_min, y_max], the range of the stored values after
        # the modality LUT (y_min > y_max for a negative slope); below the window gives y_min, above y_max.
        # Windowing two extreme inputs reads those ends back as pydicom computes them.
        with np.errstate(over="ignore"):
            low, high = (float(v) for v in apply_windowing(np.array([-1e300, 1e300]), ds))
        out = apply_windowing(values, ds)
    else:
        # No VOI: the whole range the stored values can take, through the modality LUT.
        ends = apply_modality_lut(np.array([smin, smax], dtype=np.int64), ds).astype(np.float64)
        low, high = float(ends.min()), float(ends.max())
        out = values
    grey = _to_unit(out, low, high)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _colour_to_grey(rgb: np.ndarray, bits: int) -> np.ndarray:
    """RGB at `bits` per sample -> 8-bit RGB -> ITU-R 601 luma exactly as PIL's convert('L'); no LUTs."""
    from PIL import Image

    if rgb.dtype != np.uint8 or bits != 8:
        rgb = _to_unit(rgb, 0, 2 ** bits - 1)
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").convert("L"), dtype=np.uint8)


def read_dicom(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Decode a DICOM radiograph to a (H, W) uint8 array as a viewer shows it, or raise ImageReadError
    naming the file. An 8-bit unsigned MONOCHROME2 image without window or rescale comes back unchanged.
    `data`: the file's bytes when they are already in memory (an upload); `path` then only names it."""
    from pydicom.pixels import apply_color_lut

    path = Path(path)
    ds = _read_dataset(path, data=data)
    photometric = _check_decodable(path, ds)
    arr = _decode_first_frame(path, ds)
    try:
        if photometric in _MONO:
            if arr.ndim != 2:
                raise ValueError(f"expected one sample per pixel, got shape {arr.shape}")
            grey = _monochrome_to_grey(arr, ds, photometric)
        elif photometric == _PALETTE:
            rgb = apply_color_lut(arr, ds)
            grey = _colour_to_grey(rgb, 8 if rgb.dtype == np.uint8 else 16)
        else:
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ValueError(f"expected three samples per pixel, got shape {arr.shape}")
            grey = _colour_to_grey(arr, int(ds.get("BitsStored") or 8))
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"{path}: cannot convert DICOM pixels ({photometric}) to grey "
                             f"({type(e).__name__}: {_short(e, 200)}); the header's pixel description "
                             "is inconsistent: export the image again") from e
    if grey.ndim != 2 or grey.size == 0:
        raise ImageReadError(f"{path}: DICOM decoded to an empty or non-2-D array of shape {grey.shape}")
    return grey


def patient_key(path: str | Path, salt: str) -> str | None:
    """A salted SHA-256 (16 hex digits) of the file's PatientID, to group images by patient without
    keeping the id; None when the file is not DICOM, cannot be read or has no (or an empty) PatientID.
    Ids are compared as their stored bytes, trailing padding removed. The raw id is neither returned
    nor stored, and is read as bytes (pydicom's value checks would quote it in a warning)."""
    path = Path(path)
    if not is_dicom_file(path):
        return None
    try:
        ds = _read_dataset(path, stop_before_pixels=True)
    except ImageReadError:
        return None
    if "PatientID" not in ds:
        return None
    raw = ds.get_item("PatientID")   # raw element: no value conversion, hence no validation warning
    value = raw.value if raw is not None else None
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not value:
        return None
    ident = bytes(value).strip(b" \x00")
    if not ident:
        return None
    return hashlib.sha256(salt.encode("utf-8") + b"\x00" + ident).hexdigest()[:16]
