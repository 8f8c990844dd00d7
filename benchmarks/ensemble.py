"""Ensembles of trained recipes against source shortcuts: do models that learned different shortcuts cancel them?

Averaging the probabilities of independently trained networks is one of the most reliable ways to improve
accuracy and calibration under dataset shift (Lakshminarayanan, Pritzel & Blundell, "Simple and scalable
predictive uncertainty estimation using deep ensembles", NeurIPS 2017; Ovadia et al., "Can you trust your
model's uncertainty?", NeurIPS 2019). Here the members are exported models of different recipes (the
default, and lever recipes that trade pooled accuracy for the worst source):

  1. every member's probabilities on the valid and test images of the roots, each through the library's own
     predictor (its manifest's contrast step and size, no TTA);
  2. every subset of two or more members, averaged with equal weights;
  3. the choice, on validation only: the highest worst-source balanced accuracy among the single members and
     subsets whose pooled validation accuracy is within --max-drop of the first member's (the reference,
     e.g. the default recipe);
  4. test figures (bootstrap 95% intervals, per root and per source) of the reference and the chosen one,
     and of every subset with --all-test.

    python benchmarks/ensemble.py ARTIFACT ARTIFACT [ARTIFACT ...] [--data ROOT ...] [--cache DIR]
                                  [--max-drop 0.01] [--all-test] [--json OUT]

DATA defaults to cxr3 and cxr3-adult beside the repository ($CXR_DATA_ROOT for their parent folder).
--cache keeps each member's probabilities between runs (one .npz per artifact; recomputed when its items
differ). Nothing else is written; no model is changed.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from last_layer import default_roots, root_rows, test_by_root, valid_row


def member_probs(artifact: Path, paths: list[str], classes: list[str], cache: Path | None) -> np.ndarray:
    """Probabilities of one exported model for every path, its columns in `classes` order."""
    from cxr_fastai.artifact.predict import iter_probs, load_predictor
    from cxr_fastai.config import PredictConfig

    key = hashlib.sha1(str(artifact.resolve()).encode()).hexdigest()[:10]   # fold models are all called "model"
    f = cache / f"{artifact.name}-{key}.npz" if cache else None
    if f is not None and f.is_file():
        z = np.load(f)
        if z["paths"].tolist() == paths:
            return z["probs"]
    cfg = PredictConfig(workers=2)
    pred = load_predictor(artifact, cfg)
    if sorted(pred.classes) != sorted(classes):
        raise SystemExit(f"{artifact}: classes {pred.classes} differ from the first member's {classes}")
    order = [pred.classes.index(c) for c in classes]
    out = np.zeros((len(paths), len(classes)), np.float32)
    t0 = time.time()
    for i, (p, pr, err) in enumerate(iter_probs(pred, [Path(p) for p in paths], cfg)):
        if pr is None:
            raise SystemExit(f"{p}: {err}")
        out[i] = pr[order]
    print(f"  {artifact.name}: {len(paths)} images in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f, probs=out, paths=np.array(paths))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", type=Path, nargs="+", help="exported models; the first is the reference")
    ap.add_argument("--data", type=Path, action="append", default=[], help="a data root (repeatable)")
    ap.add_argument("--cache", type=Path, help="keep every member's probabilities here")
    ap.add_argument("--max-drop", type=float, default=0.01, help="pooled valid accuracy a candidate may lose")
    ap.add_argument("--all-test", action="store_true", help="test figures of every candidate, not only the chosen")
    ap.add_argument("--json", type=Path, help="write every figure here")
    a = ap.parse_args(argv)
    if len(a.artifacts) < 2:
        ap.error("give two or more artifacts")

    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.data.discover import discover

    roots = a.data or default_roots()
    classes = list(read_manifest(a.artifacts[0]).classes)
    items = discover(roots).items
    items = items[items.split.isin(["valid", "test"]) & items.label.isin(classes)].reset_index(drop=True)
    paths = items.path.astype(str).tolist()
    y = items.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    src = items.source.astype(str).to_numpy()
    va, te = (items.split == "valid").to_numpy(), (items.split == "test").to_numpy()
    print(f"{len(paths)} valid/test images of {len(roots)} root(s); members:", ", ".join(p.name for p in a.artifacts))
    P = [member_probs(art, paths, classes, a.cache) for art in a.artifacts]

    names = [p.name for p in a.artifacts]
    if len(set(names)) < len(names):
        names = [str(p) for p in a.artifacts]
    candidates = [((i,), P[i]) for i in range(len(P))]
    for k in range(2, len(P) + 1):
        candidates += [(c, np.mean([P[i] for i in c], axis=0)) for c in itertools.combinations(range(len(P)), k)]

    def label(c):
        return " + ".join(names[i] for i in c)

    rows = [{"members": [names[i] for i in c], **valid_row(y, p, classes, src, va)} for c, p in candidates]
    ref = rows[0]
    for r in rows:
        r["allowed"] = r["pooled_accuracy"] >= ref["pooled_accuracy"] - a.max_drop
    print("valid (worst source first):")
    for r in rows:
        print(f"  {' + '.join(r['members']):60s} worst {r['worst_source']} {r['worst_balanced_accuracy']:.3f}  "
              f"pooled acc {r['pooled_accuracy']:.3f}" + ("" if r["allowed"] else "  (drops more than --max-drop)"))
    best = max((i for i, r in enumerate(rows) if r["allowed"]), key=lambda i: rows[i]["worst_balanced_accuracy"])
    print(f"chosen on validation: {label(candidates[best][0])}")
    result = {"data": [str(r) for r in roots], "members": [str(p) for p in a.artifacts], "valid": rows,
              "chosen": rows[best]["members"], "test": {}}
    show = range(len(candidates)) if a.all_test else sorted({0, best})
    te_roots = root_rows(items.path.astype(str), roots, te)
    for j in show:
        c, p = candidates[j]
        result["test"][label(c)] = test_by_root(label(c), y, p, classes, src, te_roots)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
