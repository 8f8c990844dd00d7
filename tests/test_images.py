"""images.read_grey / squash: every path (train, predict, evaluate) sees one 8-bit grey channel."""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import noise_image, write_image
from cxr_fastai.errors import ImageReadError
from cxr_fastai.io.images import is_image_name, read_grey, squash

ORIENTATION = 0x0112


def luma(r: int, g: int, b: int) -> float:
    return r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000


def assert_grey(a: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 2
    if shape is not None:
        assert a.shape == shape


# ------------------------------------------------------------------------------------------ 16-bit

def test_16bit_grey_png_is_scaled_by_bit_depth_not_clipped_to_white(tmp_path):
    a = np.array([[0, 32896], [65535, 257]], np.uint16)
    p = tmp_path / "x16.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # really stored as 16-bit
    g = read_grey(p)
    assert_grey(g, (2, 2))
    assert g.tolist() == [[0, 128], [255, 1]]


def test_dark_16bit_png_stays_dark_instead_of_being_read_as_8bit(tmp_path):
    p = tmp_path / "dark16.png"
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(p)
    assert read_grey(p).max() <= 1  # 200 / 65535 * 255 ~ 0.8


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_tiff_is_scaled_by_bit_depth(tmp_path, mode):
    a = np.array([[0, 32896, 65535, 16448]], np.uint16)
    im = Image.fromarray(a) if mode == "I;16" else Image.frombytes(mode, (4, 1), a.astype(">u2").tobytes())
    p = tmp_path / "x16.tif"
    im.save(p)
    g = read_grey(p)
    assert_grey(g, (1, 4))
    assert g.tolist() == [[0, 128, 255, 64]]


# ----------------------------------------------------------------------------------- colour modes

def test_rgba_is_composited_on_black(tmp_path):
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = (255, 255, 255, 0)     # fully transparent white
    a[0, 1] = (255, 255, 255, 255)   # opaque white
    a[0, 2] = (200, 200, 200, 128)   # half transparent light grey
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    g = read_grey(p)
    assert_grey(g, (1, 3))
    assert g[0, 0] == 0
    assert g[0, 1] == 255
    assert abs(int(g[0, 2]) - 200 * 128 / 255) <= 1


def test_la_is_composited_on_black(tmp_path):
    a = np.zeros((1, 3, 2), np.uint8)
    a[0, 0] = (255, 0)
    a[0, 1] = (200, 255)
    a[0, 2] = (250, 51)
    p = tmp_path / "la.png"
    Image.fromarray(a, "LA").save(p)
    with Image.open(p) as im:
        assert im.mode == "LA"
    g = read_grey(p)
    assert g[0, 0] == 0 and g[0, 1] == 200 and abs(int(g[0, 2]) - 50) <= 1


def test_palette_image_reads_palette_colours_as_luma(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    for x, idx in enumerate((0, 1, 2)):
        im.putpixel((x, 0), idx)
    p = tmp_path / "p.png"
    im.save(p)
    g = read_grey(p)
    assert_grey(g, (1, 3))
    assert g[0, 0] == 0 and g[0, 1] == 255 and abs(int(g[0, 2]) - luma(255, 0, 0)) <= 1


def test_palette_image_with_transparency_reads_transparent_entries_as_black(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 255, 255, 128, 128, 128] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    p = tmp_path / "pt.png"
    im.save(p, transparency=0)  # palette entry 0 (white) is transparent
    with Image.open(p) as r:
        assert r.mode == "P" and "transparency" in r.info
    g = read_grey(p)
    assert g.tolist() == [[0, 128]]


def test_rgb_uses_luma(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 200, 90), (255, 255, 255)]
    a = np.array([colours], np.uint8)
    p = tmp_path / "rgb.png"
    Image.fromarray(a, "RGB").save(p)
    g = read_grey(p)
    assert_grey(g, (1, 5))
    for got, c in zip(g[0], colours):
        assert abs(int(got) - luma(*c)) <= 1, (c, got)


def test_cmyk_jpeg_reads_with_sensible_values(tmp_path):
    im = Image.new("CMYK", (16, 16), (0, 0, 0, 0))                  # white paper
    im.paste((0, 0, 0, 255), (0, 0, 8, 16))                          # left half: full black ink
    p = tmp_path / "cmyk.jpg"
    im.save(p, quality=95)
    with Image.open(p) as r:
        assert r.mode == "CMYK"
    g = read_grey(p)
    assert_grey(g, (16, 16))
    assert g[:, :6].mean() < 20 and g[:, 10:].mean() > 235


def test_mode_1_bilevel_image_reads_as_0_and_255(tmp_path):
    im = Image.new("1", (2, 1))
    im.putpixel((1, 0), 1)
    p = tmp_path / "bw.png"
    im.save(p)
    assert read_grey(p).tolist() == [[0, 255]]


@pytest.mark.parametrize("orientation, k", [(6, -1), (8, 1)])
def test_exif_rotated_jpeg_comes_back_transposed(tmp_path, orientation, k):
    a = np.zeros((16, 32), np.uint8)
    a[:, :16] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[ORIENTATION] = orientation
    p = tmp_path / f"exif{orientation}.jpg"
    im.save(p, exif=exif, quality=95)
    g = read_grey(p)
    assert_grey(g, (32, 16))  # shape swapped
    want = np.rot90(a, k)    # 6: rotate 90 clockwise, 8: 90 counter-clockwise
    assert np.abs(g.astype(int) - want).mean() < 8


def test_1x1_image_reads(tmp_path):
    p = write_image(tmp_path / "one.png", 77, size=1)
    g = read_grey(p)
    assert_grey(g, (1, 1))
    assert g[0, 0] == 77


@pytest.mark.parametrize("ext", [".bmp", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".JPG"])
def test_common_formats_read(tmp_path, ext):
    a = noise_image(np.random.default_rng(0), 20)
    p = write_image(tmp_path / f"x{ext}", a)
    g = read_grey(p)
    assert_grey(g, (20, 20))
    tol = 12 if ext.lower() in (".jpg", ".jpeg") else 0
    assert np.abs(g.astype(int) - a).mean() <= tol
    assert is_image_name(p)


def test_non_square_image_keeps_height_by_width(tmp_path):
    p = write_image(tmp_path / "wide.png", np.zeros((10, 30), np.uint8))
    assert read_grey(p).shape == (10, 30)


def test_accepts_str_paths(tmp_path):
    p = write_image(tmp_path / "s.png", 5)
    assert read_grey(str(p))[0, 0] == 5


# ---------------------------------------------------------------------------------------- errors

def _valid_bytes(fmt: str, size: int = 32) -> bytes:
    b = io.BytesIO()
    Image.fromarray(noise_image(np.random.default_rng(1), size)).save(b, fmt)
    return b.getvalue()


def _make_bad(tmp_path: Path, kind: str) -> Path:
    if kind == "zero-byte":
        p = tmp_path / "empty.png"
        p.write_bytes(b"")
    elif kind == "truncated-jpeg":
        b = _valid_bytes("JPEG", 64)
        p = tmp_path / "trunc.jpg"
        p.write_bytes(b[: len(b) // 2])
    elif kind == "truncated-png":
        b = _valid_bytes("PNG", 64)
        p = tmp_path / "trunc.png"
        p.write_bytes(b[: len(b) // 2])
    elif kind == "text-named-jpg":
        p = tmp_path / "notes.jpg"
        p.write_text("this is not an image\n")
    elif kind == "folder-named-jpg":
        p = tmp_path / "x.jpg"
        p.mkdir()
    elif kind == "missing":
        p = tmp_path / "nowhere" / "gone.png"
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind", ["zero-byte", "truncated-jpeg", "truncated-png", "text-named-jpg",
                                  "folder-named-jpg", "missing"])
def test_unreadable_file_raises_image_read_error_naming_the_path(tmp_path, kind):
    p = _make_bad(tmp_path, kind)
    with pytest.raises(ImageReadError) as ei:
        read_grey(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("side", [12, 40])  # 144 px: Pillow only warns (1x-2x); 1600 px: Pillow raises
def test_decompression_bomb_raises_image_read_error_naming_the_path(tmp_path, monkeypatch, side):
    p = write_image(tmp_path / "bomb.png", 9, size=side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageReadError) as ei:
            read_grey(p)
    assert str(p) in str(ei.value) and "too large" in str(ei.value)


def test_decompression_bomb_is_an_error_even_when_warnings_are_errors(tmp_path, monkeypatch):
    p = write_image(tmp_path / "bomb.png", 9, size=12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError):
            read_grey(p)


def test_image_below_the_pixel_limit_reads(tmp_path, monkeypatch):
    p = write_image(tmp_path / "ok.png", 9, size=10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_grey(p).shape == (10, 10)


def test_bomb_check_holds_in_threads_and_leaves_warning_filters_alone(tmp_path, monkeypatch):
    """decode_many reads in threads: the size limit must hold for every image in every thread, and the
    process-wide warning filters must not be changed (warnings.catch_warnings is not thread-safe)."""
    paths = [write_image(tmp_path / f"b{i}.png", i % 256, size=12) for i in range(200)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        before = list(warnings.filters)

        def one(p):
            try:
                read_grey(p)
                return "read"
            except ImageReadError:
                return "refused"

        for _ in range(3):
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(one, paths))
            assert got.count("read") == 0
        assert list(warnings.filters) == before


def test_no_other_exception_type_escapes_for_a_float_image_with_nan(tmp_path):
    p = tmp_path / "nan.tif"
    Image.fromarray(np.array([[np.nan, 1.0]], np.float32), "F").save(p)
    with pytest.raises(ImageReadError) as ei:
        read_grey(p)
    assert str(p) in str(ei.value)


# ----------------------------------------------------------------------------------------- squash

@pytest.mark.parametrize("shape, size", [((24, 24), 32), ((40, 30), 16), ((7, 50), 32), ((1, 1), 8),
                                         ((64, 64), 64)])
def test_squash_gives_size_by_size_equal_to_pil_bilinear_resize_of_the_whole_image(shape, size):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    s = squash(a, size)
    assert s.shape == (size, size) and s.dtype == np.uint8
    want = np.asarray(Image.fromarray(a, "L").resize((size, size), Image.BILINEAR))
    assert np.array_equal(s, want)


# ------------------------------------------------------------------------------------------- fuzz

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


SEEDS = {ext: _valid_bytes(fmt, 16) for fmt, ext in (("PNG", ".png"), ("JPEG", ".jpg"))}
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check_decodes_or_refuses(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF/TIFF tags; not our concern
        try:
            a = read_grey(path)
        except ImageReadError as e:
            assert str(path) in str(e)
            return
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 2 and a.size > 0


@FUZZ
@given(data=st.binary(max_size=600), ext=st.sampled_from([".png", ".jpg", ".bmp", ".tif"]))
def test_fuzz_random_bytes_decode_or_raise_image_read_error(fuzz_dir, data, ext):
    p = fuzz_dir / f"random{ext}"
    p.write_bytes(data)
    _check_decodes_or_refuses(p)


@FUZZ
@given(ext=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzz_mutated_png_and_jpeg_decode_or_raise_image_read_error(fuzz_dir, ext, edits, cut):
    b = bytearray(SEEDS[ext])
    for where, byte in edits:
        b[int(where * len(b))] = byte
    if cut is not None:
        b = b[: int(cut * len(b))]
    p = fuzz_dir / f"mutated{ext}"
    p.write_bytes(bytes(b))
    _check_decodes_or_refuses(p)
