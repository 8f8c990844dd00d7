"""Folders as users have them: symlinked class folders, link cycles, OS debris (.DS_Store, Thumbs.db,
__MACOSX/), for every command that walks folders (discover -> train/evaluate/audit, and predict)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, noise_image, write_image
from cxr_fastai.data.discover import discover
from cxr_fastai.io.files import walk_files


def _debris(folder: Path) -> None:
    """What macOS, Windows and zip tools leave beside images; some with image-like names."""
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\x00" * 64)
    (folder / "._scan.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 64)   # AppleDouble, not a PNG
    mac = folder / "__MACOSX"
    mac.mkdir(exist_ok=True)
    (mac / "._scan.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 64)
    (folder / ".hidden").mkdir(exist_ok=True)
    (folder / ".hidden" / "x.png").write_bytes(b"not an image")


def _symlinked_dataset(tmp_path: Path, n: int = 5) -> Path:
    """ROOT/CLASS -> symlinks to folders kept elsewhere (the layout of a user who links their exports),
    with debris inside and a link back up to ROOT (a cycle)."""
    rng = np.random.default_rng(0)
    store = tmp_path / "store"
    root = tmp_path / "data"
    root.mkdir()
    for ci, c in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(n):
            write_image(store / c / f"{c}_{i}.png", noise_image(rng, 24, bias=30 * ci))
        _debris(store / c)
        os.symlink(store / c, root / c, target_is_directory=True)
    os.symlink(root, store / "NORMAL" / "loop", target_is_directory=True)   # cycle: data/NORMAL/loop -> data
    _debris(root)
    return root


def test_walk_follows_symlinked_folders_once_and_skips_debris(tmp_path):
    root = _symlinked_dataset(tmp_path)
    found = walk_files(root, lambda p: True)
    names = sorted(p.name for p in found)
    assert names == sorted([f"NORMAL_{i}.png" for i in range(5)] + [f"PNEUMONIA_{i}.png" for i in range(5)])
    # the names users see (through the links), not the link targets
    assert all(str(p).startswith(str(root)) for p in found)


def test_discover_reads_symlinked_class_folders(tmp_path):
    root = _symlinked_dataset(tmp_path)
    ds = discover(root)
    assert ds.layout == "class-folders"
    assert sorted(ds.items.label.value_counts().to_dict().items()) == [("NORMAL", 5), ("PNEUMONIA", 5)]
    assert not ds.items.path.str.contains("__MACOSX|DS_Store|Thumbs|/\\._", regex=True).any()


def test_split_folders_behind_symlinks(tmp_path, make_folder_dataset):
    real = make_folder_dataset(root=tmp_path / "real")
    root = tmp_path / "linked"
    root.mkdir()
    for split in ("train", "valid"):
        os.symlink(real / split, root / split, target_is_directory=True)
        _debris(real / split)
    ds = discover(root)
    assert ds.layout == "split-folders"
    assert ds.items.groupby("split").size().to_dict() == {"train": 12, "valid": 12}


def test_predict_and_audit_on_symlinked_folders_with_debris(tmp_path, tiny_model):
    root = _symlinked_dataset(tmp_path)
    out = tmp_path / "p.csv"
    r = cli("predict", tiny_model.art, root, "--out", out)
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 10 and (df.error == "").all()
    r = cli("audit", root, "--out", tmp_path / "audit.json")
    assert r.exit_code == 0, r.output
    import json

    assert json.loads((tmp_path / "audit.json").read_text())["n_images"] == 10


def test_folder_with_only_debris_is_refused_clearly(tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    _debris(empty)
    r = cli("predict", tiny_model.art, empty)
    assert r.exit_code == 1
    assert "holds no images" in r.output and "Traceback" not in r.output


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this OS")
def test_dangling_link_is_ignored(tmp_path, make_folder_dataset):
    root = make_folder_dataset(splits=None)
    os.symlink(tmp_path / "gone", root / "A" / "gone", target_is_directory=True)
    ds = discover(root)
    assert len(ds.items) == 12
