"""`cxr-fastai audit` and the leakage checks in train/export/evaluate.

Planted leaks (one of each) must all be found and nothing else; a clean dataset must come out clean.
Images are smooth random pictures (8x8 noise upsampled), whose perceptual hashes are far apart, so the
only near duplicates are the planted ones. Near duplicates are phash candidates confirmed by thumbnail
correlation: to test the confirmation on different pictures whose phashes collide, the tests monkeypatch
`cxr_fastai.data.audit._phash_int`. One tiny model (16 px, 1 epoch, 18 synthetic images, a narrow ResNet9)
is trained for the module to check the warnings of train and evaluate.
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

import cxr_fastai.data.audit as audit_mod
from conftest import TINY_WIDTHS, cli
from cxr_fastai.data.audit import MIN_SIMILARITY, audit, near_duplicates, near_pairs
from cxr_fastai.data.audit import cheap_checks


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
                rows.append({"path": rel, "label": c, "split": split, "source": "srcY" if i % 2 else "srcX",
                             "patient_id": f"p-{split}-{c}{i}", "group": f"g-{split}-{c}{i}"})
    if leaks:
        shutil.copyfile(root / "train/A/A0.png", root / "test/A/copy.png")
        rows.append({"path": "test/A/copy.png", "label": "A", "split": "test", "source": "srcX",
                     "patient_id": "p-copy", "group": "g-copy"})
        near = np.asarray(Image.open(root / "train/B/B0.png"), dtype=np.int16) + 6   # a little brighter
        buf = io.BytesIO()
        Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (root / "test/B/near.jpg").write_bytes(buf.getvalue())
        rows.append({"path": "test/B/near.jpg", "label": "B", "split": "test", "source": "srcX",
                     "patient_id": "p-near", "group": "g-near"})
        rows[3 * 2]["patient_id"] = rows[0]["patient_id"]     # valid/A/A0 shares train/A/A0's patient
        rows[2 * 6 + 1]["group"] = rows[1]["group"]           # test/A/A1 shares train/A/A1's group
    if broken:
        (root / "valid/B/broken.png").write_bytes(b"not a png")
        rows.append({"path": "valid/B/broken.png", "label": "B", "split": "valid", "source": "srcY",
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
    assert rep.near.pairs == rep.near.candidates == 1, rep.near
    nx = rep.near.examples[0]
    assert (nx["a"], nx["b"]) == ("train/B/B0.png", "test/B/near.jpg") and nx["distance"] <= 4
    assert nx["correlation"] >= MIN_SIMILARITY and rep.near.rejected_examples == []
    assert rep.near.similarity_histogram == {"<0.8": 0, "0.8-0.9": 0, "0.9-0.95": 0, ">=0.95": 1}
    assert rep.min_similarity == MIN_SIMILARITY
    assert rep.patients.ids == 1 and rep.patients.examples[0]["id"] == "p-train-A0"
    assert rep.patients.examples[0]["splits"] == {"train": 1, "valid": 1}
    assert rep.groups.ids == 1 and rep.groups.examples[0]["id"] == "g-train-A1"
    assert rep.groups.images_by_split == {"train": 1, "test": 1}
    assert rep.leakage and len(rep.leak_messages()) == 4
    assert rep.unreadable == []
    # class by source: A is 7/10 srcX (all splits), B likewise; the threshold is 80%, so no warning; and each
    # source holds both classes alike in train, so no source stands for a class either
    assert rep.class_by_source["all"]["A"] == {"srcX": 7, "srcY": 3}
    assert rep.source_warnings == []


def test_clean_dataset_has_no_findings(clean):
    rep = audit(clean, workers=2)
    assert not rep.leakage and rep.leak_messages() == []
    assert rep.exact.pairs == rep.near.pairs == rep.patients.ids == rep.groups.ids == 0
    assert rep.patients.present and rep.groups.present


def _corr(root: Path, a: str, b: str) -> float:
    from cxr_fastai.io.images import read_grey, squash

    x, y = (squash(read_grey(root / p), 32).astype(np.float64).ravel() for p in (a, b))
    return float(np.corrcoef(x, y)[0, 1])


def test_phash_collisions_between_different_pictures_are_candidates_not_confirmed(leaky, monkeypatch):
    # every image gets one of 4 hashes (0..3, at most 2 bits apart): every cross-split pair is a candidate,
    # through both the same-hash and the different-hash paths; only the planted re-save is the same picture
    monkeypatch.setattr(audit_mod, "_phash_int", lambda arr: int(arr.sum()) % 4)
    rep = audit(leaky, workers=2)
    # 20 images, train 6 / valid 6 / test 8: (20^2 - 6^2 - 6^2 - 8^2) / 2 = 132 cross pairs, less the byte copy
    assert rep.near.candidates == 131 and sum(rep.near.similarity_histogram.values()) == 131
    assert sum(rep.near.candidates_by_distance.values()) == 131
    assert rep.near.pairs == 1 and rep.near.images_by_split == {"train": 1, "valid": 0, "test": 1}
    nx = rep.near.examples[0]
    assert (nx["a"], nx["b"]) == ("train/B/B0.png", "test/B/near.jpg")
    assert nx["correlation"] == pytest.approx(_corr(leaky, nx["a"], nx["b"]), abs=1e-4)
    # the rejected ones are different pictures, most similar first, with their correlation
    rj = rep.near.rejected_examples
    assert len(rj) == audit_mod.MAX_EXAMPLES and all(e["correlation"] < MIN_SIMILARITY for e in rj)
    assert [e["correlation"] for e in rj] == sorted((e["correlation"] for e in rj), reverse=True)
    assert rj[0]["correlation"] == pytest.approx(_corr(leaky, rj[0]["a"], rj[0]["b"]), abs=1e-4)
    # only the confirmed pair counts as leakage: the same 4 messages as without the collisions
    assert len(rep.leak_messages()) == 4 and "1 near-duplicate pair(s)" in rep.leak_messages()[1]


def test_two_different_noise_images_with_the_same_phash_are_not_a_leak(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    root = tmp_path / "ds"
    for split in ("train", "valid"):
        for c in ("A", "B"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(root / split / c / "x.png")
    monkeypatch.setattr(audit_mod, "_phash_int", lambda arr: 0)
    rep = audit(root, workers=1)
    assert rep.near.candidates == 4 and rep.near.candidates_by_distance == {"0": 4}
    assert rep.near.pairs == 0 and rep.near.examples == [] and not rep.leakage
    assert all(abs(e["correlation"]) < 0.5 for e in rep.near.rejected_examples)
    assert "0 pair(s) confirmed of 4 phash candidate(s)" in "\n".join(rep.summary_lines())
    # with the confirmation off (-1 accepts any correlation) they would all count, as phash alone did
    assert audit(root, workers=1, min_similarity=-1.0).near.pairs == 4


def test_each_image_is_decoded_once(leaky, monkeypatch):
    import cxr_fastai.io.images as images_mod

    calls: list[str] = []
    real = images_mod.read_grey
    monkeypatch.setattr(images_mod, "read_grey", lambda p: calls.append(str(p)) or real(p))
    rep = audit(leaky, workers=1)
    assert len(calls) == len(set(calls)) == rep.n_images == 20


def test_thumbnails_are_standardised_and_flat_ones_never_match():
    from cxr_fastai.data.audit import _thumb

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    t = _thumb(a)
    assert t.dtype == np.float32 and t.shape == (1024,)
    assert float(t @ t) / 1024 == pytest.approx(1.0, abs=1e-5)
    brighter = _thumb(np.clip(a.astype(np.int16) + 5, 0, 255).astype(np.uint8))
    assert float(t @ brighter) / 1024 > 0.99
    assert not _thumb(np.full((40, 40), 7, np.uint8)).any()


def test_near_duplicates_equal_brute_force():
    """Candidates, confirmations, histogram and images against an all-pairs loop, on made-up hashes with
    big buckets (so the blockwise paths run too), byte copies inside buckets and correlations of every size."""
    rng = np.random.default_rng(5)
    n = 400
    base = np.array([0, 1, 3, 0b111000, 1 << 40], np.uint64)        # 0/1/3 within 2 bits; the others far
    hk = rng.integers(0, len(base), n)
    h = base[hk]
    splits = rng.choice(["train", "valid", "test"], n).tolist()
    shas = [f"s{i}" for i in range(n)]
    for i in range(0, n - 1, 25):                                   # some byte copies (same hash by construction)
        shas[i + 1], h[i + 1] = shas[i], h[i]
    shas[7] = None                                                  # an unreadable file's hash: never a copy
    protos = rng.normal(size=(12, 1024))
    x = protos[rng.integers(0, 12, n)] + rng.uniform(0.05, 1.5, (n, 1)) * rng.normal(size=(n, 1024))
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    thumbs = x.astype(np.float32)
    paths = [f"p{i}.png" for i in range(n)]
    rep = near_duplicates([int(v) for v in h], thumbs, shas, splits, paths, 4, 0.9)

    a, b = np.triu_indices(n, 1)
    d = np.array([bin(int(v)).count("1") for v in (h[a] ^ h[b])])
    sa, sb = np.array([s or f"?{i}" for i, s in enumerate(shas)])[a], np.array([s or f"?{i}" for i, s in enumerate(shas)])[b]
    sp = np.array(splits)
    cand = (d <= 4) & (sp[a] != sp[b]) & (sa != sb)
    r = (thumbs[a[cand]] * thumbs[b[cand]]).sum(1) / 1024
    conf = r >= np.float32(0.9)
    assert rep.candidates == cand.sum() > 5000 and rep.pairs == conf.sum() > 100
    assert rep.pairs < rep.candidates
    edges = np.searchsorted(np.float32([0.8, 0.9, 0.95]), r.astype(np.float32), side="right")
    assert list(rep.similarity_histogram.values()) == np.bincount(edges, minlength=4).tolist()
    dc = d[cand]
    assert rep.candidates_by_distance == {str(k): int((dc == k).sum()) for k in np.unique(dc)}
    assert rep.pairs_by_distance == {str(k): int((dc[conf] == k).sum()) for k in np.unique(dc[conf])}
    inv = np.zeros(n, bool)
    inv[a[cand][conf]] = inv[b[cand][conf]] = True
    assert rep.images_by_split == {s: int((inv & (sp == s)).sum()) for s in ("train", "valid", "test")}
    ex = rep.examples
    assert len(ex) == 50 and [e["distance"] for e in ex] == sorted(e["distance"] for e in ex)
    assert all(e["correlation"] >= 0.9 and e["split_a"] != e["split_b"] for e in ex)


def test_unreadable_image_is_listed_not_fatal(tmp_path):
    rep = audit(build(tmp_path / "ds", leaks=False, broken=True), workers=2)
    assert [p for p, _ in rep.unreadable] == ["valid/B/broken.png"]
    assert "broken.png" in rep.unreadable[0][1]
    assert not rep.leakage and rep.n_images == 19


def test_source_warning_when_a_class_comes_from_one_source(tmp_path):
    root = build(tmp_path / "ds", leaks=False)
    text = (root / "labels.csv").read_text().replace(",A,train,srcY,", ",A,train,srcX,")
    text = text.replace(",A,valid,srcY,", ",A,valid,srcX,").replace(",A,test,srcY,", ",A,test,srcX,")
    (root / "labels.csv").write_text(text)
    rep = audit(root, workers=1)
    by_class = [w for w in rep.source_warnings if w.startswith("class ")]
    assert len(by_class) == 1 and by_class[0].startswith("class A: 100% "), rep.source_warnings
    # and the other direction: srcX now stands for A (3 of 5 training images, against none of srcY's)
    others = [w for w in rep.source_warnings if w not in by_class]
    assert others and all(w.startswith(("source 'srcX'", "source 'srcY'")) for w in others), others


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
    from cxr_fastai.data.discover import discover

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
    assert rep["near"]["candidates"] == 1 and rep["min_similarity"] == MIN_SIMILARITY
    assert rep["near"]["examples"][0]["correlation"] >= MIN_SIMILARITY


def test_cli_min_similarity_above_the_pair_leaves_a_candidate_unconfirmed(leaky, tmp_path):
    import inspect

    from cxr_fastai.cli import audit_cmd

    assert inspect.signature(audit_cmd).parameters["min_similarity"].default.default == MIN_SIMILARITY
    out = tmp_path / "r.json"
    res = cli("audit", leaky, "--out", out, "--min-similarity", "1")
    assert res.exit_code == 0, (res.output, res.exception)
    assert "0 pair(s) confirmed of 1 phash candidate(s)" in res.stdout
    assert not any("near-duplicate" in ln for ln in res.stderr.splitlines())
    rep = json.loads(out.read_text())
    assert rep["near"]["pairs"] == 0 and rep["near"]["candidates"] == 1 and rep["min_similarity"] == 1.0
    assert rep["near"]["rejected_examples"][0]["b"] == "test/B/near.jpg"
    assert cli("audit", leaky, "--min-similarity", "1.5").exit_code == 2


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
    from cxr_fastai.artifact.export import export_run
    from cxr_fastai.synth import make_synthetic_dataset
    from cxr_fastai.train.fit import train

    base = tmp_path_factory.mktemp("audit_trained")
    ds = make_synthetic_dataset(base / "ds", {"train": 4, "valid": 2}, size=32)
    src = "train/NORMAL/synthetic_train_0000.png"
    shutil.copyfile(ds / src, ds / "valid/NORMAL/copy.png")
    with open(ds / "labels.csv", "a") as f:
        f.write("valid/NORMAL/copy.png,NORMAL,valid,synthetic,syn-copy,syn-copy\n")
    warned: list[str] = []
    cfg = TrainConfig(data=str(ds), run=str(base / "run"), size=16, epochs=1, bs=4, device="cpu", workers=0,
                      widths=TINY_WIDTHS)
    train(cfg, warn=warned.append)
    art = export_run(base / "run", base / "art")
    return {"ds": ds, "art": art.folder, "manifest": art.manifest, "warned": warned, "src": src}


@pytest.mark.slow
def test_train_warns_about_train_valid_copies(trained):
    hits = [w for w in trained["warned"] if "byte-identical" in w]
    assert len(hits) == 1 and hits[0].startswith("1 validation image(s)") and "copy.png" in hits[0], trained["warned"]


@pytest.mark.slow
def test_manifest_lists_training_image_hashes(trained):
    from cxr_fastai.io.files import sha256_file

    hashes = trained["manifest"]["training_images_sha256"]
    assert len(hashes) == 12 and hashes == sorted(hashes) and trained["manifest"]["training_images_missing"] == 0
    assert sha256_file(trained["ds"] / trained["src"]) in hashes


@pytest.mark.slow
def test_evaluate_counts_and_warns_about_training_images(trained):
    from cxr_fastai.config import EvalConfig, PredictConfig
    from cxr_fastai.evaluate.evaluate import evaluate

    cfg, ecfg = PredictConfig(device="cpu", workers=2), EvalConfig(n_boot=20)
    warned: list[str] = []
    res = evaluate(trained["art"], trained["ds"], split="train", cfg=cfg, ecfg=ecfg, warn=warned.append)
    assert res.seen_in_training == res.n == 12 and res.to_dict()["seen_in_training"] == 12
    assert any(w.startswith("12 of the 12 evaluated images were used in training") for w in warned), warned
    warned.clear()
    res = evaluate(trained["art"], trained["ds"], split="valid", cfg=cfg, ecfg=ecfg, warn=warned.append)
    assert res.seen_in_training == 1 and res.n == 7   # only the planted copy
    assert any(w.startswith("1 of the 7 evaluated images") for w in warned), warned
    from cxr_fastai.data.discover import discover

    res = evaluate(trained["art"], trained["ds"], split="all", cfg=cfg, ecfg=ecfg)   # every split at once
    assert res.split == "all" and res.n == len(discover(trained["ds"]).items) == 19 and res.seen_in_training == 13
