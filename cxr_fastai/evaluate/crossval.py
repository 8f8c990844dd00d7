"""Leave-one-source-out cross-validation: how a model does on a hospital (source) it never saw.

For every source with at least two classes (every source with `all_sources`), a model is trained on all
the OTHER sources (`TrainConfig.exclude_sources`) and evaluated on the held-out source's images (every
split by default: none of them was seen in training or used to pick the best epoch). One more "pooled"
fold trains on everything and is evaluated on the pooled test split: the in-distribution figure that the
held-out ones are compared with.

`--by group --folds K` is patient-grouped K-fold instead (on one source with `source`, or on all the
images): every image lands in one of K folds, a patient's (and a duplicate group's) images in the same
one, class mix stratified (`data.discover.group_folds`); fold k's model trains on the others' train/valid
images (`TrainConfig.group_folds` / `holdout_fold`) and is scored on fold k's images. No pooled fold:
every fold is in distribution.

Layout of the output folder (resumable: a rerun with the same config skips the folds that are done):
  crossval-config.json          what the series was started with; a rerun must match it (or --force)
  folds/NAME/run/               the fold's training run (resumed when interrupted)
  folds/NAME/model/             its exported artifact
  folds/NAME/result.json        its metrics: once this exists, the fold is done
  crossval.json / .md / .png    the summary, written by `write_crossval`
A call may compute only some folds (`only`: e.g. one fold per machine, the same --out on shared disk, or
one fold per session); the others are reported as pending until a call computes them.

`crossval` only trains, evaluates and keeps the per-fold state; it prints nothing (progress goes to `log`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..config import CrossvalConfig, PredictConfig, TrainConfig, write_json
from ..errors import ArtifactError, CxrError, DataError, RunError
from ..train.runs import fmt_seconds

Log = Callable[[str], None]

CONFIG_FILE = "crossval-config.json"
RESULT_FILE = "result.json"
OUTPUTS = ("crossval.json", "crossval.md", "crossval.png")
POOLED = "pooled"
SPLIT_CHOICES = ("all", "test", "valid")
BY_CHOICES = ("source", "group")
# TrainConfig fields that say how a fold is computed, not what: a resumed series may differ in them
_EXECUTION_FIELDS = ("run", "workers", "cache_dir", "device", "compile")
# TrainConfig fields crossval sets per fold
_FOLD_FIELDS = ("data", "run", "exclude_sources", "group_folds", "holdout_fold")


def _noop(msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ results

@dataclass
class FoldResult:
    name: str                       # folder name under folds/
    kind: str                       # "source" (one source held out) | "group" (a patient-grouped fold held out)
                                    # | "pooled" (trained on everything)
    held_out: str | None            # the held-out source, or "fold k of K" (None for the pooled fold)
    status: str                     # "done" | "skipped" | "pending" (not computed yet: another call's `only`)
    reason: str = ""                # why it was skipped, or notes on a done fold (labels left out...)
    split: str = ""                 # the evaluated split(s)
    n: int = 0                      # images evaluated
    classes: list[str] = field(default_factory=list)   # the fold model's classes
    accuracy: float | None = None
    accuracy_ci95: list[float] | None = None
    balanced_accuracy: float | None = None
    balanced_accuracy_ci95: list[float] | None = None
    sensitivity: dict[str, dict[str, Any]] = field(default_factory=dict)   # class -> {value, ci95, support}
    left_out: dict[str, int] = field(default_factory=dict)   # held-out labels the model lacks -> images not scored
    unreadable: int = 0
    seen_in_training: int | None = None
    n_train: int = 0
    n_valid: int = 0
    best_epoch: int | None = None
    run: str = ""
    artifact: str = ""
    seconds: float = 0.0            # wall time of this fold (train + export + evaluate) when it was computed
    metrics: dict[str, Any] | None = None   # the full metrics (confusion matrix, per-class rates, per source...)

    def to_dict(self, full: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not full:
            d.pop("metrics")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FoldResult":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CrossvalResult:
    out: Path
    config: dict[str, Any]
    folds: list[FoldResult]         # held-out source folds in source order (or group folds), then the pooled fold
    seconds: float = 0.0

    @property
    def source_folds(self) -> list[FoldResult]:
        """The held-out folds: one per source, or one per patient-grouped fold."""
        return [f for f in self.folds if f.kind != "pooled"]

    @property
    def pooled(self) -> FoldResult | None:
        return next((f for f in self.folds if f.kind == "pooled"), None)

    @property
    def done(self) -> list[FoldResult]:
        return [f for f in self.folds if f.status == "done"]

    @property
    def skipped(self) -> list[FoldResult]:
        return [f for f in self.folds if f.status == "skipped"]

    @property
    def pending(self) -> list[FoldResult]:
        return [f for f in self.folds if f.status == "pending"]

    def summary(self) -> dict[str, Any]:
        bas = [f.balanced_accuracy for f in self.source_folds if f.status == "done" and f.balanced_accuracy is not None]
        pooled = self.pooled
        pooled_ba = pooled.balanced_accuracy if pooled is not None and pooled.status == "done" else None
        mean = float(np.mean(bas)) if bas else None
        out = {
            "held_out_folds_done": len(bas),
            "held_out_balanced_accuracy_mean": mean,
            "held_out_balanced_accuracy_min": float(min(bas)) if bas else None,
            "held_out_balanced_accuracy_max": float(max(bas)) if bas else None,
            "pooled_balanced_accuracy": pooled_ba,
            "gap_pooled_minus_mean_held_out": (pooled_ba - mean) if pooled_ba is not None and mean is not None else None,
        }
        if self.config.get("crossval", {}).get("by") == "group":
            out["out_of_fold"] = self.out_of_fold()
        return out

    def out_of_fold(self) -> dict[str, Any] | None:
        """K-fold's pooled figure: every done fold's confusion matrix summed (each image scored once, by the model
        that never saw its patient); None until every fold is done or when the folds' classes differ."""
        folds = self.source_folds
        if not folds or any(f.status != "done" or not f.metrics for f in folds) or len({tuple(f.classes) for f in folds}) > 1:
            return None
        from ..metrics import confusion_rates

        cm = np.sum([np.asarray(f.metrics["confusion_matrix"]) for f in folds], axis=0)
        r = confusion_rates(cm)
        return {"n": int(cm.sum()), "accuracy": r["accuracy"], "balanced_accuracy": r["balanced_accuracy"],
                "sensitivity": dict(zip(folds[0].classes, r["sensitivity"])), "confusion_matrix": cm.tolist()}

    def to_dict(self) -> dict[str, Any]:
        folds = []
        for f in self.folds:
            d = f.to_dict(full=False)
            d["result"] = str(self.out / "folds" / f.name / RESULT_FILE) if f.status == "done" else None
            folds.append(d)
        return {"out": str(self.out), "config": self.config, "summary": self.summary(), "folds": folds,
                "seconds": self.seconds}


# --------------------------------------------------------------------------------------------- plan

@dataclass
class _Fold:
    name: str
    kind: str
    held_out: str | None
    exclude: tuple[str, ...]        # sources left out of this fold's training
    eval_items: pd.DataFrame        # the images it is evaluated on
    split: str                      # what eval_items are, for the report
    n_fit: int                      # train + valid images of its training (for the ETA)
    skip: str = ""                  # a reason known before training
    train_kw: dict[str, Any] = field(default_factory=dict)   # more TrainConfig fields of this fold's training


def fold_name(source: str, taken: set[str]) -> str:
    """A folder name for a held-out source: `holdout-` + its name with unsafe characters replaced, made unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("._-") or "source"
    name = f"holdout-{safe[:60]}"
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def plan_folds(items: pd.DataFrame, cfg: CrossvalConfig, always_excluded: Sequence[str] = (),
               where: str = "the data", seed: int = 0) -> list[_Fold]:
    """The folds of a series over `items` (discover's columns): raises DataError when there is nothing to hold out."""
    if cfg.by not in BY_CHOICES:
        raise CxrError(f"crossval --by {cfg.by}: give one of {', '.join(BY_CHOICES)}")
    if cfg.split not in SPLIT_CHOICES:
        raise CxrError(f"crossval --split {cfg.split!r}: give one of {', '.join(SPLIT_CHOICES)}")
    if cfg.by == "group":
        return plan_group_folds(items, cfg, always_excluded, where, seed)
    if cfg.source:
        raise CxrError("crossval --source picks the one source of --by group; leave-one-source-out uses them all "
                       "(leave sources out of every fold with --exclude-source)")
    items = items[~items.source.isin(always_excluded)]
    sources = sorted(set(items.source) - {""})
    if len(sources) < 2:
        have = f"only source {sources[0]!r}" if sources else "no source names"
        raise DataError(f"{where}: leave-one-source-out needs images from at least 2 sources, found {have}; give "
                        "several dataset roots (an image's source is its root's folder name) or a labels.csv "
                        "`source` column with 2 or more values")
    taken: set[str] = {POOLED}
    folds: list[_Fold] = []
    for src in sources:
        mine = items[items.source == src]
        rest = items[items.source != src]
        ev = mine if cfg.split == "all" else mine[mine.split == cfg.split]
        labels = sorted(set(mine.label))
        train_labels = sorted(set(rest.label[rest.split == "train"]))
        skip = ""
        if len(labels) < 2 and not cfg.all_sources:
            skip = (f"source {src!r} has one class ({labels[0]}): its balanced accuracy would be one sensitivity; "
                    "pass --all-sources to hold it out all the same")
        elif len(train_labels) < 2:
            skip = (f"the other sources have training images of {len(train_labels)} class"
                    f"{'' if len(train_labels) == 1 else 'es'} ({', '.join(train_labels) or 'none'}); a model needs 2")
        elif len(ev) == 0:
            have = ", ".join(sorted(set(mine.split)))
            skip = f"source {src!r} has no {cfg.split} images (its splits: {have}); try --split all"
        elif not set(ev.label) & set(train_labels):
            skip = (f"none of source {src!r}'s labels ({', '.join(sorted(set(ev.label)))}) is a class of the model "
                    f"trained on the other sources ({', '.join(train_labels)})")
        n_fit = int(rest.split.isin(("train", "valid")).sum())
        folds.append(_Fold(fold_name(src, taken), "source", src, tuple(always_excluded) + (src,),
                           ev.reset_index(drop=True), cfg.split, n_fit, skip))
    if cfg.pooled:
        psplit = "test" if cfg.split == "all" else cfg.split
        ev = items[items.split == psplit]
        skip = "" if len(ev) else (f"no pooled {psplit} images (splits: {', '.join(sorted(set(items.split)))}); "
                                   "the pooled figure needs a test split (or --split valid)")
        folds.append(_Fold(POOLED, "pooled", None, tuple(always_excluded), ev.reset_index(drop=True), psplit,
                           int(items.split.isin(("train", "valid")).sum()), skip))
    if not any(f.kind == "source" and not f.skip for f in folds):
        reasons = "; ".join(f.skip for f in folds if f.kind == "source")
        raise DataError(f"{where}: no source can be held out: {reasons}")
    return folds


def plan_group_folds(items: pd.DataFrame, cfg: CrossvalConfig, always_excluded: Sequence[str] = (),
                     where: str = "the data", seed: int = 0) -> list[_Fold]:
    """Patient-grouped K-fold over the images left after `always_excluded` (and, with cfg.source, of that source
    only): fold k's training leaves fold k out (`TrainConfig.holdout_fold`), its figures are on fold k's images."""
    from ..data.discover import item_folds

    if cfg.folds < 2:
        raise CxrError(f"crossval --folds {cfg.folds}: give 2 or more")
    exclude = tuple(always_excluded)
    if cfg.source:
        have = set(items.source[~items.source.isin(exclude)]) - {""}
        if cfg.source not in have:
            raise DataError(f"{where}: no images from source {cfg.source!r} (sources: {', '.join(sorted(have)) or 'none'})")
        exclude += tuple(sorted(have - {cfg.source}))
    # exactly the images a fold's training starts from (train.fit.prepare_run), so both number the folds alike
    items = items[~items.source.isin(exclude)].reset_index(drop=True)
    fold = item_folds(items, cfg.folds, seed)
    folds = []
    for k in range(cfg.folds):
        mine, rest = items[fold == k], items[fold != k]
        ev = mine if cfg.split == "all" else mine[mine.split == cfg.split]
        train_labels = sorted(set(rest.label[rest.split == "train"]))
        skip = ""
        if len(train_labels) < 2:
            skip = f"the other folds have training images of {len(train_labels)} class(es); a model needs 2"
        elif not (rest.split == "valid").any():
            skip = "the other folds have no valid images to choose the epoch on"
        elif len(ev) == 0:
            skip = f"fold {k + 1} has no {cfg.split} images; try --split all"
        folds.append(_Fold(f"fold-{k + 1}-of-{cfg.folds}", "group", f"fold {k + 1} of {cfg.folds}", exclude,
                           ev.reset_index(drop=True), cfg.split, int(rest.split.isin(("train", "valid")).sum()), skip,
                           {"group_folds": cfg.folds, "holdout_fold": k}))
    if all(f.skip for f in folds):
        raise DataError(f"{where}: no fold can be held out: {folds[0].skip}")
    return folds


# ---------------------------------------------------------------------------------------------- run

def series_config(tcfg: TrainConfig, cfg: CrossvalConfig, roots: Sequence[Path]) -> dict[str, Any]:
    """What a series is defined by (and a resumed one must match)."""
    train = {k: v for k, v in tcfg.to_dict().items()
             if k not in _EXECUTION_FIELDS and k not in ("data", "group_folds", "holdout_fold")}
    cv = dataclasses.asdict(cfg)
    # only the fields of this kind of series (older leave-one-source-out series files hold no k-fold fields)
    for k in (("folds", "source") if cfg.by == "source" else ("pooled", "all_sources")):
        cv.pop(k)
    config = {"data": [str(r) for r in roots], "crossval": cv, "train": train}
    return json.loads(json.dumps(config))   # as it reads back from the file (tuples become lists)


def _check_out(out: Path, config: dict[str, Any], force: bool, log: Log) -> None:
    cfile = out / CONFIG_FILE
    if out.exists() and not out.is_dir():
        raise CxrError(f"{out}: exists and is a file; give a folder for --out")
    if force:
        for name in ("folds", CONFIG_FILE, *OUTPUTS):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return
    if cfile.is_file():
        try:
            old = json.loads(cfile.read_text())
        except ValueError as e:
            raise RunError(f"{cfile}: damaged ({e}); pass --force to start the series again") from e
        old = _with_later_defaults(old, config)
        if old != config:
            diff = _first_difference(old, config)
            raise RunError(f"{out}: holds a crossval series with another config ({diff}); rerun with the same "
                           "options to resume it, pass --force to start again, or give another --out")
        log(f"resuming the crossval series in {out}")
    elif (out / "folds").exists():
        raise RunError(f"{out}: has a folds/ folder but no {CONFIG_FILE}; pass --force to start again or give "
                       "another --out")


def _with_later_defaults(old: Any, config: dict[str, Any]) -> Any:
    """A series file written before an option existed lacks its field; the option's default is what that
    version did, so the field is read as its default (a series is not refused for being older)."""
    if not isinstance(old, dict):
        return old
    later = {"train": series_config(TrainConfig(), CrossvalConfig(), ())["train"],
             "crossval": json.loads(json.dumps(dataclasses.asdict(CrossvalConfig())))}
    out = dict(old)
    for part, defaults in later.items():
        if isinstance(old.get(part), dict) and isinstance(config.get(part), dict):
            missing = {k: defaults[k] for k in config[part] if k not in old[part] and k in defaults}
            out[part] = {**old[part], **missing}
    return out


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else k)
    return f"{path or 'config'}: was {json.dumps(old)}, now {json.dumps(new)}"


def crossval(tcfg: TrainConfig, out: str | Path, cfg: CrossvalConfig = CrossvalConfig(), *,
             pcfg: PredictConfig = PredictConfig(), force: bool = False, progress: bool = False,
             only: Sequence[str] = (), log: Log = _noop, warn: Log = _noop) -> CrossvalResult:
    """Run (or resume) a leave-one-source-out series over `tcfg.data`; `tcfg` is the recipe of every fold
    (its `run` is ignored; `exclude_sources` are left out of every fold). Per-fold state goes under `out`.
    `only`: compute just these folds (their folder names, or held-out source names); the others not done
    yet are reported as pending. Which folds a call computes is not part of the series config."""
    from ..data.discover import discover

    t0 = time.perf_counter()
    out = Path(out)
    if not tcfg.data:
        raise DataError("no dataset root given; give two or more roots, or one whose labels.csv has a source column")
    ds = discover(tcfg.data, tcfg.valid_pct, tcfg.seed)
    unknown = sorted(set(tcfg.exclude_sources) - set(ds.items.source))
    if unknown:
        raise DataError(f"{ds.where}: no images from source {unknown[0]!r} to exclude")
    folds = plan_folds(ds.items, cfg, tcfg.exclude_sources, ds.where, tcfg.seed)
    by_name = {**{f.held_out: f.name for f in folds if f.held_out}, **{f.name: f.name for f in folds},
               **{str(f.train_kw["holdout_fold"] + 1): f.name for f in folds if f.kind == "group"}}
    unknown = [o for o in only if o not in by_name]
    if unknown:
        raise CxrError(f"crossval --fold {unknown[0]!r}: not a fold of this series (folds: "
                       f"{', '.join(f.name for f in folds)}; a held-out source's name, or a group fold's "
                       "number, works too)")
    only = tuple(dict.fromkeys(by_name[o] for o in only))
    blank = int((ds.items.source == "").sum())
    if blank:
        warn(f"{blank} image(s) have no source: they are in every fold's training and never held out")
    config = series_config(tcfg, cfg, ds.roots)
    _check_out(out, config, force, log)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, config)
    roots = tuple(str(r) for r in ds.roots)

    def to_compute(f: _Fold) -> bool:   # this call trains or scores it
        return not f.skip and not (out / "folds" / f.name / RESULT_FILE).is_file() and (not only or f.name in only)

    todo = [f for f in folds if to_compute(f)]
    log(f"crossval: {len(folds)} fold(s) over {len(roots)} root(s): "
        + ", ".join(f.name for f in folds) + f"; {len(todo)} to compute")
    results: list[FoldResult] = []
    spent, fitted = 0.0, 0
    for i, f in enumerate(folds, 1):
        fdir = out / "folds" / f.name
        rfile = fdir / RESULT_FILE
        if f.skip:
            log(f"[{i}/{len(folds)}] {f.name}: skipped: {f.skip}")
            results.append(FoldResult(f.name, f.kind, f.held_out, "skipped", f.skip, split=f.split))
            continue
        if rfile.is_file():
            try:
                res = FoldResult.from_dict(json.loads(rfile.read_text()))
                log(f"[{i}/{len(folds)}] {f.name}: done earlier (balanced accuracy {_fmt(res.balanced_accuracy)})")
                results.append(res)
                continue
            except (ValueError, TypeError) as e:
                warn(f"{rfile}: damaged ({e}); computing the fold again")
        if only and f.name not in only:
            log(f"[{i}/{len(folds)}] {f.name}: pending (not among --fold {', '.join(only)})")
            results.append(FoldResult(f.name, f.kind, f.held_out, "pending",
                                      "not computed yet: rerun without --fold, or with --fold " + f.name, split=f.split))
            continue
        what = f"hold out {f.held_out!r}" if f.kind != "pooled" else "train on every source"
        log(f"[{i}/{len(folds)}] {f.name}: start ({what}; {f.n_fit} train+valid images, {len(f.eval_items)} to evaluate)")
        t_fold = time.perf_counter()
        fcfg = tcfg.replace(data=roots, run=str(fdir / "run"), exclude_sources=f.exclude, **f.train_kw)
        try:
            res = _run_fold(f, fcfg, fdir, cfg, pcfg, progress=progress, log=log, warn=warn)
        except DataError as e:   # e.g. the other sources lack a class that training needs: report, go on
            res = FoldResult(f.name, f.kind, f.held_out, "skipped", f"training failed: {e}", split=f.split)
            warn(f"{f.name}: skipped: {e}")
        res.seconds = time.perf_counter() - t_fold
        if res.status == "done":
            write_json(rfile, res.to_dict())
            spent += res.seconds
            fitted += f.n_fit
        results.append(res)
        msg = (f"[{i}/{len(folds)}] {f.name}: end in {res.seconds:.0f} s"
               + (f": {res.n} images, accuracy {_fmt(res.accuracy)}, balanced accuracy {_fmt(res.balanced_accuracy)}"
                  if res.status == "done" else " (skipped)"))
        left = [g for g in folds[i:] if to_compute(g)]
        if left and fitted:
            eta = spent / fitted * sum(g.n_fit for g in left)
            msg += f"; about {fmt_seconds(eta)} left for {len(left)} more fold(s)"
        log(msg)
    return CrossvalResult(out, config, results, time.perf_counter() - t0)


def _run_fold(f: _Fold, fcfg: TrainConfig, fdir: Path, cfg: CrossvalConfig, pcfg: PredictConfig, *,
              progress: bool, log: Log, warn: Log) -> FoldResult:
    from ..artifact.export import export_run, read_manifest
    from ..train.fit import train
    from ..train.runs import load_run

    run, model = fdir / "run", fdir / "model"
    state = _run_state(run)
    if state == "finished":
        log(f"{f.name}: training finished earlier; exporting and evaluating")
    elif state == "resume":
        log(f"{f.name}: resuming the interrupted training in {run}")
        train(fcfg, resume=True, progress=progress, log=log, warn=warn)
    else:
        if state == "restart":
            warn(f"{run}: no checkpoint to resume from (stopped before its first epoch, or damaged); training the fold "
                 "from the start")
        train(fcfg, force=True, progress=progress, log=log, warn=warn)
    info = load_run(run)
    try:
        if state != "finished":   # a model from before this training is stale
            raise ArtifactError("stale")
        read_manifest(model)
    except CxrError:
        export_run(run, model, force=True)
    best = info.meta.get("best", {}) or {}
    counts = info.meta.get("counts", {})
    res = evaluate_fold(model, f, cfg, pcfg, warn=warn)
    res.run, res.artifact = str(run), str(model)
    res.n_train = int(sum(counts.get("train", {}).values()))
    res.n_valid = int(sum(counts.get("valid", {}).values()))
    res.best_epoch = int(best["epoch"]) if "epoch" in best else None
    return res


def _run_state(run: Path) -> str:
    """new | finished | resume | restart (a folder train cannot resume: no checkpoint, damaged files)."""
    from ..train.runs import load_run

    if not run.is_dir() or not any(run.iterdir()):
        return "new"
    try:
        info = load_run(run, need_best=False)
    except RunError:
        return "restart"
    if info.meta.get("finished") and info.best_path.is_file() and (run / "learner.pkl").is_file():
        return "finished"
    if info.last_path.is_file():
        return "resume"
    return "restart"


def evaluate_fold(artifact: Path, f: _Fold, cfg: CrossvalConfig, pcfg: PredictConfig,
                  warn: Log = _noop) -> FoldResult:
    """Metrics of the artifact on the fold's images; labels the model lacks are left out and counted."""
    from ..artifact.predict import iter_probs, load_predictor
    from .evaluate import seen_in_training
    from ..metrics import compute_metrics

    pred = load_predictor(artifact, pcfg)
    classes = list(pred.classes)
    items = f.eval_items
    lacking = items[~items.label.isin(classes)]
    left_out = {str(k): int(v) for k, v in lacking.label.value_counts().sort_index().items()}
    notes = []
    if left_out:
        notes.append(f"left out {sum(left_out.values())} image(s) of label(s) the model was not trained on: "
                     + ", ".join(f"{k} ({v})" for k, v in left_out.items()))
        warn(f"{f.name}: {notes[-1]}")
    items = items[items.label.isin(classes)].reset_index(drop=True)
    if len(items) == 0:
        return FoldResult(f.name, f.kind, f.held_out, "skipped", "; ".join(notes) or "no images to evaluate",
                          split=f.split, classes=classes, left_out=left_out)
    index = {c: i for i, c in enumerate(classes)}
    y, probs, srcs, used, unreadable = [], [], [], [], 0
    paths = [Path(p) for p in items.path]
    for i, (p, pr, err) in enumerate(iter_probs(pred, paths, pcfg)):
        if pr is None:
            unreadable += 1
            continue
        y.append(index[items.label[i]])
        probs.append(pr)
        srcs.append(items.source[i] or "(no source)")
        used.append(str(p))
    if unreadable:
        notes.append(f"{unreadable} unreadable image(s) left out")
        warn(f"{f.name}: {notes[-1]}")
    if not y:
        return FoldResult(f.name, f.kind, f.held_out, "skipped", "; ".join(notes) or "no readable images",
                          split=f.split, classes=classes, left_out=left_out, unreadable=unreadable)
    per_source = srcs if f.kind != "source" and len(set(srcs)) > 1 else None
    m = compute_metrics(np.array(y), np.stack(probs), classes, sources=per_source, n_boot=cfg.n_boot,
                        seed=cfg.eval_seed)
    seen = seen_in_training(pred.art.manifest, used)
    if seen and f.kind != "pooled":
        notes.append(f"{seen} held-out image(s) have the same content as training images of other sources")
        warn(f"{f.name}: {notes[-1]}: the held-out figure is optimistic")
    sens = {c: {"value": m.per_class[c]["sensitivity"], "ci95": m.ci95.get(f"sensitivity/{c}"),
                "support": m.per_class[c]["support"]} for c in classes}
    return FoldResult(f.name, f.kind, f.held_out, "done", "; ".join(notes), split=f.split, n=m.n, classes=classes,
                      accuracy=m.accuracy, accuracy_ci95=m.ci95.get("accuracy"),
                      balanced_accuracy=m.balanced_accuracy, balanced_accuracy_ci95=m.ci95.get("balanced_accuracy"),
                      sensitivity=sens, left_out=left_out, unreadable=unreadable, seen_in_training=seen,
                      metrics=m.to_dict())


# ------------------------------------------------------------------------------------------ outputs

def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(x: float | None, ci: list[float] | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{x:.3f}"


def crossval_markdown(res: CrossvalResult) -> str:
    classes = sorted({c for f in res.folds for c in f.classes})
    head = ["Fold", "Held out", "Split", "n", "Accuracy [95% CI]", "Balanced accuracy [95% CI]",
            *[f"Sensitivity {c} [95% CI]" for c in classes], "Seconds"]
    cv = res.config["crossval"]
    group = cv.get("by") == "group"
    if group:
        on = f"source {cv['source']}" if cv.get("source") else "every image"
        intro = [f"# Patient-grouped {cv['folds']}-fold cross-validation", "",
                 f"Data: {', '.join(res.config['data'])} ({on}). Every image is in one of {cv['folds']} folds, a "
                 "patient's (and a duplicate group's) images in the same fold; each fold's model trains on the other "
                 "folds' train/valid images and is evaluated on its fold's images."]
    else:
        intro = ["# Leave-one-source-out cross-validation", "",
                 f"Data: {', '.join(res.config['data'])}. Each held-out fold trains on every other source and is "
                 "evaluated on the held-out source's images; the pooled fold trains on every source and is evaluated "
                 "on the pooled split shown."]
    intro[-1] += f" Intervals: 95% percentile bootstrap ({cv['n_boot']} resamples)."
    lines = intro + ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for f in res.folds:
        held = f.held_out if f.kind != "pooled" else "none (every source)"
        if f.status != "done":
            cells = [f.name, held, f.split, "", "not computed yet" if f.status == "pending" else "skipped", "",
                     *["" for _ in classes], ""]
        else:
            sens = [_ci(f.sensitivity[c]["value"], f.sensitivity[c]["ci95"]) if c in f.sensitivity else "n/a (not a class)"
                    for c in classes]
            cells = [f.name, held, f.split, str(f.n), _ci(f.accuracy, f.accuracy_ci95),
                     _ci(f.balanced_accuracy, f.balanced_accuracy_ci95), *sens, f"{f.seconds:.0f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    s = res.summary()
    lines += ["", f"Mean held-out balanced accuracy over {s['held_out_folds_done']} {'fold' if group else 'source'}(s): "
              f"{_fmt(s['held_out_balanced_accuracy_mean'])} (range {_fmt(s['held_out_balanced_accuracy_min'])} to "
              f"{_fmt(s['held_out_balanced_accuracy_max'])})"]
    if group:
        oof = s.get("out_of_fold")
        lines[-1] += ("; out of fold (every image scored once, every fold's confusion matrix summed): "
                      + (f"n {oof['n']}, accuracy {oof['accuracy']:.3f}, balanced accuracy "
                         f"{oof['balanced_accuracy']:.3f}." if oof else "when every fold is done."))
    else:
        lines[-1] += f"; pooled: {_fmt(s['pooled_balanced_accuracy'])}."
    notes = [(f.name, f.reason) for f in res.folds if f.reason]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {reason}" for name, reason in notes]
    lines += ["", "Runs and models: `folds/NAME/run`, `folds/NAME/model`; full metrics: `folds/NAME/result.json`.", ""]
    return "\n".join(lines)


def crossval_figure(res: CrossvalResult):
    """Per held-out source balanced accuracy with 95% whiskers, the pooled figure as a line."""
    from matplotlib.figure import Figure

    cv = res.config["crossval"]
    group = cv.get("by") == "group"
    done = [f for f in res.source_folds if f.status == "done" and f.balanced_accuracy is not None]
    fig = Figure(figsize=(max(6.0, 1.1 * len(done) + 3), 4.4), dpi=100)
    ax = fig.add_subplot()
    x = np.arange(len(done))
    ba = np.array([f.balanced_accuracy for f in done], dtype=float)
    lo = np.array([f.balanced_accuracy - f.balanced_accuracy_ci95[0] if f.balanced_accuracy_ci95 else 0.0 for f in done])
    hi = np.array([f.balanced_accuracy_ci95[1] - f.balanced_accuracy if f.balanced_accuracy_ci95 else 0.0 for f in done])
    if len(done):
        ax.errorbar(x, ba, yerr=np.vstack([lo, hi]), fmt="o", color="tab:blue", ecolor="tab:blue", capsize=5,
                    label=f"held-out {'fold' if group else 'source'} (95% CI)")
    pooled, oof = res.pooled, res.out_of_fold() if group else None
    if oof:
        ax.axhline(oof["balanced_accuracy"], color="tab:orange", ls="--",
                   label=f"out of fold, n={oof['n']} ({oof['balanced_accuracy']:.3f})")
    if pooled is not None and pooled.status == "done":
        ax.axhline(pooled.balanced_accuracy, color="tab:orange", ls="--",
                   label=f"pooled {pooled.split} ({pooled.balanced_accuracy:.3f})")
        if pooled.balanced_accuracy_ci95:
            ax.axhspan(*pooled.balanced_accuracy_ci95, color="tab:orange", alpha=0.15, lw=0)
    n_classes = max((len(f.classes) for f in res.done), default=0)
    if n_classes:
        ax.axhline(1 / n_classes, color="grey", ls=":", lw=1, label=f"chance ({1 / n_classes:.2f})")
    ax.set_xticks(x, [f"{f.held_out}\n(n={f.n})" for f in done])
    ax.set_xlim(-0.6, max(len(done) - 0.4, 0.6))
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("balanced accuracy")
    ax.set_title((f"Patient-grouped {cv['folds']}-fold: balanced accuracy on the held-out fold" if group else
                  "Leave-one-source-out: balanced accuracy on the held-out source")
                 + (f"\n({len(res.pending)} fold(s) not computed yet)" if res.pending else ""), fontsize=10)
    if not done:
        ax.text(0.5, 0.5, "no held-out fold finished yet", ha="center", va="center", transform=ax.transAxes)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_crossval(res: CrossvalResult, out: str | Path | None = None) -> dict[str, Path]:
    """crossval.json, crossval.md and crossval.png in `out` (default: the series folder), each atomically."""
    from ..io.files import atomic_save_path, atomic_write_text

    out = Path(out) if out is not None else res.out
    files = {name: out / name for name in OUTPUTS}
    write_json(files["crossval.json"], res.to_dict())
    atomic_write_text(files["crossval.md"], crossval_markdown(res))
    fig = crossval_figure(res)
    with atomic_save_path(files["crossval.png"]) as tmp:
        fig.savefig(tmp, format="png")
    return files


# ------------------------------------------------------------------------------- option pass-through

def parse_train_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`FIELD=VALUE` strings -> TrainConfig keyword arguments, each VALUE read as its field's type
    (booleans: true/false, tuples: comma-separated). data, run and exclude_sources have options of their own."""
    defaults = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CxrError(f"--set {pair!r}: give FIELD=VALUE (e.g. widths=32,64,128,256)")
        if key not in fields:
            raise CxrError(f"--set {pair!r}: {key!r} is not a training option (known: {', '.join(sorted(fields))})")
        if key in _FOLD_FIELDS:
            raise CxrError(f"--set {pair!r}: {key} is set by crossval itself (use DATA arguments, --exclude-source, "
                           "--by group --folds K)")
        default = getattr(defaults, key)
        try:
            out[key] = _coerce(raw.strip(), default)
        except ValueError:
            raise CxrError(f"--set {pair!r}: {raw!r} is not a valid {type(default).__name__} "
                           f"(default {default!r})") from None
    return out


def _coerce(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, tuple):
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        kind = type(default[0]) if default else str
        return tuple(kind(p) for p in parts)
    return raw
