"""Evaluate an artifact on labelled images: metrics as data first, written by a separate function."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import EvalConfig, PredictConfig, write_json
from ..data.discover import discover, select_items
from ..errors import DataError
from ..artifact.export import seen_counts, seen_in_training  # noqa: F401  (crossval imports seen_in_training from here)
from ..artifact.predict import iter_probs, load_predictor
from ..metrics import Metrics, compute_metrics, source_gaps, source_warnings


@dataclass
class EvalResult:
    metrics: Metrics
    split: str | None
    data: str
    artifact: str
    skipped: list[tuple[str, str]]
    seen_in_training: int | None = None   # evaluated images whose bytes were training images (None: artifact lacks the list)
    seen_in_adaptation: int | None = None  # evaluated images that gave an adapted model's BatchNorm statistics
    seen_in_refit: int | None = None       # evaluated images a refitted head was fitted or chosen on

    @property
    def n(self) -> int:
        return self.metrics.n

    @property
    def accuracy(self) -> float:
        return self.metrics.accuracy

    @property
    def balanced_accuracy(self) -> float:
        return self.metrics.balanced_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics.to_dict(), "split": self.split, "data": self.data, "artifact": self.artifact,
                "skipped": [{"path": p, "error": e} for p, e in self.skipped], "seen_in_training": self.seen_in_training,
                "seen_in_adaptation": self.seen_in_adaptation, "seen_in_refit": self.seen_in_refit}


def evaluate(artifact: str | Path, data: str | Path | Sequence[str | Path], split: str = EvalConfig.split,
             cfg: PredictConfig = PredictConfig(), ecfg: EvalConfig = EvalConfig(),
             warn: Callable[[str], None] = lambda m: None, sources: Sequence[str] = ()) -> EvalResult:
    pred = load_predictor(artifact, cfg)
    classes = pred.classes
    ds = discover(data)
    items = select_items(ds, (split,), sources)
    used_split = split if ds.split_given else None
    unknown = sorted(set(items.label) - set(classes))
    if unknown:
        raise DataError(f"{ds.where}: label {unknown[0]!r} is not a class of this model ({', '.join(classes)}); "
                        "remove those images or evaluate a model trained with that class")
    items = items.reset_index(drop=True)
    index = {c: i for i, c in enumerate(classes)}
    y, probs, srcs, skipped, used = [], [], [], [], []
    paths = [Path(p) for p in items.path]
    for i, (p, pr, err) in enumerate(iter_probs(pred, paths, cfg)):
        if pr is None:
            skipped.append((str(p), err))
            continue
        y.append(index[items.label[i]])
        probs.append(pr)
        srcs.append(items.source[i])
        used.append(str(p))
    if skipped:
        warn(f"{len(skipped)} unreadable image(s) left out of the metrics (first: {skipped[0][1]})")
    if not y:
        raise DataError(f"{ds.where}: none of the {len(items)} image(s) could be read")
    sources = srcs if any(srcs) else None
    m = compute_metrics(np.array(y), np.stack(probs), classes, sources=sources, n_boot=ecfg.n_boot, seed=ecfg.seed)
    if sources:
        for w in source_warnings(np.array(y), classes, sources) + source_gaps(m.per_source, m.balanced_accuracy,
                                                                             ecfg.source_gap):
            warn(w)
    seen, adapted, refit = seen_counts(pred.art.manifest, used)
    if seen:
        warn(f"{seen} of the {len(used)} evaluated images were used in training (same file content); these metrics "
             "overstate how the model does on new images: evaluate on images it was not trained on")
    if adapted:
        warn(f"{adapted} of the {len(used)} evaluated images gave this model's BatchNorm statistics (`cxr-fastai "
             "adapt`; their labels were not used); figures on them need not carry to films it was not adapted on: "
             "to measure, adapt on one split and evaluate another")
    if refit:
        warn(f"{refit} of the {len(used)} evaluated images fitted or chose this model's last layer (`cxr-fastai "
             "refit`); these metrics overstate how it does on new images: evaluate it on a split it was not refitted on")
    return EvalResult(m, used_split, ds.where, str(Path(artifact)), skipped, seen, adapted, refit)


def write_metrics(res: EvalResult, out: str | Path) -> None:
    write_json(Path(out), res.to_dict())
