"""Tests for cxr_fastai.metrics: agreement with scikit-learn, None handling,
bootstrap behaviour, calibration error, per-source breakdown and input checks."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from cxr_fastai.metrics import Metrics, compute_metrics, source_warnings

TOL = 1e-12


def _random_case(seed: int, n: int, n_classes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    probs = rng.dirichlet(np.ones(n_classes), n)
    probs[np.arange(n), y] += 0.3  # a weakly informative model, so not every rate is ~1/C
    probs /= probs.sum(axis=1, keepdims=True)
    return y, probs, [f"C{i}" for i in range(n_classes)]


def _numbers(obj):
    """Every float leaf of a nested to_dict() result, paired with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            for path, x in _numbers(v):
                yield (k, *path), x
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            for path, x in _numbers(v):
                yield (i, *path), x
    else:
        yield (), obj


# ---------------------------------------------------------------- sklearn parity


@pytest.mark.parametrize("n_classes", [3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_sklearn(seed: int, n_classes: int) -> None:
    y, probs, classes = _random_case(seed, 300, n_classes)
    pred = probs.argmax(axis=1)
    m = compute_metrics(y, probs, classes, n_boot=0)
    labels = list(range(n_classes))

    assert abs(m.accuracy - accuracy_score(y, pred)) < TOL
    assert abs(m.balanced_accuracy - balanced_accuracy_score(y, pred)) < TOL
    cm = confusion_matrix(y, pred, labels=labels)
    assert m.confusion_matrix == cm.tolist()

    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    n = cm.sum()
    for c, name in enumerate(classes):
        pc = m.per_class[name]
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = n - tp - fn - fp
        assert abs(pc["sensitivity"] - rec[c]) < TOL
        assert abs(pc["ppv"] - prec[c]) < TOL
        assert abs(pc["f1"] - f1[c]) < TOL
        assert pc["support"] == sup[c]
        assert abs(pc["specificity"] - tn / (tn + fp)) < TOL
        assert abs(pc["npv"] - tn / (tn + fn)) < TOL
        assert abs(pc["roc_auc"] - roc_auc_score(y == c, probs[:, c])) < TOL

    for r in ("sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc"):
        assert abs(m.macro[r] - np.mean([m.per_class[k][r] for k in classes])) < TOL
    # Macro sensitivity over present classes is balanced accuracy by definition.
    assert abs(m.macro["sensitivity"] - m.balanced_accuracy) < TOL


def test_ties_go_to_lowest_class_index() -> None:
    m = compute_metrics([1, 0], np.full((2, 2), 0.5), ["A", "B"], n_boot=0)
    assert m.confusion_matrix == [[1, 0], [1, 0]]


# ---------------------------------------------------------------- None handling


def test_absent_class_gives_none_and_strict_json() -> None:
    classes = ["COVID19", "NORMAL", "PNEUMONIA"]
    y = [0, 0, 1, 1, 0, 1]  # PNEUMONIA never occurs and is never predicted
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1]]
    )
    m = compute_metrics(y, probs, classes, n_boot=200)
    pn = m.per_class["PNEUMONIA"]
    assert pn["support"] == 0
    assert pn["sensitivity"] is None  # TP+FN = 0
    assert pn["ppv"] is None  # never predicted
    assert pn["f1"] is None  # 2TP+FP+FN = 0
    assert pn["roc_auc"] is None
    assert pn["specificity"] == 1.0 and pn["npv"] == 1.0
    assert m.ci95["sensitivity/PNEUMONIA"] is None
    assert m.ci95["specificity/PNEUMONIA"] == [1.0, 1.0]

    # Macro skips None rather than counting it as 0.
    expected = np.mean([m.per_class["COVID19"]["sensitivity"], m.per_class["NORMAL"]["sensitivity"]])
    assert abs(m.macro["sensitivity"] - expected) < TOL
    assert abs(m.balanced_accuracy - balanced_accuracy_score(y, probs.argmax(1))) < TOL

    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    assert list(d) == [
        "classes", "n", "accuracy", "balanced_accuracy", "confusion_matrix",
        "per_class", "macro", "ci95", "ece", "per_source",
    ]
    assert list(d["per_class"]["COVID19"]) == [
        "sensitivity", "specificity", "ppv", "npv", "f1", "support", "roc_auc"
    ]
    for _, x in _numbers(d):
        assert x is None or type(x) in (int, float, str, bool)


def test_class_that_is_every_item_has_no_auc() -> None:
    m = compute_metrics([0, 0, 0], np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), ["A", "B"], n_boot=0)
    assert m.per_class["A"]["roc_auc"] is None
    assert m.per_class["A"]["specificity"] is None  # no negatives
    assert m.per_class["B"]["sensitivity"] is None
    assert m.macro["roc_auc"] is None
    assert m.ci95["accuracy"] is None  # n_boot=0 means no intervals


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_contains_point_and_is_deterministic() -> None:
    y, probs, classes = _random_case(7, 500, 3)
    a = compute_metrics(y, probs, classes, n_boot=500, seed=11)
    b = compute_metrics(y, probs, classes, n_boot=500, seed=11)
    c = compute_metrics(y, probs, classes, n_boot=500, seed=12)
    assert a.ci95 == b.ci95
    assert a.ci95 != c.ci95

    expected_keys = ["accuracy", "balanced_accuracy"] + [
        f"{r}/{k}" for k in classes for r in ("sensitivity", "specificity", "ppv", "npv", "f1")
    ]
    assert list(a.ci95) == expected_keys
    point = {"accuracy": a.accuracy, "balanced_accuracy": a.balanced_accuracy}
    for k in classes:
        for r in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            point[f"{r}/{k}"] = a.per_class[k][r]
    for key, (lo, hi) in a.ci95.items():
        assert 0.0 <= lo <= point[key] <= hi <= 1.0, key


def test_bootstrap_narrows_with_n() -> None:
    def width(n: int) -> float:
        y, probs, classes = _random_case(3, n, 3)
        lo, hi = compute_metrics(y, probs, classes, n_boot=400).ci95["accuracy"]
        return hi - lo

    small, large = width(100), width(2000)
    # Width ~ 1/sqrt(n): expect ~4.5x narrower; 2x leaves room for noise.
    assert large < small / 2


def test_bootstrap_is_fast() -> None:
    y, probs, classes = _random_case(5, 2000, 4)
    compute_metrics(y[:10], probs[:10], classes, n_boot=10)  # warm up sklearn import
    t0 = time.perf_counter()
    compute_metrics(y, probs, classes, n_boot=1000)
    assert time.perf_counter() - t0 < 1.0  # generous: ~0.05 s on an idle core


# ---------------------------------------------------------------- calibration


def test_ece_zero_for_confident_correct_one_hot() -> None:
    y = np.array([0, 1, 2, 1, 0])
    probs = np.eye(3)[y]
    m = compute_metrics(y, probs, ["A", "B", "C"], n_boot=0)
    assert m.ece == 0.0
    assert m.accuracy == 1.0


def test_ece_hand_computed() -> None:
    # Top-class confidences 0.9, 0.9, 0.6, 0.55; bins of width 1/15:
    #   0.9 -> (0.8667, 0.9333]: 2 items, 1 correct -> |0.5 - 0.9| * 2/4 = 0.2
    #   0.6 -> (0.5333, 0.6]:    2 items (0.6 and 0.55), 1 correct
    #                            -> |0.5 - 0.575| * 2/4 = 0.0375
    y = [0, 1, 0, 0]
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    m = compute_metrics(y, probs, ["A", "B"], n_boot=0)
    assert math.isclose(m.ece, 0.2 + 0.0375, abs_tol=TOL)


# ---------------------------------------------------------------- sources


def test_per_source_breakdown() -> None:
    classes = ["COVID19", "NORMAL", "PNEUMONIA"]
    #          site_a: 0 0 1 1        site_b: 2 2 2 1 0
    y = [0, 0, 1, 1, 2, 2, 2, 1, 0]
    pred = [0, 1, 1, 1, 2, 2, 0, 1, 0]
    sources = ["site_a"] * 4 + ["site_b"] * 5
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = compute_metrics(y, probs, classes, sources=sources, n_boot=0)
    assert list(m.per_source) == ["site_a", "site_b"]
    a, b = m.per_source["site_a"], m.per_source["site_b"]
    assert a["n"] == 4 and b["n"] == 5
    assert a["accuracy"] == 3 / 4
    assert a["per_class_sensitivity"] == {"COVID19": 0.5, "NORMAL": 1.0, "PNEUMONIA": None}
    assert a["balanced_accuracy"] == 0.75
    assert b["accuracy"] == 4 / 5
    assert b["per_class_sensitivity"] == {"COVID19": 1.0, "NORMAL": 1.0, "PNEUMONIA": 2 / 3}
    assert math.isclose(b["balanced_accuracy"], (1 + 1 + 2 / 3) / 3, abs_tol=TOL)
    json.dumps(m.to_dict(), allow_nan=False)

    assert compute_metrics(y, probs, classes, n_boot=0).per_source is None


def test_source_warnings() -> None:
    classes = ["COVID19", "NORMAL", "PNEUMONIA"]
    # PNEUMONIA: 14 of 15 from kermany (93%); NORMAL: 8 of 10 from nih (exactly 80%);
    # COVID19: 3 of 5 from cohen (60%).
    y = [2] * 15 + [1] * 10 + [0] * 5
    sources = (
        ["kermany_pediatric"] * 14 + ["nih"]
        + ["nih"] * 8 + ["kermany_pediatric"] * 2
        + ["cohen"] * 3 + ["nih"] * 2
    )
    w = source_warnings(y, classes, sources)
    assert w == [
        "class NORMAL: 80% of its 10 images come from source 'nih'; "
        "the model may have learned the source, not the disease",
        "class PNEUMONIA: 93% of its 15 images come from source 'kermany_pediatric'; "
        "the model may have learned the source, not the disease",
    ]
    assert len(source_warnings(y, classes, sources, threshold=0.5)) == 3
    assert source_warnings(y, classes, sources, threshold=0.95) == []
    # A single source for everything confounds nothing.
    assert source_warnings(y, classes, ["nih"] * len(y)) == []
    with pytest.raises(ValueError, match="sources"):
        source_warnings(y, classes, sources[:-1])
    with pytest.raises(ValueError, match="threshold"):
        source_warnings(y, classes, sources, threshold=0.0)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("y", "probs", "classes", "match"),
    [
        ([0, 1], np.full((3, 2), 0.5), ["A", "B"], "items"),
        ([0, 1], np.full(2, 0.5), ["A", "B"], "2-D"),
        ([0, 1], np.full((2, 3), 0.3), ["A", "B"], "columns"),
        ([0, 2], np.full((2, 2), 0.5), ["A", "B"], "labels"),
        ([0, -1], np.full((2, 2), 0.5), ["A", "B"], "labels"),
        ([], np.zeros((0, 2)), ["A", "B"], "n >= 1"),
        ([0, 1], np.array([[0.5, np.nan], [0.5, 0.5]]), ["A", "B"], "NaN"),
        ([0, 1], np.array([[2.0, -1.0], [0.5, 0.5]]), ["A", "B"], r"\[0, 1\]"),
        ([0.5, 1], np.full((2, 2), 0.5), ["A", "B"], "integer"),
        (["a", "b"], np.full((2, 2), 0.5), ["A", "B"], "integer"),
        ([0, 1], np.full((2, 2), 0.5), ["A", "A"], "unique"),
    ],
)
def test_invalid_input_raises(y, probs, classes, match) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, probs, classes, n_boot=0)


def test_invalid_sources_and_n_boot_raise() -> None:
    with pytest.raises(ValueError, match="sources"):
        compute_metrics([0, 1], np.full((2, 2), 0.5), ["A", "B"], sources=["x"])
    with pytest.raises(ValueError, match="n_boot"):
        compute_metrics([0, 1], np.full((2, 2), 0.5), ["A", "B"], n_boot=-1)


# ---------------------------------------------------------------- property


@st.composite
def _valid_inputs(draw):
    n_classes = draw(st.integers(1, 5))
    n = draw(st.integers(1, 40))
    y = draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n))
    flat = draw(
        st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n * n_classes, max_size=n * n_classes)
    )
    probs = np.array(flat).reshape(n, n_classes)
    if draw(st.booleans()):
        sums = probs.sum(axis=1, keepdims=True)
        probs = np.where(sums > 0, probs / np.where(sums > 0, sums, 1.0), 1.0 / n_classes)
    sources = draw(st.none() | st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n))
    return y, probs, [f"K{i}" for i in range(n_classes)], sources


_INT_FIELDS = {"n", "support", "confusion_matrix"}


# database=None: no .hypothesis/ folder left in the repo.
@settings(max_examples=50, deadline=None, database=None)
@given(_valid_inputs(), st.integers(0, 30), st.integers(0, 2**32 - 1))
def test_random_valid_inputs_never_raise(inputs, n_boot: int, seed: int) -> None:
    y, probs, classes, sources = inputs
    m = compute_metrics(y, probs, classes, sources=sources, n_boot=n_boot, seed=seed)
    assert isinstance(m, Metrics)
    d = m.to_dict()
    json.dumps(d, allow_nan=False)
    for path, x in _numbers(d):
        if x is None or isinstance(x, str):
            continue
        if _INT_FIELDS & set(map(str, path)):
            assert type(x) is int and x >= 0
        else:
            assert type(x) is float and 0.0 <= x <= 1.0, (path, x)
    if sources is not None:
        source_warnings(y, classes, sources)
