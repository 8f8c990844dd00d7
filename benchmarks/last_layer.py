"""Last-layer retraining against source shortcuts: does a re-fitted head fix what the features already hold?

Deep feature reweighting (Kirichenko, Izmailov & Wilson, "Last layer re-training is sufficient for
robustness to spurious correlations", ICLR 2023) keeps a trained network's features and fits only its
last linear layer again on data in which the shortcut no longer pays, e.g. every (class, source) stratum
equally weighted. It costs one forward pass over the data instead of a training. Here:

  1. the exported model's pooled features (what its head reads) for every train/valid/test image of the
     roots, each image preprocessed as predict does (contrast step, squashed to the model's size);
  2. a multinomial logistic regression on the standardised train features for every weighting in the grid:
     the training loader's own sampling weights (`--balance` class-source or class-then-source), tempered
     by an exponent alpha (0: unweighted, 1: fully balanced), and every L2 strength C;
  3. the choice, on validation only: the highest worst-source balanced accuracy among the heads whose
     pooled validation accuracy is within --max-drop of the trained head's;
  4. test figures (bootstrap 95% intervals, per source) of the trained head and the chosen one;
  5. a diagnostic: per test source, the best accuracy any threshold on the trained head's P(PNEUMONIA)
     reaches, chosen on those very images (an oracle: the ceiling of re-thresholding, never a recipe);
  6. with --frontier, a second diagnostic: every head of the grid scored on test (each root's accuracy, each
     source's accuracy and per-class hits), to see what trade the features allow at all. Reading test for
     every head is an oracle's view: it shows a frontier, it never chooses.

    python benchmarks/last_layer.py ARTIFACT [DATA ...] [--features F.npz] [--max-drop 0.01] [--json OUT]
                                    [--no-grid]   # 1, 4 (trained head) and 5 only
                                    [--holdout SOURCE]  # a crossval fold's model: SOURCE neither fits nor chooses
                                    [--frontier]  # 6: every head scored on test (a diagnostic)
                                    [--draws K [--crop-seed S ...]]  # fit on K training crops per image, as
                                        # `refit --draws K` does (its crops: the run's seed); other seeds show how
                                        # much the choice depends on the draw, several seeds fit on all their crops

DATA defaults to cxr3 and cxr3-adult beside the repository ($CXR_DATA_ROOT for their parent folder).
--features keeps the features between runs (an .npz; recomputed when its items differ). Nothing else is
written; no model is changed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_fastai.artifact.refit import BALANCES, fit_grid, stack_crops, training_crop, valid_row  # noqa: E402,F401  (valid_row: ensemble.py)
from cxr_fastai.config import REFIT_DRAWS  # noqa: E402


def default_roots() -> list[Path]:
    parent = Path(os.environ.get("CXR_DATA_ROOT", REPO.parent / "shared" / "data"))
    return [parent / "cxr3", parent / "cxr3-adult"]


def features(pred, paths: list[str], bs: int = 256, workers: int = 2) -> np.ndarray:
    """The head's input for every path (the library's `refit.features`), with progress; an unreadable image stops it."""
    from cxr_fastai.artifact.refit import features as refit_features

    t0 = time.time()
    F, bad = refit_features(pred, paths, bs=bs, workers=workers, progress=lambda d, n: print(
        f"  features {d}/{n} ({d / (time.time() - t0):.0f} img/s)", file=sys.stderr, flush=True))
    if bad:
        raise SystemExit(f"{paths[bad[0][0]]}: {bad[0][1]}")
    return F


def oracle_threshold(p_pos: np.ndarray, is_pos: np.ndarray) -> tuple[float, float]:
    """The best accuracy any threshold on p_pos reaches on these very items, and that threshold. A ceiling for re-thresholding or
    re-calibrating, chosen on the scored items themselves: a diagnostic, never a recipe."""
    ts = np.unique(np.r_[p_pos, np.inf])
    accs = [np.mean((p_pos >= t) == is_pos) for t in ts]
    i = int(np.argmax(accs))
    return float(accs[i]), float(ts[i])


def summary(m) -> dict:
    """The figures a row of the comparison needs, from compute_metrics."""
    d = m.to_dict()
    return {"n": d["n"], "accuracy": d["accuracy"], "accuracy_ci95": d["ci95"]["accuracy"],
            "balanced_accuracy": d["balanced_accuracy"], "balanced_accuracy_ci95": d["ci95"]["balanced_accuracy"],
            "per_source": d["per_source"]}


def root_rows(paths, roots, mask) -> dict[str, np.ndarray]:
    """Each root's folder name and its `mask` rows (those whose path lies under it), for the roots that have any."""
    out = {}
    for root in roots:
        m = mask & paths.str.startswith(str(Path(root).resolve()) + os.sep).to_numpy()
        if m.any():
            out[Path(root).name] = m
    return out


def test_by_root(name, y, p, classes, src, by_root: dict[str, np.ndarray]) -> dict:
    """Test figures (bootstrap intervals, per source) for each root's rows (`root_rows`), printed and returned."""
    from cxr_fastai.metrics import compute_metrics

    per_root = {root: summary(compute_metrics(y[m], p[m], classes, sources=src[m].tolist())) for root, m in by_root.items()}
    print(f"test, {name}:")
    for root, s in per_root.items():
        lo, hi = s["accuracy_ci95"]
        blo, bhi = s["balanced_accuracy_ci95"]
        print(f"  {root}: n {s['n']}, accuracy {s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], balanced "
              f"{s['balanced_accuracy']:.3f} [{blo:.3f}, {bhi:.3f}]")
        for so, f in s["per_source"].items():
            sens = ", ".join(f"{k} {v:.3f}" for k, v in f["per_class_sensitivity"].items() if v is not None)
            print(f"    {so}: n {f['n']}, accuracy {f['accuracy']:.3f}, balanced {f['balanced_accuracy']:.3f} ({sens})")
    return per_root


def test_row(y, p, classes, src, by_root: dict[str, np.ndarray], mask) -> dict:
    """One head's test figures without intervals: each root's accuracy (`root_rows`), and each source's accuracy
    and per-class hits (correct of support) over the `mask` rows."""
    hit = p.argmax(1) == y
    out = {"roots": {root: {"n": int(m.sum()), "accuracy": float(hit[m].mean())} for root, m in by_root.items()},
           "sources": {}}
    for so in np.unique(src[mask]):
        m = mask & (src == so)
        out["sources"][str(so)] = {"n": int(m.sum()), "correct": int(hit[m].sum()), "classes": {
            c: [int((hit & m & (y == k)).sum()), int((m & (y == k)).sum())]
            for k, c in enumerate(classes) if (m & (y == k)).any()}}
    return out


def show_frontier(rows: list[dict]) -> None:
    """Every head's test row, one line each, in the grid's order."""
    print("frontier (every head scored on test; an oracle's view, never a choice):")
    for r in rows:
        t = r["test"]
        roots = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in t["roots"].items())
        srcs = "; ".join(f"{s} {v['correct']}/{v['n']} (" + ", ".join(f"{c} {h}/{n}" for c, (h, n) in v["classes"].items()) + ")"
                         for s, v in t["sources"].items())
        print(f"  {r['balance']:17s} a {r['alpha']:<4} C {r['C']:<6} valid worst {r['worst_balanced_accuracy']:.3f} "
              f"pooled {r['pooled_accuracy']:.3f} | test {roots} | {srcs}")


def crops(pred, paths: list[str], draws: int, min_scale: float, seed: int, bs: int = 256, workers: int = 2) -> np.ndarray:
    """`draws` training crops of every path (the library's `refit.crop_features`), with progress; an unreadable image stops it."""
    from cxr_fastai.artifact.refit import crop_features

    t0 = time.time()
    C, bad = crop_features(pred, paths, draws, min_scale, seed, bs=bs, workers=workers, progress=lambda d, n: print(
        f"  crops {d}/{n} ({d / (time.time() - t0):.0f} img/s)", file=sys.stderr, flush=True))
    if bad:
        raise SystemExit(f"{paths[bad[0][0]]}: {bad[0][1]}")
    return C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("data", type=Path, nargs="*")
    ap.add_argument("--features", type=Path, help="cache the features here (.npz)")
    ap.add_argument("--max-drop", type=float, default=0.01, help="pooled valid accuracy a head may lose")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--no-grid", action="store_true", help="only the trained head's figures and the oracle")
    ap.add_argument("--holdout", action="append", default=[], metavar="SOURCE",
                    help="a source the model never trained on (a crossval fold's): its train and valid images are kept "
                         "out of the re-fit and the choice, its test images are scored (repeatable)")
    ap.add_argument("--draws", type=int, default=REFIT_DRAWS,
                    help="fit on this many training crops of each train image, as `cxr-fastai refit` does (0: the images themselves)")
    ap.add_argument("--crop-seed", type=int, action="append", default=[], metavar="SEED",
                    help="with --draws: cut the crops from this seed instead of the training run's (refit's); repeatable, "
                         "each seed's draws stacked (3 seeds of --draws 2: 6 crops of each image)")
    ap.add_argument("--frontier", action="store_true",
                    help="also score every head of the grid on test (a diagnostic of the trade the features allow)")
    a = ap.parse_args(argv)
    if a.crop_seed and not a.draws:
        ap.error("--crop-seed needs --draws")

    import torch

    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.data.discover import discover

    if a.threads:
        torch.set_num_threads(a.threads)
    roots = a.data or default_roots()
    art = read_manifest(a.artifact)
    pred = Predictor(art)
    model = pred.model
    items = discover(roots).items
    items = items[items.split.isin(["train", "valid", "test"]) & items.label.isin(art.classes)].reset_index(drop=True)
    paths = items.path.astype(str).tolist()

    cached = dict(np.load(a.features)) if a.features and a.features.is_file() else None
    if cached is not None and cached["paths"].tolist() != paths:
        cached = None   # another model's or data's features: recomputed
    if cached is not None:
        F = cached["feats"]
    else:
        t0 = time.time()
        F = features(pred, paths)
        print(f"features: {len(paths)} images in {time.time() - t0:.0f} s", file=sys.stderr)
        cached = {"feats": F, "paths": np.array(paths)}
        if a.features:
            np.savez(a.features, **cached)

    n_held = int(items.source.isin(a.holdout).sum())
    rows_of = np.arange(len(items))   # the item behind each row of F
    if a.draws:   # the train rows become `draws` training crops of each train image (refit's own features)
        ti = np.flatnonzero((items.split == "train").to_numpy())
        min_scale, run_seed = training_crop(art)
        parts, crop_seeds = [], a.crop_seed or [run_seed]
        for seed in crop_seeds:   # each seed's draws, one after the other
            key = f"crops{a.draws}" if seed == run_seed else f"crops{a.draws}_seed{seed}"
            if key not in cached:
                t0 = time.time()
                cached[key] = crops(pred, [paths[i] for i in ti], a.draws, min_scale, seed)
                print(f"crops: {a.draws} of {len(ti)} train images (seed {seed}) in {time.time() - t0:.0f} s", file=sys.stderr)
                if a.features:
                    np.savez(a.features, **cached)
            parts.append(cached[key])
        rest = np.setdiff1d(rows_of, ti)
        F, rows_of = stack_crops(np.concatenate(parts), ti, F[rest], rest)
    items = items.iloc[rows_of].reset_index(drop=True)
    y = items.label.map({c: i for i, c in enumerate(art.classes)}).to_numpy()
    src = items.source.astype(str).to_numpy()
    seen = ~items.source.isin(a.holdout).to_numpy()
    tr, va, te = ((items.split == s).to_numpy() for s in ("train", "valid", "test"))
    tr, va = tr & seen, va & seen
    if a.holdout:
        print(f"held out of the re-fit and the choice: {', '.join(a.holdout)} ({n_held} images; its test images are scored)")
    with torch.inference_mode():
        p0 = torch.softmax(model.head(torch.from_numpy(F)), dim=1).numpy()

    base = valid_row(y, p0, art.classes, src, va)
    print(f"trained head: valid worst source {base['worst_source']} {base['worst_balanced_accuracy']:.3f}, "
          f"pooled valid accuracy {base['pooled_accuracy']:.3f}")
    def show(row):
        print(f"  {row['balance']:17s} alpha {row['alpha']:<4} C {row['C']:<6} valid worst {row['worst_source']} "
              f"{row['worst_balanced_accuracy']:.3f}  pooled {row['pooled_accuracy']:.3f}"
              f"{'' if row['allowed'] else '  (drops more than --max-drop)'}", flush=True)

    te_roots = root_rows(items.path.astype(str), roots, te)

    def on_fit(row, proba):
        row["test"] = test_row(y, proba, art.classes, src, te_roots, te)

    rows, best = fit_grid(F, y, src, items[tr], tr, va, art.classes, base, balances=() if a.no_grid else BALANCES,
                          max_drop=a.max_drop, progress=show, on_fit=on_fit if a.frontier else None)
    if a.frontier and rows:
        show_frontier([{"balance": "trained head", "alpha": "-", "C": "-", **base,
                        "test": test_row(y, p0, art.classes, src, te_roots, te)}] + rows)
    if best is not None:
        best = (best[0], best[1].predict_proba(best[2].transform(F)))
    result = {"artifact": str(a.artifact), "data": [str(r) for r in roots], "draws": a.draws,
              "crop_seeds": crop_seeds if a.draws else [], "valid_trained_head": base, "grid": rows}
    heads = [("trained head", p0)]
    if best is None and rows:
        print("no re-fitted head keeps pooled valid accuracy within --max-drop")
    elif best is not None:
        result["chosen"] = best[0]
        heads.append((f"re-fitted head ({best[0]['balance']}, alpha {best[0]['alpha']}, C {best[0]['C']})", best[1]))
        print(f"chosen on validation: {heads[-1][0]}")
    for name, row in [("trained head", base)] + ([("chosen head", best[0])] if best else []):
        print(f"valid by source, {name}: " + ", ".join(f"{s} {v:.3f}" for s, v in row["balanced_accuracy_by_source"].items()))
    result["test"] = {}
    for name, p in heads:
        result["test"][name] = test_by_root(name, y, p, art.classes, src, te_roots)
    if "PNEUMONIA" in art.classes:
        k = art.classes.index("PNEUMONIA")
        result["oracle"] = {}
        print("oracle threshold on P(PNEUMONIA), trained head, test (PNEUMONIA or not; chosen on the scored images):")
        for so in np.unique(src[te]):
            m = te & (src == so)
            is_pos = y[m] == k
            if is_pos.all() or not is_pos.any():
                continue
            acc, t = oracle_threshold(p0[m, k], is_pos)
            argmax_acc = float(np.mean((p0[m].argmax(1) == k) == is_pos))
            result["oracle"][str(so)] = {"n": int(m.sum()), "argmax_accuracy": argmax_acc, "oracle_accuracy": acc, "threshold": t}
            print(f"  {so} (n={m.sum()}): argmax {argmax_acc:.3f}, best threshold {acc:.3f} (at {t:.3f})")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
