"""Does `cxr-fastai predict` stream? Peak memory must stay flat as the image count grows.

For each count N (default 2,000 and 20,000) this makes a folder of N symlinks to the cxr3 test images
(repeated as often as needed) in a temporary folder, runs

    python -m cxr_fastai predict ARTIFACT LINKS --out TMP/pred_N.csv --device cpu

in a fresh wrapper process that measures the peak RSS of its one child with
resource.getrusage(RUSAGE_CHILDREN), plus wall time, and prints a table (or, with --json, one JSON object
{"n": [...], "peak_rss_mib": [...], "img_s": [...], ...}). Exit status 1 when the peak at the largest N is
more than --max-growth times the peak at the smallest N, or when a predictions file has the wrong row count.

Without --artifact it trains and exports a tiny 32 px model on synthetic data first (in the temporary
folder). Images come from $CXR_DATA or ../shared/data/cxr3 beside the repository; nothing is written
beside them.

    python benchmarks/predict_memory.py [--artifact DIR] [--counts 2000 20000] [--json]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# A fresh process per count: RUSAGE_CHILDREN then covers exactly one predict run.
WRAPPER = r'''
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall_s": wall, "maxrss_kib": ru.ru_maxrss, "stderr": p.stderr[-2000:]}))
'''


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def cli(*args) -> None:
    p = subprocess.run([sys.executable, "-m", "cxr_fastai", *map(str, args)], capture_output=True, text=True,
                       env=env())
    if p.returncode:
        sys.exit(f"`cxr-fastai {' '.join(map(str, args))}` failed ({p.returncode}):\n{p.stderr}")


def tiny_artifact(tmp: Path, log) -> Path:
    """Train (32 px, 1 epoch, 8 synthetic images per class) and export a throwaway model."""
    sys.path.insert(0, str(REPO))
    from cxr_fastai.synth import make_synthetic_dataset

    log("no --artifact: training a tiny 32 px model on synthetic images ...")
    ds = make_synthetic_dataset(tmp / "synthetic", {"train": 8, "valid": 4}, size=64)
    cli("train", ds, "--run", tmp / "run", "--size", 32, "--epochs", 1, "--bs", 8, "--device", "cpu", "-q")
    cli("export", tmp / "run", "--to", tmp / "artifact")
    return tmp / "artifact"


def source_images(data: Path) -> list[Path]:
    test = data / "test"
    if not test.is_dir():
        sys.exit(f"{test}: not found; set $CXR_DATA or --data to the cxr3 dataset root")
    imgs = sorted(p.resolve() for p in test.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    if not imgs:
        sys.exit(f"{test}: holds no images")
    return imgs


def link_folder(folder: Path, imgs: list[Path], n: int) -> Path:
    """n symlinks named 000000_x.jpg ... to imgs, cycling through them."""
    folder.mkdir(parents=True)
    for i in range(n):
        src = imgs[i % len(imgs)]
        os.symlink(src, folder / f"{i:06d}{src.suffix.lower()}")
    return folder


def measure(artifact: Path, links: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "cxr_fastai", "predict", str(artifact), str(links), "--out", str(out),
           "--device", args.device, "--bs", str(args.bs), "--workers", str(args.workers)]
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env())
    if p.returncode:
        sys.exit(f"wrapper failed:\n{p.stderr}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if r["rc"]:
        sys.exit(f"predict failed ({r['rc']}):\n{r['stderr']}")
    with open(out, newline="") as f:
        rd = csv.DictReader(f)
        rows = errors = 0
        for row in rd:
            rows += 1
            errors += bool(row["error"])
    return {**r, "rows": rows, "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, help="exported model folder (default: train a tiny one)")
    ap.add_argument("--counts", type=int, nargs="+", default=[2_000, 20_000], help="image counts to compare")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data" / "cxr3")),
                    help="cxr3 root (its test/ images are repeated)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-growth", type=float, default=1.25,
                    help="fail when peak RSS at the largest count exceeds this times the smallest's")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    log = (lambda m: print(m, file=sys.stderr, flush=True))

    imgs = source_images(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="cxr_predict_memory_"))
    try:
        artifact = args.artifact or tiny_artifact(tmp, log)
        res = []
        for n in sorted(args.counts):
            log(f"predict over {n} images ({len(imgs)} distinct, symlinked) ...")
            links = link_folder(tmp / f"links_{n}", imgs, n)
            r = measure(artifact, links, tmp / f"pred_{n}.csv", args)
            shutil.rmtree(links)
            (tmp / f"pred_{n}.csv").unlink()
            r.update(n=n, peak_rss_mib=r["maxrss_kib"] / 1024, img_s=n / r["wall_s"])
            res.append(r)
            log(f"  peak RSS {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.1f} s, {r['img_s']:.0f} img/s")
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    bad = [f"n={r['n']}: {r['rows']} rows, {r['errors']} errors" for r in res if r["rows"] != r["n"] or r["errors"]]
    growth = res[-1]["peak_rss_mib"] / res[0]["peak_rss_mib"]
    if len(res) > 1 and res[-1]["wall_s"] > res[0]["wall_s"]:
        marginal = (res[-1]["n"] - res[0]["n"]) / (res[-1]["wall_s"] - res[0]["wall_s"])
    else:
        marginal = None
    if args.json:
        print(json.dumps({"n": [r["n"] for r in res], "peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in res],
                          "img_s": [round(r["img_s"], 1) for r in res], "wall_s": [round(r["wall_s"], 2) for r in res],
                          "growth": round(growth, 3), "marginal_img_s": marginal and round(marginal, 1),
                          "artifact": str(args.artifact) if args.artifact else "tiny 32 px (trained here)"}))
    else:
        print(f"{'images':>8}  {'peak RSS MiB':>12}  {'wall s':>7}  {'img/s':>7}")
        for r in res:
            print(f"{r['n']:>8}  {r['peak_rss_mib']:>12.1f}  {r['wall_s']:>7.1f}  {r['img_s']:>7.0f}")
        print(f"peak RSS growth {res[0]['n']} -> {res[-1]['n']}: x{growth:.3f} (limit x{args.max_growth})"
              + (f"; marginal rate {marginal:.0f} img/s (start-up excluded)" if marginal else ""))
    for b in bad:
        print(f"error: predictions file incomplete: {b}", file=sys.stderr)
    if growth > args.max_growth:
        print(f"error: peak memory grows with the image count (x{growth:.2f})", file=sys.stderr)
    return 1 if bad or growth > args.max_growth else 0


if __name__ == "__main__":
    sys.exit(main())
