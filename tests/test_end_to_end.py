"""The whole product path on a small slice of real cxr3 images, through the CLI.

Commands run in-process (CliRunner); a narrow ResNet9 (the CLI has no option for the widths) keeps every
forward pass cheap. One check runs `predict` in a fresh process: the artifact exported here must give the
same numbers there."""
from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from conftest import TINY_WIDTHS, cli, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
TRAIN_ARGS = ("--size", 32, "--epochs", 2, "--bs", 32, "--quiet")


def ok(res):
    assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def narrow():
    """`train` builds a narrow ResNet9 (every later command reads the widths from the run or artifact)."""
    from cxr_fastai import cli as cli_module
    from cxr_fastai.config import TrainConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_module, "TrainConfig", functools.partial(TrainConfig, widths=TINY_WIDTHS))
        yield


@pytest.fixture(scope="module")
def data(cxr3_slice, tmp_path_factory) -> Path:
    """The shared slice plus one truncated JPEG in train, listed in labels.csv."""
    root = tmp_path_factory.mktemp("e2e") / "data"
    shutil.copytree(cxr3_slice, root)
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    good = root / df.path[df.split == "train"].iloc[0]
    bad = good.with_name("truncated.jpg")
    bad.write_bytes(good.read_bytes()[:200])
    row = df[df.split == "train"].iloc[[0]].copy()
    row["path"] = str(bad.relative_to(root))
    pd.concat([df, row]).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def run(data, narrow, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "r1"
    r = ok(cli("train", data, "--run", run, *TRAIN_ARGS))
    assert "unreadable" in r.stderr and "truncated.jpg" in r.stderr
    return run


@pytest.fixture(scope="module")
def artifact(run, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("export") / "m"
    ok(cli("export", run, "--to", dest))
    return dest


def predict_rows(*args) -> list[dict]:
    return _read_csv(ok(cli("predict", *args)).stdout)


def probs(rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[f"p_{c}"]) for c in ("COVID19", "NORMAL", "PNEUMONIA")] for r in rows])


def test_train_writes_a_complete_run_folder(run, data):
    for f in ["config.json", "run.json", "items.csv", "skipped.csv", "history.csv", "learner.pkl",
              "checkpoints/best.pth", "checkpoints/last.pth"]:
        assert (run / f).is_file(), f
    meta = json.loads((run / "run.json").read_text())
    assert meta["classes"] == ["COVID19", "NORMAL", "PNEUMONIA"]
    assert meta["finished"] and meta["epochs_done"] == 2 and 1 <= meta["best"]["epoch"] <= 2
    assert 0 < meta["stats"]["std"] < 1 and 0 < meta["stats"]["mean"] < 1
    hist = pd.read_csv(run / "history.csv")
    assert len(hist) == 2 and {"accuracy", "balanced_accuracy_score"} <= set(hist.columns)
    skipped = pd.read_csv(run / "skipped.csv")
    assert skipped.path.str.endswith("truncated.jpg").tolist() == [True]
    items = pd.read_csv(run / "items.csv")
    assert not items.path.str.contains("truncated").any()
    assert set(items.split) == {"train", "valid"}  # the test split is never trained or validated on


def test_same_seed_gives_the_same_numbers_on_cpu(run, data, narrow, tmp_path):
    again = tmp_path / "again"
    ok(cli("train", data, "--run", again, *TRAIN_ARGS))
    a = pd.read_csv(run / "history.csv").drop(columns="seconds")
    b = pd.read_csv(again / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)


def test_interpret_writes_top_losses_and_confusion_reports(run, tmp_path):
    out = tmp_path / "report"
    ok(cli("interpret", run, "--k", 6, "--out", out))
    top = pd.read_csv(out / "top_losses.csv")
    assert list(top.columns) == ["path", "actual", "predicted", "probability", "loss"] and len(top) == 6
    assert top.loss.is_monotonic_decreasing
    for png in ("top_losses.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert np.array(summary["confusion_matrix"]).sum() == 60  # 20 valid images per class
    assert (out / "most_confused.csv").is_file()


def test_export_folder_holds_pickle_weights_and_a_checked_manifest(artifact, run):
    from cxr_fastai.io.files import sha256_file

    m = json.loads((artifact / "manifest.json").read_text())
    assert m["classes"] == ["COVID19", "NORMAL", "PNEUMONIA"] and m["input"]["size"] == 32
    assert m["architecture"]["name"] == "ResNet9" and m["format_version"] == 1
    for f in ("model.pkl", "model.safetensors"):
        assert m["files"][f]["sha256"] == sha256_file(artifact / f)
    meta = json.loads((run / "run.json").read_text())
    assert m["normalization"] == {k: meta["stats"][k] for k in ("mean", "std")}
    assert m["input"]["cache_side"] == meta["cache_side"] == 64  # 128 px JPEGs, 2 x the 32 px input
    assert {"fastai", "torch", "numpy"} <= set(m["versions"]) and m["training"]["epochs"] == 2
    # the run says what machine trained it (the same seed repeats its numbers there, not on every machine)
    import platform
    assert meta["machine"]["arch"] == platform.machine() and meta["machine"]["cores"] >= 1
    assert isinstance(meta["machine"]["cpu"], str) and meta["machine"]["cpu"]
    assert m["architecture"]["widths"] == list(TINY_WIDTHS)
    # nothing but the model in the pickle: its weights and fastai's few kB of objects, not the images (the
    # training cache alone is 180 x 64 x 64 bytes, 737 kB)
    extra = (artifact / "model.pkl").stat().st_size - (artifact / "model.safetensors").stat().st_size
    assert extra < 100_000, extra


def _read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_predict_in_a_fresh_process_safetensors_and_pickle_paths_agree(artifact, data):
    """The artifact exported in this process: a fresh `python -m cxr_fastai` unpickles model.pkl (every
    class it names must import by name) and gives the numbers the safetensors weights give here."""
    test_dir = data / "test"
    a = predict_rows(artifact, test_dir)
    fresh = run_cli("predict", artifact, test_dir, "--trust-pickle")
    assert fresh.returncode == 0, fresh.stderr
    assert "pickle" in fresh.stderr.lower() and "Traceback" not in fresh.stderr
    b = _read_csv(fresh.stdout)
    here = predict_rows(artifact, test_dir, "--trust-pickle")
    assert len(a) == len(b) == len(here) >= 200
    assert list(a[0].keys()) == ["path", "prediction", "p_COVID19", "p_NORMAL", "p_PNEUMONIA", "error"]
    pa, pb = probs(a), probs(b)
    assert [r["path"] for r in a] == [r["path"] for r in b] == [r["path"] for r in here]
    assert np.abs(pa - pb).max() <= 1e-4
    assert np.abs(probs(here) - pb).max() <= 1e-6  # this process and a fresh one: the same pickle, the same numbers
    np.testing.assert_allclose(pa.sum(1), 1, atol=1e-5)


def test_predict_with_tta_averages_crops_and_mostly_agrees_with_plain_predict(artifact, data):
    test_dir = data / "test"
    a, b = predict_rows(artifact, test_dir), predict_rows(artifact, test_dir, "--tta")
    assert [r["path"] for r in a] == [r["path"] for r in b]
    pa, pb = probs(a), probs(b)
    np.testing.assert_allclose(pb.sum(1), 1, atol=1e-5)
    assert np.abs(pa - pb).max() > 1e-3          # the crops change the probabilities
    # and they are the mean of the six views' softmax, each view scored on its own
    import torch

    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.data.augment import tta_views
    from cxr_fastai.io.images import read_grey

    art = read_manifest(artifact)
    assert art.cache_side == 64  # TTA cuts its crops from the side training cut them from
    plain_pred = Predictor(art, "cpu")
    arrays = [read_grey(r["path"]) for r in a[:16]]
    with torch.inference_mode():
        views = tta_views(plain_pred.preprocess(arrays), plain_pred.preprocess(arrays, art.cache_side))
        assert torch.equal(views[0], plain_pred.preprocess(arrays))  # the first view is plain predict's input
        want = torch.stack([torch.softmax(plain_pred.model(v), 1) for v in views]).mean(0).numpy()
    np.testing.assert_allclose(Predictor(read_manifest(artifact), "cpu", tta=True).probs(arrays), want, atol=1e-5)
    np.testing.assert_allclose(pb[:16], want, atol=2e-6)  # the CLI writes 6 decimals
    both = cli("predict", artifact, test_dir, "--tta", "--trust-pickle")
    assert both.exit_code == 1 and "--tta" in both.stderr and "Traceback" not in both.output


def test_predict_json_and_out_file(artifact, data, tmp_path):
    out = tmp_path / "p.json"
    ok(cli("predict", artifact, data / "test" / "NORMAL", "--format", "json", "--out", out))
    rows = json.loads(out.read_text())
    assert len(rows) == 70 and set(rows[0]) == {"path", "prediction", "p_COVID19", "p_NORMAL", "p_PNEUMONIA", "error"}


def test_unreadable_image_among_readable_ones_is_listed_not_fatal(artifact, data, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(data / "test" / "COVID19", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = predict_rows(artifact, folder)
    broken = [x for x in rows if x["path"].endswith("broken.jpg")]
    assert len(rows) == 71 and len(broken) == 1
    assert broken[0]["prediction"] == "" and broken[0]["p_NORMAL"] == "" and "broken.jpg" in broken[0]["error"]
    assert all(x["error"] == "" for x in rows if x is not broken[0])


def test_evaluate_numbers_equal_scikit_learn_on_the_same_predictions(artifact, data, tmp_path):
    out = tmp_path / "metrics.json"
    ok(cli("evaluate", artifact, data, "--split", "test", "--out", out))
    m = json.loads(out.read_text())
    rows = predict_rows(artifact, data / "test")
    classes = m["classes"]
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    actual = {str((data / q).resolve()): lab for q, lab in zip(labels.path, labels.label)}
    y = [classes.index(actual[str(Path(x["path"]).resolve())]) for x in rows]
    yhat = [classes.index(x["prediction"]) for x in rows]
    assert m["n"] == len(y) == 210
    assert m["accuracy"] == pytest.approx(accuracy_score(y, yhat), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, yhat), abs=1e-12)
    assert m["confusion_matrix"] == confusion_matrix(y, yhat, labels=range(3)).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(y, yhat, labels=range(3), zero_division=0)
    for i, c in enumerate(classes):
        pc = m["per_class"][c]
        assert pc["sensitivity"] == pytest.approx(rec[i]) and pc["f1"] == pytest.approx(f1[i])
        assert pc["support"] == sup[i]
        if pc["ppv"] is not None:
            assert pc["ppv"] == pytest.approx(prec[i])
        for key in ("specificity", "npv"):
            assert pc[key] is None or 0 <= pc[key] <= 1
