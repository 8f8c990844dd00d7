"""Batch-norm statistics re-estimated on a hospital's own unlabelled films: does the model then read them better?

AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting batch normalization for practical domain adaptation", 2016;
test-time BN adaptation in Schneider et al., NeurIPS 2020) keeps every learned weight and replaces only
each BatchNorm layer's running mean and variance by those of the target domain's images. No label is
used: a hospital can do it with the films it wants to read. Here, for each source:

  1. the source's train and valid images (their labels ignored) give the model their BN statistics, by the
     library's `adapt_on_files` (what `cxr-fastai adapt` does: shuffled, near-equal batches, update_bn);
  2. the source's test images are scored by the model as trained and by the adapted copy.

    python benchmarks/adapt_bn.py ARTIFACT [DATA ...] [--source NAME ...] [--fit train,valid] [--score test]
                                  [--json OUT]      # --fit train --score valid: the choice, on validation

DATA defaults to cxr3 and cxr3-adult beside the repository ($CXR_DATA_ROOT for their parent folder). No
test image and no label takes part in the adaptation; nothing is written but --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from last_layer import default_roots, summary


def load_arrays(pred, paths: list[str], workers: int = 2) -> list[np.ndarray]:
    """Every image as the torch Predictor shrinks it (contrast step, squashed to the model's size)."""
    from cxr_fastai.io.images import decode_many

    out: list[np.ndarray | None] = [None] * len(paths)
    for i, arr, err in decode_many(paths, workers=workers, fn=pred.shrink):
        if arr is None:
            raise SystemExit(f"{paths[i]}: {err}")
        out[i] = arr
    return out


def probs(model, art, arrays, bs: int = 256) -> np.ndarray:
    import torch

    from cxr_fastai.data.augment import to_model_input

    model.eval()
    with torch.inference_mode():
        return np.concatenate([torch.softmax(model(to_model_input(arrays[i:i + bs], art.mean, art.std)), 1).numpy()
                               for i in range(0, len(arrays), bs)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("data", type=Path, nargs="*")
    ap.add_argument("--source", action="append", default=[], help="adapt to and score this source (default: each)")
    ap.add_argument("--fit", default="train,valid", help="splits whose images (not labels) give the statistics")
    ap.add_argument("--score", default="test", help="the split scored (never one of --fit)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import torch

    from cxr_fastai.artifact.adapt import adapt_on_files
    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.data.discover import discover
    from cxr_fastai.metrics import compute_metrics

    if a.threads:
        torch.set_num_threads(a.threads)
    art = read_manifest(a.artifact)
    pred = Predictor(art)
    model = pred.model
    items = discover(a.data or default_roots()).items
    items = items[items.label.isin(art.classes)].reset_index(drop=True)
    index = {c: i for i, c in enumerate(art.classes)}
    fit_splits, score = [x.strip() for x in a.fit.split(",") if x.strip()], a.score
    if score in fit_splits:
        raise SystemExit(f"--score {score} is among --fit {a.fit}: the scored images must not give the statistics")
    result = {"artifact": str(a.artifact), "fit": fit_splits, "score": score, "sources": {}}
    for src in a.source or sorted(set(items.source)):
        mine = items[items.source == src]
        fit, test = mine[mine.split.isin(fit_splits)], mine[mine.split == score]
        if not len(fit) or not len(test):
            print(f"{src}: needs {a.fit} and {score} images; skipped")
            continue
        t0 = time.time()
        adapted, _, bad, _ = adapt_on_files(pred, fit.path.astype(str).tolist(), workers=2)
        if bad:
            raise SystemExit(bad[0][1])
        x = load_arrays(pred, test.path.astype(str).tolist())
        y = test.label.map(index).to_numpy()
        row = {"adapted_on": len(fit), "n_scored": len(test)}
        for name, m in (("as trained", model), ("BN adapted", adapted)):
            p = probs(m, art, x)
            met = compute_metrics(y, p, art.classes)
            s = summary(met)
            s["sensitivity"] = {c: met.per_class[c]["sensitivity"] for c in art.classes if met.per_class[c]["support"]}
            if "PNEUMONIA" in art.classes and "NORMAL" in art.classes:
                s["pneumonia_auc"] = met.per_class["PNEUMONIA"].get("roc_auc")
            row[name] = s
            lo, hi = s["accuracy_ci95"]
            sens = ", ".join(f"{c} {v:.3f}" for c, v in s["sensitivity"].items())
            print(f"{src} {score} (n={len(test)}), {name}: accuracy {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], balanced "
                  f"{s['balanced_accuracy']:.3f}; {sens}" + (f"; PNEUMONIA AUC {s['pneumonia_auc']:.3f}"
                                                            if s.get("pneumonia_auc") is not None else ""), flush=True)
        print(f"  ({len(fit)} unlabelled {a.fit} images for the statistics; {time.time() - t0:.0f} s)")
        result["sources"][src] = row
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
