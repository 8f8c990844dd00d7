"""The fastai callbacks of a training run. Importing this module imports fastai.

Learner callbacks (kept in learner.pkl, so module-level and free of run state): `EpochSeed`,
`SmoothLossOnDevice`, `SelectiveMixUp`, `GroupDRO`. Per-fit callbacks (given to `fit_one_cycle` only):
`RunCheckpoint`, `Eta`, `EpochLog`.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixHandler
from fastai.learner import AvgSmoothLoss
from fastai.torch_core import rank_distrib

from ..config import write_json
from ..errors import CxrError
from ..data.cached_dl import seed_for
from ..io.files import atomic_save_path, atomic_write_text
from .runs import BEST_METRIC, RunInfo, fmt_seconds

Log = Callable[[str], None]


def unwrap(model):
    """The plain module behind DistributedDataParallel and torch.compile: what checkpoints, weights and
    pickles hold (state_dict keys without a `module.` or `_orig_mod.` prefix)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


class EpochSeed(Callback):
    """Before each epoch, tell the loaders which epoch it is: the shuffle and the crops of epoch k then
    depend on (seed, k) only, so a run resumed at epoch k sees what the uninterrupted run would have.
    Data-parallel, process r > 0 seeds the global generators with (seed, k, r): fastai's own batch
    transforms then draw differently on each process's share of a batch (process 0 draws as one process)."""
    order = -10

    def before_epoch(self):
        for dl in (self.dls.train, self.dls.valid):
            if hasattr(dl, "set_epoch"):
                dl.set_epoch(self.epoch)
        # fastai's own random batch transforms (--augment) draw from the global generators
        s = seed_for(getattr(self.dls.train, "seed", 0), self.epoch)
        rank = rank_distrib()
        if rank:
            s = seed_for(s, rank)
        random.seed(s)
        torch.manual_seed(s)


class SelectiveMixUp(MixHandler):
    """MixUp with chosen partners (LISA, Yao et al. 2022, "Improving out-of-distribution robustness via
    selective augmentation"). For each training image, with probability `p_label` the partner is an image of
    the batch with the same class from another source (the mix keeps the label and blurs what tells sources
    apart), otherwise one from the same source with another class (the source cannot explain the label).
    An image with no such partner in its batch is mixed with a random one, as fastai's MixUp does. The
    weight is fastai's: lam = max(b, 1 - b), b ~ Beta(alpha, alpha); the loss is mixed by MixHandler.
    It reads the batch's source ids from the cached loader (`groups` at `last_idx`). Draws come from torch's
    generator, which EpochSeed seeds per epoch."""

    def __init__(self, alpha: float = 0.4, p_label: float = 0.5):
        super().__init__(alpha)
        self.p_label = float(p_label)

    def before_fit(self):
        dl = self.dls.train
        if getattr(dl, "groups", None) is None:
            raise CxrError("--mixup-pairs lisa reads each image's source from the cached loader in one process: "
                           "use --data-path cached without --procs, or --mixup-pairs random")

    def before_batch(self):
        x, y = self.x, self.y
        g = self.dl.groups[self.dl.last_idx]
        n, dev = y.size(0), x.device
        b = self.distrib.sample((n,)).to(dev)
        self.lam = torch.maximum(b, 1 - b)
        self.partner = pick_partners(y, g, torch.rand(n, device=dev) < self.p_label, torch.rand(n, n, device=dev),
                                     torch.randperm(n, device=dev))
        self.yb1 = (y[self.partner],)
        self.learn.xb = (torch.lerp(x[self.partner], x, self.lam.view(-1, *[1] * (x.dim() - 1))),)


def pick_partners(y, g, by_label, scores, fallback):
    """Row i's partner: the highest-scoring j with y[j] == y[i] and g[j] != g[i] where by_label[i], else with
    g[j] == g[i] and y[j] != y[i]; fallback[i] where no j qualifies. scores: (n, n) in [0, 1)."""
    same_y, same_g = y[:, None] == y[None, :], g[:, None] == g[None, :]
    ok = torch.where(by_label[:, None], same_y & ~same_g, same_g & ~same_y)
    masked = torch.where(ok, scores, torch.full_like(scores, -1.0))
    best, j = masked.max(1)
    return torch.where(best >= 0, j, fallback)


class GroupDRO(Callback):
    """Online group DRO (Sagawa et al., ICLR 2020, "Distributionally robust neural networks for group
    shifts", their Algorithm 1). Groups are the class x source strata that have training images. Each training
    step: every group present in the batch has its mean loss; the group weights q grow as
    q_g <- q_g * exp(eta * loss_g) and are renormalised; the step minimises sum_g q_g * loss_g, so the
    strata the model fits worst carry the gradient. q persists across batches and epochs (it is saved in
    the run's checkpoint, so a resumed run carries on with it). Validation is untouched. It reads the
    batch's source ids from the cached loader, as SelectiveMixUp does. The training loss a run records is
    this weighted loss."""
    order = 10  # after_loss: before anything that reads the loss

    def __init__(self, eta: float = 0.01):
        self.eta, self.q = float(eta), None

    def before_fit(self):
        dl = self.dls.train
        if getattr(dl, "groups", None) is None:
            raise CxrError("--group-dro reads each image's source from the cached loader in one process: "
                           "use --data-path cached without --procs")
        self.n_sources = int(dl.groups.max()) + 1 if len(dl.groups) else 1
        n = self.n_sources * len(self.dls.vocab)
        k = dl.cache[1].to(dl.groups.device) * self.n_sources + dl.groups
        self.present = (torch.bincount(k, minlength=n) > 0).cpu()   # strata (class * n_sources + source) with images
        if self.q is None or self.q.numel() != n:  # a resumed run has its q set from the checkpoint
            # uniform over the strata that have training images; an empty stratum keeps weight 0
            self.q = self.present.float() / self.present.sum()

    def after_loss(self):
        if not self.training:
            return
        y = self.y
        k = y * self.n_sources + self.dl.groups[self.dl.last_idx].to(y.device)
        per_item = item_losses(self.learn.loss_func, self.pred, y)
        loss, self.q = group_dro_step(per_item, k, self.q.to(per_item.device), self.eta)
        self.learn.loss_grad = loss
        self.learn.loss = loss.detach().clone()

    def __getstate__(self):  # learner.pkl: no run state (the weights are in run.json and the checkpoint)
        return {**self.__dict__, "q": None}


def item_losses(loss_func, pred, y):
    """The run's cross-entropy (its class weights and label smoothing) per item, unreduced, in float32."""
    import torch.nn.functional as F

    f = getattr(loss_func, "func", loss_func)
    return F.cross_entropy(pred.float(), y, weight=getattr(f, "weight", None),
                           label_smoothing=float(getattr(f, "label_smoothing", 0.0)), reduction="none")


def group_dro_step(losses, k, q, eta: float):
    """One step of online group DRO: (loss to minimise, new q). losses: (B,) per-item; k: (B,) group of
    each item; q: (G,) group weights summing to 1. Groups absent from the batch keep their weight and add
    no loss (Sagawa et al.'s reference code does the same)."""
    n_groups = q.numel()
    count = torch.bincount(k, minlength=n_groups).to(losses.dtype)
    mean = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device).index_add(0, k, losses) / count.clamp(min=1)
    q = q * torch.exp(eta * mean.detach() * (count > 0))
    q = q / q.sum()
    return (q * mean).sum(), q


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


class RunCheckpoint(Callback):
    """After each epoch: keep the best epoch's weights (by validation balanced accuracy), the last
    epoch's weights + optimizer state, and history.csv, each written atomically. Epochs that
    fastai's SkipToEpoch skips on --resume are ignored."""
    order = 61  # after Recorder, which fills recorder.values

    def __init__(self, info: RunInfo, start_epoch: int, best_score: float, best_epoch: int):
        self.info, self.start_epoch = info, start_epoch
        self.sources = None  # --group-dro: the training sources' names, read once
        self.best_score, self.best_epoch = best_score, best_epoch
        self.history = read_history(info.path / "history.csv", start_epoch)

    def before_epoch(self):
        self.t_epoch = time.perf_counter()

    def after_epoch(self):
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
        # validation images scored this epoch (each once, whatever the number of processes)
        self.info.meta["valid_n"] = int(getattr(self.learn.recorder.loss, "count", 0))
        state = {"model": model_sd, "opt": self.learn.opt.state_dict(), "epochs_done": self.epoch + 1,
                 "best_score": self.best_score, "best_epoch": self.best_epoch}
        dro = group_dro_of(self.learn)
        if dro is not None:  # its weights carry on in a resumed run; run.json shows them per stratum
            state["group_dro_q"] = dro.q.detach().cpu().clone()
            if self.sources is None:
                from ..data.loaders import source_codes

                items = self.info.items()
                self.sources = source_codes(items[items.split == "train"])[1]   # the loader's source ids' names
            self.info.meta["group_dro_weights"] = dro_weights_by_stratum(dro, self.info.classes, self.sources)
        with atomic_save_path(self.info.last_path) as tmp:
            torch.save(state, tmp)
        self.history.append({"epoch": self.epoch + 1, **vals,
                             "seconds": round(time.perf_counter() - self.t_epoch, 2)})
        atomic_write_text(self.info.path / "history.csv", pd.DataFrame(self.history).to_csv(index=False))
        self.info.meta["epochs_done"] = self.epoch + 1
        write_json(self.info.path / "run.json", self.info.meta)


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
        bs = self.dls.train.bs * getattr(self.dls.train, "world_size", 1)  # data-parallel: the global batch
        self.log(f"ETA: ~{fmt_seconds(total)} for {self.epochs_left} epoch(s) (~{fmt_seconds(per_epoch)} per epoch, "
                 f"{bs / per_batch:.0f} img/s training)")
        if total > 3600:
            self.warn(f"this run will take about {fmt_seconds(total)}; a smaller --size or fewer --epochs, "
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


def group_dro_of(learn):
    """The learner's GroupDRO callback, or None."""
    return next((cb for cb in learn.cbs if isinstance(cb, GroupDRO)), None)


def dro_weights_by_stratum(dro: GroupDRO, classes: list[str], sources: list[str]) -> dict[str, float]:
    """GroupDRO's weights named 'CLASS @ SOURCE' (strata with training images only), largest first."""
    q, present = dro.q.detach().cpu().tolist(), dro.present.tolist()
    named = {f"{c} @ {s or '-'}": round(q[ci * dro.n_sources + si], 6)
             for ci, c in enumerate(classes) for si, s in enumerate(sources) if present[ci * dro.n_sources + si]}
    return dict(sorted(named.items(), key=lambda kv: -kv[1]))


def read_history(path: Path, epochs_done: int) -> list[dict]:
    """Rows of earlier epochs (on resume), cut to the epochs the last checkpoint holds."""
    if epochs_done == 0 or not path.is_file():
        return []
    return pd.read_csv(path).head(epochs_done).to_dict("records")


