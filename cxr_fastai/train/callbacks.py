"""The fastai callbacks of a training run. Importing this module imports fastai.

Learner callbacks (kept in learner.pkl, so module-level and free of run state): `EpochSeed`,
`SmoothLossOnDevice`, `SelectiveMixUp`, `GroupDRO`, `SourceAdversary`, `WeightAverage`, `MixStyle`.
Per-fit callbacks (given to `fit_one_cycle` only): `RunCheckpoint`, `Eta`, `EpochLog`.
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


def strata_counts(dl, n_classes: int, option: str):
    """(number of training sources, counts[class, source]: training images of each class x source stratum), on
    the CPU, from the cached loader's labels and source ids. `option` names the recipe option that needs them
    in the error raised when the loader has no source ids (the PIL path, or one process of several)."""
    if getattr(dl, "groups", None) is None:
        raise CxrError(f"{option} reads each image's source from the cached loader in one process: "
                       "use --data-path cached without --procs")
    labels, groups = dl.cache[1].cpu(), dl.groups.cpu()
    n_sources = int(groups.max()) + 1 if len(groups) else 1
    counts = torch.bincount(labels * n_sources + groups, minlength=n_classes * n_sources)
    return n_sources, counts.view(n_classes, n_sources)


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
        self.n_sources, counts = strata_counts(self.dls.train, len(self.dls.vocab), "--group-dro")
        n = counts.numel()
        self.present = (counts > 0).flatten()   # strata (class * n_sources + source) with images
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


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def reverse_grad(x, lam: float):
    """The identity forward; backward, the gradient times -lam (Ganin & Lempitsky 2015's gradient reversal)."""
    return _ReverseGrad.apply(x, float(lam))


def adversary_ramp(progress: float) -> float:
    """DANN's schedule for the reversal weight over training progress 0..1: 2 / (1 + exp(-10 p)) - 1, from 0 at
    the start (the adversary learns first) to 0.46 at 10% and 0.99 at half-way."""
    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


def conditional_source_loss(logits, y, g, allowed):
    """The adversary's loss and hits. logits: (B, C, S) source logits for each class; y, g: (B,) class and
    source of each item; allowed: (C, S) bool, the sources with training images of each class. Each item's
    source is predicted among its own class's sources (the row of its class, the others masked); items whose
    class has one source only are left out (nothing to tell apart). Returns (mean cross-entropy over the
    items kept, number kept, number whose source the adversary got right), all tensors on the logits'
    device: no host sync per training step."""
    import torch.nn.functional as F

    mask = allowed[y]                                                 # (B, S)
    keep = mask.sum(1) >= 2
    n = keep.sum()
    rows = logits[torch.arange(len(y), device=y.device), y].float().masked_fill(~mask, float("-inf"))
    ce = torch.where(keep, F.cross_entropy(rows, g, reduction="none"), 0.0)
    return ce.sum() / n.clamp(min=1), n, ((rows.argmax(1) == g) & keep).sum()


class SourceAdversary(Callback):
    """A class-conditional source adversary (Li et al., ECCV 2018, "Deep domain generalization via conditional
    invariant adversarial networks"; the gradient reversal of Ganin & Lempitsky, ICML 2015). A small head
    (Linear-ReLU-Linear, its own Adam) reads the pooled features the classifier reads and learns each training
    image's source, conditioned on its class: for a NORMAL film, which hospital's NORMAL is it? The network
    gets the head's gradient reversed, times `weight` x DANN's ramp, so it learns features that keep the class
    and lose the hospital within a class. Classes with one training source (here every COVID19 film) add
    nothing: their class is their source. It reads the batch's source ids from the cached loader, as
    GroupDRO does, and adds its loss after GroupDRO's; the training loss a run records is the classifier's.
    The head and its optimizer are in the run's checkpoint (a resumed run carries on with them), never in
    learner.pkl or an export: inference is the classifier alone. Per epoch, run.json gets the head's
    within-class source accuracy on the training batches and what always naming the class's commonest
    source would score."""
    order = 11  # after_loss: after GroupDRO (10), before anything that reads the loss

    def __init__(self, weight: float = 1.0, hidden: int = 256, lr: float = 1e-3, seed: int = 0):
        # (not .lr / .opt: a callback's attributes must not shadow the learner's)
        self.weight, self.hidden, self.head_lr, self.seed = float(weight), int(hidden), float(lr), int(seed)
        self.net = self.head_opt = self.state = self.feats = self.hook = None
        self.epoch_stats = [0.0, 0, 0]   # this epoch's loss sum (x items), items, hits

    def before_fit(self):
        from torch import nn

        model = unwrap(self.learn.model)
        n_classes = len(self.dls.vocab)
        self.n_sources, counts = strata_counts(self.dls.train, n_classes, "--source-adversary")
        self.allowed = (counts > 0).to(self.dls.device)
        # always naming the class's commonest source (among its training images): what a head that learned
        # nothing from the features would score
        multi = (counts > 0).sum(1) >= 2
        self.chance = float(counts[multi].max(1).values.sum() / counts[multi].sum().clamp(min=1)) if multi.any() else 1.0
        with torch.random.fork_rng(devices=[]):  # its own draws: the run's generators are left as they were
            torch.manual_seed(self.seed)
            self.net = nn.Sequential(nn.Linear(model.head.in_features, self.hidden), nn.ReLU(),
                                     nn.Linear(self.hidden, n_classes * self.n_sources)).to(self.dls.device)
        self.head_opt = torch.optim.Adam(self.net.parameters(), lr=self.head_lr)
        if self.state is not None:  # a resumed run: where the head stood at its last checkpoint
            self.net.load_state_dict(self.state["net"])
            self.head_opt.load_state_dict(self.state["opt"])
            self.state = None
        self.hook = model.head.register_forward_pre_hook(self._grab)

    def _grab(self, module, args):
        self.feats = args[0] if module.training else None

    def before_epoch(self):
        self.epoch_stats = [0.0, 0, 0]

    def after_loss(self):
        feats, self.feats = self.feats, None
        if not self.training or feats is None:
            return
        lam = self.weight * adversary_ramp((self.epoch + self.iter / self.n_iter) / self.n_epoch)
        y = self.y
        # float32: under bf16 autocast (CUDA) the features are bf16 and autocast has ended by now
        logits = self.net(reverse_grad(feats.float(), lam)).view(len(y), -1, self.n_sources)
        g = self.dl.groups[self.dl.last_idx].to(y.device)
        loss, n, hits = conditional_source_loss(logits, y, g, self.allowed)
        self.learn.loss_grad = self.learn.loss_grad + loss     # 0 (no gradient) when no item has two sources
        for i, v in enumerate((loss.detach() * n, n, hits)):     # on the device: read once per epoch
            self.epoch_stats[i] = self.epoch_stats[i] + v

    def after_step(self):
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)

    def after_fit(self):
        if self.hook is not None:
            self.hook.remove()
        self.hook = None

    def checkpoint(self) -> dict:
        """The head and its optimizer, for the run's last.pth."""
        return {"net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                "opt": self.head_opt.state_dict()}

    def epoch_summary(self, epoch: int) -> dict:
        loss, n, hits = (float(v) for v in self.epoch_stats)
        n = int(n)
        lam = self.weight * adversary_ramp((epoch + 1) / self.n_epoch)
        return {"within_class_source_accuracy": round(hits / n, 4) if n else None,
                "commonest_source_share": round(self.chance, 4), "loss": round(loss / n, 4) if n else None,
                "reversal_weight_at_epoch_end": round(lam, 4), "images": n}

    def __getstate__(self):  # learner.pkl: no run state, no head (inference never uses it)
        return {**self.__dict__, "net": None, "head_opt": None, "state": None, "feats": None, "hook": None,
                "allowed": None}


def averaging_first_epoch(n_epochs: int, fraction: float) -> int:
    """The first (0-based) epoch whose steps --weight-average FRACTION averages: the last FRACTION of the epochs,
    at least one."""
    return n_epochs - max(1, min(n_epochs, round(fraction * n_epochs)))


class WeightAverage(Callback):
    """Weight averaging over the end of training: the run's model becomes the mean of the weights after every
    training step of the last `fraction` of the epochs (stochastic weight averaging, Izmailov et al., UAI 2018;
    dense, every step, as SWAD does, Cha et al., NeurIPS 2021, which reports out-of-domain gains on all five
    DomainBed benchmarks; SWAD picks its window from the validation loss, this a fixed one). The sum runs on the
    device in float32 (one foreach lerp per step); BatchNorm's statistics are recomputed for the averaged
    weights at the end (`use_average`). The running mean and its count are in the run's checkpoint, so a
    resumed run carries on with them; never in learner.pkl."""
    order = 70  # after_step: after the optimizer's step (fastai steps inside the training loop, before callbacks)

    def __init__(self, fraction: float = 0.5):
        self.fraction = float(fraction)
        self.avg, self.n = None, 0

    def restore(self, state: dict) -> None:
        """A resumed run: the mean as it stood at the last checkpoint (`checkpoint`'s dict)."""
        self.avg, self.n = state["avg"], int(state["n"])

    def before_fit(self):
        self.first_epoch = averaging_first_epoch(self.n_epoch, self.fraction)
        if self.avg is not None:  # restored on the CPU: the sum runs beside the weights
            device = next(unwrap(self.learn.model).parameters()).device
            self.avg = [t.to(device) for t in self.avg]

    def after_step(self):
        if self.epoch < self.first_epoch:
            return
        params = [p.detach() for p in unwrap(self.learn.model).parameters()]
        self.n += 1
        if self.avg is None:
            self.avg = [p.float().clone() for p in params]
        else:
            torch._foreach_lerp_(self.avg, [p.float() for p in params], 1.0 / self.n)   # avg += (w - avg) / n

    def checkpoint(self) -> dict:
        """The running mean and its count, for the run's last.pth."""
        return {"avg": None if self.avg is None else [t.detach().cpu().clone() for t in self.avg], "n": self.n}

    def averaged_state_dict(self, model) -> dict:
        """model's state dict with every parameter replaced by its mean (buffers as they are)."""
        if self.avg is None:
            raise CxrError("--weight-average: no training step was averaged (is the run finished?)")
        names = [n for n, _ in model.named_parameters()]
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, a in zip(names, self.avg):
            sd[name] = a.to(sd[name].device, sd[name].dtype)
        return sd

    def __getstate__(self):  # learner.pkl: no run state
        return {**self.__dict__, "avg": None}


def use_average(learn, wa: "WeightAverage") -> None:
    """Load the averaged weights into learn.model and recompute its BatchNorm statistics with one pass over the
    training loader (torch's update_bn; the averaged weights never had statistics of their own)."""
    from torch.optim.swa_utils import update_bn

    model = unwrap(learn.model)
    model.load_state_dict(wa.averaged_state_dict(model))
    with torch.no_grad():
        update_bn(learn.dls.train, model)


def mix_style(x, lam, perm, eps: float = 1e-6):
    """MixStyle's step on one feature map (B, C, H, W): each image's per-channel mean and standard deviation
    (its "style": brightness, contrast, the texture a pipeline leaves) become lam x its own + (1 - lam) x
    those of image perm[i]; what the normalised map holds (the content) is kept. The statistics are not
    differentiated through, as in the paper. Computed in float32 (bf16 autocast on CUDA)."""
    dtype = x.dtype
    x = x.float()
    mu = x.mean((2, 3), keepdim=True).detach()
    sig = (x.var((2, 3), keepdim=True) + eps).sqrt().detach()
    lam = lam.view(-1, 1, 1, 1)
    mixed_mu = lam * mu + (1 - lam) * mu[perm]
    mixed_sig = lam * sig + (1 - lam) * sig[perm]
    return ((x - mu) / sig * mixed_sig + mixed_mu).to(dtype)


class MixStyle(Callback):
    """MixStyle (Zhou, Yang, Qiao & Xiang, ICLR 2021, "Domain generalization with MixStyle"): in a training
    batch chosen with probability `p`, the feature maps after `layers` (ResNet9's layer1 and layer2, the
    paper's res1-res2) get each image's channel statistics mixed with those of a random partner in the
    batch, weight lam ~ Beta(alpha, alpha) per image (0.1: mostly near 0 or 1, sometimes halfway). Sources
    differ by processing and exposure, which the early layers' statistics carry; mixing them makes new
    "hospitals" from the batch and leaves the content, and the label, alone. Forward hooks while fitting
    only: the model, its exports and inference are unchanged. Draws come from torch's generator, which
    EpochSeed seeds per epoch (a resumed run draws what the uninterrupted one would)."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, layers: tuple[str, ...] = ("layer1", "layer2")):
        self.p, self.alpha, self.layers = float(p), float(alpha), tuple(layers)
        self.hooks, self.draw = [], None

    def before_fit(self):
        model = unwrap(self.learn.model)
        self.hooks = [getattr(model, name).register_forward_hook(self._mix) for name in self.layers]

    def before_batch(self):
        self.draw = None
        bs = len(self.y)
        if not self.training or bs < 2 or float(torch.rand(())) >= self.p:
            return
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((bs,))
        self.draw = (lam.to(self.y.device), torch.randperm(bs).to(self.y.device))

    def _mix(self, module, args, out):
        if self.draw is None or not module.training:
            return None
        return mix_style(out, *self.draw)

    def after_fit(self):
        for h in self.hooks:
            h.remove()
        self.hooks, self.draw = [], None

    def __getstate__(self):  # learner.pkl: the settings, no hook handles
        d = dict(self.__dict__)
        d["hooks"], d["draw"] = [], None
        return d


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
        adv = callback_of(self.learn, SourceAdversary)
        if adv is not None:  # its head carries on in a resumed run; run.json shows how well it told sources apart
            state["source_adversary"] = adv.checkpoint()
            self.info.meta.setdefault("source_adversary", {})[str(self.epoch + 1)] = adv.epoch_summary(self.epoch)
        wa = callback_of(self.learn, WeightAverage)
        if wa is not None:  # the running mean carries on in a resumed run
            state["weight_average"] = wa.checkpoint()
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


def callback_of(learn, kind: type):
    """The learner's callback of this type, or None."""
    return next((cb for cb in learn.cbs if isinstance(cb, kind)), None)


def group_dro_of(learn):
    """The learner's GroupDRO callback, or None."""
    return callback_of(learn, GroupDRO)


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


