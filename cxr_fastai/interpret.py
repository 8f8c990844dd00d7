"""Interpretation of a run on its validation set: compute (returns data), then save (PNG, CSV, JSON).

Built on fastai's ClassificationInterpretation; figures are drawn on matplotlib `Figure` objects
directly (no pyplot state, no backend switch), so it works headless.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import write_json
from .fsutil import atomic_folder


@dataclass
class Interpretation:
    classes: list[str]
    confusion: np.ndarray          # (C, C), rows = actual
    top_losses: pd.DataFrame       # path, actual, predicted, probability, loss (probability of the prediction)
    most_confused: pd.DataFrame    # actual, predicted, count
    accuracy: float
    n: int


@dataclass
class Report:
    folder: Path
    files: list[str] = field(default_factory=list)


def compute(learn, k: int = 16) -> Interpretation:
    """One pass over the validation set; fastai's ClassificationInterpretation ranks the losses."""
    from fastai.interpret import ClassificationInterpretation

    dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    with learn.no_bar():
        probs, targs, losses = learn.get_preds(dl=dl, with_loss=True)
    interp = ClassificationInterpretation(learn, dl, losses)
    classes = list(interp.vocab)
    items = dl.items
    probs = probs.float()
    pred = probs.argmax(1)
    top_l, idxs = interp.top_losses(min(k, len(items)))
    rows = []
    for loss, i in zip(top_l.tolist(), idxs.tolist()):
        r = items.iloc[i]
        rows.append({"path": r["path"], "actual": r["label"], "predicted": classes[int(pred[i])],
                     "probability": float(probs[i, pred[i]]), "loss": float(loss)})
    top = pd.DataFrame(rows, columns=["path", "actual", "predicted", "probability", "loss"])
    c = len(classes)
    cm = np.bincount(targs.long().numpy() * c + pred.numpy(), minlength=c * c).reshape(c, c)  # rows = actual
    pairs = [(classes[a], classes[b], int(cm[a, b])) for a in range(c) for b in range(c) if a != b and cm[a, b] > 0]
    mc = pd.DataFrame(sorted(pairs, key=lambda t: -t[2]), columns=["actual", "predicted", "count"])
    n = int(cm.sum())
    return Interpretation(classes, cm, top, mc, float(np.trace(cm) / max(n, 1)), n)


def top_losses_figure(interp: Interpretation, size: int):
    from matplotlib.figure import Figure

    from .images import read_grey, squash

    k = len(interp.top_losses)
    cols = min(4, max(k, 1))
    rows = max(1, -(-k // cols))
    fig = Figure(figsize=(3.2 * cols, 4.0 * rows), dpi=100)
    for j, r in enumerate(interp.top_losses.itertuples()):
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.imshow(squash(read_grey(r.path), max(size, 128)), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"actual {r.actual}\npred {r.predicted} p={r.probability:.2f}\nloss {r.loss:.2f}", fontsize=8,
                     color="firebrick" if r.actual != r.predicted else "black")
        ax.set_xlabel(Path(r.path).name[:38], fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Top losses on the validation set (image, actual, predicted, probability, loss)", fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(interp: Interpretation):
    from matplotlib.figure import Figure

    cm, classes = interp.confusion, interp.classes
    c = len(classes)
    fig = Figure(figsize=(1.4 * c + 2.5, 1.4 * c + 2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(cm, cmap="Blues")
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > thresh else "black")
    ax.set_xticks(range(c), classes, rotation=30, ha="right")
    ax.set_yticks(range(c), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"Confusion matrix (validation, n={interp.n}, accuracy {interp.accuracy:.3f})")
    fig.tight_layout()
    return fig


def save_report(interp: Interpretation, out: Path, size: int, force: bool = True) -> Report:
    from .errors import CxrError

    out = Path(out)
    if out.exists() and not force:
        raise CxrError(f"{out}: report folder exists; pass --force to replace it or --out another folder")
    names = ["top_losses.png", "top_losses.csv", "confusion_matrix.png", "most_confused.csv", "summary.json"]
    with atomic_folder(out) as tmp:
        top_losses_figure(interp, size).savefig(tmp / names[0])
        interp.top_losses.to_csv(tmp / names[1], index=False)
        confusion_figure(interp).savefig(tmp / names[2])
        interp.most_confused.to_csv(tmp / names[3], index=False)
        (tmp / names[4]).write_text(__import__("json").dumps({
            "classes": interp.classes, "n": interp.n, "accuracy": interp.accuracy,
            "confusion_matrix": interp.confusion.tolist()}, indent=2) + "\n")
    return Report(out, [str(out / n) for n in names])


def interpret_run(run: str | Path, k: int = 16, out: str | Path | None = None, device: str = "auto",
                  force: bool = True) -> Report:
    from .train import learner_from_run, load_run

    info = load_run(run)
    learn = learner_from_run(info, device)
    interp = compute(learn, k)
    return save_report(interp, Path(out) if out else info.path / "report", info.cfg.size, force)
