"""Shared fixtures. Real data: $CXR_DATA or ../shared/data/cxr3 beside the repository. Under CI=true a
missing dataset is a failure, not a skip.

`tiny_model`: ONE tiny trained run and its exported artifact for the whole session (synthetic data, a narrow
ResNet9 at 16 px, one epoch, trained in-process through the library): every test that only needs *a* model
uses it and must not change it (copy what you want to edit). `cli(...)` runs the CLI in-process (typer's
CliRunner); `run_cli(...)` starts a fresh process, for the few tests that must prove one works (signals, a
model exported in one process predicting the same in another, the `python -m cxr_fastai` entry point)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # under pytest-xdist (`make test` runs two workers on the two cores) each worker, and every process a test
    # starts, gets one thread: two workers at two threads each would oversubscribe the cores
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


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


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package; each is imported from its file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def synthetic_source(dest: Path, source: str, seed: int, counts=None) -> Path:
    """A synthetic labels.csv root (24 px; `counts` per class and split, default 8 train / 3 valid / 3 test)
    whose every image has labels.csv source `source`: one hospital of a multi-source test."""
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(dest, counts or {"train": 8, "valid": 3, "test": 3}, size=24, seed=seed)
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    df["source"] = source
    df.to_csv(root / "labels.csv", index=False)
    return root


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


@contextmanager
def interrupted_after_first_epoch(monkeypatch):
    """The training run inside stops with KeyboardInterrupt (what Ctrl-C raises) right after epoch 1's
    checkpoint is written; the block expects that interruption."""
    from cxr_fastai.train import callbacks

    after_epoch = callbacks.RunCheckpoint.after_epoch

    def interrupt_after_first(self):
        after_epoch(self)
        if self.epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.RunCheckpoint, "after_epoch", interrupt_after_first)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(callbacks.RunCheckpoint, "after_epoch", after_epoch)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`cxr-fastai ARGS` in a fresh process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "cxr_fastai", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def cli(*args):
    """`cxr-fastai ARGS` in this process (typer's CliRunner): result.exit_code, .stdout, .stderr, .output."""
    from typer.testing import CliRunner

    from cxr_fastai.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------ one tiny model for the session

TINY_WIDTHS = (8, 16, 16, 32)   # a narrow ResNet9: every forward pass is ~100x cheaper than the default


@dataclass(frozen=True)
class TinyModel:
    data: Path        # synthetic labels.csv dataset: train 8, valid 4, test 4 images per class, 32 px
    run: Path         # the finished run folder (16 px, 1 epoch)
    art: Path         # its exported artifact
    classes: tuple[str, ...]

    def test_images(self, label: str | None = None) -> list[Path]:
        folder = self.data / "test" / label if label else self.data / "test"
        return sorted(folder.rglob("*.png"))


def _fingerprint(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A trained run + artifact shared by every test that needs a model but not a particular one. Read it,
    never change it: the session checks at its end that no file of the data, run or artifact changed."""
    from cxr_fastai.artifact.export import export_run
    from cxr_fastai.config import TrainConfig
    from cxr_fastai.synth import CLASSES, make_synthetic_dataset
    from cxr_fastai.train.fit import train

    base = tmp_path_factory.mktemp("tiny_model")
    data = make_synthetic_dataset(base / "data", {"train": 8, "valid": 4, "test": 4}, size=32, seed=0)
    run, art = base / "run", base / "art"
    train(TrainConfig(data=str(data), run=str(run), size=16, epochs=1, bs=8, widths=TINY_WIDTHS, device="cpu"))
    export_run(run, art)
    before = _fingerprint(data, run, art)
    yield TinyModel(data, run, art, tuple(CLASSES))
    assert _fingerprint(data, run, art) == before, "a test changed the session's tiny model; copy it instead"
