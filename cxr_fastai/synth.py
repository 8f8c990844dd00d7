"""Deterministic generator of a small SYNTHETIC chest-X-ray-like dataset.

Used by ``cxr-fastai demo`` so the whole pipeline can run without downloading
real data. The pictures are procedurally drawn cartoons: they share the rough
layout of a frontal chest radiograph and differ per class only in the shape and
place of bright "opacities". They carry no medical meaning whatsoever.

Pure numpy + Pillow; importing this module has no side effects.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from .io.files import atomic_folder

CLASSES: tuple[str, ...] = ("COVID19", "NORMAL", "PNEUMONIA")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
LABELS_HEADER: tuple[str, ...] = ("path", "label", "split", "source", "patient_id", "group")
DEFAULT_N_PER_CLASS: Mapping[str, int] = MappingProxyType({"train": 200, "valid": 60, "test": 60})

# Mean grey level (0..255) every image is shifted to, drawn per image from
# N(_MEAN_TARGET, _MEAN_SD) for every class alike, so brightness is no shortcut.
_MEAN_TARGET = 110.0
_MEAN_SD = 8.0
_NOISE_SD = 5.0  # grey levels, per pixel

_README = """\
# Synthetic demo dataset

Every image in this folder is SYNTHETIC: procedurally generated from random
ellipses, arcs, blobs and noise by `cxr_fastai.synth`. No patient data was used.
The class names (COVID19, NORMAL, PNEUMONIA) are only labels for a toy
shape-recognition task; the images say nothing about medicine and must not be
used to judge any clinical method.

Layout: `{split}/{CLASS}/synthetic_{split}_{index}.png` (8-bit grey PNG) and
`labels.csv` with columns `path,label,split,source,patient_id,group`.
Regenerating with the same seed gives byte-identical files.
"""


def _soft_ellipse(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float, edge: float
) -> np.ndarray:
    """Mask in 0..1, ~1 inside the ellipse; `edge` is the falloff width in radius units."""
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge))


def _gauss(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))


def make_synthetic_image(label: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draw one synthetic frontal "chest" of class `label`.

    Returns a (size, size) uint8 array. Geometry is in normalised coordinates
    x, y in [-1, 1] (x to the right, y downwards), so the picture looks the same
    at any size; only the pixel noise is per pixel.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")

    coords = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # each (size, size)

    # Per-image jitter: patient position / magnification / exposure.
    cx = rng.normal(0.0, 0.03)
    cy = rng.normal(0.0, 0.03)
    s = rng.uniform(0.92, 1.06)
    contrast = rng.uniform(0.85, 1.15)

    img = np.full((size, size), 18.0)  # dark background
    # Trunk, plus shoulders so the outline is not a plain oval.
    img += 130.0 * _soft_ellipse(xx, yy, cx, cy + 0.15 * s, 0.86 * s, 1.0 * s, 0.05)
    img += 70.0 * _soft_ellipse(xx, yy, cx, cy - 0.6 * s, 0.95 * s, 0.3 * s, 0.25)

    # Lung fields: two darker ellipses; lx/ly/ax/ay kept for placing opacities.
    lung_dx, lung_cy = 0.37 * s, cy - 0.08 * s
    lung_ax, lung_ay = 0.27 * s, 0.55 * s
    lungs = []
    for side in (-1.0, 1.0):
        lx = cx + side * lung_dx
        m = _soft_ellipse(xx, yy, lx, lung_cy, lung_ax * rng.uniform(0.95, 1.05),
                          lung_ay * rng.uniform(0.95, 1.05), 0.08)
        lungs.append((side, lx, m))
    lung_mask = np.clip(lungs[0][2] + lungs[1][2], 0.0, 1.0)
    img -= 85.0 * lung_mask

    # Faint rib arcs: curves that drop laterally, ~0.13 apart, only visible in the lungs.
    dist = np.abs(xx - cx)
    rib_w = 0.022 * s
    ribs = np.zeros_like(img)
    for k in range(7):
        y0 = lung_cy - 0.48 * s + k * 0.14 * s + rng.normal(0.0, 0.01)
        yr = y0 + 0.55 * (dist - 0.1 * s) ** 2
        ribs += np.exp(-0.5 * ((yy - yr) / rib_w) ** 2)
    img += 14.0 * np.clip(ribs, 0.0, 1.0) * lung_mask

    # Mediastinum / spine strip, heart shadow to the patient's left (image right).
    img += 55.0 * _soft_ellipse(xx, yy, cx, cy - 0.05, 0.09 * s, 1.1 * s, 0.15)
    img += 35.0 * _soft_ellipse(xx, yy, cx + 0.1 * s, cy + 0.22 * s, 0.2 * s, 0.18 * s, 0.15) * lung_mask

    # Tiny specks common to every class, so "any bright dot" is no cue.
    opac = np.zeros_like(img)
    for _ in range(rng.integers(0, 4)):
        side, lx, _m = lungs[rng.integers(0, 2)]
        px = lx + rng.uniform(-0.7, 0.7) * lung_ax
        py = lung_cy + rng.uniform(-0.7, 0.7) * lung_ay
        r = rng.uniform(0.015, 0.03) * s
        opac += rng.uniform(25.0, 45.0) * _gauss(xx, yy, px, py, r, r)

    if label == "PNEUMONIA":
        # One dense, compact, roughly round (lobar) consolidation, lower zone, one side.
        side, lx, m = lungs[rng.integers(0, 2)]
        px = lx + rng.normal(0.0, 0.12) * lung_ax
        py = lung_cy + rng.uniform(0.1, 0.55) * lung_ay
        rx = rng.uniform(0.16, 0.22) * s
        ry = rx * rng.uniform(0.8, 1.2)
        opac += rng.uniform(75.0, 95.0) * _soft_ellipse(xx, yy, px, py, rx, ry, 0.12) * m
    elif label == "COVID19":
        # Several small hazy ground-glass patches in BOTH lungs, peripheral and lower.
        for side, lx, m in lungs:
            for _ in range(rng.integers(2, 4)):
                px = lx + side * rng.uniform(0.25, 0.7) * lung_ax  # lateral half = periphery
                py = lung_cy + rng.uniform(-0.1, 0.65) * lung_ay
                # Each patch is a loose cluster of faint puffs: irregular, not a round nodule.
                for _ in range(4):
                    qx = px + rng.normal(0.0, 0.06) * s
                    qy = py + rng.normal(0.0, 0.08) * s
                    sx = rng.uniform(0.05, 0.08) * s
                    sy = sx * rng.uniform(0.7, 1.4)
                    opac += rng.uniform(16.0, 24.0) * _gauss(xx, yy, qx, qy, sx, sy) * m
    img += np.minimum(opac, 100.0)

    img = (img - img.mean()) * contrast
    img += rng.normal(0.0, _NOISE_SD, size=img.shape)

    # Same mean distribution for every class; a second pass corrects the shift
    # that clipping at 0/255 introduces.
    target = float(np.clip(rng.normal(_MEAN_TARGET, _MEAN_SD), 60.0, 190.0))
    out = np.clip(img - img.mean() + target, 0.0, 255.0)
    out = np.clip(out - out.mean() + target, 0.0, 255.0)
    return np.rint(out).astype(np.uint8)


def _resolve_counts(n_per_class: Mapping[str, int] | int) -> dict[str, int]:
    if isinstance(n_per_class, (int, np.integer)) and not isinstance(n_per_class, bool):
        n = int(n_per_class)
        counts = {"train": n, "valid": round(0.3 * n), "test": round(0.3 * n)}
    elif isinstance(n_per_class, Mapping):
        unknown = set(n_per_class) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; expected keys from {SPLITS}")
        counts = {sp: int(n_per_class.get(sp, 0)) for sp in SPLITS}
    else:
        raise TypeError(f"n_per_class must be an int or a mapping, got {type(n_per_class).__name__}")
    if any(v < 0 for v in counts.values()):
        raise ValueError(f"negative image count in {counts}")
    return counts


def _png_bytes(arr: np.ndarray) -> bytes:
    # Pillow writes no tIME/text chunks unless asked, so bytes depend only on pixels.
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_dataset(dest: Path, counts: Mapping[str, int], size: int, seed: int) -> None:
    rows: list[tuple[str, ...]] = []
    for si, split in enumerate(SPLITS):
        for ci, cls in enumerate(CLASSES):
            n = counts[split]
            if n == 0:
                continue
            folder = dest / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # Independent stream per image: adding images or splits never
                # changes the ones already there.
                rng = np.random.default_rng([seed, si, ci, i])
                name = f"synthetic_{split}_{i:04d}.png"
                (folder / name).write_bytes(_png_bytes(make_synthetic_image(cls, rng, size)))
                pid = f"syn-{split}-{cls}-{i:04d}"
                rows.append((f"{split}/{cls}/{name}", cls, split, "synthetic", pid, pid))
    with open(dest / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(LABELS_HEADER)
        w.writerows(rows)
    (dest / "README.md").write_text(_README, encoding="utf-8")


def make_synthetic_dataset(
    root: Path | str,
    n_per_class: Mapping[str, int] | int = DEFAULT_N_PER_CLASS,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset to `root`, replacing anything already there.

    `n_per_class` is images per class for each split (keys from SPLITS, missing = 0),
    or an int n meaning train=n and valid=test=round(0.3 n). Output is
    byte-identical for the same (n_per_class, size, seed). Returns `root`.
    """
    root = Path(root)
    counts = _resolve_counts(n_per_class)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root.parent.mkdir(parents=True, exist_ok=True)

    # Build beside root, then swap, so a crash never leaves a half-written root.
    with atomic_folder(root) as tmp:
        _write_dataset(tmp, counts, size, seed)
    return root
