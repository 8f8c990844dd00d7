"""Does the cached path learn as well as fastai's per-item PIL path? (Was a CI test; it trains four models.)

    .venv/bin/python benchmarks/cached_vs_pil.py [--data ../shared/data/cxr3] [--out runs/cached-vs-pil]
        [--train 667 --valid 300 --size 32 --epochs 3 --seeds 0 1]

A class-balanced slice of cxr3 (per class: --train training and --valid validation images, drawn with a
fixed seed, read in place: nothing is copied) is written as a labels.csv beside the runs; both data
paths train on it with the same recipe and seeds, and the script prints each run's final validation
accuracy, the mean per path and the difference (the old test asked for both > 0.6 and a difference
<= 0.03). One 3-epoch run alone swings by a few points: that is why two seeds are averaged.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd


def make_slice(root: Path, dest: Path, n_train: int, n_valid: int, seed: int = 1) -> Path:
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    per = {"train": n_train, "valid": n_valid}
    parts = [g.sample(min(per[s], len(g)), random_state=seed) for (s, _), g in df.groupby(["split", "label"])
             if s in per]
    sl = pd.concat(parts).sort_values("path")
    sl["path"] = [str((root / p).resolve()) for p in sl.path]   # absolute: the images stay where they are
    dest.mkdir(parents=True, exist_ok=True)
    # labels.csv paths must stay inside its folder: link the images' root beside it
    link = dest / "images"
    if not link.exists():
        link.symlink_to(root.resolve(), target_is_directory=True)
    sl["path"] = [str(Path("images") / Path(p).relative_to(root.resolve())) for p in sl.path]
    sl.to_csv(dest / "labels.csv", index=False)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/cxr3")
    ap.add_argument("--out", default="runs/cached-vs-pil")
    ap.add_argument("--train", type=int, default=667)
    ap.add_argument("--valid", type=int, default=300)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = ap.parse_args()
    out = Path(a.out)
    data = make_slice(Path(a.data), out / "data", a.train, a.valid)
    acc: dict[str, list[float]] = {}
    for path in ("cached", "pil"):
        for seed in a.seeds:
            run = out / f"{path}-{seed}"
            # a moderate peak lr: the one-cycle run ends settled, so the last epoch is not a lucky swing
            r = subprocess.run([sys.executable, "-m", "cxr_fastai", "train", str(data), "--run", str(run),
                                "--size", str(a.size), "--epochs", str(a.epochs), "--bs", "64", "--lr", "1e-3",
                                "--seed", str(seed), "--data-path", path, "--quiet", "--force"],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"train failed: {r.stderr.strip()}")
            final = float(pd.read_csv(run / "history.csv").accuracy.iloc[-1])
            acc.setdefault(path, []).append(final)
            print(f"{path} seed {seed}: final validation accuracy {final:.4f}", flush=True)
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    print(json.dumps({"runs": acc, "mean": mean, "cached_minus_pil": mean["cached"] - mean["pil"]}))


if __name__ == "__main__":
    main()
