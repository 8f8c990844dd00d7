"""Tests for the synthetic demo dataset generator (cxr_fastai.synth)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_fastai.synth import CLASSES, SPLITS, make_synthetic_dataset, make_synthetic_image

SIZE = 32  # px; small keeps the tests fast


def _read_labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "label", "split", "source", "patient_id", "group"]
        return list(reader)


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    return make_synthetic_dataset(root, n_per_class={"train": 5, "valid": 2, "test": 3}, size=SIZE, seed=1)


def test_layout_and_labels(dataset: Path) -> None:
    rows = _read_labels(dataset)
    expected = {"train": 5, "valid": 2, "test": 3}
    assert len(rows) == sum(expected.values()) * len(CLASSES)
    assert len({r["patient_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["source"] == "synthetic"
        assert r["group"] == r["patient_id"]
        assert r["label"] in CLASSES and r["split"] in SPLITS
        assert "\\" not in r["path"] and not r["path"].startswith("/")
        parts = r["path"].split("/")
        assert parts[0] == r["split"] and parts[1] == r["label"]
        assert parts[2].startswith(f"synthetic_{r['split']}_") and parts[2].endswith(".png")
        with Image.open(dataset / r["path"]) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (SIZE, SIZE)
    for split, n in expected.items():
        for cls in CLASSES:
            assert sum(r["split"] == split and r["label"] == cls for r in rows) == n
            assert len(list((dataset / split / cls).glob("*.png"))) == n
    readme = (dataset / "README.md").read_text(encoding="utf-8").lower()
    assert "synthetic" in readme and "procedural" in readme and "medicine" in readme
    # Nothing but the dataset ends up in root or beside it.
    listed = {r["path"] for r in rows} | {"labels.csv", "README.md"}
    assert set(_all_files(dataset)) == listed
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]


def test_int_counts(tmp_path: Path) -> None:
    rows = _read_labels(make_synthetic_dataset(tmp_path / "d", n_per_class=5, size=SIZE))
    per_split = {sp: sum(r["split"] == sp for r in rows) for sp in SPLITS}
    assert per_split == {"train": 5 * 3, "valid": 2 * 3, "test": 2 * 3}  # round(0.3*5) = 2


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    counts = {"train": 5, "valid": 2, "test": 3}
    again = make_synthetic_dataset(tmp_path / "again", n_per_class=counts, size=SIZE, seed=1)
    assert _all_files(again) == _all_files(dataset)
    other = make_synthetic_dataset(tmp_path / "other", n_per_class=counts, size=SIZE, seed=2)
    a, b = _all_files(dataset), _all_files(other)
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in pngs)


def test_replaces_existing_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_synthetic_dataset(root, n_per_class=2, size=SIZE)
    (root / "stray.txt").write_text("left over")
    (root / "train" / "NORMAL" / "stray.png").write_bytes(b"x")
    make_synthetic_dataset(root, n_per_class=2, size=SIZE)
    assert not (root / "stray.txt").exists()
    assert not (root / "train" / "NORMAL" / "stray.png").exists()
    assert (root / "labels.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temp folders left behind


def test_brightness_is_no_shortcut_but_shape_is() -> None:
    n, size = 100, 32
    stacks = {
        c: np.stack([make_synthetic_image(c, np.random.default_rng([0, 0, ci, i]), size) for i in range(n)])
        .astype(np.float64)
        for ci, c in enumerate(CLASSES)
    }
    class_means = [s.mean() for s in stacks.values()]  # grey levels
    assert max(class_means) - min(class_means) < 3.0
    # Mean images (size, size) differ clearly where opacities sit, e.g. lower lung zones.
    diff = stacks["PNEUMONIA"].mean(0) - stacks["NORMAL"].mean(0)
    assert diff.max() > 20.0
    diff = stacks["COVID19"].mean(0) - stacks["NORMAL"].mean(0)
    assert diff.max() > 20.0


def test_image_contract() -> None:
    img = make_synthetic_image("NORMAL", np.random.default_rng(0), size=48)
    assert img.shape == (48, 48) and img.dtype == np.uint8
    with pytest.raises(ValueError):
        make_synthetic_image("FLU", np.random.default_rng(0))
