"""`cxr-fastai audit` and the leakage checks in train/export/evaluate.

Planted leaks (one of each) must all be found and nothing else; a clean dataset must come out clean.
Images are smooth random pictures (8x8 noise upsampled), whose perceptual hashes are far apart, so the
only near duplicates are the planted ones. One tiny model (16 px, 1 epoch, 18 synthetic images) is
trained for the module to check the warnings of train and evaluate.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_fastai.audit import audit, cheap_checks, near_pairs
from cxr_fastai.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def smooth(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    small = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))
    return np.asarray(small.resize((size, size), Image.BICUBIC))


def build(root: Path, leaks: bool, broken: bool = False, n: int = 3) -> Path:
    """labels.csv dataset, classes A/B, n images per class and split, each its own patient and group.
    leaks=True plants: an exact copy train->test, a brightened JPEG re-save train->test, a patient shared
    by train and valid, a group shared by train and test."""
    rng = np.random.default_rng(7)
    rows = []
    for split in ("train", "valid", "test"):
        for c in ("A", "B"):
            for i in range(n):
                rel = f"{split}/{c}/{c}{i}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(smooth(rng)).save(root / rel)
                rows.append({"path": rel, "label": c, "split": split, "source": f"src{c}" if i else "other",
                             "patient_id": f"p-{split}-{c}{i}", "group": f"g-{split}-{c}{i}"})
    if leaks:
        shutil.copyfile(root / "train/A/A0.png", root / "test/A/copy.png")
        rows.append({"path": "test/A/copy.png", "label": "A", "split": "test", "source": "srcA",
                     "patient_id": "p-copy", "group": "g-copy"})
        near = np.asarray(Image.open(root / "train/B/B0.png"), dtype=np.int16) + 6   # a little brighter
        buf = io.BytesIO()
        Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (root / "test/B/near.jpg").write_bytes(buf.getvalue())
        rows.append({"path": "test/B/near.jpg", "label": "B", "split": "test", "source": "srcB",
                     "patient_id": "p-near", "group": "g-near"})
        rows[3 * 2]["patient_id"] = rows[0]["patient_id"]     # valid/A/A0 shares train/A/A0's patient
        rows[2 * 6 + 1]["group"] = rows[1]["group"]           # test/A/A1 shares train/A/A1's group
    if broken:
        (root / "valid/B/broken.png").write_bytes(b"not a png")
        rows.append({"path": "valid/B/broken.png", "label": "B", "split": "valid", "source": "srcB",
                     "patient_id": "p-broken", "group": "g-broken"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("leaky"), leaks=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("clean"), leaks=False)


# ------------------------------------------------------------------------------------------ library

def test_planted_leaks_are_all_found(leaky):
    rep = audit(leaky, workers=2)
    assert rep.n_images == 20 and rep.n_by_split == {"train": 6, "valid": 6, "test": 8}
    assert rep.exact.pairs == 1 and rep.exact.images_by_split == {"train": 1, "valid": 0, "test": 1}
    ex = rep.exact.examples[0]
    assert (ex["a"], ex["split_a"], ex["b"], ex["split_b"]) == ("train/A/A0.png", "train", "test/A/copy.png", "test")
    # the byte copy has the same phash too, but it is an exact duplicate, not counted again as near
    assert rep.near.pairs == 1, rep.near
    nx = rep.near.examples[0]
    assert (nx["a"], nx["b"]) == ("train/B/B0.png", "test/B/near.jpg") and nx["distance"] <= 4
    assert rep.patients.ids == 1 and rep.patients.examples[0]["id"] == "p-train-A0"
    assert rep.patients.examples[0]["splits"] == {"train": 1, "valid": 1}
    assert rep.groups.ids == 1 and rep.groups.examples[0]["id"] == "g-train-A1"
    assert rep.groups.images_by_split == {"train": 1, "test": 1}
    assert rep.leakage and len(rep.leak_messages()) == 4
    assert rep.unreadable == []
    # class by source: A is 2/3 srcA (all splits), B likewise; the threshold is 80%, so no warning
    assert rep.class_by_source["all"]["A"] == {"srcA": 7, "other": 3}
    assert rep.source_warnings == []


def test_clean_dataset_has_no_findings(clean):
    rep = audit(clean, workers=2)
    assert not rep.leakage and rep.leak_messages() == []
    assert rep.exact.pairs == rep.near.pairs == rep.patients.ids == rep.groups.ids == 0
    assert rep.patients.present and rep.groups.present


def test_unreadable_image_is_listed_not_fatal(tmp_path):
    rep = audit(build(tmp_path / "ds", leaks=False, broken=True), workers=2)
    assert [p for p, _ in rep.unreadable] == ["valid/B/broken.png"]
    assert "broken.png" in rep.unreadable[0][1]
    assert not rep.leakage and rep.n_images == 19


def test_source_warning_when_a_class_comes_from_one_source(tmp_path):
    root = build(tmp_path / "ds", leaks=False)
    text = (root / "labels.csv").read_text().replace(",other,", ",srcA,")
    (root / "labels.csv").write_text(text)
    rep = audit(root, workers=1)
    assert len(rep.source_warnings) == 1 and rep.source_warnings[0].startswith("class A: 100% ")


def test_banded_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    # neighbours at 1..6 bits from random bases, so every distance around the threshold occurs
    flips = [b ^ np.uint64(sum(1 << int(k) for k in rng.choice(64, d, replace=False)))
             for b, d in zip(base[:200], rng.integers(1, 7, 200))]
    h = np.unique(np.concatenate([base, np.array(flips, np.uint64)]))
    i, j, d = near_pairs(h, 4)
    got = set(zip(i.tolist(), j.tolist()))
    want = {(a, b) for a in range(len(h)) for b in range(a + 1, len(h)) if bin(int(h[a] ^ h[b])).count("1") <= 4}
    assert got == want and len(got) == len(i)   # every pair, each once
    assert all(bin(int(h[a] ^ h[b])).count("1") == k for a, b, k in zip(i.tolist(), j.tolist(), d.tolist()))


def test_cheap_checks_cover_train_and_valid_only(leaky):
    from cxr_fastai.data import discover

    msgs = cheap_checks(discover(leaky).items)
    # the patient is shared train/valid; the group and both duplicates go train/test: not train's business
    assert len(msgs) == 1 and "patient id" in msgs[0] and "p-train-A0" in msgs[0]


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_strict_with_leakage_exits_1_with_one_error_line(leaky, tmp_path):
    out = tmp_path / "audit.json"
    res = cli("audit", leaky, "--out", out, "--strict")
    assert res.exit_code == 1, (res.output, res.exception)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(leaky) in errors[0] and "Traceback" not in res.output
    assert "exact duplicate" in errors[0] and "patient" in errors[0]
    rep = json.loads(out.read_text())   # written before failing, and valid JSON
    assert rep["leakage"] is True and rep["exact"]["pairs"] == 1 and rep["near"]["pairs"] == 1


def test_cli_without_strict_warns_and_exits_0(leaky, tmp_path):
    out = tmp_path / "r.json"
    res = cli("audit", leaky, "--out", out)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "exact duplicates across splits: 1 pair" in res.stdout
    assert sum(ln.startswith("warning:") for ln in res.stderr.splitlines()) == 4
    rep = json.loads(out.read_text())
    assert rep["patients"]["ids"] == 1 and rep["groups"]["ids"] == 1 and rep["n_images"] == 20


def test_cli_clean_strict_exits_0(clean):
    res = cli("audit", clean, "--strict")
    assert res.exit_code == 0, (res.output, res.exception)
    assert "error:" not in res.stderr and "warning:" not in res.stderr


def test_cli_missing_folder_is_one_line_error(tmp_path):
    res = cli("audit", tmp_path / "nope")
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / "nope") in lines[0], res.stderr


# ------------------------------------------------------------- train warns, export lists, evaluate counts

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """18 synthetic images (3 classes x 4 train + 2 valid), plus one byte copy of a train image in valid."""
    from cxr_fastai.config import TrainConfig
    from cxr_fastai.export import export_run
    from cxr_fastai.synth import make_synthetic_dataset
    from cxr_fastai.train import train

    base = tmp_path_factory.mktemp("audit_trained")
    ds = make_synthetic_dataset(base / "ds", {"train": 4, "valid": 2}, size=32)
    src = "train/NORMAL/synthetic_train_0000.png"
    shutil.copyfile(ds / src, ds / "valid/NORMAL/copy.png")
    with open(ds / "labels.csv", "a") as f:
        f.write("valid/NORMAL/copy.png,NORMAL,valid,synthetic,syn-copy,syn-copy\n")
    warned: list[str] = []
    cfg = TrainConfig(data=str(ds), run=str(base / "run"), size=16, epochs=1, bs=4, device="cpu", workers=0)
    train(cfg, warn=warned.append)
    art = export_run(base / "run", base / "art")
    return {"ds": ds, "art": art.folder, "manifest": art.manifest, "warned": warned, "src": src}


@pytest.mark.slow
def test_train_warns_about_train_valid_copies(trained):
    hits = [w for w in trained["warned"] if "byte-identical" in w]
    assert len(hits) == 1 and hits[0].startswith("1 validation image(s)") and "copy.png" in hits[0], trained["warned"]


@pytest.mark.slow
def test_manifest_lists_training_image_hashes(trained):
    from cxr_fastai.export import sha256_file

    hashes = trained["manifest"]["training_images_sha256"]
    assert len(hashes) == 12 and hashes == sorted(hashes) and trained["manifest"]["training_images_missing"] == 0
    assert sha256_file(trained["ds"] / trained["src"]) in hashes


@pytest.mark.slow
def test_evaluate_counts_and_warns_about_training_images(trained):
    from cxr_fastai.config import EvalConfig, PredictConfig
    from cxr_fastai.evaluate import evaluate

    cfg, ecfg = PredictConfig(device="cpu", workers=2), EvalConfig(n_boot=20)
    warned: list[str] = []
    res = evaluate(trained["art"], trained["ds"], split="train", cfg=cfg, ecfg=ecfg, warn=warned.append)
    assert res.seen_in_training == res.n == 12 and res.to_dict()["seen_in_training"] == 12
    assert any(w.startswith("12 of the 12 evaluated images were used in training") for w in warned), warned
    warned.clear()
    res = evaluate(trained["art"], trained["ds"], split="valid", cfg=cfg, ecfg=ecfg, warn=warned.append)
    assert res.seen_in_training == 1 and res.n == 7   # only the planted copy
    assert any(w.startswith("1 of the 7 evaluated images") for w in warned), warned
