"""Interpretation of a run on its validation set: compute (returns data), then save (PNG, CSV, JSON).

Built on fastai's ClassificationInterpretation; figures are drawn on matplotlib `Figure` objects
directly (no pyplot state, no backend switch), so it works headless.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import EvalConfig, InterpretConfig
from ..io.files import atomic_folder


@dataclass
class Interpretation:
    classes: list[str]
    confusion: np.ndarray          # (C, C), rows = actual
    top_losses: pd.DataFrame       # path, actual, predicted, probability, loss (probability of the prediction)
    most_confused: pd.DataFrame    # actual, predicted, count
    accuracy: float
    n: int
    y: np.ndarray = None           # (N,) actual class indices, validation order
    probs: np.ndarray = None       # (N, C) softmax probabilities
    paths: list = None             # (N,) image paths
    metrics: dict = None           # metrics.compute_metrics(...).to_dict(): intervals, AUC, calibration
    cams: dict = None              # path -> (size, size) float map in [0, 1] (Grad-CAM of the predicted class)


@dataclass
class Report:
    folder: Path
    files: list[str] = field(default_factory=list)


def compute(learn, k: int = InterpretConfig.k) -> Interpretation:
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
    from ..metrics import compute_metrics

    y = targs.long().numpy()
    p = probs.numpy()
    src = [str(s) for s in items["source"]] if "source" in items.columns else []
    metrics = compute_metrics(y, p, classes, sources=src if any(src) else None, n_boot=InterpretConfig.n_boot,
                              seed=0).to_dict()
    interp_ = Interpretation(classes, cm, top, mc, float(np.trace(cm) / max(n, 1)), n, y, p,
                             [str(x) for x in items["path"]], metrics)
    interp_.cams = grad_cams(learn.model, _cam_paths(interp_), learn.dls.valid, classes)
    return interp_


def _cam_paths(interp: "Interpretation", per_class: int = InterpretConfig.cams_per_class) -> list[str]:
    """Top-loss images plus a few correctly classified ones per class."""
    chosen = list(interp.top_losses.path)
    pred = interp.probs.argmax(1)
    for c in range(len(interp.classes)):
        ok = np.flatnonzero((interp.y == c) & (pred == c))
        # the most confident correct ones: what the model looks at when it is sure
        ok = ok[np.argsort(-interp.probs[ok, c])][:per_class]
        chosen += [interp.paths[i] for i in ok]
    return list(dict.fromkeys(chosen))


def grad_cams(model, paths: list[str], dl, classes) -> dict[str, np.ndarray]:
    """Grad-CAM (Selvaraju et al. 2017) on ResNet9's last feature map for the predicted class.

    Each image goes through the validation preprocessing (squash to size, /255, the run's mean/std).
    With ResNet9's global max pool the channel weights are the head's weights spread over the map, so
    the map shows where each channel's evidence lies."""
    from ..data.augment import to_model_input
    from ..gradcam import grad_cam_maps
    from ..io.images import read_model_image, squash

    norm = _normaliser(dl)
    contrast, crop = _read_step(dl)
    size = _input_size(dl)
    model = getattr(model, "_orig_mod", model).float()
    dev = next(model.parameters()).device
    return {p: grad_cam_maps(model, to_model_input([squash(read_model_image(p, contrast, crop), size)], *norm, device=dev))[0]
            for p in paths}


def _input_size(dl) -> int:
    x, _ = dl.one_batch()
    return int(x.shape[-1])


def _read_step(dl) -> tuple[str, float]:
    """The run's contrast step and border crop, from the loader's item transforms (none and 0 without them)."""
    from ..data.types import Contrast, CropBorder

    kinds = [t.kind for t in dl.after_item.fs if isinstance(t, Contrast)]
    crops = [t.frac for t in dl.after_item.fs if isinstance(t, CropBorder)]
    return (kinds[0] if kinds else "none"), (crops[0] if crops else 0.0)


def _normaliser(dl):
    """(mean, std) of the fastai Normalize in the run's validation loader."""
    from fastai.data.transforms import Normalize

    nm = [t for t in dl.after_batch.fs if isinstance(t, Normalize)][0]
    return float(nm.mean.flatten()[0]), float(nm.std.flatten()[0])


def roc_figure(interp: Interpretation):
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5.5, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for c, name in enumerate(interp.classes):
        pos = interp.y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, interp.probs[:, c])
        auc = interp.metrics["per_class"][name].get("roc_auc")
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC, one class vs the rest (validation)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def cam_figure(interp: Interpretation, paths: list[str], title: str):
    from matplotlib.figure import Figure

    from ..io.images import read_grey, squash

    cols = min(4, max(1, len(paths)))
    rows = max(1, -(-len(paths) // cols))
    fig = Figure(figsize=(3.2 * cols, 3.6 * rows), dpi=100)
    idx = {p: i for i, p in enumerate(interp.paths)}
    for j, p in enumerate(paths):
        i = idx[p]
        cam = interp.cams[p]
        ax = fig.add_subplot(rows, cols, j + 1)
        box = (0, 1, 1, 0)  # both layers on the same unit square, whatever their pixel sizes
        ax.imshow(squash(read_grey(p), max(128, cam.shape[0])), cmap="gray", vmin=0, vmax=255, extent=box)
        ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1, extent=box, interpolation="bilinear")
        pred = int(interp.probs[i].argmax())
        ax.set_title(f"actual {interp.classes[interp.y[i]]}\npred {interp.classes[pred]} p={interp.probs[i, pred]:.2f}",
                     fontsize=8, color="firebrick" if pred != interp.y[i] else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def top_losses_figure(interp: Interpretation, size: int):
    from matplotlib.figure import Figure

    from ..io.images import read_grey, squash

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
    from ..errors import CxrError

    out = Path(out)
    if out.exists() and not force:
        raise CxrError(f"{out}: report folder exists; pass --force to replace it or --out another folder")
    import json

    names = ["report.html", "top_losses.png", "top_losses.csv", "confusion_matrix.png", "most_confused.csv",
             "roc.png", "gradcam_top_losses.png", "gradcam_correct.png", "summary.json"]
    top_paths = list(interp.top_losses.path)
    correct = [p for p in interp.cams if p not in set(top_paths)]
    with atomic_folder(out) as tmp:
        figs = {
            "top_losses.png": top_losses_figure(interp, size),
            "confusion_matrix.png": confusion_figure(interp),
            "roc.png": roc_figure(interp),
            "gradcam_top_losses.png": cam_figure(interp, top_paths, "Grad-CAM of the predicted class: top losses"),
            "gradcam_correct.png": cam_figure(interp, correct, "Grad-CAM of the predicted class: confident correct"),
        }
        for name, fig in figs.items():
            fig.savefig(tmp / name)
        interp.top_losses.to_csv(tmp / "top_losses.csv", index=False)
        interp.most_confused.to_csv(tmp / "most_confused.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps({
            "classes": interp.classes, "n": interp.n, "accuracy": interp.accuracy,
            "confusion_matrix": interp.confusion.tolist(), "metrics": interp.metrics}, indent=2) + "\n")
        (tmp / "report.html").write_text(html_report(interp, tmp), encoding="utf-8")
    return Report(out, [str(out / n) for n in names])


def html_report(interp: Interpretation, folder: Path) -> str:
    """One self-contained page (images embedded as base64) a person opens in a browser."""
    import base64
    import html

    from ..metrics import source_gaps

    def img(name: str, alt: str) -> str:
        b64 = base64.b64encode((folder / name).read_bytes()).decode()
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'

    m = interp.metrics
    ci = m.get("ci95") or {}

    def fmt(v):
        return "–" if v is None else f"{v:.3f}"

    def interval(key):
        lo_hi = ci.get(key)
        return "" if not lo_hi else f" <span class=ci>[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]</span>"

    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{fmt(pc['sensitivity'])}{interval('sensitivity/' + c)}</td>"
        f"<td>{fmt(pc['specificity'])}{interval('specificity/' + c)}</td><td>{fmt(pc['ppv'])}</td>"
        f"<td>{fmt(pc['npv'])}</td><td>{fmt(pc['f1'])}</td><td>{fmt(pc.get('roc_auc'))}</td><td>{pc['support']}</td></tr>"
        for c, pc in m["per_class"].items())
    per_source = m.get("per_source") or {}
    src_rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{f['n']}</td><td>{fmt(f['accuracy'])}</td><td>{fmt(f['balanced_accuracy'])}</td>"
        + "".join(f"<td>{fmt(f['per_class_sensitivity'].get(c))}</td>" for c in m["per_class"]) + "</tr>"
        for s, f in sorted(per_source.items()))
    gaps = "".join(f'<p class="warn">{html.escape(g)}.</p>' for g in
                   source_gaps(per_source, m["balanced_accuracy"], EvalConfig.source_gap))
    src_section = "" if not per_source else (
        "<h2>Per source</h2>" + gaps + "<table><tr><th>source</th><th>n</th><th>accuracy</th><th>balanced accuracy</th>"
        + "".join(f"<th>sensitivity {html.escape(c)}</th>" for c in m["per_class"]) + f"</tr>{src_rows}</table>")
    top = "".join(f"<tr><td>{html.escape(Path(r.path).name)}</td><td>{html.escape(r.actual)}</td>"
                  f"<td>{html.escape(r.predicted)}</td><td>{r.probability:.3f}</td><td>{r.loss:.3f}</td></tr>"
                  for r in interp.top_losses.itertuples())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxr-fastai report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}
.ci{{color:#666;font-size:0.85em}} img{{max-width:100%;border:1px solid #ddd;margin:0.5em 0}}
.warn{{background:#fff4e0;border-left:4px solid #e0a000;padding:0.6em 1em}}</style></head><body>
<h1>Validation report</h1>
<p class="warn">Research use only, not for diagnosis. These figures come from the run's validation split;
report test-split figures with <code>cxr-fastai evaluate</code>.</p>
<h2>Metrics (n = {interp.n}, 95% bootstrap intervals)</h2>
<p>Accuracy <b>{m['accuracy']:.3f}</b>{interval('accuracy')} &nbsp; Balanced accuracy
<b>{m['balanced_accuracy']:.3f}</b>{interval('balanced_accuracy')} &nbsp; Expected calibration error {m['ece']:.3f}</p>
<table><tr><th>class</th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th><th>F1</th><th>ROC AUC</th><th>support</th></tr>{rows}</table>
{src_section}
<h2>Confusion matrix</h2>{img('confusion_matrix.png', 'confusion matrix')}
<h2>ROC curves</h2>{img('roc.png', 'ROC curves')}
<h2>Top losses</h2>{img('top_losses.png', 'top losses')}
<table><tr><th>image</th><th>actual</th><th>predicted</th><th>probability</th><th>loss</th></tr>{top}</table>
<h2>Grad-CAM: where the evidence for the predicted class lies</h2>
{img('gradcam_top_losses.png', 'Grad-CAM on top losses')}
{img('gradcam_correct.png', 'Grad-CAM on confident correct images')}
</body></html>
"""


def interpret_run(run: str | Path, k: int = InterpretConfig.k, out: str | Path | None = None, device: str = "auto",
                  force: bool = True) -> Report:
    from ..train.fit import learner_from_run
    from ..train.runs import load_run

    info = load_run(run)
    learn = learner_from_run(info, device)
    interp = compute(learn, k)
    return save_report(interp, Path(out) if out else info.path / "report", info.cfg.size, force)
