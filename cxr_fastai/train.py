"""make_learner(cfg, dls) and train(cfg): fastai Learner, one-cycle Adam, GradientClip, checkpoints.

A run folder holds everything needed to resume, interpret or export without the original command:
  config.json       the TrainConfig (data path included)
  run.json          class order, pixel stats, layout, counts, best epoch and its validation metrics
  items.csv         the train/valid images actually used (unreadable ones left out)
  skipped.csv       unreadable images: path,error
  history.csv       one row per epoch: losses, metrics, seconds
  checkpoints/      best.pth (weights of the best epoch), last.pth (weights + optimizer + epoch)
  learner.pkl       fastai `learn.export` of the best model, written when training finishes
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .audit import cheap_checks
from .config import TrainConfig, resolve_device, write_json
from .data import PixelStats, build_dls, check_items_exist, check_trainable, discover, scan
from .errors import DataError, RunError
from .fsutil import atomic_save_path, atomic_write_text
from .model import MIN_SIZE, ResNet9

BEST_METRIC = "balanced_accuracy_score"  # fastai's name for BalancedAccuracy()
Log = Callable[[str], None]


def _noop(msg: str) -> None:
    pass


@dataclass
class RunInfo:
    path: Path
    cfg: TrainConfig
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def stats(self) -> PixelStats:
        return PixelStats(**self.meta["stats"])

    @property
    def best_path(self) -> Path:
        return self.path / "checkpoints" / "best.pth"

    @property
    def last_path(self) -> Path:
        return self.path / "checkpoints" / "last.pth"

    def items(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "items.csv", dtype=str, keep_default_na=False)


def load_run(run: str | Path, need_best: bool = True) -> RunInfo:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder; train one with `cxr-fastai train DATA_DIR --run {run}`")
    for name in ("config.json", "run.json", "items.csv"):
        if not (run / name).is_file():
            raise RunError(f"{run}: not a cxr-fastai run folder ({name} is missing); "
                           "point to the --run folder that `cxr-fastai train` made")
    try:
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
        meta = json.loads((run / "run.json").read_text())
        meta["classes"], meta["stats"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{run}: config.json or run.json is damaged ({type(e).__name__}: {e}); retrain the run") from e
    info = RunInfo(run, cfg, meta)
    if need_best and not info.best_path.is_file():
        raise RunError(f"{run}: no checkpoint ({info.best_path} is missing); the run never finished an epoch — "
                       f"resume it with `cxr-fastai train --resume --run {run}` or train again")
    return info


# ---------------------------------------------------------------------------------------- callbacks

def _callbacks():
    """fastai Callback classes, built on first use so that importing this module stays light."""
    from fastai.callback.core import Callback

    class RunCheckpoint(Callback):
        """After each epoch: keep the best epoch's weights (by validation balanced accuracy), the last
        epoch's weights + optimizer state, and history.csv, each written atomically. Epochs that
        fastai's SkipToEpoch skips on --resume are ignored."""
        order = 61  # after Recorder, which fills recorder.values

        def __init__(self, info: RunInfo, start_epoch: int, best_score: float, best_epoch: int):
            self.info, self.start_epoch = info, start_epoch
            self.best_score, self.best_epoch = best_score, best_epoch
            self.history = _read_history(info.path / "history.csv", start_epoch)

        def after_epoch(self):
            import torch

            if self.epoch < self.start_epoch:
                return
            names = self.learn.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
            vals = {n: float(v) for n, v in zip(names, self.learn.recorder.values[-1])}
            score = vals.get(BEST_METRIC, float("nan"))
            model_sd = {k: v.detach().cpu().clone() for k, v in unwrap(self.learn.model).state_dict().items()}
            if not math.isnan(score) and score > self.best_score:
                self.best_score, self.best_epoch = score, self.epoch
                with atomic_save_path(self.info.best_path) as tmp:
                    torch.save(model_sd, tmp)
                self.info.meta["best"] = {"epoch": self.epoch + 1, **vals}
            with atomic_save_path(self.info.last_path) as tmp:
                torch.save({"model": model_sd, "opt": self.learn.opt.state_dict(), "epochs_done": self.epoch + 1,
                            "best_score": self.best_score, "best_epoch": self.best_epoch}, tmp)
            self.history.append({"epoch": self.epoch + 1, **vals,
                                 "seconds": round(time.perf_counter() - self.t_epoch, 2)})
            atomic_write_text(self.info.path / "history.csv", pd.DataFrame(self.history).to_csv(index=False))
            self.info.meta["epochs_done"] = self.epoch + 1
            write_json(self.info.path / "run.json", self.info.meta)

        def before_epoch(self):
            self.t_epoch = time.perf_counter()

    class Eta(Callback):
        """Log an estimate of the whole run's time after a few batches; warn past an hour."""
        order = 70

        def __init__(self, log: Log, warn: Log, epochs_left: int, measure: int = 4):
            self.log, self.warn, self.epochs_left, self.measure, self.done = log, warn, epochs_left, measure, False

        def before_fit(self):
            self.n_seen, self.t0 = 0, None

        def after_batch(self):
            if self.done or not self.training:
                return
            self.n_seen += 1
            if self.n_seen == 1:  # the first batch pays one-off costs: start the clock after it
                self.t0 = time.perf_counter()
                return
            if self.n_seen - 1 < min(self.measure, max(1, len(self.dls.train) - 1)):
                return
            per_batch = (time.perf_counter() - self.t0) / (self.n_seen - 1)
            # validation: forward only, ~1/3 of a training batch's cost
            per_epoch = per_batch * (len(self.dls.train) + len(self.dls.valid) / 3)
            total = per_epoch * self.epochs_left
            self.log(f"ETA: ~{_fmt_s(total)} for {self.epochs_left} epoch(s) (~{_fmt_s(per_epoch)} per epoch, "
                     f"{self.dls.train.bs / per_batch:.0f} img/s training)")
            if total > 3600:
                self.warn(f"this run will take about {_fmt_s(total)}; a smaller --size or fewer --epochs, "
                          "or a GPU, would be much faster")
            self.done = True

    class EpochLog(Callback):
        """One line per epoch through `log` when fastai's progress table is off."""
        order = 65

        def __init__(self, log: Log, start_epoch: int):
            self.log, self.start_epoch = log, start_epoch

        def after_epoch(self):
            if self.epoch < self.start_epoch:
                return
            names = self.learn.recorder.metric_names[1:-1]
            vals = self.learn.recorder.values[-1]
            parts = [f"{n}={v:.4f}" for n, v in zip(names, vals)]
            self.log(f"epoch {self.epoch + 1}/{self.n_epoch}: " + " ".join(parts))

    return RunCheckpoint, Eta, EpochLog


def _read_history(path: Path, epochs_done: int) -> list[dict]:
    """Rows of earlier epochs (on resume), cut to the epochs the last checkpoint holds."""
    if epochs_done == 0 or not path.is_file():
        return []
    return pd.read_csv(path).head(epochs_done).to_dict("records")


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ------------------------------------------------------------------------------------------ learner

def decay_groups(model) -> list[list]:
    """fastai splitter: [weights that decay, BN weights and biases that don't]."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [decay, no_decay]


def _no_decay_callback():
    from fastai.callback.core import Callback

    class NoDecayOnNormBias(Callback):
        """fit() sets one weight decay for every group; the torch AdamW's second group (BN weights,
        biases) must have none, as fastai's own Adam does with wd_bn_bias=False."""
        order = -5

        def before_fit(self):
            pgs = getattr(self.learn.opt, "opt", None)
            if pgs is not None and len(pgs.param_groups) > 1:
                pgs.param_groups[1]["weight_decay"] = 0.0

    return NoDecayOnNormBias


def _smooth_loss_callback():
    import torch
    from fastai.callback.core import Callback
    from fastai.learner import AvgSmoothLoss

    class DeviceSmoothLoss(AvgSmoothLoss):
        """fastai's smoothed training loss, the same numbers, kept on the loss's device: fastai's own copies
        the loss to the host after every batch, which on a GPU stalls the CPU until that step has finished."""

        def accumulate(self, learn):
            self.count += 1
            loss = learn.loss.detach().mean()
            self.val = torch.lerp(loss, self.val.to(loss.device, loss.dtype), self.beta)

    class SmoothLossOnDevice(Callback):
        """Swap the Recorder's smoothed loss for DeviceSmoothLoss: no host sync per training step. The
        per-batch losses come back to the host in one copy at the end of the fit."""
        order = 0  # before the Recorder (50) resets it in before_fit

        def before_fit(self):
            rec = self.learn.recorder
            if not isinstance(rec.smooth_loss, DeviceSmoothLoss):
                rec.smooth_loss = DeviceSmoothLoss(beta=rec.smooth_loss.beta)

        def after_fit(self):
            rec = self.learn.recorder
            if rec.losses and all(torch.is_tensor(v) for v in rec.losses):
                rec.losses = list(torch.stack(rec.losses).float().cpu().unbind())

    return SmoothLossOnDevice


def make_opt_func(kind: str, cuda: bool):
    from functools import partial

    if kind == "fastai":
        from fastai.optimizer import Adam

        return Adam
    import torch
    from fastai.optimizer import OptimWrapper

    # one multi-tensor (foreach) or fused kernel per step instead of a Python loop over parameters;
    # eps and betas as fastai's Adam; AdamW's weight decay is decoupled like fastai's true_wd
    return partial(OptimWrapper, opt=torch.optim.AdamW, eps=1e-5, **({"fused": True} if cuda else {"foreach": True}))


def make_loss(cfg: TrainConfig, dls):
    from fastai.losses import CrossEntropyLossFlat

    weight = None
    if cfg.class_weights:
        import torch

        y = _train_labels(dls)
        counts = torch.bincount(y, minlength=len(dls.vocab)).float().clamp(min=1)
        weight = (counts.sum() / (len(counts) * counts)).to(dls.device)  # inverse frequency, mean weight ~1
    return CrossEntropyLossFlat(weight=weight, label_smoothing=cfg.label_smoothing)


def _train_labels(dls):
    import torch

    if hasattr(dls.train, "y"):  # the cached path holds the labels as a tensor
        return dls.train.y.cpu()
    vocab = list(dls.vocab)
    return torch.tensor([vocab.index(c) for c in dls.train.items["label"]])


def make_learner(cfg: TrainConfig, dls, n_classes: int, path: Path | None = None):
    from fastai.callback.training import GradientClip
    from fastai.learner import Learner
    from fastai.metrics import BalancedAccuracy, accuracy

    cuda = str(dls.device).startswith("cuda")
    model = ResNet9(n_in=1, n_out=n_classes, widths=cfg.widths)
    cbs = [GradientClip(cfg.clip), _smooth_loss_callback()()]
    extra = {}
    if cfg.opt != "fastai":
        cbs.append(_no_decay_callback()())
        extra["splitter"] = decay_groups
    learn = Learner(dls, model, loss_func=make_loss(cfg, dls), opt_func=make_opt_func(cfg.opt, cuda), wd=cfg.wd,
                    metrics=[accuracy, BalancedAccuracy()], cbs=cbs, path=path or Path("."),
                    model_dir="checkpoints", **extra)
    if str(dls.device).startswith("cuda"):
        import torch

        learn.model.to(memory_format=torch.channels_last)
        learn.to_bf16()  # bf16 autocast: no grad-scaler syncs (fp16's to_fp16 syncs twice per step)
    return learn


def learner_from_run(info: RunInfo, device: str = "auto"):
    """A Learner over the run's own train/valid items with the best weights loaded (no unpickling)."""
    import torch

    device = resolve_device(device)
    items = info.items()
    check_items_exist(items, info)
    dls = build_dls(items, info.classes, info.stats, info.cfg.replace(workers=0), device)
    learn = make_learner(info.cfg, dls, len(info.classes), path=info.path)
    learn.model.load_state_dict(torch.load(info.best_path, map_location="cpu", weights_only=True))
    learn.model.to(device)
    return learn


def validate_config(cfg: TrainConfig) -> None:
    from .errors import CxrError

    if cfg.size < MIN_SIZE:
        raise CxrError(f"--size {cfg.size} is below {MIN_SIZE} px, the smallest input ResNet9 accepts")


# -------------------------------------------------------------------------------------------- train

@dataclass
class TrainResult:
    run: Path
    best_epoch: int
    best: dict[str, float]
    n_train: int
    n_valid: int
    skipped: int
    seconds: float


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = False,
          log: Log = _noop, warn: Log = _noop) -> TrainResult:
    import torch
    import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle)
    from fastai.torch_core import set_seed

    t_start = time.perf_counter()
    run = Path(cfg.run)
    if resume:
        info = load_run(run, need_best=False)
        if not info.last_path.is_file():
            raise RunError(f"{run}: nothing to resume (no checkpoints/last.pth); start it again with --force")
        if info.meta.get("finished"):
            raise RunError(f"{run}: this run already finished all {info.cfg.epochs} epochs; nothing to resume")
        cfg = info.cfg
        items = info.items()
        check_items_exist(items, info)
        skipped_n = int(info.meta.get("skipped", 0))
    else:
        validate_config(cfg)
        if run.exists() and any(run.iterdir()):
            if not force:
                raise RunError(f"{run}: run folder already exists; pass --force to replace it "
                               f"or --resume to continue it")
            shutil.rmtree(run)
        ds = discover(cfg.data, cfg.valid_pct, cfg.seed)
        if cfg.exclude_sources:
            unknown = sorted(set(cfg.exclude_sources) - set(ds.items.source))
            if unknown:
                raise DataError(f"{ds.root}: no images from source {unknown[0]!r} to exclude "
                                f"(sources: {', '.join(sorted(set(ds.items.source) - {''})) or 'none'})")
            ds.items = ds.items[~ds.items.source.isin(cfg.exclude_sources)].reset_index(drop=True)
        classes = check_trainable(ds)
        log(f"data: {ds.root} ({ds.layout}); classes {', '.join(classes)}; scanning {len(ds.items)} images")
        items, skipped, stats = scan(ds, ("train", "valid"), cfg.size, cfg.stats_limit, cfg.seed, workers=4)
        for w in cheap_checks(items):  # train/valid leakage: shared patients or groups, byte-identical images
            warn(w)
        if len(skipped):
            warn(f"{len(skipped)} unreadable image(s) skipped, listed in {run / 'skipped.csv'} "
                 f"(first: {skipped.rows[0][1]})")
        for split in ("train", "valid"):
            if not (items.split == split).any():
                raise RunError(f"{ds.root}: no readable {split} images left after skipping {len(skipped)} unreadable")
        run.mkdir(parents=True, exist_ok=True)
        cfg = cfg.replace(data=str(ds.root), run=str(run))
        n_by = items.groupby(["split", "label"]).size()
        meta = {
            "classes": classes,
            "stats": stats.to_dict(),
            "layout": ds.layout,
            "split_given": ds.split_given,
            "counts": {s: {c: int(n_by.get((s, c), 0)) for c in classes} for s in ("train", "valid")},
            "skipped": len(skipped),
            "epochs_done": 0,
            "finished": False,
            "versions": versions(),
        }
        write_json(run / "config.json", cfg.to_dict())
        atomic_write_text(run / "items.csv", items[["path", "label", "split"]].to_csv(index=False))
        atomic_write_text(run / "skipped.csv", skipped.frame().to_csv(index=False))
        write_json(run / "run.json", meta)
        info = RunInfo(run, cfg, meta)
        skipped_n = len(skipped)

    device = resolve_device(cfg.device)
    cuda = str(device).startswith("cuda")
    # CPU: bit-for-bit repeatable (tested). CUDA: cuDNN picks the fastest kernels for the fixed input
    # size, which is not bit-repeatable; seeded all the same.
    set_seed(cfg.seed, reproducible=not cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
    dls = make_dls(items, info, cfg, device, log)
    learn = make_learner(cfg, dls, len(info.classes), path=run)
    start_epoch, best_score, best_epoch = 0, -math.inf, -1
    if resume:
        ck = torch.load(info.last_path, map_location="cpu", weights_only=False)
        learn.model.load_state_dict(ck["model"])
        learn.create_opt()
        learn.opt.load_state_dict(ck["opt"])
        start_epoch, best_score, best_epoch = ck["epochs_done"], ck["best_score"], ck["best_epoch"]
        log(f"resuming {run} at epoch {start_epoch + 1}/{cfg.epochs}" if start_epoch < cfg.epochs else
            f"{run}: all {cfg.epochs} epochs were trained; finishing the run (best epoch -> learner.pkl)")
    if cfg.compile:
        learn.model = torch.compile(learn.model)
    RunCheckpoint, Eta, EpochLog = _callbacks()
    cbs = [RunCheckpoint(info, start_epoch, best_score, best_epoch)]
    if device == "cpu":
        cbs.append(Eta(log, warn, cfg.epochs - start_epoch))
    if not progress:
        cbs.append(EpochLog(log, start_epoch))
    if start_epoch < cfg.epochs:
        if progress:
            learn.fit_one_cycle(cfg.epochs, cfg.lr, wd=cfg.wd, cbs=cbs, start_epoch=start_epoch)
        else:
            learn.logger = _noop
            with learn.no_bar():
                learn.fit_one_cycle(cfg.epochs, cfg.lr, wd=cfg.wd, cbs=cbs, start_epoch=start_epoch)
    # keep the best epoch: its weights become the run's model and learner.pkl
    learn.model = unwrap(learn.model)
    learn.model.load_state_dict(torch.load(info.best_path, map_location="cpu", weights_only=True))
    if cfg.data_path != "pil":
        # the pickle carries the DataBlock pipeline (PIL path), which fastai's test_dl needs
        learn.dls = build_dls(items, info.classes, info.stats, cfg.replace(workers=0), "cpu")
    export_learner(learn, run / "learner.pkl")
    info.meta["finished"] = True
    write_json(run / "run.json", info.meta)
    best = info.meta.get("best", {})
    return TrainResult(run=run, best_epoch=int(best.get("epoch", 0)), best=best,
                       n_train=int((items.split == "train").sum()), n_valid=int((items.split == "valid").sum()),
                       skipped=skipped_n, seconds=time.perf_counter() - t_start)


def unwrap(model):
    """The plain module behind torch.compile: what checkpoints, weights and pickles hold."""
    return getattr(model, "_orig_mod", model)


def make_dls(items: pd.DataFrame, info: RunInfo, cfg: TrainConfig, device: str, log: Log = _noop):
    if cfg.data_path == "pil":
        return build_dls(items, info.classes, info.stats, cfg, device)
    from .fastpath import build_cached_dls

    t0 = time.perf_counter()
    dls = build_cached_dls(items, info.classes, info.stats, cfg, device, cache_dir=cfg.cache_dir or None)
    log(f"image cache ready in {time.perf_counter() - t0:.1f} s ({dls.train.n} train, {dls.valid.n} valid, "
        f"train side {dls.train.x.shape[-1]} px, on {device})")
    return dls


def export_learner(learn, dest: Path) -> None:
    """fastai `learn.export` with only picklable, reusable callbacks and no data (dls.new_empty)."""
    learn.model.cpu()
    keep = [cb for cb in learn.cbs if type(cb).__module__.startswith("fastai.")]
    removed = [cb for cb in learn.cbs if cb not in keep]
    learn.remove_cbs(removed)
    try:
        with atomic_save_path(dest) as tmp:
            learn.export(Path(tmp).absolute())  # fastai prefixes learn.path to a relative name
    finally:
        learn.add_cbs(removed)


def versions() -> dict[str, str]:
    import platform

    import fastai
    import torch
    import torchvision

    from . import __version__

    return {"cxr_fastai": __version__, "fastai": fastai.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version()}
