"""make_learner(cfg, dls) and train(cfg): fastai Learner, one-cycle Adam, GradientClip, checkpoints.

`train` runs in named steps: prepare a new run folder (or restore an interrupted one), build the
loaders and the learner, fit, finish (best epoch -> learner.pkl). The run folder is described in
`runs.py`.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from ..config import (ADAM, AUGMENT, BALANCE, CONTRAST, MAX_CROP_BORDER, MIXUP_PAIRS, ONE_CYCLE, TrainConfig, resolve_device,
                      write_json)
from ..data.audit import cheap_checks
from ..data.discover import check_items_exist, check_trainable, discover, item_folds, scan
from ..errors import CxrError, DataError, RunError
from ..io.files import atomic_save_path, atomic_write_text
from ..model import MIN_SIZE, ResNet9
from .runs import RunInfo, cache_side, load_run, machine, versions

Log = Callable[[str], None]


def _noop(msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ learner

def decay_groups(model) -> list[list]:
    """fastai splitter: [weights that decay, BN weights and biases that don't] (wd is given per group)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [decay, no_decay]


def group_wd(cfg: TrainConfig) -> list[float]:
    """fastai's per-group weight decay: cfg.wd on conv/linear weights, none on BN weights and biases."""
    return [cfg.wd, 0.0]


def make_opt_func(kind: str, cuda: bool):
    """fastai's Adam hyper-parameters (config.ADAM) whichever class runs them: fastai's own Adam (a Python
    loop over parameters), or torch's AdamW in one multi-tensor (CPU) or fused (CUDA) kernel per step.
    Both decay weights decoupled from the gradient (fastai's true_wd, AdamW's definition)."""
    from functools import partial

    if kind == "fastai":
        from fastai.optimizer import Adam

        return partial(Adam, mom=ADAM["mom"], sqr_mom=ADAM["sqr_mom"], eps=ADAM["eps"])
    import torch
    from fastai.optimizer import OptimWrapper

    return partial(OptimWrapper, opt=torch.optim.AdamW, betas=(ADAM["mom"], ADAM["sqr_mom"]), eps=ADAM["eps"],
                   **({"fused": True} if cuda else {"foreach": True}))


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

    cache = getattr(dls.train, "cache", None)
    if cache is not None:  # the cached path holds the labels as a tensor
        return cache[1].cpu()
    vocab = list(dls.vocab)
    return torch.tensor([vocab.index(c) for c in dls.train.items["label"]])


def make_learner(cfg: TrainConfig, dls, n_classes: int, path: Path | None = None):
    from fastai.callback.training import GradientClip
    from fastai.learner import Learner
    from fastai.metrics import BalancedAccuracy, accuracy

    from .callbacks import EpochSeed, SmoothLossOnDevice

    cuda = str(dls.device).startswith("cuda")
    model = ResNet9(n_in=1, n_out=n_classes, widths=cfg.widths)
    learn = Learner(dls, model, loss_func=make_loss(cfg, dls), opt_func=make_opt_func(cfg.opt, cuda),
                    splitter=decay_groups, wd=group_wd(cfg), metrics=[accuracy, BalancedAccuracy()],
                    cbs=[GradientClip(cfg.clip), SmoothLossOnDevice(), EpochSeed()], path=path or Path("."),
                    model_dir="checkpoints")
    if cfg.mixup > 0:  # its own draws come from torch's generator, which EpochSeed seeds: resumes stay identical
        from fastai.callback.mixup import MixUp

        from .callbacks import SelectiveMixUp

        learn.add_cb(SelectiveMixUp(cfg.mixup) if cfg.mixup_pairs == "lisa" else MixUp(cfg.mixup))
    if cfg.group_dro > 0:
        from .callbacks import GroupDRO

        learn.add_cb(GroupDRO(cfg.group_dro))
    if cfg.source_adversary > 0:
        from .callbacks import SourceAdversary

        learn.add_cb(SourceAdversary(cfg.source_adversary, seed=cfg.seed))
    if cfg.weight_average > 0:
        from .callbacks import WeightAverage

        learn.add_cb(WeightAverage(cfg.weight_average))
    if cfg.mix_style > 0:  # its draws come from torch's generator, which EpochSeed seeds: resumes stay identical
        from .callbacks import MixStyle

        learn.add_cb(MixStyle(cfg.mix_style))
    if cuda:
        import torch

        learn.model.to(memory_format=torch.channels_last)
        learn.to_bf16()  # bf16 autocast: no grad-scaler syncs (fp16's to_fp16 syncs twice per step)
    return learn


def learner_from_run(info: RunInfo, device: str = "auto"):
    """A Learner over the run's own train/valid items, on the run's data path, with the best weights
    loaded (no unpickling)."""
    import torch

    from ..data.loaders import build_dls

    device = resolve_device(device)
    items = info.items()
    check_items_exist(items, info)
    dls = build_dls(items, info.classes, info.stats, info.cfg.replace(workers=0), device, side=cache_side(info))
    learn = make_learner(info.cfg, dls, len(info.classes), path=info.path)
    learn.model.load_state_dict(torch.load(info.best_path, map_location="cpu", weights_only=True))
    learn.model.to(device)
    return learn


def validate_config(cfg: TrainConfig) -> None:
    if cfg.size < MIN_SIZE:
        raise CxrError(f"--size {cfg.size} is below {MIN_SIZE} px, the smallest input ResNet9 accepts")
    for name, value, allowed in (("balance", cfg.balance, BALANCE), ("augment", cfg.augment, AUGMENT),
                                 ("contrast", cfg.contrast, CONTRAST), ("mixup-pairs", cfg.mixup_pairs, MIXUP_PAIRS)):
        if value not in allowed:
            raise CxrError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
    if cfg.data_path == "pil" and (cfg.balance != "none" or cfg.augment != "none" or cfg.mixup_pairs != "random"):
        raise CxrError("--balance, --augment and --mixup-pairs work on the cached data path; drop --data-path pil")
    if not 0 <= cfg.balance_power <= 1:
        raise CxrError(f"--balance-power {cfg.balance_power} is outside 0..1 (1 = full balance)")
    if cfg.balance_power != 1 and cfg.balance == "none":
        raise CxrError("--balance-power tempers --balance: give --balance class, class-source or class-then-source too")
    if not 0 <= cfg.crop_border <= MAX_CROP_BORDER:
        raise CxrError(f"--crop-border {cfg.crop_border} is outside 0..{MAX_CROP_BORDER} (a fraction cut from each edge)")
    if cfg.mixup < 0:
        raise CxrError(f"--mixup {cfg.mixup} is negative: give a Beta alpha > 0, or 0 for no MixUp")
    if cfg.mixup > 0 and cfg.bs < 2:
        raise CxrError("--mixup blends images within a batch: give --bs 2 or more")
    for flag, value, what in (("--group-dro", cfg.group_dro, "a step size > 0 (e.g. 0.01)"),
                              ("--source-adversary", cfg.source_adversary, "a weight > 0 (e.g. 1)")):
        if value < 0:
            raise CxrError(f"{flag} {value} is negative: give {what}, or 0 for off")
        if value > 0 and cfg.data_path == "pil":
            raise CxrError(f"{flag} reads each image's source from the cached loader; drop --data-path pil")
    if cfg.group_dro > 0 and cfg.mixup > 0:
        raise CxrError("--group-dro and --mixup both set the training loss: give one of them")
    if cfg.source_adversary > 0 and cfg.mixup > 0:
        raise CxrError("--source-adversary reads each image's class and source, which --mixup blends: give one of them")
    if not 0 <= cfg.weight_average <= 1:
        raise CxrError(f"--weight-average {cfg.weight_average} is outside 0..1 (the fraction of the epochs averaged; 0 = off)")
    if not 0 <= cfg.mix_style <= 1:
        raise CxrError(f"--mix-style {cfg.mix_style} is outside 0..1 (the fraction of training batches mixed; 0 = off)")
    if cfg.mixup_pairs != "random" and cfg.mixup == 0:
        raise CxrError(f"--mixup-pairs {cfg.mixup_pairs} chooses MixUp's partners: give --mixup ALPHA too")
    if cfg.group_folds and not (cfg.group_folds >= 2 and 0 <= cfg.holdout_fold < cfg.group_folds):
        raise CxrError(f"group_folds {cfg.group_folds} / holdout_fold {cfg.holdout_fold}: give k >= 2 folds and a "
                       "held-out fold from 0 to k-1")


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
    rank: int = 0      # data-parallel: this process's rank (only rank 0 reports)


@dataclass
class Checkpoint:
    """Where a run stands: epochs done and the best epoch so far (0, -inf, -1 for a new run)."""
    epochs_done: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = False,
          log: Log = _noop, warn: Log = _noop) -> TrainResult:
    from .distributed import world_size

    if world_size() > 1:  # started by accelerate launch / torchrun: data-parallel
        from .distributed import train as train_data_parallel

        return train_data_parallel(cfg, resume=resume, force=force, progress=progress, log=log, warn=warn)
    t_start = time.perf_counter()
    if resume:
        info, items = restore_run(Path(cfg.run))
    else:
        info, items = prepare_run(cfg, force=force, log=log, warn=warn)
    info.meta.pop("data_parallel", None)  # this run (or its resumption) trains in one process
    cfg = info.cfg
    learn, ck = build_learner(info, items, resume=resume, log=log)
    fit(learn, info, ck, progress=progress, log=log, warn=warn)
    finish(learn, info)
    best = info.meta.get("best", {})
    return TrainResult(run=info.path, best_epoch=int(best.get("epoch", 0)), best=best,
                       n_train=int((items.split == "train").sum()), n_valid=int((items.split == "valid").sum()),
                       skipped=int(info.meta.get("skipped", 0)), seconds=time.perf_counter() - t_start)


def restore_run(run: Path) -> tuple[RunInfo, pd.DataFrame]:
    """An interrupted run folder, checked: its config, items and last checkpoint are there."""
    info = load_run(run, need_best=False)
    if not info.last_path.is_file():
        raise RunError(f"{run}: nothing to resume (no checkpoints/last.pth); start it again with --force")
    if info.meta.get("finished"):
        raise RunError(f"{run}: this run already finished all {info.cfg.epochs} epochs; nothing to resume")
    items = info.items()
    check_items_exist(items, info)
    return info, items


def prepare_run(cfg: TrainConfig, *, force: bool, log: Log, warn: Log) -> tuple[RunInfo, pd.DataFrame]:
    """Find and scan the data, then write a new run folder: config, items, skipped images, run.json."""
    from ..data.loaders import cache_side_for

    validate_config(cfg)
    run = Path(cfg.run)
    if run.exists() and any(run.iterdir()):
        if not force:
            raise RunError(f"{run}: run folder already exists; pass --force to replace it or --resume to continue it")
        shutil.rmtree(run)
    ds = discover(cfg.data, cfg.valid_pct, cfg.seed)
    if cfg.exclude_sources:
        unknown = sorted(set(cfg.exclude_sources) - set(ds.items.source))
        if unknown:
            raise DataError(f"{ds.root}: no images from source {unknown[0]!r} to exclude "
                            f"(sources: {', '.join(sorted(set(ds.items.source) - {''})) or 'none'})")
        ds.items = ds.items[~ds.items.source.isin(cfg.exclude_sources)].reset_index(drop=True)
    if cfg.group_folds:
        fold = item_folds(ds.items, cfg.group_folds, cfg.seed)
        log(f"patient-grouped fold {cfg.holdout_fold + 1} of {cfg.group_folds} left out of training: "
            f"{int((fold == cfg.holdout_fold).sum())} image(s)")
        ds.items = ds.items[fold != cfg.holdout_fold].reset_index(drop=True)
    classes = check_trainable(ds)
    log(f"data: {ds.where} ({ds.layout}); classes {', '.join(classes)}; scanning {len(ds.items)} images")
    other = ds.items[~ds.items.split.isin(("train", "valid"))]
    if len(other):
        by = other.split.value_counts()
        log(f"{len(other)} image(s) of other splits left out of training: "
            + ", ".join(f"{s} {n}" for s, n in sorted(by.items())))
    items, skipped, stats = scan(ds, ("train", "valid"), cfg.size, cfg.stats_limit, cfg.seed, workers=4,
                                 contrast=cfg.contrast, crop=cfg.crop_border)
    for w in cheap_checks(items):  # train/valid leakage: shared patients or groups, byte-identical images
        warn(w)
    if len(skipped):
        warn(f"{len(skipped)} unreadable image(s) skipped, listed in {run / 'skipped.csv'} "
             f"(first: {skipped.rows[0][1]})")
    for split in ("train", "valid"):
        if not (items.split == split).any():
            raise RunError(f"{ds.root}: no readable {split} images left after skipping {len(skipped)} unreadable")
    run.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(data=tuple(str(r) for r in ds.roots), run=str(run))
    n_by = items.groupby(["split", "label"]).size()
    meta = {
        "classes": classes,
        "stats": stats.to_dict(),
        # px: training crops are cut from the images at this side (their median side, at most 2x the input)
        "cache_side": cache_side_for(cfg.size, stats.side),
        "layout": ds.layout,
        "split_given": ds.split_given,
        "counts": {s: {c: int(n_by.get((s, c), 0)) for c in classes} for s in ("train", "valid")},
        "skipped": len(skipped),
        "epochs_done": 0,
        "finished": False,
        "versions": versions(),
        "machine": machine(),   # what trained it: numbers repeat on the same machine, not on every one
    }
    write_json(run / "config.json", cfg.to_dict())
    atomic_write_text(run / "items.csv", items[["path", "label", "split", "source"]].to_csv(index=False))
    atomic_write_text(run / "skipped.csv", skipped.frame().to_csv(index=False))
    write_json(run / "run.json", meta)
    return RunInfo(run, cfg, meta), items


def build_learner(info: RunInfo, items: pd.DataFrame, *, resume: bool, log: Log, device: str | None = None,
                  bs: int | None = None):
    """Seeded loaders and learner on the run's device; on resume, the last checkpoint's weights and
    optimizer state. Returns (learner, where the run stands). Data-parallel, `device` is this process's
    and `bs` its share of the global batch."""
    import torch
    from fastai.torch_core import set_seed

    from ..data.loaders import build_dls

    cfg = info.cfg
    device = device or resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    # CPU: bit-for-bit repeatable (tested). CUDA: cuDNN picks the fastest kernels for the fixed input
    # size, which is not bit-repeatable; seeded all the same.
    set_seed(cfg.seed, reproducible=not cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    dls = build_dls(items, info.classes, info.stats, cfg.replace(bs=bs) if bs else cfg, device, side=cache_side(info))
    if cfg.data_path != "pil":
        log(f"image cache ready in {time.perf_counter() - t0:.1f} s ({len(dls.train_ds)} train, "
            f"{len(dls.valid_ds)} valid, train side {cache_side(info)} px, on {device})")
    learn = make_learner(cfg, dls, len(info.classes), path=info.path)
    ck = Checkpoint()
    if resume:
        state = torch.load(info.last_path, map_location="cpu", weights_only=False)
        learn.model.load_state_dict(state["model"])
        learn.create_opt()
        learn.opt.load_state_dict(state["opt"])
        ck = Checkpoint(state["epochs_done"], state["best_score"], state["best_epoch"])
        if "group_dro_q" in state:
            from .callbacks import group_dro_of

            group_dro_of(learn).q = state["group_dro_q"]
        if "source_adversary" in state:
            from .callbacks import SourceAdversary, callback_of

            callback_of(learn, SourceAdversary).state = state["source_adversary"]
        if "weight_average" in state:
            from .callbacks import WeightAverage, callback_of

            callback_of(learn, WeightAverage).restore(state["weight_average"])
        log(f"resuming {info.path} at epoch {ck.epochs_done + 1}/{cfg.epochs}" if ck.epochs_done < cfg.epochs else
            f"{info.path}: all {cfg.epochs} epochs were trained; finishing the run (best epoch -> learner.pkl)")
    if cfg.compile:
        learn.model = torch.compile(learn.model)
    return learn, ck


def fit(learn, info: RunInfo, ck: Checkpoint, *, progress: bool, log: Log, warn: Log, write: bool = True,
        extra_cbs: Sequence = ()) -> None:
    """fastai's fit_one_cycle from the epoch the run stands at, checkpointing every epoch (`write`: False
    on the processes of a data-parallel run other than rank 0)."""
    import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle)

    from .callbacks import EpochLog, Eta, RunCheckpoint

    cfg = info.cfg
    if ck.epochs_done >= cfg.epochs:
        return
    cbs = [RunCheckpoint(info, ck.epochs_done, ck.best_score, ck.best_epoch)] if write else []
    if write and str(learn.dls.device) == "cpu":
        cbs.append(Eta(log, warn, cfg.epochs - ck.epochs_done))
    cbs += list(extra_cbs)
    if not progress:
        cbs.append(EpochLog(log, ck.epochs_done))
        learn.logger = _noop

    def go():
        learn.fit_one_cycle(cfg.epochs, cfg.lr, wd=group_wd(cfg), cbs=cbs, start_epoch=ck.epochs_done, **ONE_CYCLE)

    if progress:
        go()
    else:
        with learn.no_bar():
            go()


def finish(learn, info: RunInfo) -> None:
    """The best epoch's weights become the run's model and learner.pkl; the run is marked finished. With
    --weight-average, the averaged weights do instead (`average_into_best`)."""
    import torch

    from .callbacks import unwrap

    learn.model = unwrap(learn.model)
    if info.cfg.weight_average > 0:
        average_into_best(learn, info)   # the model holds the averaged weights it saved as best.pth
    else:
        learn.model.load_state_dict(torch.load(info.best_path, map_location="cpu", weights_only=True))
    info.meta["best_by_source"] = validation_by_source(learn, info)
    export_learner(learn, info.path / "learner.pkl")
    info.meta["finished"] = True
    write_json(info.path / "run.json", info.meta)


def average_into_best(learn, info: RunInfo) -> None:
    """--weight-average: the averaged weights, their BatchNorm statistics recomputed, become the run's model
    (checkpoints/best.pth); the best single epoch's weights stay as checkpoints/best_epoch.pth and its
    validation figures in run.json's `best_single_epoch`, beside the average's in `best`."""
    import torch

    from .callbacks import WeightAverage, averaging_first_epoch, callback_of, use_average

    wa = callback_of(learn, WeightAverage)
    single = info.path / "checkpoints" / "best_epoch.pth"
    if not single.is_file():  # (finishing again after an interruption: the single epoch's weights are kept already)
        with atomic_save_path(single) as tmp:
            shutil.copyfile(info.best_path, tmp)
    # run.json on disk holds the best single epoch's figures until this function's caller writes it
    info.meta.setdefault("best_single_epoch", info.meta.get("best", {}))
    use_average(learn, wa)
    with learn.no_bar():
        vals = learn.validate()
    names = ["valid_loss"] + [m.name for m in learn.metrics]
    first = averaging_first_epoch(info.cfg.epochs, info.cfg.weight_average) + 1
    info.meta["weight_average"] = {"from_epoch": first, "to_epoch": info.cfg.epochs, "steps": wa.n}
    info.meta["best"] = {"epoch": info.cfg.epochs, "averaged_from_epoch": first,
                         **{n: float(v) for n, v in zip(names, vals)}}
    sd = {k: v.detach().cpu().clone() for k, v in learn.model.state_dict().items()}
    with atomic_save_path(info.best_path) as tmp:
        torch.save(sd, tmp)


def validation_by_source(learn, info: RunInfo) -> dict | None:
    """The best model's validation figures per source (None when the run's items carry no source)."""
    from ..metrics import compute_metrics

    items = info.items()
    valid = items[items.split == "valid"]
    if "source" not in valid.columns or not valid.source.astype(str).str.len().any():
        return None
    with learn.no_bar():
        probs, targs = learn.get_preds(dl=learn.dls.valid.new(shuffle=False, drop_last=False))
    m = compute_metrics(targs.long().numpy(), probs.float().numpy(), info.classes,
                        sources=valid.source.astype(str).tolist(), n_boot=0)
    return {"n": m.n, "accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "per_source": m.per_source}


def export_learner(learn, dest: Path) -> None:
    """fastai's `learn.export` of the training learner: its loaders go in empty (`dls.new_empty`, no
    images), the model on the CPU."""
    learn.model.cpu()
    with atomic_save_path(dest) as tmp:
        learn.export(Path(tmp).absolute())  # fastai prefixes learn.path to a relative name
