"""Run training recipes through the CLI and collect an ablation table (valid, and test when asked).

    .venv/bin/python benchmarks/ablation.py --data ../shared/data/cxr3 --out runs/ablation \
        --recipes base ls01 cw --epochs 3 --size 32 [--test] [--json]

Each recipe is `cxr-fastai train` + `export` + `evaluate --split valid` (and `--split test` with --test),
timed end to end. Results go to OUT/results.jsonl (one line per recipe, appended) so an interrupted
ablation keeps what it measured; `--table` prints the markdown table from that file.
Choices are made on validation; run --test only for the recipes compared at the end.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RECIPES: dict[str, list[str]] = {
    "base": [],                                        # the train defaults
    "lr4e-3": ["--lr", "4e-3"],
    "lr1e-3": ["--lr", "1e-3"],
    "bs128": ["--bs", "128"],
    "ls0.1": ["--label-smoothing", "0.1"],
    "cw": ["--class-weights"],
    "minscale0.6": ["--min-scale", "0.6"],
    "minscale0.35": ["--min-scale", "0.35"],      # the default before the 10-epoch comparison
    "wd5e-4": ["--wd", "5e-4"],
    "no-nih": ["--exclude-source", "darkcovidnet_nih"],  # leave-one-source-out
}


def device_name() -> str:
    """What `train` will run on (its --device auto): the GPU's name, or the CPU and its core count."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_fastai", *args], capture_output=True, text=True)


def evaluate(art: Path, data: str, split: str, extra: list[str], must: bool = True) -> dict | None:
    out = art.parent / f"{art.name}-{split}{'-' + extra[-1].strip('-') if extra else ''}.json"
    r = cli("evaluate", str(art), data, "--split", split, "--out", str(out), *extra)
    if r.returncode != 0:
        if not must:
            return None
        raise SystemExit(f"evaluate failed: {r.stderr.strip()}")
    m = json.loads(out.read_text())
    return {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "n": m["n"],
            "sensitivity": {c: v["sensitivity"] for c, v in m["per_class"].items()},
            "ci95_accuracy": m.get("ci95", {}).get("accuracy")}


def tta_row(name: str, args: argparse.Namespace) -> dict:
    """RECIPE+tta: RECIPE's exported model, evaluated with --tta (no new training)."""
    base = name[: -len("+tta")]
    out = Path(args.out)
    art = out / f"{base}-export"
    rows = [r for r in read_rows(out / "results.jsonl") if r["recipe"] == base]
    if not art.is_dir() or not rows:
        raise SystemExit(f"{name}: train recipe {base} first (no {art} or no result row)")
    row = {"recipe": name, "command": rows[-1]["command"] + "; evaluate --tta", "device": args.device_name,
           "train_wall_s": rows[-1]["train_wall_s"], "valid": evaluate(art, args.data, "valid", ["--tta"])}
    if args.test:
        row["test"] = evaluate(art, args.data, "test", ["--tta"])
    return row


def add_test(names: list[str], args: argparse.Namespace) -> None:
    """Fill the test column of recipes already trained (the ones compared at the end), in place."""
    res = Path(args.out) / "results.jsonl"
    rows = read_rows(res)
    for r in rows:
        if r["recipe"] in names and not r.get("test"):
            base = r["recipe"].removesuffix("+tta")
            art = Path(args.out) / f"{base}-export"
            r["test"] = evaluate(art, args.data, "test", ["--tta"] if r["recipe"].endswith("+tta") else [])
            print(json.dumps({"recipe": r["recipe"], "test": r["test"]}), flush=True)
    tmp = res.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(res)


def read_rows(res: Path) -> list[dict]:
    return [json.loads(line) for line in res.read_text().splitlines() if line.strip()] if res.exists() else []


def run_recipe(name: str, args: argparse.Namespace) -> dict:
    if name.endswith("+tta"):
        return tta_row(name, args)
    out = Path(args.out)
    run, art = out / name, out / f"{name}-export"
    flags = ["--size", str(args.size), "--epochs", str(args.epochs), *RECIPES[name]]
    t0 = time.perf_counter()
    r = cli("train", args.data, "--run", str(run), *flags, "--force", "--quiet")
    if r.returncode != 0:
        raise SystemExit(f"train {name} failed: {r.stderr.strip()}")
    train_s = time.perf_counter() - t0
    r = cli("export", str(run), "--to", str(art), "--force")
    if r.returncode != 0:
        raise SystemExit(f"export {name} failed: {r.stderr.strip()}")
    row = {"recipe": name, "command": f"cxr-fastai train DATA {' '.join(flags)}", "device": args.device_name,
           "train_wall_s": round(train_s, 1), "valid": evaluate(art, args.data, "valid", [])}
    if args.test:
        row["test"] = evaluate(art, args.data, "test", [])
    if name == "no-nih":
        # the unseen source: its images from every split, scored by a model that never saw one
        row["held_out_source"] = {s: evaluate(art, args.data, s, ["--source", "darkcovidnet_nih"], must=False)
                                  for s in ("train", "valid", "test")}
    return row


def table(rows: list[dict]) -> str:
    head = ("| recipe | command | device | train wall | valid acc | valid bal. acc | test acc | test sens. "
            "COVID19 / NORMAL / PNEUMONIA |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        t = r.get("test")
        sens = " / ".join(f"{v:.3f}" for v in t["sensitivity"].values()) if t else "not run"
        lines.append(f"| {r['recipe']} | `{r['command']}` | {r['device']} | {r['train_wall_s'] / 60:.1f} min | "
                     f"{r['valid']['accuracy']:.4f} | {r['valid']['balanced_accuracy']:.4f} | "
                     f"{t['accuracy']:.4f} | {sens} |" if t else
                     f"| {r['recipe']} | `{r['command']}` | {r['device']} | {r['train_wall_s'] / 60:.1f} min | "
                     f"{r['valid']['accuracy']:.4f} | {r['valid']['balanced_accuracy']:.4f} | not run | not run |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cxr3")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--recipes", nargs="*", default=["base"],
                    choices=sorted(RECIPES) + sorted(f"{r}+tta" for r in RECIPES))
    ap.add_argument("--add-test", nargs="*", default=[], metavar="RECIPE",
                    help="evaluate these already-trained recipes on the test split and exit")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--test", action="store_true", help="also evaluate on the test split")
    ap.add_argument("--table", action="store_true", help="print the table of results so far and exit")
    args = ap.parse_args()
    args.device_name = device_name()
    res = Path(args.out) / "results.jsonl"
    if args.add_test:
        add_test(args.add_test, args)
    elif not args.table:
        res.parent.mkdir(parents=True, exist_ok=True)
        for name in args.recipes:
            row = run_recipe(name, args)
            with open(res, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(read_rows(res)))


if __name__ == "__main__":
    main()
