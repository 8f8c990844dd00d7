"""Shared fixtures. Real data: $CXR_DATA or ../shared/data/cxr3 beside the repository. Under CI=true a
missing dataset is a failure, not a skip."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def cxr3_path() -> Path:
    return Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data" / "cxr3"))


@pytest.fixture(scope="session")
def cxr3_root() -> Path:
    root = cxr3_path()
    if not (root / "labels.csv").is_file():
        msg = f"real dataset not found at {root} (set CXR_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def make_slice(root: Path, dest: Path, per: dict[str, int], seed: int = 0) -> Path:
    """Copy a class-balanced slice of cxr3 (labels.csv layout, same columns) into dest."""
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    parts = [g.sample(min(per[s], len(g)), random_state=seed) for (s, _), g in df.groupby(["split", "label"])
             if per.get(s, 0) > 0]
    sl = pd.concat(parts).sort_values("path")
    for p in sl.path:
        (dest / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / p, dest / p)
    sl.to_csv(dest / "labels.csv", index=False)
    return dest


@pytest.fixture(scope="session")
def cxr3_slice(cxr3_root, tmp_path_factory) -> Path:
    """60 train, 20 valid, 70 test images per class (test: 210 images for the pickle/safetensors check)."""
    return make_slice(cxr3_root, tmp_path_factory.mktemp("cxr3_slice"), {"train": 60, "valid": 20, "test": 70})


def write_image(path: Path, value: int | np.ndarray = 128, size: int = 24, mode: str = "L") -> Path:
    """A small valid image; `value` a grey level or an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size), value, np.uint8) if np.isscalar(value) else np.asarray(value)
    img = Image.fromarray(arr)
    if mode != img.mode:
        img = img.convert(mode)
    img.save(path)
    return path


def noise_image(rng: np.random.Generator, size: int = 24, bias: int = 0) -> np.ndarray:
    return np.clip(rng.normal(120 + bias, 30, (size, size)), 0, 255).astype(np.uint8)


@pytest.fixture
def make_folder_dataset(tmp_path):
    """Factory: ROOT/{split}/CLASS/*.png (split=None gives ROOT/CLASS/*.png) with n images per class."""
    def make(classes=("A", "B"), n=6, splits=("train", "valid"), size=24, root=None) -> Path:
        root = Path(root or tmp_path / "ds")
        rng = np.random.default_rng(0)
        for split in splits or (None,):
            for ci, c in enumerate(classes):
                for i in range(n):
                    d = root / split / c if split else root / c
                    write_image(d / f"{c}_{i}.png", noise_image(rng, size, bias=20 * ci))
        return root
    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`cxr-fastai ARGS` in a fresh process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "cxr_fastai", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
