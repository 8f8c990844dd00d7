"""`cxr-fastai demo`: the whole path on a small synthetic dataset that the package makes itself."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import DemoConfig, PredictConfig, TrainConfig
from .errors import CxrError

MARKER = ".cxr-fastai-demo"  # only folders carrying it are ever deleted by the demo


@dataclass
class DemoResult:
    test_accuracy: float
    test_balanced_accuracy: float
    files: dict[str, str]


def _clear(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise CxrError(f"{out}: is a file; give --out a folder for the demo's output")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise CxrError(f"{out}: folder is not empty and was not made by the demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by cxr-fastai demo; replaced on every run\n")


def run_demo(cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = lambda m: None,
             warn: Callable[[str], None] = lambda m: None) -> DemoResult:
    from .evaluate.evaluate import evaluate, write_metrics
    from .artifact.export import export_run
    from .evaluate.report import interpret_run
    from .artifact.predict import predict_paths, write_predictions
    from .synth import make_synthetic_dataset
    from .train.fit import train

    out = Path(cfg.out)
    _clear(out)
    data = out / "data"
    log(f"making a synthetic dataset in {data} (procedural images, not real radiographs)")
    n_eval = max(1, round(0.3 * cfg.n_train))
    make_synthetic_dataset(data, {"train": cfg.n_train, "valid": n_eval, "test": n_eval}, size=cfg.image_size,
                           seed=cfg.seed)
    run = out / "run"
    tcfg = TrainConfig(data=str(data), run=str(run), size=cfg.size, epochs=cfg.epochs, bs=cfg.bs, lr=cfg.lr,
                       seed=cfg.seed, widths=cfg.widths, device="cpu")
    log(f"training ResNet9 (widths {'-'.join(map(str, cfg.widths))}) at {cfg.size} px for {cfg.epochs} epochs")
    train(tcfg, force=True, log=log, warn=warn)
    log("interpreting the validation set")
    report = interpret_run(run, k=12, device="cpu")
    art_dir = out / "export"
    log(f"exporting to {art_dir}")
    export_run(run, to=art_dir, force=True)
    preds = out / "predictions.csv"
    log(f"predicting the synthetic test images into {preds}")
    write_predictions(predict_paths(art_dir, [data / "test"], PredictConfig(device="cpu")), preds, "csv")
    metrics = out / "metrics.json"
    res = evaluate(art_dir, data, split="test", cfg=PredictConfig(device="cpu"), warn=warn)
    write_metrics(res, metrics)
    files = {
        "synthetic data": str(data),
        "run folder": str(run),
        "training log": str(run / "history.csv"),
        "report folder": str(report.folder),
        **{Path(f).name: f for f in report.files},
        "artifact": str(art_dir),
        "manifest": str(art_dir / "manifest.json"),
        "predictions": str(preds),
        "test metrics": str(metrics),
    }
    return DemoResult(res.accuracy, res.balanced_accuracy, files)
