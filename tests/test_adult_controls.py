"""benchmarks/adult_controls.py: cxr3-adult with RSNA "Normal" films as the only training controls."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import load_benchmark
from cxr_fastai.data.discover import discover


# (split, label, RSNA class; "" = unknown)
ROWS = [("train", "NORMAL", "Normal"), ("train", "NORMAL", "No Lung Opacity / Not Normal"), ("train", "NORMAL", ""),
        ("train", "PNEUMONIA", "Lung Opacity"), ("train", "PNEUMONIA", "Lung Opacity"),
        ("valid", "NORMAL", "No Lung Opacity / Not Normal"), ("valid", "NORMAL", "Normal"),
        ("valid", "PNEUMONIA", "Lung Opacity"),
        ("test", "NORMAL", "No Lung Opacity / Not Normal"), ("test", "PNEUMONIA", "Lung Opacity")]


def _fake_adult(root: Path) -> Path:
    rng = np.random.default_rng(0)
    labels, classes = [], []
    for i, (split, label, rsna) in enumerate(ROWS):
        rel = f"{split}/{label}/rsna_adult__p{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / rel)
        labels.append({"path": rel, "label": label, "split": split, "source": "rsna_adult", "patient_id": f"p{i}",
                       "group": ""})
        classes.append({"path": rel, "rsna_class": rsna})
    for name, rows in (("labels.csv", labels), ("rsna_class.csv", classes)):
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def test_only_normal_controls_stay_in_training_and_the_rest_is_unchanged(tmp_path, capsys):
    data = _fake_adult(tmp_path / "cxr3-adult")
    out = tmp_path / "adult-normal-controls"
    assert load_benchmark("adult_controls").main([str(out), "--data", str(data)]) == 0
    assert "2 NORMAL row(s) of train moved to split 'nonopacity'" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["img", "labels.csv"] and (out / "img").is_symlink()

    ds = discover(out)
    items = ds.items.assign(name=ds.items.path.map(lambda p: Path(p).name))
    by_name = dict(zip(items.name, items.split))
    # the Not-Normal and unknown training controls move out; the "Normal" one and every pneumonia stay
    assert [by_name[f"rsna_adult__p{i}.jpg"] for i in range(5)] == ["train", "nonopacity", "nonopacity", "train",
                                                                    "train"]
    # valid and test keep every row, Not-Normal controls included
    assert [by_name[f"rsna_adult__p{i}.jpg"] for i in range(5, 10)] == ["valid"] * 3 + ["test"] * 2
    assert set(items.source) == {"rsna_adult"}
    assert list(items.label) == [label for _, label, _ in ROWS]
    for p in items.path:  # each row is the original image, reached through the link
        rel = Path(p).relative_to(out / "img")
        assert Path(p).read_bytes() == (data / rel).read_bytes()


def test_splits_option_and_refusals(tmp_path, capsys):
    mod = load_benchmark("adult_controls")
    data = _fake_adult(tmp_path / "cxr3-adult")
    out = tmp_path / "o"
    assert mod.main([str(out), "--data", str(data), "--splits", "train", "test"]) == 0
    items = discover(out).items
    split = dict(zip(items.path.map(lambda p: Path(p).name), items.split))
    assert split["rsna_adult__p8.jpg"] == "nonopacity" and split["rsna_adult__p5.jpg"] == "valid"
    assert mod.main([str(out), "--data", str(data)]) == 2
    assert "exists" in capsys.readouterr().err
    assert mod.main([str(tmp_path / "p"), "--data", str(tmp_path)]) == 2
    assert "labels.csv not found" in capsys.readouterr().err
