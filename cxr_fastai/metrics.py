"""Evaluation metrics for the chest X-ray classifier, in plain numpy.

Every per-class number is one-vs-rest on argmax predictions. A ratio whose
denominator is 0 (e.g. the sensitivity of a class absent from the test set) is
reported as None, never NaN, so results serialise to strict JSON and an
unmeasurable number cannot be mistaken for a bad one. Internally NaN stands in
for None until the values leave this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

__all__ = ["Metrics", "compute_metrics", "confusion_rates", "source_gaps", "source_warnings"]

# One-vs-rest ratios reported per class, in output order.
_RATES: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "npv", "f1")
_ECE_BINS = 15
# Elements of one bootstrap index matrix (resamples x items); bounds peak memory
# to roughly 12 bytes per element (int32 index + int64 code) regardless of n.
_BOOT_CHUNK_ELEMS = 1 << 20


@dataclass
class Metrics:
    classes: list[str]
    n: int
    accuracy: float
    balanced_accuracy: float
    confusion_matrix: list[list[int]]  # rows = actual, cols = predicted, in `classes` order
    per_class: dict[str, dict[str, float | int | None]]
    macro: dict[str, float | None]
    ci95: dict[str, list[float] | None]  # percentile bootstrap [2.5%, 97.5%]
    ece: float  # top-class calibration error, 15 equal-width bins
    per_source: dict[str, dict[str, Any]] | None

    def to_dict(self) -> dict[str, Any]:
        """Plain-python, strict-JSON-ready copy (field order preserved)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def compute_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    classes: Sequence[str],
    sources: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Metrics:
    """Metrics of argmax(probs) against integer labels y_true.

    probs: (N, C) scores in [0, 1], C == len(classes); rows need not sum to 1,
    but ece is only meaningful for calibrated probabilities. Ties in argmax go
    to the lowest class index. sources: optional per-item data-set name, adds
    the per_source breakdown. n_boot: bootstrap resamples for ci95 (0 gives
    None intervals); the same seed and inputs give the same intervals.
    """
    names = _validate_classes(classes)
    n_classes = len(names)
    p = _validate_probs(probs, n_classes)
    y = _validate_labels(y_true, n_classes)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} items but probs has {p.shape[0]} rows")
    n = int(y.shape[0])
    src = None if sources is None else _validate_sources(sources, n)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")

    pred = p.argmax(axis=1)
    # Item -> cell of the flattened C x C confusion matrix; lets any subset or
    # resample be counted with one bincount.
    codes = y * n_classes + pred
    cm = np.bincount(codes, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    point = _stats(cm[None])
    support = cm.sum(axis=1)

    aucs = _roc_aucs(y, p)
    per_class: dict[str, dict[str, float | int | None]] = {}
    for c, name in enumerate(names):
        row: dict[str, float | int | None] = {r: _num(point[r][0, c]) for r in _RATES}
        row["support"] = int(support[c])
        row["roc_auc"] = aucs[c]
        per_class[name] = row

    macro: dict[str, float | None] = {}
    for r in (*_RATES, "roc_auc"):
        vals = [v for v in (per_class[k][r] for k in names) if v is not None]
        macro[r] = float(np.mean(vals)) if vals else None

    ci95: dict[str, list[float] | None]
    if n_boot == 0:
        ci95 = {key: None for key, _ in _ci_series(point, names)}
    else:
        boot = _bootstrap(codes, n, n_classes, int(n_boot), np.random.default_rng(seed))
        ci95 = {key: _percentile_ci(vals) for key, vals in _ci_series(boot, names)}

    per_source = None if src is None else _per_source(codes, src, names)

    return Metrics(
        classes=names,
        n=n,
        accuracy=float(point["accuracy"][0]),
        balanced_accuracy=float(point["balanced_accuracy"][0]),
        confusion_matrix=cm.tolist(),
        per_class=per_class,
        macro=macro,
        ci95=ci95,
        ece=_ece(p, pred, y),
        per_source=per_source,
    )


def source_warnings(
    y_true: Sequence[int],
    classes: Sequence[str],
    sources: Sequence[str],
    threshold: float = 0.8,
) -> list[str]:
    """One sentence per class whose items come >= threshold from one source.

    Such a class can be predicted from scanner/hospital/preprocessing artefacts
    alone (shortcut learning). Returns [] when all items share one source:
    then no class is distinguishable by source and every warning would be noise.
    """
    names = _validate_classes(classes)
    y = _validate_labels(y_true, len(names))
    src = _validate_sources(sources, int(y.shape[0]))
    if isinstance(threshold, bool) or not (0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if len(set(src)) < 2:
        return []

    warnings: list[str] = []
    for c, name in enumerate(names):
        counts: dict[str, int] = {}
        for label, s in zip(y.tolist(), src):
            if label == c:
                counts[s] = counts.get(s, 0) + 1
        total = sum(counts.values())
        if total == 0:
            continue
        # Sorted first so a tie (possible only for threshold <= 0.5) names the
        # same source on every run.
        top, k = max(sorted(counts.items()), key=lambda kv: kv[1])
        share = k / total
        if share >= threshold:
            # Floor so a 99.6% share never prints as a misleading "100%".
            pct = math.floor(share * 100 + 1e-9)
            warnings.append(
                f"class {name}: {pct}% of its {total} images come from source '{top}'; "
                "the model may have learned the source, not the disease"
            )
    return warnings


def source_gaps(per_source: dict[str, dict[str, Any]] | None, pooled_balanced: float,
                gap: float = 0.10) -> list[str]:
    """One plain sentence per source whose balanced accuracy is at least `gap` below the pooled figure:
    the number a user would otherwise take for how the model does on their own hospital's images."""
    out: list[str] = []
    for s, f in sorted((per_source or {}).items()):
        b = f.get("balanced_accuracy")
        if b is None or not math.isfinite(b) or pooled_balanced - b < gap:
            continue
        weak = [f"{c} {v:.2f}" for c, v in (f.get("per_class_sensitivity") or {}).items() if v is not None]
        out.append(f"source '{s}' (n={f['n']}): balanced accuracy {b:.2f} against {pooled_balanced:.2f} pooled"
                   + (f" (sensitivity {', '.join(weak)})" if weak else "")
                   + "; the pooled figure overstates how the model does on images like these")
    return out


# --------------------------------------------------------------------------- core


def confusion_rates(cm: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and per-class sensitivity (None where a class has no items) of one confusion
    matrix (rows = actual), e.g. the sum of several folds' matrices; the same definitions as compute_metrics."""
    st = _stats(np.asarray(cm, dtype=np.int64)[None])
    sens = [None if not np.isfinite(v) else float(v) for v in st["sensitivity"][0]]
    return {"accuracy": float(st["accuracy"][0]), "balanced_accuracy": float(st["balanced_accuracy"][0]),
            "sensitivity": sens}


def _stats(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Rates for a batch of confusion matrices (B, C, C) -> arrays (B,) or (B, C), NaN = undefined."""
    n = cms.sum(axis=(1, 2))
    tp = np.diagonal(cms, axis1=1, axis2=2)
    actual = cms.sum(axis=2)
    predicted = cms.sum(axis=1)
    fn = actual - tp
    fp = predicted - tp
    tn = n[:, None] - actual - fp
    sens = _ratio(tp, actual)
    present = actual > 0
    # Every batch member has n >= 1 items, so at least one class is present.
    bal = np.where(present, sens, 0.0).sum(axis=1) / present.sum(axis=1)
    return {
        "accuracy": tp.sum(axis=1) / n,
        "balanced_accuracy": bal,
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, predicted),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ci_series(stats: dict[str, np.ndarray], names: list[str]) -> list[tuple[str, np.ndarray]]:
    """ci95 keys in output order, each with its (B,) series."""
    series = [("accuracy", stats["accuracy"]), ("balanced_accuracy", stats["balanced_accuracy"])]
    for c, name in enumerate(names):
        series.extend((f"{r}/{name}", stats[r][:, c]) for r in _RATES)
    return series


def _bootstrap(
    codes: np.ndarray, n: int, n_classes: int, n_boot: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    cells = n_classes * n_classes
    rows = max(1, _BOOT_CHUNK_ELEMS // n)
    idx_dtype = np.int32 if n < 2**31 else np.int64
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, rows):
        b = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(b, n), dtype=idx_dtype)
        # Shift each resample into its own block of C*C bins so one bincount
        # yields all b confusion matrices.
        flat = codes[idx] + (np.arange(b, dtype=np.int64) * cells)[:, None]
        cms = np.bincount(flat.ravel(), minlength=b * cells).reshape(b, n_classes, n_classes)
        parts.append(_stats(cms))
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _percentile_ci(vals: np.ndarray) -> list[float] | None:
    defined = vals[~np.isnan(vals)]
    if defined.size == 0:
        return None
    lo, hi = np.percentile(defined, [2.5, 97.5])
    return [float(lo), float(hi)]


def _ece(p: np.ndarray, pred: np.ndarray, y: np.ndarray) -> float:
    conf = p.max(axis=1)
    correct = (pred == y).astype(np.float64)
    # Bin k holds conf in (k/15, (k+1)/15]; conf == 0 joins bin 0.
    bins = np.clip(np.ceil(conf * _ECE_BINS).astype(np.int64) - 1, 0, _ECE_BINS - 1)
    sum_conf = np.bincount(bins, weights=conf, minlength=_ECE_BINS)
    sum_acc = np.bincount(bins, weights=correct, minlength=_ECE_BINS)
    # sum_b (n_b/N) |acc_b - conf_b| == sum_b |sum_acc_b - sum_conf_b| / N
    return float(np.abs(sum_acc - sum_conf).sum() / len(y))


def _roc_aucs(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    from sklearn.metrics import roc_auc_score  # deferred: keeps import of this module cheap

    out: list[float | None] = []
    for c in range(p.shape[1]):
        pos = y == c
        k = int(pos.sum())
        out.append(None if k == 0 or k == len(y) else float(roc_auc_score(pos, p[:, c])))
    return out


def _per_source(codes: np.ndarray, src: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    n_classes = len(names)
    src_arr = np.array(src, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for s in sorted(set(src)):
        sub = codes[src_arr == s]
        cm = np.bincount(sub, minlength=n_classes * n_classes).reshape(1, n_classes, n_classes)
        st = _stats(cm)
        out[s] = {
            "n": int(sub.size),
            "accuracy": float(st["accuracy"][0]),
            "balanced_accuracy": float(st["balanced_accuracy"][0]),
            "per_class_sensitivity": {
                name: _num(st["sensitivity"][0, c]) for c, name in enumerate(names)
            },
        }
    return out


# --------------------------------------------------------------------- validation


def _validate_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, (str, bytes)):
        raise ValueError("classes must be a sequence of class names, not a single string")
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("classes must not be empty")
    if len(set(names)) != len(names):
        raise ValueError(f"classes must be unique, got {names}")
    return names


def _validate_labels(y_true: Sequence[int], n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("need at least one item (n >= 1), got 0")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError("y_true must hold integer class indices, got non-integral floats")
    elif y.dtype.kind not in "biu":
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    # Range-check before the cast so huge floats cannot wrap around into range.
    bad = (y < 0) | (y >= n_classes)
    if np.any(bad):
        shown = sorted(set(y[bad].tolist()))[:10]
        raise ValueError(f"y_true labels must be in 0..{n_classes - 1}, got {shown}")
    return y.astype(np.int64)


def _validate_probs(probs: np.ndarray, n_classes: int) -> np.ndarray:
    try:
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"probs must be a numeric (N, C) array: {e}") from e
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {p.shape}")
    if p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {n_classes} classes")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(
            f"probs must be in [0, 1], got range [{p.min():.4g}, {p.max():.4g}] "
            "(logits instead of softmax outputs?)"
        )
    return p


def _validate_sources(sources: Sequence[str], n: int) -> list[str]:
    if isinstance(sources, (str, bytes)):
        raise ValueError("sources must be a sequence with one source name per item, not a string")
    src = [str(s) for s in sources]
    if len(src) != n:
        raise ValueError(f"sources has {len(src)} items but y_true has {n}")
    return src


# ------------------------------------------------------------------------ output


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _plain(x: Any) -> Any:
    """Recursively convert numpy containers/scalars to JSON-ready python values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _num(x)
    return x
