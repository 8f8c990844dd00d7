"""`cxr-fastai refit`: only the last layer fitted again on class-and-source-balanced data (deep feature
reweighting), chosen on the worst validation source, written as a whole artifact.

What it must do: keep every weight and statistic but the head's; make the head exactly the chosen logistic
regression (standardisation folded in), so safetensors, ONNX and `evaluate` all give that regression's
probabilities; choose by the rule (best worst-source balanced accuracy among heads within --max-drop of the
trained head's pooled validation accuracy), never read test, keep --holdout sources out of fit and choice,
write nothing when no head is allowed, name no file in the manifest, and refuse what it cannot do in one line.

The session's tiny model (16 px) is only read; the two labelled roots (sources site_a and site_b) are the
synthetic set written twice with different seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import cli, load_benchmark, synthetic_source

COUNTS = {"train": 10, "valid": 4, "test": 3}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("refit_data")
    return [synthetic_source(base / "site_a", "site_a", 11, COUNTS), synthetic_source(base / "site_b", "site_b", 12, COUNTS)]


def _items(roots, split):
    from cxr_fastai.data.discover import discover

    items = discover([str(r) for r in roots]).items
    return items[items.split == split].reset_index(drop=True)


def test_linear_head_is_the_regression_with_its_standardisation_folded_in():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cxr_fastai.artifact.refit import linear_head

    rng = np.random.default_rng(0)
    for k in (3, 2):   # sklearn keeps one logit for two classes: the head must still have two rows
        F = rng.normal(3.0, [0.1, 5.0, 1.0, 20.0], size=(90, 4))
        y = np.arange(90) % k
        F[:, 2] += y
        sc = StandardScaler().fit(F)
        lr = LogisticRegression(C=0.1, max_iter=1000).fit(sc.transform(F), y)
        W, b = linear_head(lr, sc, k)
        assert W.shape == (k, 4) and b.shape == (k,)
        z = F @ W.T.astype(np.float64) + b
        p = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(p / p.sum(1, keepdims=True), lr.predict_proba(sc.transform(F)), atol=1e-5)


def test_refit_writes_the_chosen_regression_as_the_head_and_keeps_every_other_weight(tiny_model, roots, tmp_path):
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cxr_fastai.artifact.export import load_model, read_manifest
    from cxr_fastai.artifact.onnx_runtime import OnnxPredictor
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.artifact.refit import features
    from cxr_fastai.data.loaders import sampling_weights
    from cxr_fastai.evaluate.evaluate import evaluate
    from cxr_fastai.io.images import read_grey

    out = tmp_path / "refit"
    rows_seen: list[dict] = []
    from cxr_fastai.artifact.refit import refit_artifact

    res = refit_artifact(tiny_model.art, roots, out, max_drop=1.0, workers=2, draws=0, on_row=rows_seen.append)
    assert res.artifact is not None and not res.skipped and res.held_out == []
    train, valid = _items(roots, "train"), _items(roots, "valid")
    assert (res.n_train, res.n_valid) == (len(train), len(valid))
    assert len(res.grid) == 32 and rows_seen == res.grid and all(r["allowed"] for r in res.grid)
    # the rule: the best worst-source balanced accuracy (the first of ties)
    best = max(res.grid, key=lambda r: r["worst_balanced_accuracy"])
    assert res.chosen is best

    old_art, new_art = read_manifest(tiny_model.art), read_manifest(out)
    old, new = load_model(old_art), load_model(new_art)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    for k in old_sd:
        if not k.startswith("head."):
            assert torch.equal(old_sd[k], new_sd[k]), k
    assert not torch.allclose(old_sd["head.weight"], new_sd["head.weight"])

    # the head is that regression, fitted here again from the same features, weights and C
    pred = Predictor(old_art)
    F_tr, bad = features(pred, train.path.astype(str).tolist(), workers=1)
    F_va, _ = features(pred, valid.path.astype(str).tolist(), workers=1)
    assert bad == []
    ytr = train.label.map({c: i for i, c in enumerate(old_art.classes)}).to_numpy()
    w = sampling_weights(train, best["balance"]) ** best["alpha"]
    sc = StandardScaler().fit(F_tr)
    lr = LogisticRegression(C=best["C"], max_iter=3000).fit(sc.transform(F_tr), ytr, sample_weight=w * len(w) / w.sum())
    want = lr.predict_proba(sc.transform(F_va))
    arrays = [read_grey(str(p)) for p in valid.path]
    got = Predictor(new_art).probs(arrays)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(OnnxPredictor(new_art).probs(arrays), got, atol=1e-4)

    # the recorded validation figures are what `evaluate` measures on the new artifact
    rec = new_art.manifest["refit"]
    ev = evaluate(out, [str(r) for r in roots], split="valid")
    assert ev.accuracy == pytest.approx(rec["validation"]["refitted_head"]["pooled_accuracy"])
    by_src = {s: f["balanced_accuracy"] for s, f in ev.metrics.per_source.items()}
    assert by_src == pytest.approx(rec["validation"]["refitted_head"]["balanced_accuracy_by_source"])
    ev_old = evaluate(tiny_model.art, [str(r) for r in roots], split="valid")
    # evaluate says when it scores the images the head was fitted or chosen on, and only then
    assert ev.seen_in_refit == len(valid) and ev.to_dict()["seen_in_refit"] == len(valid)
    warned: list[str] = []
    on_test = evaluate(out, [str(r) for r in roots], split="test", warn=warned.append)
    assert on_test.seen_in_refit == 0 and not any("refit" in w for w in warned)
    evaluate(out, [str(r) for r in roots], split="valid", warn=warned.append)
    assert any("fitted or chose this model's last layer" in w for w in warned), warned
    assert ev_old.seen_in_refit is None
    assert ev_old.accuracy == pytest.approx(rec["validation"]["trained_head"]["pooled_accuracy"])

    # the manifest: what was done, on how many images of which strata, the parent; no file or folder name
    m = new_art.manifest
    assert set(m["files"]) == {"model.safetensors", "model.onnx"} and not new_art.has_pickle
    assert (rec["balance"], rec["alpha"], rec["C"]) == (best["balance"], best["alpha"], best["C"])
    assert rec["train_images"] == len(train) and sum(rec["train_counts"].values()) == len(train)
    assert len(rec["images_sha256"]) == len(train) + len(valid)
    assert rec["parent"]["weights_sha256"] == old_art.manifest["files"]["model.safetensors"]["sha256"]
    assert "refit" in m["model_card"] and m["classes"] == old_art.manifest["classes"]
    text = (out / "manifest.json").read_text()
    assert str(roots[0]) not in text and ".png" not in text
    assert read_manifest(tiny_model.art).manifest == old_art.manifest


def test_holdout_sources_neither_fit_nor_choose_and_test_is_never_read(tiny_model, roots, tmp_path, monkeypatch):
    import cxr_fastai.artifact.refit as refit

    read: list[str] = []

    def spy(real):
        def f(pred, paths, *a, **kw):
            read.extend(paths)
            return real(pred, paths, *a, **kw)
        return f

    monkeypatch.setattr(refit, "features", spy(refit.features))
    monkeypatch.setattr(refit, "crop_features", spy(refit.crop_features))
    res = refit.refit_artifact(tiny_model.art, roots, tmp_path / "fold", holdout=["site_b"], max_drop=1.0, workers=1)
    a_train, a_valid = (_items(roots[:1], s) for s in ("train", "valid"))
    assert sorted(read) == sorted(map(str, list(a_train.path) + list(a_valid.path)))
    assert res.held_out == ["site_b"] and res.n_train == len(a_train)
    assert all(set(r["balanced_accuracy_by_source"]) == {"site_a"} for r in res.grid)
    rec = res.artifact.manifest["refit"]
    assert rec["held_out_sources"] == ["site_b"] and all(k.startswith("site_a/") for k in rec["train_counts"])


def test_crops_are_the_training_crop_of_what_predict_reads_seeded_and_streamed(tiny_model, roots, tmp_path):
    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.artifact.refit import crop_features, features
    from cxr_fastai.data.augment import random_resized_crop
    from cxr_fastai.io.images import read_grey, read_step, squash

    pred = Predictor(read_manifest(tiny_model.art))
    art = pred.art
    paths = _items(roots, "train").path.astype(str).tolist()[:7]
    F, bad = crop_features(pred, paths, 3, 0.6, seed=5, bs=4, workers=2)
    assert bad == [] and F.shape == (3, 7, pred.model.head.in_features)
    # seeded: the same crops again, whatever the batch size; another seed, other crops; each draw its own crop
    np.testing.assert_allclose(crop_features(pred, paths, 3, 0.6, seed=5, bs=3, workers=1)[0], F, atol=1e-5)
    assert not np.allclose(crop_features(pred, paths, 3, 0.6, seed=6, bs=4, workers=1)[0], F, atol=1e-3)
    assert not np.allclose(F[0], F[1], atol=1e-3)
    # the crops are what training does to the cached image: the image as predict reads it, squashed to the cache
    # side, cut by random_resized_crop with the seed's draws (all drawn first, draw by image), normalised
    import torch
    u = torch.rand((3, 7, 4), generator=torch.Generator().manual_seed(5))
    x = torch.from_numpy(np.stack([squash(read_step(read_grey(p), art.contrast, art.crop_border), art.cache_side)
                                   for p in paths[:4]]))[:, None].float() / 255
    for k in range(3):
        xk = (random_resized_crop(x, art.size, 0.6, u[k, :4]) - art.mean) / art.std
        with torch.inference_mode():
            np.testing.assert_allclose(F[k, :4], pred.model.embed(xk).numpy(), atol=1e-5)
    # a flat image stays flat under any crop: its features are predict's own
    from PIL import Image
    Image.fromarray(np.full((40, 30), 90, np.uint8)).save(tmp_path / "flat.png")
    Fc, _ = crop_features(pred, [str(tmp_path / "flat.png")], 2, 0.6, workers=1)
    Fp, _ = features(pred, [str(tmp_path / "flat.png")], workers=1)
    np.testing.assert_allclose(Fc[0], Fp, atol=1e-4)
    np.testing.assert_allclose(Fc[1], Fp, atol=1e-4)


def test_with_draws_the_head_is_the_regression_on_the_training_crops(tiny_model, roots, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.artifact.refit import crop_features, features, refit_artifact
    from cxr_fastai.data.loaders import sampling_weights
    from cxr_fastai.io.images import read_grey

    res = refit_artifact(tiny_model.art, roots, tmp_path / "rf", max_drop=1.0, draws=2, balances=["class-source"],
                         workers=1)
    train, valid = _items(roots, "train"), _items(roots, "valid")
    assert (res.n_train, res.n_valid) == (len(train), len(valid)) and len(res.grid) == 16
    old_art = read_manifest(tiny_model.art)
    rec = res.artifact.manifest["refit"]
    assert rec["train_images"] == len(train) and sum(rec["train_counts"].values()) == len(train)
    assert rec["train_features"].startswith("2 training crops per image")
    assert len(rec["images_sha256"]) == len(train) + len(valid)
    # fitted again by hand: the two draws of every train image (seeded by the training's seed), valid as predict reads it
    pred = Predictor(old_art)
    min_scale, seed = old_art.manifest["training"]["min_scale"], old_art.manifest["training"]["seed"]
    Fc, _ = crop_features(pred, train.path.astype(str).tolist(), 2, min_scale, seed, workers=1)
    F_va, _ = features(pred, valid.path.astype(str).tolist(), workers=1)
    ytr = np.tile(train.label.map({c: i for i, c in enumerate(old_art.classes)}).to_numpy(), 2)
    best = res.chosen
    w = np.tile(sampling_weights(train, best["balance"]), 2) ** best["alpha"]
    X = Fc.reshape(-1, Fc.shape[-1])
    sc = StandardScaler().fit(X)
    lr = LogisticRegression(C=best["C"], max_iter=3000).fit(sc.transform(X), ytr, sample_weight=w * len(w) / w.sum())
    got = Predictor(res.artifact).probs([read_grey(str(p)) for p in valid.path])
    np.testing.assert_allclose(got, lr.predict_proba(sc.transform(F_va)), atol=1e-4)
    # and it is not the head fitted on the images themselves
    plain = refit_artifact(tiny_model.art, roots, tmp_path / "rf0", max_drop=1.0, draws=0, balances=["class-source"],
                           workers=1)
    assert plain.artifact.manifest["refit"]["train_features"] == "each image as predict reads it"
    assert not np.allclose(Predictor(plain.artifact).probs([read_grey(str(p)) for p in valid.path]), got, atol=1e-3)
    from cxr_fastai.errors import DataError
    with pytest.raises(DataError, match="draws must be 0"):
        refit_artifact(tiny_model.art, roots, tmp_path / "neg", draws=-1)


def test_no_head_within_max_drop_writes_nothing(tiny_model, roots, tmp_path):
    from cxr_fastai.artifact.refit import refit_artifact

    # a negative allowance demands a pooled gain of a whole unit: no head can have it
    res = refit_artifact(tiny_model.art, roots, tmp_path / "none", max_drop=-1.0, balances=["class-source"], workers=1)
    assert res.artifact is None and res.chosen is None and len(res.grid) == 16
    assert not (tmp_path / "none").exists()


def test_cli_refit_and_its_one_line_errors(tiny_model, roots, tmp_path):
    from test_onnx import one_line_error, ok

    out = tmp_path / "refit"
    res = ok(cli("refit", tiny_model.art, *roots, "--to", out, "--max-drop", "1", "--balance", "class-then-source",
                 "--draws", "2"))
    assert "chosen on validation: class-then-source" in res.stdout and "trained head: valid worst source" in res.stdout
    assert res.stderr.count("refit: class-then-source alpha") == 16 and "refit: features of" in res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["refit"]["balance"] == "class-then-source" and m["refit"]["grid_size"] == 16
    assert m["refit"]["train_features"].startswith("2 training crops per image")
    ok(cli("evaluate", out, *roots, "--split", "test"))   # a refitted model is scored like any other
    from fastapi.testclient import TestClient

    from cxr_fastai.serve.app import create_app

    with TestClient(create_app(out)) as c:                 # serve's /model says how the head was made
        info = c.get("/model").json()
    assert info["refit"]["balance"] == "class-then-source" and "refit" in info["model_card"]
    assert "images_sha256" not in info["refit"]

    one_line_error(cli("refit", tiny_model.art, *roots, "--to", out), "already exists", "--force")
    one_line_error(cli("refit", tiny_model.art, *roots, "--to", tiny_model.art), "is the artifact being refitted")
    one_line_error(cli("refit", tiny_model.art, *roots, "--to", tmp_path / "x", "--holdout", "site_z"),
                   "no train or valid images from source 'site_z'")
    one_line_error(cli("refit", tiny_model.art, roots[0], "--to", tmp_path / "x", "--holdout", "site_a"),
                   "the train split has no")
    no_valid = synthetic_source(tmp_path / "no_valid", "site_c", 3, {"train": 6, "test": 2})
    one_line_error(cli("refit", tiny_model.art, no_valid, "--to", tmp_path / "x"), "the valid split has no")
    other = synthetic_source(tmp_path / "other", "site_d", 4)
    df = pd.read_csv(other / "labels.csv", dtype=str, keep_default_na=False)
    df.loc[df.label == df.label.iloc[0], "label"] = "TUBERCULOSIS"
    df.to_csv(other / "labels.csv", index=False)
    one_line_error(cli("refit", tiny_model.art, other, "--to", tmp_path / "x"), "TUBERCULOSIS", "not among the model's classes")
    assert not (tmp_path / "x").exists()


def test_cli_says_when_no_head_is_allowed_and_exits_1(tiny_model, roots, tmp_path, monkeypatch):
    import cxr_fastai.artifact.refit as refit

    real = refit.fit_grid
    monkeypatch.setattr(refit, "fit_grid", lambda *a, **k: (real(*a, **k)[0], None))   # as if every head lost
    res = cli("refit", tiny_model.art, *roots, "--to", tmp_path / "none", "--balance", "class-source", "-q")
    assert res.exit_code == 1 and "nothing written" in res.stderr and "Traceback" not in res.output
    assert "trained head: valid worst source" in res.stdout and not (tmp_path / "none").exists()


def _two_source_features(seed: int, n: int):
    """Features of n items, 3 classes over two sources with a class-by-source shortcut; the first two thirds train."""
    rng = np.random.default_rng(seed)
    classes = ["A", "B", "C"]
    y = np.arange(n) % 3
    src = np.array(["s1", "s2"])[(np.arange(n) // 3) % 2]
    F = rng.normal(size=(n, 6))
    F[:, 0] += y * 0.8
    F[:, 1] += (src == "s2") * 1.5 + (y == 2) * (src == "s1") * 1.0   # a class-by-source shortcut
    tr = np.arange(n) < n * 2 // 3
    train = pd.DataFrame({"label": np.array(classes)[y[tr]], "source": src[tr]})
    return F, y, src, tr, ~tr, train, classes


def test_the_choice_keeps_to_heads_within_max_drop_and_ranks_only_two_class_sources():
    from cxr_fastai.artifact.refit import fit_grid, valid_row

    F, y, src, tr, va, train, classes = _two_source_features(3, 240)
    rows, _ = fit_grid(F, y, src, train, tr, va, classes, {"pooled_accuracy": 0.0})
    pooled = sorted(r["pooled_accuracy"] for r in rows)
    bar = pooled[len(pooled) // 2]                      # half the heads fall below it
    rows, best = fit_grid(F, y, src, train, tr, va, classes, {"pooled_accuracy": bar}, max_drop=0.0)
    assert [r["allowed"] for r in rows] == [r["pooled_accuracy"] >= bar for r in rows]
    allowed = [r for r in rows if r["allowed"]]
    assert 0 < len(allowed) < len(rows)
    assert best[0] is max(allowed, key=lambda r: r["worst_balanced_accuracy"])
    # the chosen regression is the one whose figures the row holds
    assert valid_row(y, best[1].predict_proba(best[2].transform(F)), classes, src, va)["pooled_accuracy"] == \
        pytest.approx(best[0]["pooled_accuracy"])

    # a source with one class in valid is not ranked: its "balanced accuracy" is that class's recall alone
    y2, src2 = np.array([0, 0, 0, 0, 1, 1, 0, 1]), np.array(["one"] * 4 + ["two"] * 4)
    p = np.eye(3)[[1, 1, 1, 1, 1, 1, 0, 1]]            # every "one" film wrong (recall 0); "two" 3 of 4 right
    row = valid_row(y2, p, classes, src2, np.ones(8, bool))
    assert row["balanced_accuracy_by_source"]["one"] == 0.0 and row["worst_source"] == "two"
    assert row["one_class_sources"] == ["one"]


@pytest.mark.parametrize("draws", [0, 2])
def test_unreadable_images_are_left_out_and_said(tiny_model, tmp_path, draws):
    from cxr_fastai.artifact.refit import refit_artifact

    root = synthetic_source(tmp_path / "site_x", "site_x", 5, COUNTS)
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    bad = df[df.split == "train"].iloc[[0]].copy()
    bad["path"] = "train/broken.png"
    (root / "train" / "broken.png").write_bytes(b"not an image")
    pd.concat([df, bad]).to_csv(root / "labels.csv", index=False)
    n_train, n_valid = int((df.split == "train").sum()), int((df.split == "valid").sum())
    res = refit_artifact(tiny_model.art, [root], tmp_path / "out", max_drop=1.0, balances=["class-source"], workers=1,
                         draws=draws)
    assert len(res.skipped) == 1 and res.skipped[0][0].endswith("broken.png")
    assert (res.n_train, res.n_valid) == (n_train, n_valid)
    rec = res.artifact.manifest["refit"]
    assert rec["unreadable"] == 1 and rec["train_images"] == n_train
    assert len(rec["images_sha256"]) == n_train + n_valid and sum(rec["train_counts"].values()) == n_train


def test_a_crossval_folds_model_keeps_its_held_out_source_out_and_a_grouped_fold_is_refused(tiny_model, roots, tmp_path):
    import shutil

    from test_onnx import one_line_error

    from cxr_fastai.artifact.refit import refit_artifact

    fold = tmp_path / "fold_model"
    shutil.copytree(tiny_model.art, fold)
    m = json.loads((fold / "manifest.json").read_text())
    m["training"]["exclude_sources"] = ["site_b"]          # as crossval writes a held-out fold's model
    (fold / "manifest.json").write_text(json.dumps(m))
    res = refit_artifact(fold, roots, tmp_path / "out", max_drop=1.0, balances=["class-source"], workers=1)
    assert res.held_out == ["site_b"] and res.held_out_by_model == ["site_b"]
    assert all(set(r["balanced_accuracy_by_source"]) == {"site_a"} for r in res.grid)
    assert res.artifact.manifest["refit"]["held_out_sources"] == ["site_b"]

    m["training"].update(exclude_sources=[], group_folds=5, holdout_fold=1)
    (fold / "manifest.json").write_text(json.dumps(m))
    one_line_error(cli("refit", fold, *roots, "--to", tmp_path / "grouped"), "patient-grouped fold")
    assert not (tmp_path / "grouped").exists()


def test_cli_warns_when_the_valid_split_holds_the_models_training_images(tiny_model, tmp_path):
    import shutil

    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_model.data, swapped)
    df = pd.read_csv(swapped / "labels.csv", dtype=str, keep_default_na=False)
    df["split"] = df.split.map({"train": "valid", "valid": "train"}).fillna(df.split)
    df.to_csv(swapped / "labels.csv", index=False)
    n_valid = int((df.split == "valid").sum())
    res = cli("refit", tiny_model.art, swapped, "--to", tmp_path / "out", "--max-drop", "1", "--balance", "class-source", "-q")
    assert res.exit_code == 0, res.output
    assert f"{n_valid} of the {n_valid} valid images are training images of this model" in res.stderr


def test_the_on_fit_hook_sees_each_heads_probabilities_and_changes_no_choice():
    from cxr_fastai.artifact.refit import fit_grid, valid_row

    n = 180
    F, y, src, tr, va, train, classes = _two_source_features(5, n)
    seen: list[tuple[dict, np.ndarray]] = []
    rows, best = fit_grid(F, y, src, train, tr, va, classes, {"pooled_accuracy": 0.0},
                          on_fit=lambda row, p: seen.append((row, p)))
    rows0, best0 = fit_grid(F, y, src, train, tr, va, classes, {"pooled_accuracy": 0.0})
    assert [r for r, _ in seen] == rows == rows0 and best[0] == best0[0]
    for row, p in seen:   # the probabilities are the head's, for every row of F
        assert p.shape == (n, 3)
        assert valid_row(y, p, classes, src, va)["pooled_accuracy"] == pytest.approx(row["pooled_accuracy"])


def test_last_layer_benchmark_frontier_scores_every_head_on_test(tiny_model, roots, tmp_path):
    mod = load_benchmark("last_layer")
    out = tmp_path / "ll.json"
    assert mod.main([str(tiny_model.art), *map(str, roots), "--frontier", "--max-drop", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    test = _items(roots, "test")
    assert len(r["grid"]) == 32 and r["chosen"] == max(r["grid"], key=lambda g: g["worst_balanced_accuracy"])
    for g in r["grid"]:
        t = g["test"]
        assert {k: v["n"] for k, v in t["roots"].items()} == {Path(x).name: int((test.path.astype(str).str.startswith(str(x))).sum()) for x in roots}
        assert {k: v["n"] for k, v in t["sources"].items()} == test.source.value_counts().to_dict()
        for v in t["sources"].values():
            assert sum(h for h, _ in v["classes"].values()) == v["correct"] <= v["n"]
            assert sum(k for _, k in v["classes"].values()) == v["n"]


def test_last_layer_benchmark_fits_on_the_crops_refit_fits_on_and_caches_them(tiny_model, roots, tmp_path, monkeypatch):
    import cxr_fastai.artifact.refit as refit

    mod = load_benchmark("last_layer")
    out, feats = tmp_path / "ll.json", tmp_path / "f.npz"
    args = [str(tiny_model.art), *map(str, roots), "--max-drop", "1", "--draws", "2", "--features", str(feats), "--json", str(out)]
    assert mod.main(args) == 0
    bench = json.loads(out.read_text())
    lib = refit.refit_artifact(tiny_model.art, roots, tmp_path / "rf", max_drop=1.0, draws=2, workers=1)
    assert [(g["balance"], g["alpha"], g["C"]) for g in bench["grid"]] == [(g["balance"], g["alpha"], g["C"]) for g in lib.grid]
    for b, g in zip(bench["grid"], lib.grid):
        assert b["balanced_accuracy_by_source"] == pytest.approx(g["balanced_accuracy_by_source"], abs=1e-9)
        assert b["pooled_accuracy"] == pytest.approx(g["pooled_accuracy"], abs=1e-9)
    # the crops are kept beside the features and read back, not cut again
    assert "crops2" in np.load(feats).files
    monkeypatch.setattr(refit, "crop_features", lambda *a, **k: pytest.fail("crops cut again"))
    assert mod.main(args) == 0 and json.loads(out.read_text())["grid"] == bench["grid"]


def test_last_layer_benchmark_stacks_the_crops_of_several_seeds(tiny_model, roots, tmp_path, monkeypatch):
    import cxr_fastai.artifact.refit as refit
    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.data.discover import discover

    mod = load_benchmark("last_layer")
    art = read_manifest(tiny_model.art)
    min_scale, run_seed = refit.training_crop(art)
    other = run_seed + 7
    out, feats = tmp_path / "ll.json", tmp_path / "f.npz"
    args = [str(tiny_model.art), *map(str, roots), "--max-drop", "1", "--draws", "1", "--crop-seed", str(run_seed),
            "--crop-seed", str(other), "--features", str(feats), "--json", str(out)]
    assert mod.main(args) == 0
    bench = json.loads(out.read_text())
    assert bench["draws"] == 1 and bench["crop_seeds"] == [run_seed, other]
    # each seed's crops are the library's crops of the train images, kept under their own key
    items = discover([str(r) for r in roots]).items
    items = items[items.split.isin(["train", "valid", "test"]) & items.label.isin(art.classes)].reset_index(drop=True)
    ti = np.flatnonzero((items.split == "train").to_numpy())
    pred = Predictor(art)
    cached = np.load(feats)
    mine = {s: refit.crop_features(pred, items.path.astype(str).iloc[ti].tolist(), 1, min_scale, s, workers=1)[0]
            for s in (run_seed, other)}
    np.testing.assert_allclose(cached["crops1"], mine[run_seed], atol=1e-5)
    np.testing.assert_allclose(cached[f"crops1_seed{other}"], mine[other], atol=1e-5)
    assert not np.allclose(mine[run_seed], mine[other])
    # the grid is fitted on both seeds' crops together: two rows for each train image
    rest = np.setdiff1d(np.arange(len(items)), ti)
    F, rows_of = refit.stack_crops(np.concatenate([mine[run_seed], mine[other]]), ti, cached["feats"][rest], rest)
    it = items.iloc[rows_of].reset_index(drop=True)
    y = it.label.map({c: i for i, c in enumerate(art.classes)}).to_numpy()
    src = it.source.astype(str).to_numpy()
    tr, va = ((it.split == s).to_numpy() for s in ("train", "valid"))
    assert tr.sum() == 2 * len(ti)
    import torch
    with torch.inference_mode():
        p0 = torch.softmax(pred.model.head(torch.from_numpy(F)), dim=1).numpy()
    base = refit.valid_row(y, p0, art.classes, src, va)
    rows, _ = refit.fit_grid(F, y, src, it[tr], tr, va, art.classes, base, max_drop=1.0)
    for b, g in zip(bench["grid"], rows, strict=True):
        assert b["balanced_accuracy_by_source"] == pytest.approx(g["balanced_accuracy_by_source"], abs=1e-9)
        assert b["pooled_accuracy"] == pytest.approx(g["pooled_accuracy"], abs=1e-9)
    # read back, not cut again; without --draws a crop seed is refused
    monkeypatch.setattr(refit, "crop_features", lambda *a, **k: pytest.fail("crops cut again"))
    assert mod.main(args) == 0 and json.loads(out.read_text())["grid"] == bench["grid"]
    with pytest.raises(SystemExit):
        mod.main([str(tiny_model.art), *map(str, roots), "--crop-seed", "3"])
