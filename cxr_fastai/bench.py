"""`cxr-fastai bench`: the project's fastai path against a fair plain-PyTorch loop, same data and model.

Both paths read the same decoded uint8 cache (resident on the device), cut batches there, apply the same
per-batch RandomResizedCrop and normalisation, and train the same ResNet9 with the same recipe
(one-cycle, Adam with decoupled weight decay and none on BN/bias, gradient-norm clipping); bf16 and
channels_last on CUDA. One uncounted warm-up epoch each; then the paths run twice in alternating order
and the second run of each counts.
"""
from __future__ import annotations

import math
import resource
import time
from typing import Any, Callable

import numpy as np

from .config import ADAM, ONE_CYCLE, BenchConfig, TrainConfig


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_optimizer(model, cfg: BenchConfig, cuda: bool):
    """torch AdamW with fastai's Adam hyper-parameters (config.ADAM) and the same two parameter groups as
    `train` (decay on conv/linear weights, none on BN weights and biases)."""
    import torch

    from .train.fit import decay_groups

    decay, no_decay = decay_groups(model)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(ADAM["mom"], ADAM["sqr_mom"]), eps=ADAM["eps"],
                             **({"fused": True} if cuda else {"foreach": True}))


def _cos(start: float, end: float, pos: float) -> float:
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def one_cycle_at(pos: float, lr: float) -> tuple[float, float]:
    """(lr, Adam beta1) at fraction `pos` of the run: fastai's fit_one_cycle schedule (config.ONE_CYCLE),
    written out in plain Python. Any number of steps works (torch's OneCycleLR divides by zero on very
    short runs)."""
    pct, (m0, m1, m2) = ONE_CYCLE["pct_start"], ONE_CYCLE["moms"]
    lo, hi, end = lr / ONE_CYCLE["div"], lr, lr / ONE_CYCLE["div_final"]
    if pos < pct:
        p = pos / pct
        return _cos(lo, hi, p), _cos(m0, m1, p)
    p = (pos - pct) / (1 - pct)
    return _cos(hi, end, p), _cos(m1, m2, p)


def plain_loop(cache, stats, cfg: BenchConfig, device, epochs: int, t_origin: float, target: float,
               valid_x, valid_y) -> dict[str, Any]:
    """A hand-written loop of the same recipe: AdamW (fused on CUDA, foreach on CPU) with fastai's Adam
    hyper-parameters, fastai's one-cycle schedule of lr and beta1, gradient-norm clipping, the same
    per-item antialiased crops drawn on the device."""
    import torch
    import torch.nn.functional as F

    from .data.augment import random_resized_crop
    from .model import ResNet9

    torch.manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    model = ResNet9(1, int(cache.y_train.max()) + 1).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = plain_optimizer(model, cfg, cuda)
    x, y = cache.x_train.to(device), cache.y_train.to(device)
    n = len(y)
    bs = min(cfg.bs, n)
    steps = n // bs
    total = max(1, epochs * steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    gen_dev = torch.Generator(device=device).manual_seed(cfg.seed)
    train_s, seen, t_target, accs, step = 0.0, 0, None, [], 0
    for ep in range(epochs):
        model.train()
        _sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(steps):
            lr, beta1 = one_cycle_at(step / total, cfg.lr)
            for g in opt.param_groups:
                g["lr"], g["betas"] = lr, (beta1, g["betas"][1])
            idx = perm[i * bs:(i + 1) * bs]
            u = torch.rand((bs, 4), generator=gen_dev, device=device)
            xb = (random_resized_crop(x[idx].float().div_(255.0), cfg.size, cfg.min_scale, u) - stats.mean) / stats.std
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            step += 1
        _sync(device)
        train_s += time.perf_counter() - t0
        seen += steps * bs
        acc = _accuracy(model, valid_x, valid_y, stats, device, bs)
        accs.append(acc)
        if t_target is None and acc >= target:
            t_target = time.perf_counter() - t_origin
    return {"img_s": seen / train_s, "train_s": train_s, "valid_acc": accs, "time_to_target_s": t_target}


def _accuracy(model, vx, vy, stats, device, bs) -> float:
    import torch

    from .data.augment import normalise

    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(vy), bs):
            xb = normalise(vx[i:i + bs], stats.mean, stats.std)
            correct += int((model(xb).argmax(1) == vy[i:i + bs]).sum())
    return correct / len(vy)


def fastai_path(cache, stats, classes, items, cfg: BenchConfig, device, epochs: int, t_origin: float,
                target: float) -> dict[str, Any]:
    """The project's own path: build_cached_dls + make_learner + fit_one_cycle, as `train` does."""
    import fastai.callback.schedule  # noqa: F401
    from fastai.callback.core import Callback
    from fastai.torch_core import set_seed

    from .data.loaders import build_cached_dls
    from .train.fit import group_wd, make_learner

    set_seed(cfg.seed)
    tcfg = TrainConfig(size=cfg.size, epochs=epochs, bs=cfg.bs, lr=cfg.lr, wd=cfg.wd, clip=cfg.clip, seed=cfg.seed,
                       min_scale=cfg.min_scale)
    dls = build_cached_dls(items, classes, stats, tcfg, str(device), cache.side, cache=cache)
    learn = make_learner(tcfg, dls, len(classes))
    rec: dict[str, Any] = {"train_s": 0.0, "seen": 0, "accs": [], "t_target": None}

    class Clock(Callback):
        order = 100

        def before_train(self):
            _sync(device)
            self.t0 = time.perf_counter()

        def after_train(self):
            _sync(device)
            rec["train_s"] += time.perf_counter() - self.t0
            rec["seen"] += len(self.dls.train) * self.dls.train.bs

        def after_epoch(self):
            names = self.learn.recorder.metric_names[1:-1]
            acc = float(dict(zip(names, self.learn.recorder.values[-1]))["accuracy"])
            rec["accs"].append(acc)
            if rec["t_target"] is None and acc >= target:
                rec["t_target"] = time.perf_counter() - t_origin

    learn.logger = lambda *a: None
    with learn.no_bar():
        learn.fit_one_cycle(epochs, cfg.lr, wd=group_wd(tcfg), cbs=[Clock()], **ONE_CYCLE)
    return {"img_s": rec["seen"] / rec["train_s"], "train_s": rec["train_s"], "valid_acc": rec["accs"],
            "time_to_target_s": rec["t_target"], "learn": learn}


def predict_figures(learn_model, cache, stats, art_size: int, paths: list[str], device, bs: int) -> dict[str, float]:
    """img/s of: the raw model on preprocessed tensors; the predictor on the cache; predict from JPEG files."""
    import torch

    from .io.images import decode_many
    from .data.augment import normalise, to_model_input
    from .io.images import squash

    model = learn_model.eval().float()
    n = min(len(paths), len(cache.y_valid))
    vx = cache.x_valid[:n].to(device)
    xs = normalise(vx, stats.mean, stats.std)

    def forward_all(x):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(0, len(x), bs):
                model(x[i:i + bs]).float().softmax(1).cpu()

    forward_all(xs[:bs])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    forward_all(xs)
    _sync(device)
    raw = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    forward_all(normalise(vx, stats.mean, stats.std))
    _sync(device)
    from_cache = n / (time.perf_counter() - t0)
    # from JPEG files: threaded decode + squash, batched forward, as `cxr-fastai predict` does
    t0 = time.perf_counter()
    batch = []
    for _, arr, _ in decode_many(paths[:n], 8 if device.type == "cuda" else 2, fn=lambda a: squash(a, art_size)):
        batch.append(arr)
        if len(batch) == bs:
            forward_all(to_model_input(batch, stats.mean, stats.std, device))
            batch = []
    if batch:
        forward_all(to_model_input(batch, stats.mean, stats.std, device))
    _sync(device)
    files = n / (time.perf_counter() - t0)
    return {"raw_forward_img_s": raw, "predict_cache_img_s": from_cache, "predict_img_s": files, "predict_n": n}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    t_start = time.perf_counter()
    import torch
    import fastai.vision.all  # noqa: F401  (counted as import time, reported on its own)

    from .config import resolve_device
    from .data.discover import check_trainable, discover, scan
    from .data.loaders import build_cache, cache_side_for

    import_s = time.perf_counter() - t_start
    device = torch.device(resolve_device(cfg.device))
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.backends.cudnn.benchmark = True
    t_origin = time.perf_counter()  # time-to-accuracy counts from here: after imports and device start-up
    cuda = device.type == "cuda"
    target = cfg.target_acc or (0.95 if cuda else 0.85)
    limit = cfg.limit or (0 if cuda else 2048)
    ds = discover(cfg.data)
    classes = check_trainable(ds)
    items = ds.items[ds.items.split.isin(("train", "valid"))].reset_index(drop=True)
    rng = np.random.default_rng(cfg.seed)
    tr = items.index[items.split == "train"].to_numpy()
    va = items.index[items.split == "valid"].to_numpy()
    if limit and len(tr) > limit:
        tr = np.sort(rng.choice(tr, limit, replace=False))
        va = np.sort(rng.choice(va, min(len(va), max(256, limit // 4)), replace=False))
    items = items.loc[np.concatenate([tr, va])].reset_index(drop=True)
    from .data.discover import Dataset

    sub = Dataset(ds.root, ds.layout, items, ds.split_given)
    items, skipped, stats = scan(sub, ("train", "valid"), cfg.size, 20_000, cfg.seed)
    cache = build_cache(items, classes, cfg.size, cache_side_for(cfg.size, stats.side))
    prep_s = time.perf_counter() - t_origin
    log(f"bench: {len(cache.y_train)} train / {len(cache.y_valid)} valid images at {cfg.size} px on {device}; "
        f"scan + cache {prep_s:.1f} s")
    vx, vy = cache.x_valid.to(device), cache.y_valid.to(device)

    def plain(ep):
        return plain_loop(cache, stats, cfg, device, ep, time.perf_counter() - prep_s, target, vx, vy)

    def fast(ep):
        return fastai_path(cache, stats, classes, items, cfg, device, ep, time.perf_counter() - prep_s, target)

    log("warm-up: one uncounted epoch of each path")
    plain(1)
    fast(1)
    runs: dict[str, list] = {"plain": [], "fastai": []}
    for i, (name, fn) in enumerate([("plain", plain), ("fastai", fast), ("fastai", fast), ("plain", plain)]):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = fn(cfg.epochs)
        r["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        runs[name].append(r)
        log(f"run {i + 1}/4 {name}: {r['img_s']:.1f} img/s training, valid accuracy {r['valid_acc'][-1]:.3f}")
    p, f = runs["plain"][1], runs["fastai"][1]
    pred = predict_figures(f["learn"].model, cache, stats, cfg.size, items[items.split == "valid"].path.tolist(),
                           device, 512 if cuda else 128)
    gpu_name = torch.cuda.get_device_name(device) if cuda else None
    return {
        "device": str(device), "device_name": gpu_name, "size": cfg.size, "epochs": cfg.epochs, "bs": cfg.bs,
        "n_train": int(len(cache.y_train)), "n_valid": int(len(cache.y_valid)),
        "plain_train_img_s": round(p["img_s"], 1), "fastai_train_img_s": round(f["img_s"], 1),
        "ratio": round(f["img_s"] / p["img_s"], 3),
        "target_acc": target,
        "plain_time_to_target_s": None if p["time_to_target_s"] is None else round(p["time_to_target_s"], 1),
        "fastai_time_to_target_s": None if f["time_to_target_s"] is None else round(f["time_to_target_s"], 1),
        "plain_valid_acc": [round(a, 4) for a in p["valid_acc"]],
        "fastai_valid_acc": [round(a, 4) for a in f["valid_acc"]],
        "import_s": round(import_s, 2), "scan_and_cache_s": round(prep_s, 2),
        "predict_img_s": round(pred["predict_img_s"], 1), "predict_cache_img_s": round(pred["predict_cache_img_s"], 1),
        "raw_forward_img_s": round(pred["raw_forward_img_s"], 1),
        "predict_vs_raw": round(pred["predict_img_s"] / pred["raw_forward_img_s"], 3),
        "predict_n": pred["predict_n"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mib": None if not cuda else round(max(r["peak_gpu_mib"] for rs in runs.values() for r in rs), 1),
        "torch_threads": torch.get_num_threads(),
    }
