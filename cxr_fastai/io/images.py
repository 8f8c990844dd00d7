"""Reading radiographs as one 8-bit grey channel, the same way in every path (train, predict, evaluate).

Why not `PIL.Image.convert('L')` alone: it clips 16-bit images (modes I;16 / I) to white, and it turns
RGBA into grey over an undefined background. Here 16-bit data is scaled by its bit depth, alpha is
composited on black, EXIF orientation is applied and palette/CMYK images are converted properly.

DICOM files (.dcm/.dicom, or extension-less files with the 'DICM' preamble) go to `io.dicom.read_dicom`,
which applies the modality and VOI LUTs as a viewer does, so every consumer (train, predict, evaluate,
audit, interpret) reads them the same way. pydicom is only imported when a DICOM file is read.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..config import MAX_CROP_BORDER
from ..errors import ImageReadError
from .dicom import DICOM_EXTENSIONS, is_dicom_data, is_dicom_file, read_dicom
from .files import access_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", *DICOM_EXTENSIONS)


def is_image_name(path: str | Path) -> bool:
    """By name alone (no file access): one of IMAGE_EXTENSIONS."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_image_path(path: str | Path) -> bool:
    """What folder walkers should use: an image name, or a DICOM file without a telling extension
    (PACS exports are often extension-less); those cost one 132-byte read to check the 'DICM' preamble."""
    return is_image_name(path) or is_dicom_file(path)


def _to_grey(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 from any Pillow mode we accept."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(img, dtype=np.uint16).astype(np.float32)
        return np.round(a * (255.0 / 65535.0)).astype(np.uint8)
    if mode == "I":
        # 32-bit container; in practice a 16-bit PNG/TIFF decoded by an older Pillow
        a = np.asarray(img, dtype=np.int64).astype(np.float32)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        return np.round(np.clip(a, 0, top) * (255.0 / top)).astype(np.uint8)
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError("float image holds NaN or infinite values")
        top = 1.0 if a.max(initial=0) <= 1.0 else 65535.0 if a.max() > 255 else 255.0
        return np.round(np.clip(a, 0, top) * (255.0 / top)).astype(np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        img = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img)
    # RGB, CMYK, YCbCr, LAB, HSV, L and the composited images above: Pillow's ITU-R 601-2 luma
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_grey(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Decode one image file to a (H, W) uint8 array, or raise ImageReadError naming the file.
    `data`: the file's bytes when they are already in memory (an upload); `path` then only names it."""
    path = Path(path)
    if is_dicom_file(path) if data is None else is_dicom_data(path, data):
        return read_dicom(path, data)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            # Pillow raises above 2x MAX_IMAGE_PIXELS and only warns between 1x and 2x: refuse those too.
            # Checked here, not with warnings.catch_warnings(), which is not thread-safe (decode_many runs
            # this in threads: the filter could be lost for one thread and leaked into the process).
            w, h = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:
                raise ImageReadError(f"{path}: image too large ({w}x{h} = {w * h:,} pixels); "
                                     f"resize it below {limit:,} pixels")
            img = ImageOps.exif_transpose(img)
            img.load()
            arr = _to_grey(img)
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: image too large ({e}); resize it below {Image.MAX_IMAGE_PIXELS:,} pixels") from e
    except Image.DecompressionBombWarning as e:  # when warnings are errors (python -W error)
        raise ImageReadError(f"{path}: image too large ({e}); resize it") from e
    except Image.UnidentifiedImageError as e:
        raise ImageReadError(f"{path}: not an image Pillow can read (empty, text or unsupported format)") from e
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:
        raise access_error(path, e) or ImageReadError(
            f"{path}: cannot decode image ({type(e).__name__}: {e}); the file is probably truncated or corrupt") from e
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(f"{path}: decoded to an empty or non-2-D array of shape {arr.shape}")
    return arr


def apply_contrast(arr: np.ndarray, kind: str) -> np.ndarray:
    """Per-image contrast normalisation at read time, before any resize: "none" leaves the image as read;
    "equalize" spreads its grey levels evenly over 0..255 (histogram equalisation), which removes much of
    the difference in exposure and processing between hospitals' pipelines."""
    if kind == "none":
        return arr
    if kind == "equalize":
        return np.asarray(ImageOps.equalize(Image.fromarray(arr, mode="L")), dtype=np.uint8)
    raise ValueError(f"unknown contrast normalisation {kind!r}; use none or equalize")


def crop_border(arr: np.ndarray, frac: float) -> np.ndarray:
    """Cut `frac` of the height from the top and from the bottom, and of the width from each side, at read
    time: a fixed central crop that drops what lies at a film's edges (markers, text, collimation, arms
    and neck), where hospitals differ most and the lungs are not. 0 leaves the image as read."""
    if frac <= 0:
        return arr
    if frac > MAX_CROP_BORDER:
        raise ValueError(f"crop border {frac} is above {MAX_CROP_BORDER}")
    h, w = arr.shape[:2]
    dy, dx = int(round(h * frac)), int(round(w * frac))
    dy, dx = min(dy, (h - 1) // 2), min(dx, (w - 1) // 2)  # at least one pixel stays
    return np.ascontiguousarray(arr[dy:h - dy, dx:w - dx])


def read_step(arr: np.ndarray, contrast: str = "none", crop: float = 0.0) -> np.ndarray:
    """What every model consumer does to a decoded image before resizing: the run's border crop, then its
    contrast step (so that equalisation sees the kept region only)."""
    return apply_contrast(crop_border(arr, crop), contrast)


def read_model_image(path: str | Path, contrast: str = "none", crop: float = 0.0) -> np.ndarray:
    """An image as every model consumer sees it before resizing: read_grey, then the run's read step."""
    return read_step(read_grey(path), contrast, crop)


def squash(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize the whole image to size x size (no crop), bilinear: what validation and prediction see.

    Matches fastai's `RandomResizedCrop(size, val_xtra=0)` at validation time, which crops the full
    image and resizes it with PIL's bilinear filter.
    """
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode_many(paths: Sequence[str], workers: int = 4,
                fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterable[tuple[int, np.ndarray | None, str]]:
    """Yield (index, array or None, error) in order; decoding runs in a thread pool (Pillow drops the GIL)."""
    def one(i_p: tuple[int, str]):
        i, p = i_p
        try:
            a = read_grey(p)
            return i, (fn(a) if fn else a), ""
        except ImageReadError as e:
            return i, None, str(e)

    if workers <= 1:
        yield from map(one, enumerate(paths))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # bounded look-ahead keeps memory flat however many paths come in
        chunk = max(64, workers * 16)
        for start in range(0, len(paths), chunk):
            yield from pool.map(one, enumerate(paths[start:start + chunk], start))
