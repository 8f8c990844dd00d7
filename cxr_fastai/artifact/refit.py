"""Refit only a model's last layer on balanced data, chosen on the worst validation source, into a new artifact.

Deep feature reweighting (Kirichenko, Izmailov & Wilson, "Last layer re-training is sufficient for
robustness to spurious correlations", ICLR 2023): a network trained on shortcut-laden data often already
holds the features a robust classifier needs, and fitting its last linear layer again on data where the
shortcut no longer pays (every class-and-source stratum weighted alike) recovers much of the worst group's
accuracy. It costs one forward pass over the data instead of a training.

Here: the pooled features the head reads, for every train and valid image of the labelled roots, each image
read as `predict` reads it; a multinomial logistic regression on the standardised train features for every
weighting in a small grid (the training loader's own `--balance` weights raised to alpha, and L2 strength
C); the choice on validation only: the best worst-source balanced accuracy among the heads whose pooled
validation accuracy is within `max_drop` of the trained head's. Test images are never read. The chosen
regression, with its standardisation folded in, becomes the model's `head` (a Linear layer): every other
weight and statistic is kept, so the new artifact is an ordinary one (safetensors, ONNX, manifest with a
`refit` record of what was done and the validation figures it was chosen on).

Unlike the paper, which refits on data the network did not train on, the head is refitted on the train
split, usually the network's own training images, whose features, read whole as `predict` reads them, are
partly memorised. With `draws` the head is fitted instead on that many training crops of each train image,
cut as training cut them: the features the network met while it trained (measured on cxr3 test, they keep
the children's normal films that a head fitted on the whole images gives away, which the validation split
does not warn of; docs/generalisation.md). Valid images are always read as `predict` reads them.
Validation, which the network never trained on, is what chooses, and the test split is what tells.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import REFIT_DRAWS
from ..errors import DataError
from .export import (Artifact, check_derived_destination, parent_record, read_manifest, seen_counts_of,
                     write_derived_artifact)

BALANCES = ("class-source", "class-then-source")
ALPHAS = (0.25, 0.5, 0.75, 1.0)
CS = (0.001, 0.003, 0.01, 0.03)
METHOD = ("deep feature reweighting: the last linear layer refitted (multinomial logistic regression on "
          "standardised features, weighted by class-and-source strata) on the model's own features; every other "
          "weight and statistic kept")


@dataclass
class RefitResult:
    artifact: Artifact | None            # None when no head was allowed (nothing written)
    trained: dict                        # the trained head's validation figures (valid_row)
    chosen: dict | None                  # the chosen head's grid row, None when no head was allowed
    grid: list[dict] = field(default_factory=list)
    n_train: int = 0
    n_valid: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    held_out_by_model: list[str] = field(default_factory=list)   # of held_out, those the model's training left out
    valid_seen_in_training: int | None = None   # valid images that were training images of the model (same bytes)


def features(pred, paths: Sequence[str], bs: int = 256, workers: int = 4,
             progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """The head's input for every path, each image read by the Predictor's own steps (no TTA). Returns the
    (N, features) array (zeros for an unreadable image) and (index, error) of the unreadable ones."""
    import torch

    out = np.zeros((len(paths), pred.model.head.in_features), np.float32)

    def embed(batch, idx):
        with torch.inference_mode():
            out[idx] = pred.model.embed(pred.preprocess(batch)).cpu().numpy()

    return out, _in_batches(paths, pred.shrink, embed, bs, workers, progress)


def _in_batches(paths: Sequence[str], shrink, on_batch, bs: int, workers: int,
                progress: Callable[[int, int], None] | None) -> list[tuple[int, str]]:
    """Decode every path in order, each through `shrink`, and hand the readable ones to `on_batch(arrays,
    indices)` `bs` at a time (memory flat with the count). Returns (index, error) of the unreadable ones."""
    from ..io.images import decode_many

    batch, idx, bad = [], [], []
    for i, arr, err in decode_many(list(paths), workers=workers, fn=shrink):
        if arr is None:
            bad.append((i, err))
        else:
            batch.append(arr), idx.append(i)
        if len(batch) == bs:
            on_batch(batch, idx)
            batch, idx = [], []
        if progress and (i + 1) % (10 * bs) == 0:
            progress(i + 1, len(paths))
    if batch:
        on_batch(batch, idx)
    if progress:
        progress(len(paths), len(paths))
    return bad


def crop_features(pred, paths: Sequence[str], draws: int, min_scale: float, seed: int = 0, bs: int = 256,
                  workers: int = 4, progress: Callable[[int, int], None] | None = None
                  ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """The head's input for `draws` training crops of every path: each image read as `predict` reads it but
    squashed to the run's cache side, as the training cache holds it, then cut as training cuts it
    (RandomResizedCrop, smallest area `min_scale`, resized to the model's size) and normalised. A network's
    features of the very images it trained on, unaugmented, are partly memorised; these are the features it
    met while training. Streams in batches (memory flat with the count); the crops are fixed by `seed`.
    Returns the (draws, N, features) array (zeros for an unreadable image) and (index, error) of those."""
    import torch

    from ..data.augment import random_resized_crop
    from ..data.loaders import cache_form

    art = pred.art
    out = np.zeros((draws, len(paths), pred.model.head.in_features), np.float32)
    # every crop drawn up front: each image's crops depend on the seed and its place only, not on batching
    u = torch.rand((draws, len(paths), 4), generator=torch.Generator().manual_seed(int(seed)))

    def shrink(arr):
        return cache_form(arr, art.cache_side, art.contrast, art.crop_border)

    def embed(batch, idx):
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(batch))[:, None].to(pred.device).float().div_(255.0)
            for k in range(draws):
                xk = (random_resized_crop(x, art.size, min_scale, u[k, idx].to(pred.device)) - art.mean) / art.std
                out[k, idx] = pred.model.embed(xk).float().cpu().numpy()

    return out, _in_batches(paths, shrink, embed, bs, workers, progress)


def training_crop(art: Artifact) -> tuple[float, int]:
    """(smallest crop area, seed) of the run that trained `art`: what `crop_features` needs to cut as it did."""
    from ..config import TrainConfig

    t = art.manifest.get("training") or {}
    return float(t.get("min_scale", TrainConfig.min_scale)), int(t.get("seed", 0))


def stack_crops(crops: np.ndarray, crop_items: np.ndarray, rest: np.ndarray, rest_items: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """One feature matrix of the crops of some items ((draws, n, features), one draw after the other) and the
    plain features of others, and the item behind each of its rows (to index labels, sources and splits by)."""
    return (np.concatenate([crops.reshape(-1, crops.shape[-1]), rest]),
            np.r_[np.tile(crop_items, crops.shape[0]), rest_items])


def valid_row(y, p, classes, src, mask) -> dict:
    """The choice's figures on the `mask` rows: the worst source's balanced accuracy first, then the pooled ones."""
    from ..metrics import compute_metrics

    m = compute_metrics(y[mask], p[mask], classes, sources=list(src[mask]), n_boot=0)
    per = dict(sorted(((s, f["balanced_accuracy"]) for s, f in m.per_source.items()), key=lambda t: t[1]))
    # a source with one class in valid scores that class's recall alone: it would reward a head for calling
    # everything that class, so it only ranks when no source has two classes
    ys, ss = y[mask], np.asarray(src[mask])
    ranked = [s for s in per if len(set(ys[ss == s])) >= 2] or list(per)
    ws = ranked[0]   # worst first
    return {"worst_source": ws, "worst_balanced_accuracy": per[ws], "pooled_accuracy": m.accuracy,
            "pooled_balanced_accuracy": m.balanced_accuracy, "balanced_accuracy_by_source": per,
            "one_class_sources": sorted(set(per) - set(ranked))}


def fit_grid(F, y, src, train_items, tr, va, classes, base: dict, *, balances=BALANCES, alphas=ALPHAS, cs=CS,
             max_drop: float = 0.01, progress: Callable[[dict], None] | None = None,
             on_fit: Callable[[dict, np.ndarray], None] | None = None):
    """Every head of the grid fitted on the `tr` rows, scored on the `va` rows. Returns (rows, best), best =
    (row, fitted regression, scaler) of the highest worst-source balanced accuracy among the heads whose pooled
    validation accuracy is within `max_drop` of `base`'s (ties: the earlier head), or None. `on_fit(row, proba)`
    gets each head's probabilities for every row of `F` (a diagnostic's hook; the choice never sees it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from ..data.loaders import sampling_weights

    scaler = StandardScaler().fit(F[tr])
    Z = scaler.transform(F)
    rows, best = [], None
    for balance in balances:
        w_full = sampling_weights(train_items, balance)
        for alpha in alphas:
            w = w_full ** alpha
            w *= len(w) / w.sum()
            for C in cs:
                lr = LogisticRegression(C=C, max_iter=3000).fit(Z[tr], y[tr], sample_weight=w)
                proba = lr.predict_proba(Z)
                row = {"balance": balance, "alpha": alpha, "C": C, **valid_row(y, proba, classes, src, va)}
                row["allowed"] = row["pooled_accuracy"] >= base["pooled_accuracy"] - max_drop
                rows.append(row)
                if progress:
                    progress(row)
                if on_fit:
                    on_fit(row, proba)
                if row["allowed"] and (best is None or row["worst_balanced_accuracy"] > best[0]["worst_balanced_accuracy"]):
                    best = (row, lr, scaler)
    return rows, best


def linear_head(lr, scaler, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (classes, features), bias (classes,)) of a Linear layer whose softmax is `lr.predict_proba` on
    `scaler`-standardised features: the standardisation folded into the weights."""
    coef, icpt = np.asarray(lr.coef_, np.float64), np.asarray(lr.intercept_, np.float64)
    if coef.shape[0] == 1 and n_classes == 2:   # sklearn's binary form: one logit for class 1 against class 0
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, icpt]
    if list(lr.classes_) != list(range(n_classes)):
        raise DataError(f"the refit saw classes {list(lr.classes_)} of {n_classes}: every class needs training images")
    W = coef / scaler.scale_[None, :]
    b = icpt - W @ scaler.mean_
    return np.ascontiguousarray(W, np.float32), np.ascontiguousarray(b, np.float32)


def refit_artifact(artifact: str | Path, data: Sequence[str | Path], to: str | Path, *,
                   balances: Sequence[str] | None = None, max_drop: float = 0.01, holdout: Sequence[str] = (),
                   bs: int = 256, workers: int = 4, device: str = "cpu", trust_pickle: bool = False,
                   force: bool = False, draws: int = REFIT_DRAWS, progress: Callable[[int, int], None] | None = None,
                   on_row: Callable[[dict], None] | None = None) -> RefitResult:
    """Write `to`: the artifact with its last layer refitted on the train images of the labelled roots `data`
    and chosen on their valid images (see the module's docstring), split as the model's training split them
    (its valid_pct and seed, for roots without a split of their own). Sources in `holdout`, and those the
    model's training left out (a crossval fold's), are kept out of both. A patient-grouped fold's model is
    refused. When no head keeps pooled validation accuracy within `max_drop`, nothing is written and the
    result's artifact is None. With `draws` > 0 the head is fitted on that many training crops of every train
    image (`crop_features`) instead of the images themselves; valid images are always read as `predict` reads them."""
    import torch

    from ..data.discover import discover
    from ..io.files import hash_files
    from .predict import Predictor

    if draws < 0:
        raise DataError(f"draws must be 0 (the whole train images) or more, got {draws}")
    art = read_manifest(artifact)
    dest = Path(to)
    check_derived_destination(art, dest, force, "refitted")
    balances = tuple(balances or BALANCES)
    for b in balances:
        if b not in BALANCES:
            raise DataError(f"unknown balance {b!r}; use one of {', '.join(BALANCES)}")
    tcfg = art.manifest.get("training") or {}
    if int(tcfg.get("group_folds") or 0):
        raise DataError("this model is a patient-grouped fold's (crossval --by group): its held-out patients are in "
                        "the train and valid splits, so a refit would fit on them; refit the pooled model instead")
    # the model's own held-out sources (a crossval fold's) never fit or choose; the split as training made it
    by_model = [s for s in tcfg.get("exclude_sources") or [] if s not in holdout]
    ds = discover(list(data), float(tcfg.get("valid_pct", 0.2)), int(tcfg.get("seed", 0)))
    items = ds.items[ds.items.split.isin(["train", "valid"])]
    unknown = sorted(set(items.label) - set(art.classes))
    if unknown:
        raise DataError(f"train/valid labels {', '.join(unknown)} are not among the model's classes "
                        f"({', '.join(art.classes)}): refit a model on data of its own classes")
    missing = sorted(set(holdout) - set(items.source))
    if missing:
        raise DataError(f"no train or valid images from source {missing[0]!r} "
                        f"(sources: {', '.join(sorted(set(items.source)))})")
    holdout = [*holdout, *by_model]
    items = items[~items.source.isin(holdout)].reset_index(drop=True)
    for split in ("train", "valid"):
        have = items[items.split == split]
        lacking = [c for c in art.classes if c not in set(have.label)]
        if lacking:
            raise DataError(f"the {split} split has no {lacking[0]} image{' outside the held-out sources' if holdout else ''}; "
                            f"refitting needs every class in train and in valid")

    pred = Predictor(art, device)
    paths = items.path.astype(str).tolist()
    min_scale, seed = training_crop(art)
    if draws:   # train rows: `draws` crops of each train image, then every valid image as predict reads it
        is_tr = (items.split == "train").to_numpy()
        ti, vi = np.flatnonzero(is_tr), np.flatnonzero(~is_tr)
        done = 0

        def step(d, n):
            if progress:
                progress(done + d, len(paths))

        Fc, bad_c = crop_features(pred, [paths[i] for i in ti], draws, min_scale, seed, bs, workers, step)
        done = len(ti)
        Fv, bad_v = features(pred, [paths[i] for i in vi], bs=bs, workers=workers, progress=step)
        bad = sorted([(int(ti[i]), e) for i, e in bad_c] + [(int(vi[i]), e) for i, e in bad_v])
        F, rows_of = stack_crops(Fc, ti, Fv, vi)
    else:
        F, bad = features(pred, paths, bs=bs, workers=workers, progress=progress)
        rows_of = np.arange(len(items))
    ok = np.ones(len(items), bool)
    ok[[i for i, _ in bad]] = False
    y_items = items.label.map({c: i for i, c in enumerate(art.classes)}).to_numpy()
    y, src = y_items[rows_of], items.source.astype(str).to_numpy()[rows_of]
    tr = (ok & (items.split == "train").to_numpy())[rows_of]
    va = (ok & (items.split == "valid").to_numpy())[rows_of]
    for name, mask in (("train", tr), ("valid", va)):
        if len(set(y[mask])) < len(art.classes):
            raise DataError(f"too few readable {name} images: every class needs one ({len(bad)} unreadable)")

    with torch.inference_mode():
        p0 = torch.softmax(pred.model.head(torch.from_numpy(F).to(pred.device)).float(), dim=1).cpu().numpy()
    base = valid_row(y, p0, art.classes, src, va)
    rows, best = fit_grid(F, y, src, items.iloc[rows_of[tr]], tr, va, art.classes, base, balances=balances,
                          max_drop=max_drop, progress=on_row)
    skipped = [(paths[i], e) for i, e in bad]
    hashes = [h for h, _ in hash_files(paths)]
    tr_items, va_items = np.unique(rows_of[tr]), rows_of[va]
    res = RefitResult(None, base, None if best is None else best[0], rows, len(tr_items), len(va_items), skipped,
                      list(holdout), by_model, seen_counts_of(art.manifest, [hashes[i] for i in va_items])[0])
    if best is None:
        return res
    row, lr, scaler = best
    W, b = linear_head(lr, scaler, len(art.classes))
    state = {k: v.detach().cpu().contiguous() for k, v in pred.model.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.from_numpy(W), torch.from_numpy(b)
    counts = items.iloc[tr_items].groupby(["source", "label"]).size()
    record = {"method": METHOD, "balance": row["balance"], "alpha": row["alpha"], "C": row["C"],
              "max_drop": max_drop, "held_out_sources": list(holdout), "grid_size": len(rows),
              "train_images": len(tr_items), "valid_images": len(va_items), "unreadable": len(bad),
              "train_features": (f"{draws} training crops per image (RandomResizedCrop, smallest area "
                                 f"{min_scale:g}, from the run's cache side)") if draws
                                else "each image as predict reads it",
              "train_counts": {f"{s}/{c}": int(n) for (s, c), n in counts.items()},
              "validation": {"trained_head": base, "refitted_head": {k: row[k] for k in (
                  "worst_source", "worst_balanced_accuracy", "pooled_accuracy", "pooled_balanced_accuracy",
                  "balanced_accuracy_by_source")}},
              "parent": parent_record(art),
              # content hashes of the images the head was fitted and chosen on: `evaluate` says when it scores them
              "images_sha256": sorted({hashes[i] for i in np.r_[tr_items, va_items]} - {None})}
    card = (f"Last layer refitted after training (cxr-fastai refit: {row['balance']} weights at alpha "
            f"{row['alpha']}, C {row['C']}), chosen on validation: worst source {row['worst_source']} balanced "
            f"accuracy {base['worst_balanced_accuracy']:.3f} -> {row['worst_balanced_accuracy']:.3f}, pooled "
            f"accuracy {base['pooled_accuracy']:.3f} -> {row['pooled_accuracy']:.3f}. The other validation "
            "figures in this manifest are the trained head's; evaluate this model on a test split.")
    manifest = write_derived_artifact(art, state, dest, "refit", record, card, trust_pickle)
    res.artifact = Artifact(dest, manifest)
    return res
