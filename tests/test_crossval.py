"""`cxr-fastai crossval`: leave-one-source-out folds plus a pooled fold, resumable, with json/md/png outputs.

One series is trained for the module (three tiny synthetic sources, 16 px, a narrow ResNet9, one epoch: four
trainings); every other test reads it, resumes it or plans folds without training."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import TINY_WIDTHS, cli, synthetic_source

SOURCES = ("site_a", "site_b", "site_c")


def _tcfg(roots, **kw):
    from cxr_fastai.config import TrainConfig

    return TrainConfig(data=tuple(str(r) for r in roots), size=16, epochs=1, bs=16, widths=TINY_WIDTHS,
                       device="cpu", **kw)


def _ccfg(**kw):
    from cxr_fastai.config import CrossvalConfig

    return CrossvalConfig(n_boot=100, **kw)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("crossval_data")
    return [synthetic_source(base / s, s, seed=i) for i, s in enumerate(SOURCES)]


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

    root = synthetic_source(tmp_path / "only", "only", seed=0)
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


# ------------------------------------------------------------------------------- --by group --folds K

def _patient_root(dest: Path) -> Path:
    """One source; two images per patient (within one split), and one duplicate group joining two patients."""
    from cxr_fastai.synth import make_synthetic_dataset

    root = make_synthetic_dataset(dest, {"train": 8, "valid": 4, "test": 4}, size=24, seed=5)
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    df["source"] = "site_a"
    df["patient_id"] = [f"p{i // 2}" for i in range(len(df))]   # rows are grouped by split and class
    df["group"] = ""
    df.loc[[0, 2], "group"] = "dup1"                           # joins patients p0 and p1
    df.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def group_series(tmp_path_factory):
    from cxr_fastai.evaluate.crossval import crossval, write_crossval

    base = tmp_path_factory.mktemp("group_cv")
    root = _patient_root(base / "data")
    out = base / "out"
    logs: list[str] = []
    res = crossval(_tcfg([root]), out, _ccfg(by="group", folds=3), log=logs.append)
    return SimpleNamespace(res=res, files=write_crossval(res), logs=logs, out=out, root=root)


def test_group_folds_keep_patients_and_groups_together_and_stratify():
    from cxr_fastai.data.discover import group_folds

    labels = ["A", "B"] * 30
    patients = [f"p{i // 3}" for i in range(60)]   # 20 patients of 3 images
    groups = [""] * 60
    groups[0] = groups[59] = "g"                    # joins the first and last patients
    fold = group_folds(labels, patients, groups, 4, seed=0)
    assert sorted(set(fold)) == [0, 1, 2, 3]
    for p in set(patients):
        assert len({f for f, q in zip(fold, patients) if q == p}) == 1
    assert fold[0] == fold[59] and fold[57] == fold[2]
    assert group_folds(labels, patients, groups, 4, seed=0) == fold      # seeded: the same folds again
    sizes = [fold.count(k) for k in range(4)]
    assert max(sizes) - min(sizes) <= 9                                  # near-equal (components of 3 and 6)
    for k in range(4):                                                   # both classes in every fold
        assert {lab for f, lab in zip(fold, labels) if f == k} == {"A", "B"}


def test_group_folds_need_as_many_patients_as_folds():
    from cxr_fastai.data.discover import group_folds
    from cxr_fastai.errors import DataError

    with pytest.raises(DataError, match="at least 5 patients"):
        group_folds(["A", "B"] * 4, ["p1"] * 4 + ["p2"] * 4, [""] * 8, 5, seed=0)


@pytest.mark.slow
def test_group_crossval_scores_every_image_once_by_a_model_that_never_saw_its_patient(group_series):
    from cxr_fastai.data.discover import discover
    from cxr_fastai.evaluate.crossval import plan_folds

    res = group_series.res
    items = discover(group_series.root).items
    assert [f.name for f in res.folds] == ["fold-1-of-3", "fold-2-of-3", "fold-3-of-3"] and res.pooled is None
    assert all(f.status == "done" and f.kind == "group" for f in res.folds), [f.reason for f in res.folds]
    assert sum(f.n for f in res.folds) == len(items) == 3 * 16   # --split all: every image scored once
    planned = plan_folds(items, _ccfg(by="group", folds=3))
    patient = dict(zip(items.path.astype(str), items.patient_id))
    scored = []
    for k, (f, plan) in enumerate(zip(res.folds, planned)):
        cfg = json.loads((Path(f.run) / "config.json").read_text())
        assert (cfg["group_folds"], cfg["holdout_fold"]) == (3, k)
        held = set(plan.eval_items.path.astype(str))
        assert len(held) == f.n and f.seen_in_training == 0
        trained = set(pd.read_csv(Path(f.run) / "items.csv").path.astype(str))
        assert trained and not trained & held
        assert not {patient[p] for p in trained} & {patient[p] for p in held}   # no patient on both sides
        assert trained | held == set(items.path.astype(str)[items.split != "test"]) | held
        scored.append(held)
    assert set.union(*scored) == set(patient) and sum(map(len, scored)) == len(patient)
    first = items.path.astype(str)[0]
    third = items.path.astype(str)[2]
    assert any(first in h and third in h for h in scored)   # patients p0 and p1 share a group: one fold
    oof = res.summary()["out_of_fold"]
    assert oof["n"] == len(items) and sum(map(sum, oof["confusion_matrix"])) == len(items)
    assert 0 <= oof["balanced_accuracy"] <= 1
    md = group_series.files["crossval.md"].read_text()
    assert "Patient-grouped 3-fold" in md and md.count("| fold-") == 3 and "out of fold" in md
    assert group_series.files["crossval.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_group_crossval_resumes_without_retraining_and_via_the_cli(group_series, monkeypatch):
    from cxr_fastai.evaluate.crossval import crossval

    out = group_series.out
    _no_training(monkeypatch)
    again = crossval(_tcfg([group_series.root]), out, _ccfg(by="group", folds=3))
    assert [f.balanced_accuracy for f in again.folds] == [f.balanced_accuracy for f in group_series.res.folds]
    r = cli("crossval", group_series.root, "--out", out, "--by", "group", "--folds", 3, "--size", 16, "--epochs", 1,
            "--bs", 16, "--device", "cpu", "--set", "widths=8,16,16,32", "--n-boot", 100, "-q")
    assert r.exit_code == 0, r.output
    assert "fold-2-of-3" in r.stdout and "over 3 fold(s)" in r.stdout and "out of fold" in r.stdout
    r = cli("crossval", group_series.root, "--out", out, "--by", "group", "--folds", 4, "--size", 16, "--epochs", 1,
            "--bs", 16, "--device", "cpu", "--set", "widths=8,16,16,32", "--n-boot", 100, "-q")
    assert r.exit_code != 0 and "crossval.folds: was 3, now 4" in r.output


def test_group_options_are_checked_in_one_line(tmp_path):
    data = _patient_root(tmp_path / "data")
    r = cli("crossval", data, "--out", tmp_path / "o", "--source", "site_a")
    assert r.exit_code != 0 and "--source picks the one source of --by group" in r.output
    r = cli("crossval", data, "--out", tmp_path / "o", "--by", "group", "--source", "nowhere")
    assert r.exit_code != 0 and "no images from source 'nowhere'" in r.output
    r = cli("crossval", data, "--out", tmp_path / "o", "--by", "group", "--folds", 40)
    assert r.exit_code != 0 and "at least 40 patients" in r.output


def test_series_config_holds_only_its_own_kind_of_fields():
    """A leave-one-source-out series file written before k-fold existed must still match (and resume)."""
    from cxr_fastai.config import CrossvalConfig, TrainConfig
    from cxr_fastai.evaluate.crossval import series_config

    loso = series_config(TrainConfig(data=("a",)), CrossvalConfig(), ["a"])
    assert set(loso["crossval"]) == {"by", "split", "all_sources", "pooled", "n_boot", "eval_seed"}
    assert not {"group_folds", "holdout_fold", "run", "data"} & set(loso["train"])
    kfold = series_config(TrainConfig(data=("a",)), CrossvalConfig(by="group", folds=4, source="s"), ["a"])
    assert kfold["crossval"]["folds"] == 4 and kfold["crossval"]["source"] == "s"
    assert not {"pooled", "all_sources"} & set(kfold["crossval"])


def test_a_series_written_before_an_option_existed_still_resumes(tmp_path):
    """A field the series file lacks (an option added since) reads as its default; a real change is refused."""
    import json

    from cxr_fastai.config import CrossvalConfig, TrainConfig
    from cxr_fastai.errors import RunError
    from cxr_fastai.evaluate.crossval import CONFIG_FILE, _check_out, series_config

    config = series_config(TrainConfig(data=("a",)), CrossvalConfig(), ["a"])
    older = json.loads(json.dumps(config))
    del older["train"]["mixup"], older["train"]["mixup_pairs"], older["crossval"]["eval_seed"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(older))
    said = []
    _check_out(tmp_path, config, False, said.append)
    assert said == [f"resuming the crossval series in {tmp_path}"]
    changed = series_config(TrainConfig(data=("a",), mixup=0.4), CrossvalConfig(), ["a"])
    with pytest.raises(RunError, match="train.mixup: was 0.0, now 0.4"):
        _check_out(tmp_path, changed, False, said.append)


def test_a_bad_held_out_fold_is_refused_before_any_work(tmp_path):
    from cxr_fastai.config import TrainConfig
    from cxr_fastai.errors import CxrError
    from cxr_fastai.train.fit import validate_config

    for folds, k in ((1, 0), (3, 3), (3, -1)):
        with pytest.raises(CxrError, match="held-out fold"):
            validate_config(TrainConfig(data=(str(tmp_path),), run=str(tmp_path / "r"), group_folds=folds,
                                        holdout_fold=k))
