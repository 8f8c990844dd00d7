"""Run folders: what `train` leaves behind, read back for resume, interpret and export.

A run folder holds everything needed to resume, interpret or export without the original command:
  config.json       the TrainConfig (data path included)
  run.json          class order, pixel stats, cache side, layout, counts, best epoch and its validation metrics,
                    valid_n (validation images scored per epoch), data_parallel (processes, backend, batch split:
                    a run trained by several processes, train/distributed.py)
  items.csv         the train/valid images actually used (unreadable ones left out)
  skipped.csv       unreadable images: path,error
  history.csv       one row per epoch: losses, metrics, seconds
  checkpoints/      best.pth (weights of the best epoch), last.pth (weights + optimizer + epoch)
  learner.pkl       fastai `learn.export` of the best model, written when training finishes
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import TrainConfig
from ..data.discover import PixelStats
from ..errors import RunError

BEST_METRIC = "balanced_accuracy_score"  # fastai's name for BalancedAccuracy(): the epoch kept


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


def cache_side(info: RunInfo) -> int:
    """The run's cache side (run.json); runs made before it was recorded cached at 2x the input size."""
    return int(info.meta.get("cache_side") or 2 * info.cfg.size)


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


def versions() -> dict[str, str]:
    import platform

    import fastai
    import torch
    import torchvision

    from .. import __version__

    import numpy

    return {"cxr_fastai": __version__, "fastai": fastai.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def machine() -> dict:
    """The processor a run trained on (architecture, model name, cores): the same command and seed give the
    same numbers on one machine but not on every one, so a run says where its numbers came from."""
    import os
    import platform

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"arch": platform.machine(), "cpu": cpu or "unknown", "cores": os.cpu_count()}


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
