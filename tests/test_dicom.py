"""DICOM input: files built with pydicom from real cxr3 radiographs must read back as the source image
(within a grey level where the storage rounds), and every bad file must fail with one line that names the
file and leaks no patient identifier."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_util import PLANTED_ID, PLANTED_NAME, make_dicom
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEG2000MCLossless, JPEGBaseline8Bit, RLELossless

from cxr_fastai.errors import ImageReadError
from cxr_fastai.io.dicom import is_dicom_file, patient_key, read_dicom
from cxr_fastai.io.images import IMAGE_EXTENSIONS, is_image_path, read_grey

REPO = Path(__file__).resolve().parents[1]
PLANTED = (PLANTED_NAME, PLANTED_ID, "Leaky", "PID-7734", "19700101", "ACC-LEAK")


@pytest.fixture(scope="module")
def cxr_jpg(cxr3_root) -> Path:
    """One real radiograph (8-bit grey baseline JPEG, 128x128)."""
    df = pd.read_csv(cxr3_root / "labels.csv", dtype=str, keep_default_na=False)
    return cxr3_root / df.path.iloc[0]


@pytest.fixture(scope="module")
def src(cxr_jpg) -> np.ndarray:
    arr = read_grey(cxr_jpg)
    assert arr.dtype == np.uint8 and arr.ndim == 2 and arr.min() < 50 and arr.max() > 200
    return arr


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == np.uint8
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def no_leak(text: str) -> None:
    for planted in PLANTED:
        assert planted.lower() not in text.lower(), f"patient data {planted!r} leaked into: {text}"


# ------------------------------------------------------------------------------------- pixel handling

def test_monochrome2_8bit_is_identical(src, tmp_path):
    p = make_dicom(tmp_path / "a.dcm", src)
    assert np.array_equal(read_dicom(p), src)
    assert np.array_equal(read_grey(p), src)          # every consumer goes through read_grey


def test_monochrome1_is_inverted_back(src, tmp_path):
    p = make_dicom(tmp_path / "m1.dcm", 255 - src, monochrome1=True)
    assert np.array_equal(read_dicom(p), src)


def test_12bit_scaled_by_bits_stored(src, tmp_path):
    p = make_dicom(tmp_path / "b12.dcm", src.astype(np.uint16) * 16, bits=12)   # 0..4080 of 0..4095
    assert max_diff(read_dicom(p), src) <= 1


def test_16bit_full_range(src, tmp_path):
    p = make_dicom(tmp_path / "b16.dcm", src.astype(np.uint16) * 257, bits=16)
    assert np.array_equal(read_dicom(p), src)


@pytest.mark.parametrize("bits", [8, 16])
def test_signed_twos_complement_range(src, tmp_path, bits):
    if bits == 8:
        stored = (src.astype(np.int16) - 128).astype(np.int8)                 # -128..127
    else:
        stored = (src.astype(np.int32) * 257 - 32768).astype(np.int16)        # -32768..32767
    p = make_dicom(tmp_path / f"s{bits}.dcm", stored, bits=bits, signed=True)
    assert max_diff(read_dicom(p), src) <= 1


def test_window_covering_the_data_gives_the_image_back(src, tmp_path):
    # LINEAR (PS3.3 C.11.2.1.2): x <= c - 0.5 - (w-1)/2 -> lowest output, x > c - 0.5 + (w-1)/2 -> highest
    lo, hi = 0, 255 * 16
    center, width = (lo + hi + 1) / 2, hi - lo + 1
    p = make_dicom(tmp_path / "w.dcm", src.astype(np.uint16) * 16, bits=12, window=(center, width))
    assert max_diff(read_dicom(p), src) <= 1


def test_narrow_window_clips_above(src, tmp_path):
    lo, hi = 0, 2040                                    # half the data: grey v -> 2v, clipped at 255
    p = make_dicom(tmp_path / "wn.dcm", src.astype(np.uint16) * 16, bits=12,
                   window=((lo + hi + 1) / 2, hi - lo + 1))
    expected = np.clip(src.astype(np.int32) * 2, 0, 255).astype(np.uint8)
    assert max_diff(read_dicom(p), expected) <= 1


def test_window_on_monochrome1_is_inverted_after_the_lut(src, tmp_path):
    p = make_dicom(tmp_path / "w1.dcm", (255 - src.astype(np.uint16)) * 16, bits=12, monochrome1=True,
                   window=((4080 + 1) / 2, 4081))
    assert max_diff(read_dicom(p), src) <= 1


def test_rescale_slope_intercept(src, tmp_path):
    # output range: stored 0..255 -> -100..410; without a window that whole range maps onto 0..255
    p = make_dicom(tmp_path / "r.dcm", src, slope=2, intercept=-100)
    assert np.array_equal(read_dicom(p), src)


def test_rescale_then_window_in_output_units(src, tmp_path):
    # stored v*16 (12 bit), rescaled to HU-like -1024 + v*16; a window over exactly that range
    lo, hi = -1024, -1024 + 4080
    p = make_dicom(tmp_path / "rw.dcm", src.astype(np.uint16) * 16, bits=12, slope=1, intercept=-1024,
                   window=((lo + hi + 1) / 2, hi - lo + 1))
    assert max_diff(read_dicom(p), src) <= 1


def test_voi_lut_sequence(src, tmp_path):
    lut = np.clip(np.rint(np.arange(4096) / 16), 0, 255).astype(np.uint16)   # 12-bit in, 8-bit entries out
    p = make_dicom(tmp_path / "voi.dcm", src.astype(np.uint16) * 16, bits=12, voi_lut=lut)
    assert np.array_equal(read_dicom(p), src)


@pytest.mark.parametrize("tsyntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
@pytest.mark.parametrize("bits", [8, 12])
def test_compressed_lossless(src, tmp_path, tsyntax, bits):
    stored = src if bits == 8 else src.astype(np.uint16) * 16
    p = make_dicom(tmp_path / "c.dcm", stored, bits=bits, compress=tsyntax)
    import pydicom
    assert pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == tsyntax
    assert max_diff(read_dicom(p), src) <= (0 if bits == 8 else 1)


def test_jpeg_baseline_from_the_real_file(src, cxr_jpg, tmp_path):
    """pydicom cannot encode JPEG here; the cxr3 file already is one: encapsulate its bytes."""
    p = make_dicom(tmp_path / "j.dcm", src, encapsulated=[cxr_jpg.read_bytes()], transfer_syntax=JPEGBaseline8Bit)
    assert max_diff(read_dicom(p), src) <= 2           # libjpeg vs Pillow's libjpeg-turbo IDCT rounding


def test_multiframe_warns_and_reads_frame_0(src, tmp_path):
    p = make_dicom(tmp_path / "mf.dcm", src, frames=3)
    with pytest.warns(UserWarning, match="multi-frame") as rec:
        out = read_dicom(p)
    assert np.array_equal(out, src)
    assert str(p) in str(rec[0].message)
    no_leak(" ".join(str(w.message) for w in rec))


def _rgb(src: np.ndarray) -> np.ndarray:
    return np.stack([src, np.roll(src, 9, axis=0), 255 - src], axis=-1).astype(np.uint8)


def test_rgb_secondary_capture_is_pil_luma(src, tmp_path):
    rgb = _rgb(src)
    p = make_dicom(tmp_path / "rgb.dcm", rgb, rgb=True)
    assert np.array_equal(read_dicom(p), np.asarray(Image.fromarray(rgb, "RGB").convert("L")))


def test_ybr_full_is_converted_to_rgb_first(src, tmp_path):
    rgb = _rgb(src)
    p = make_dicom(tmp_path / "ybr.dcm", rgb, rgb=True, ybr=True)
    assert max_diff(read_dicom(p), np.asarray(Image.fromarray(rgb, "RGB").convert("L"))) <= 1


def test_palette_colour(src, tmp_path):
    grey_lut = np.repeat((np.arange(256, dtype=np.uint16) * 257)[:, None], 3, axis=1)
    p = make_dicom(tmp_path / "pal.dcm", src, palette=grey_lut)
    assert np.array_equal(read_dicom(p), src)


def test_extensionless_and_uid_named_files_are_found_and_read(src, tmp_path):
    for name in ("IM000001", "1.2.826.0.1.3680043.8.498.1"):
        p = make_dicom(tmp_path / name, src)
        assert is_dicom_file(p) and is_image_path(p)
        assert np.array_equal(read_grey(p), src)
    (tmp_path / "README").write_text("x" * 200)
    (tmp_path / "notes.txt").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)   # a telling extension wins
    assert not is_image_path(tmp_path / "README") and not is_image_path(tmp_path / "notes.txt")
    assert not is_dicom_file(tmp_path / "missing") and not is_dicom_file(tmp_path)
    assert is_dicom_file("x/Y.DCM") and is_dicom_file("y.dicom")            # by name, not opened
    assert ".dcm" in IMAGE_EXTENSIONS and ".dicom" in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------- errors

def _no_pixels(p, src):
    import pydicom
    ds = pydicom.dcmread(make_dicom(p, src))
    del ds.PixelData
    ds.save_as(p)


def _no_rows(p, src):
    import pydicom
    ds = pydicom.dcmread(make_dicom(p, src))
    del ds.Rows
    ds.save_as(p)


def _truncated(p, src):
    data = make_dicom(p, src).read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _header_cut(p, src):
    p.write_bytes(make_dicom(p, src).read_bytes()[:300])


def _unknown_tsyntax(p, src):
    # pydicom knows this transfer syntax but nothing decodes it; the pixel data is junk
    make_dicom(p, src, encapsulated=[b"\xff\x4f\xff\x51 junk" * 8], transfer_syntax=JPEG2000MCLossless)


def _bad_photometric(p, src):
    make_dicom(p, src, photometric="HSV")


def _corrupt_jpeg(p, src):
    make_dicom(p, src, encapsulated=[b"\xff\xd8\xff\xdb junk" * 8], transfer_syntax=JPEGBaseline8Bit)


def _not_dicom(p, src):
    p.write_text(f"{PLANTED_NAME} {PLANTED_ID}\n")


def _no_preamble(p, src):
    make_dicom(p, src, preamble=False)


def _zero_window(p, src):
    make_dicom(p, src, window=(128, 0))


BAD = {
    "no_pixel_data": (_no_pixels, "no pixel data"),
    "missing_rows": (_no_rows, "Rows"),
    "truncated": (_truncated, "truncated"),
    "header_cut": (_header_cut, "truncated before its pixels"),
    "unsupported_transfer_syntax": (_unknown_tsyntax, "1.2.840.10008.1.2.4.92.*pylibjpeg"),
    "photometric": (_bad_photometric, "'HSV'"),
    "corrupt_jpeg": (_corrupt_jpeg, "corrupt"),
    "not_dicom": (_not_dicom, "not a valid DICOM"),
    "no_preamble": (_no_preamble, "not a valid DICOM"),
    "zero_window": (_zero_window, "Window Width"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_fail_with_one_clean_line(src, tmp_path, case, caplog):
    make, pattern = BAD[case]
    p = tmp_path / f"{case}.dcm"
    make(p, src)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError, match=pattern) as err:
            read_grey(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg
    no_leak(msg)
    no_leak(" ".join(str(w.message) for w in rec) + caplog.text)


def test_missing_plugin_names_the_transfer_syntax(src, cxr_jpg, tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    p = make_dicom(tmp_path / "j.dcm", src, encapsulated=[cxr_jpg.read_bytes()], transfer_syntax=JPEGBaseline8Bit)
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(ImageReadError) as err:
        read_dicom(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: ") and "1.2.840.10008.1.2.4.50" in msg and "JPEG Baseline" in msg
    assert "pylibjpeg" in msg and "JPEG-LS" in msg and "JPEG 2000" in msg
    no_leak(msg)


# ------------------------------------------------------------------------------------------ patient key

def test_patient_key_is_salted_and_hides_the_id(src, tmp_path):
    a = make_dicom(tmp_path / "a.dcm", src)
    b = make_dicom(tmp_path / "b" / "IMG1", src[::-1])          # same patient, other image, no extension
    key = patient_key(a, "salt-1")
    assert key is not None and len(key) == 16 and int(key, 16) >= 0
    assert patient_key(b, "salt-1") == key == patient_key(a, "salt-1")
    assert patient_key(a, "salt-2") != key
    no_leak(key)
    other = make_dicom(tmp_path / "c.dcm", src, patient_id="PID-0002")
    assert patient_key(other, "salt-1") != key


def test_patient_key_none_without_an_id(src, tmp_path):
    assert patient_key(make_dicom(tmp_path / "n.dcm", src, patient_id=None), "s") is None
    assert patient_key(make_dicom(tmp_path / "e.dcm", src, patient_id=""), "s") is None
    png = tmp_path / "x.png"
    Image.fromarray(src).save(png)
    assert patient_key(png, "s") is None


def test_importing_images_does_not_import_pydicom():
    code = "import sys, cxr_fastai.io.images; assert 'pydicom' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
