"""Does model.onnx in onnxruntime give the torch Predictor's numbers, and how fast is it on the CPU?

For N images of a cxr3 split (default: 200 of the test split, a seeded sample; $CXR_DATA or
../shared/data/cxr3 beside the repository, or --data) this decodes each once, then

  * parity: probabilities of both runtimes, each through its own preprocessing (the torch Predictor and
    cxr_fastai.artifact.onnx_runtime.OnnxPredictor, batch --bs): max |p_onnx - p_torch| over images and
    classes, and how often the argmax agrees;
  * speed: CPU img/s of the model forward alone on the same preprocessed batches (decoding and
    preprocessing excluded): torch (softmax of the ResNet9, inference mode) vs onnxruntime (the exported
    graph, softmax inside), same batch size and thread count, one warm-up pass each, then --reps passes
    alternating the two; the median pass is reported.

    python benchmarks/onnx_parity.py ARTIFACT [--n 200] [--data DIR] [--split test] [--bs 64] [--reps 5]
                                              [--threads T] [--json]

Exit status 1 when the max difference exceeds --atol (1e-4). Nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def default_data() -> Path:
    return Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data" / "cxr3"))


def pick_images(data: Path, split: str, n: int, seed: int = 0) -> list[Path]:
    """n paths of `split` (labels.csv, else the DATA/SPLIT folder), a seeded sample in a fixed order."""
    import numpy as np

    from cxr_fastai.io.images import is_image_name

    if (data / "labels.csv").is_file():
        import pandas as pd

        df = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
        paths = [data / p for p in df.path[df.split == split]]
    else:
        paths = sorted(p for p in (data / split).rglob("*") if p.is_file() and is_image_name(p.name))
    if not paths:
        sys.exit(f"{data}: no images in split {split!r}; give the cxr3 root with --data or $CXR_DATA")
    idx = np.random.default_rng(seed).permutation(len(paths))[:n]
    return [paths[i] for i in sorted(idx)]


def batches(items: list, bs: int) -> list[list]:
    return [items[i:i + bs] for i in range(0, len(items), bs)]


def timed(fn, xs) -> float:
    t = time.perf_counter()
    for x in xs:
        fn(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path, help="An exported model folder holding model.onnx.")
    ap.add_argument("--n", type=int, default=200, help="Images (default 200).")
    ap.add_argument("--data", type=Path, default=None, help="cxr3 root (default $CXR_DATA or ../shared/data/cxr3).")
    ap.add_argument("--split", default="test")
    ap.add_argument("--bs", type=int, default=64, help="Batch size of both runtimes (default 64).")
    ap.add_argument("--reps", type=int, default=5, help="Timed passes per runtime after the warm-up (default 5).")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads of both runtimes (default: torch's current count, given to onnxruntime too).")
    ap.add_argument("--atol", type=float, default=1e-4, help="Exit 1 when max |p_onnx - p_torch| exceeds this.")
    ap.add_argument("--json", action="store_true", help="Print one JSON object.")
    a = ap.parse_args()

    import numpy as np
    import torch

    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.onnx_runtime import OnnxPredictor
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.errors import CxrError
    from cxr_fastai.io.images import decode_many

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    data = a.data or default_data()
    try:
        art = read_manifest(a.artifact)
        tp = Predictor(art, "cpu")
        op = OnnxPredictor(art, threads=threads)
    except CxrError as e:
        sys.exit(f"error: {e}")
    paths = pick_images(data, a.split, a.n)
    arrays, unreadable = [], 0
    for _, arr, _ in decode_many([str(p) for p in paths], workers=4):
        if arr is None:
            unreadable += 1
        else:
            arrays.append(arr)
    if not arrays:
        sys.exit(f"error: none of the {len(paths)} images could be read")

    # parity: each runtime through its own shrink + preprocessing + model
    t_small = [tp.shrink(x) for x in arrays]
    o_small = [op.shrink(x) for x in arrays]
    p_t = np.concatenate([tp.probs_shrunk(b) for b in batches(t_small, a.bs)])
    p_o = np.concatenate([op.probs_shrunk(b) for b in batches(o_small, a.bs)])
    diff = float(np.abs(p_o - p_t).max())
    agree = int((p_o.argmax(1) == p_t.argmax(1)).sum())

    # speed: the model forward only, on batches preprocessed beforehand
    xt = [tp.preprocess(b) for b in batches(t_small, a.bs)]
    xo = [op.preprocess(b) for b in batches(o_small, a.bs)]

    def torch_fwd(x):
        with torch.inference_mode():
            return torch.softmax(tp.model(x).float(), dim=1)

    timed(torch_fwd, xt)
    timed(op.run, xo)  # warm-up
    t_times, o_times = [], []
    for _ in range(a.reps):
        t_times.append(timed(torch_fwd, xt))
        o_times.append(timed(op.run, xo))
    n = len(arrays)
    t_ips, o_ips = n / statistics.median(t_times), n / statistics.median(o_times)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = {
        "artifact": str(a.artifact), "input_px": art.size, "classes": len(art.classes),
        "widths": art.manifest["architecture"]["widths"], "opset": art.manifest["onnx"]["opset"],
        "data": str(data), "split": a.split, "images": n, "unreadable": unreadable,
        "max_abs_diff": diff, "argmax_agree": agree, "argmax_agree_pct": 100.0 * agree / n,
        "bs": a.bs, "reps": a.reps, "torch_img_s": t_ips, "onnx_img_s": o_ips, "onnx_over_torch": o_ips / t_ips,
        "torch_threads": threads, "onnx_intra_op_threads": threads, "torch_version": torch.__version__,
        "onnxruntime_version": __import__("onnxruntime").__version__, "cpu_count": os.cpu_count(),
        "load_avg_1min_at_end": load,
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(f"artifact: {a.artifact} ({art.size} px, {len(art.classes)} classes, widths {res['widths']}, "
              f"onnx opset {res['opset']})")
        print(f"images: {n} of {data} split {a.split!r}" + (f" ({unreadable} unreadable, left out)" if unreadable else ""))
        print(f"max |p_onnx - p_torch|: {diff:.3g} (over {n} images x {len(art.classes)} classes)")
        print(f"argmax agreement: {agree}/{n} ({res['argmax_agree_pct']:.2f}%)")
        print(f"CPU forward, batch {a.bs}, decoding and preprocessing excluded, median of {a.reps} passes after a warm-up:")
        print(f"  torch {torch.__version__:<14}: {t_ips:8.1f} img/s  (torch threads {threads})")
        print(f"  onnxruntime {res['onnxruntime_version']:<8}: {o_ips:8.1f} img/s  (intra-op threads {threads}, "
              "CPUExecutionProvider)")
        print(f"  onnxruntime / torch: {res['onnx_over_torch']:.2f}x")
        if load is not None:
            print(f"load average (1 min) at the end: {load:.2f} on {os.cpu_count()} CPUs "
                  "(other work on the machine slows both runtimes)")
    if diff > a.atol:
        sys.exit(1)


if __name__ == "__main__":
    main()
