"""`cxr-fastai crossval`: leave-one-source-out folds plus a pooled fold, resumable, with json/md/png outputs.

One series is trained for the module (three tiny synthetic sources, 16 px, a narrow ResNet9, one epoch: four
trainings); every other test reads it, resumes it or plans folds without training."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import TINY_WIDTHS, cli

SOURCES = ("site_a", "site_b", "site_c")


def _tcfg(roots, **kw):
    from cxr_fastai.config import TrainConfig

    return TrainConfig(data=tuple(str(r) for r in roots), size=16, epochs=1, bs=16, widths=TINY_WIDTHS,
                       device="cpu", **kw)


def _ccfg(**kw):
    from cxr_fastai.config import CrossvalConfig

    return CrossvalConfig(n_boot=100, **kw)


def _make_root(dest: Path, source: str, seed: int) -> Path:
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(dest, {"train": 8, "valid": 3, "test": 3}, size=24, seed=seed)
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    df["source"] = source
    df.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("crossval_data")
    return [_make_root(base / s, s, seed=i) for i, s in enumerate(SOURCES)]


@pytest.fixture(scope="module")
def series(roots, tmp_path_factory):
    from cxr_fastai.evaluate.crossval import crossval, write_crossval

    out = tmp_path_factory.mktemp("crossval") / "out"
    logs: list[str] = []
    res = crossval(_tcfg(roots), out, _ccfg(), log=logs.append)
    files = write_crossval(res)
    return SimpleNamespace(res=res, files=files, logs=logs, out=out)


def _no_training(monkeypatch):
    import cxr_fastai.train.fit as fit

    def fail(*a, **k):
        raise AssertionError("a finished fold was trained again")
    monkeypatch.setattr(fit, "train", fail)


@pytest.mark.slow
def test_three_sources_give_three_held_out_folds_and_a_pooled_one(series):
    res, files, logs, out = series.res, series.files, series.logs, series.out
    assert [f.held_out for f in res.source_folds] == list(SOURCES)
    assert res.pooled is not None and res.pooled.split == "test"
    for f in res.folds:
        assert f.status == "done", f.reason
        assert f.n > 0 and 0 <= f.balanced_accuracy <= 1
        lo, hi = f.balanced_accuracy_ci95
        assert lo <= f.balanced_accuracy <= hi
        assert set(f.sensitivity) == {"COVID19", "NORMAL", "PNEUMONIA"}
        assert (out / "folds" / f.name / "run" / "learner.pkl").is_file()
        assert (out / "folds" / f.name / "model" / "manifest.json").is_file()
        assert (out / "folds" / f.name / "result.json").is_file()
    # a held-out fold scores every split of its source (14 images per class) and its model never saw them
    a = res.source_folds[0]
    assert a.n == 3 * 14 and a.split == "all" and a.seen_in_training == 0
    assert a.n_train == 2 * 3 * 8 and a.n_valid == 2 * 3 * 3
    run_cfg = json.loads((Path(a.run) / "config.json").read_text())
    assert run_cfg["exclude_sources"] == ["site_a"]
    assert res.pooled.n == 3 * 3 * 3 and res.pooled.n_train == 3 * 3 * 8

    d = json.loads(files["crossval.json"].read_text())
    assert [f["name"] for f in d["folds"]] == ["holdout-site_a", "holdout-site_b", "holdout-site_c", "pooled"]
    assert {"accuracy", "accuracy_ci95", "balanced_accuracy", "balanced_accuracy_ci95", "sensitivity", "run",
            "artifact", "seconds"} <= set(d["folds"][0])
    assert d["summary"]["held_out_folds_done"] == 3 and d["summary"]["pooled_balanced_accuracy"] is not None
    md = files["crossval.md"].read_text()
    assert md.count("| holdout-site_") == 3 and "| pooled |" in md and "Sensitivity NORMAL" in md
    assert files["crossval.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # progress: start and end per fold, an ETA after the first
    assert sum(" start " in m for m in logs) == 4 and sum(": end in " in m for m in logs) == 4
    assert "left for 3 more fold(s)" in next(m for m in logs if ": end in " in m)


@pytest.mark.slow
def test_rerun_does_not_retrain_done_folds(series, roots, monkeypatch):
    from cxr_fastai.evaluate.crossval import crossval

    res, out = series.res, series.out
    before = {f.name: (out / "folds" / f.name / "result.json").stat().st_mtime_ns for f in res.folds}
    _no_training(monkeypatch)
    again = crossval(_tcfg(roots), out, _ccfg())
    assert [f.balanced_accuracy for f in again.folds] == [f.balanced_accuracy for f in res.folds]
    assert {f.name: (out / "folds" / f.name / "result.json").stat().st_mtime_ns for f in res.folds} == before


@pytest.mark.slow
def test_cli_resumes_the_series_without_training(series, roots, monkeypatch):
    out = series.out
    _no_training(monkeypatch)
    r = cli("crossval", *roots, "--out", out, "--size", 16, "--epochs", 1, "--bs", 16, "--device", "cpu",
            "--set", "widths=8,16,16,32", "--n-boot", 100, "-q")
    assert r.exit_code == 0, r.output
    assert "holdout-site_b" in r.stdout and "mean held-out balanced accuracy" in r.stdout
    assert "crossval.png" in r.stdout


@pytest.mark.slow
def test_another_config_is_refused_in_one_line(series, roots):
    from cxr_fastai.errors import RunError
    from cxr_fastai.evaluate.crossval import crossval

    out = series.out
    with pytest.raises(RunError, match="train.epochs: was 1, now 2"):
        crossval(_tcfg(roots).replace(epochs=2), out, _ccfg())
    r = cli("crossval", *roots, "--out", out, "--size", 16, "--epochs", 2, "--set", "widths=8,16,16,32",
            "--n-boot", 100, "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "--force" in err[0]


@pytest.mark.slow
def test_interrupted_fold_resumes_its_run(series, roots, tmp_path):
    """A fold with a run folder but no result resumes that run (here: marked unfinished after its last epoch)."""
    import shutil

    from cxr_fastai.evaluate.crossval import crossval

    out = series.out
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    fold = copy / "folds" / "holdout-site_c"
    (fold / "result.json").unlink()
    meta = json.loads((fold / "run" / "run.json").read_text())
    meta["finished"] = False
    (fold / "run" / "run.json").write_text(json.dumps(meta))
    (fold / "run" / "learner.pkl").unlink()
    seen: list[str] = []
    again = crossval(_tcfg(roots), copy, _ccfg(), log=seen.append)
    assert any("resuming the interrupted training" in m for m in seen)
    assert json.loads((fold / "run" / "run.json").read_text())["finished"] is True
    assert again.folds[2].status == "done" and (fold / "result.json").is_file()


@pytest.mark.slow
def test_fold_selection_computes_only_those_folds_and_reports_the_rest_pending(series, roots, tmp_path, monkeypatch):
    """--fold: one machine or session per fold on one --out; a finished run in a selected fold is only
    exported and scored, an unselected fold with no result stays untouched and is reported as pending."""
    import shutil

    from cxr_fastai.errors import CxrError
    from cxr_fastai.evaluate.crossval import crossval, crossval_markdown

    copy = tmp_path / "out"
    shutil.copytree(series.out, copy)
    (copy / "folds" / "holdout-site_a" / "result.json").unlink()
    shutil.rmtree(copy / "folds" / "holdout-site_b")
    _no_training(monkeypatch)
    with pytest.raises(CxrError, match="--fold 'site_x': not a fold of this series"):
        crossval(_tcfg(roots), copy, _ccfg(), only=("site_x",))
    res = crossval(_tcfg(roots), copy, _ccfg(), only=("site_a",))   # a source name selects its fold
    assert [f.status for f in res.folds] == ["done", "pending", "done", "done"]
    assert res.folds[0].balanced_accuracy == series.res.folds[0].balanced_accuracy
    assert (copy / "folds" / "holdout-site_a" / "result.json").is_file()
    assert not (copy / "folds" / "holdout-site_b").exists() and [f.name for f in res.pending] == ["holdout-site_b"]
    md = crossval_markdown(res)
    assert "| holdout-site_b | site_b | all |  | not computed yet |" in md and "--fold holdout-site_b" in md
    r = cli("crossval", *roots, "--out", copy, "--size", 16, "--epochs", 1, "--bs", 16, "--device", "cpu",
            "--set", "widths=8,16,16,32", "--n-boot", 100, "-q", "--fold", "pooled")
    assert r.exit_code == 0, r.output
    assert "holdout-site_b: pending (not computed yet" in r.stdout


def test_one_source_is_a_clear_error(tmp_path):
    from cxr_fastai.errors import CxrError
    from cxr_fastai.evaluate.crossval import crossval

    root = _make_root(tmp_path / "only", "only", seed=0)
    with pytest.raises(CxrError, match="at least 2 sources"):
        crossval(_tcfg([root]), tmp_path / "out", _ccfg())
    r = cli("crossval", root, "--out", tmp_path / "out2", "--size", 16, "--epochs", 1)
    assert r.exit_code == 1 and "Traceback" not in r.output and "at least 2 sources" in r.stderr
    assert not (tmp_path / "out").exists()


def _items(rows):
    return pd.DataFrame([{"path": f"/x/{i}.png", "label": lab, "split": sp, "source": src, "patient_id": "", "group": ""}
                         for i, (src, lab, sp) in enumerate(rows)])


def test_plan_skips_one_class_sources_and_reports_why():
    from cxr_fastai.evaluate.crossval import plan_folds

    rows = [(s, c, sp) for s in ("a", "b") for c in ("N", "P") for sp in ("train", "valid", "test")]
    rows += [("c", "N", sp) for sp in ("train", "valid", "test")]
    folds = plan_folds(_items(rows), _ccfg())
    assert [f.name for f in folds] == ["holdout-a", "holdout-b", "holdout-c", "pooled"]
    assert folds[2].skip and "one class" in folds[2].skip and "--all-sources" in folds[2].skip
    assert not folds[0].skip and len(folds[0].eval_items) == 6 and folds[0].exclude == ("a",)
    assert len(folds[3].eval_items) == 5   # pooled test split
    assert not plan_folds(_items(rows), _ccfg(all_sources=True))[2].skip
    test_only = plan_folds(_items(rows), _ccfg(split="test"))
    assert len(test_only[0].eval_items) == 2 and test_only[3].split == "test"


def test_plan_reports_when_the_other_sources_lack_a_class():
    from cxr_fastai.errors import DataError
    from cxr_fastai.evaluate.crossval import plan_folds

    # a holds the only P images: training on b alone would see one class
    rows = [("a", c, sp) for c in ("N", "P") for sp in ("train", "valid")] + [("b", "N", "train"), ("b", "N", "valid")]
    with pytest.raises(DataError, match="no source can be held out"):
        plan_folds(_items(rows), _ccfg())
    folds = plan_folds(_items(rows + [("b", "Q", "train"), ("b", "Q", "valid")]), _ccfg())
    assert not folds[0].skip and folds[-1].skip and "test" in folds[-1].skip   # no pooled test split


def test_set_passes_training_fields_through():
    from cxr_fastai.errors import CxrError
    from cxr_fastai.evaluate.crossval import parse_train_overrides

    assert parse_train_overrides(["widths=8,16,16,32", "valid_pct=0.3", "class-weights=true"]) == {
        "widths": (8, 16, 16, 32), "valid_pct": 0.3, "class_weights": True}
    for bad in ("widths", "nope=1", "run=x", "epochs=many"):
        with pytest.raises(CxrError):
            parse_train_overrides([bad])


@pytest.mark.slow
def test_held_out_labels_the_model_lacks_are_left_out_and_reported(series, roots):
    from cxr_fastai.data.discover import discover
    from cxr_fastai.evaluate.crossval import _Fold, evaluate_fold

    out = series.out
    items = discover(roots[0]).items
    items.loc[items.label == "COVID19", "label"] = "OTHER"   # a label no training source had
    fold = _Fold("holdout-site_a", "source", "site_a", ("site_a",), items, "all", 0)
    warned: list[str] = []
    r = evaluate_fold(out / "folds" / "holdout-site_a" / "model", fold, _ccfg(), _pcfg(), warn=warned.append)
    assert r.status == "done" and r.n == 2 * 14 and r.left_out == {"OTHER": 14}
    assert "OTHER (14)" in r.reason and warned
    only_other = items[items.label == "OTHER"].reset_index(drop=True)
    fold = _Fold("holdout-site_a", "source", "site_a", ("site_a",), only_other, "all", 0)
    r = evaluate_fold(out / "folds" / "holdout-site_a" / "model", fold, _ccfg(), _pcfg())
    assert r.status == "skipped" and "not trained on" in r.reason


def _pcfg():
    from cxr_fastai.config import PredictConfig

    return PredictConfig(device="cpu", workers=1)
