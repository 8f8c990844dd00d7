"""Load an artifact and predict image files in batches, streaming: memory stays flat with the count."""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..config import PredictConfig, resolve_device
from ..errors import CxrError, DataError
from ..io.files import walk_files
from ..io.images import IMAGE_EXTENSIONS, decode_many, is_image_path, read_step, squash
from .export import Artifact, load_model, load_pickle_learner, read_manifest


def collect_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given (any extension: an unreadable one is reported per file), folders recursively (symlinked
    folders followed once each; hidden files and OS debris such as .DS_Store, Thumbs.db, __MACOSX/ skipped)."""
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = walk_files(p, is_image_path)
            if not found:
                raise DataError(f"{p}: folder holds no images ({' '.join(IMAGE_EXTENSIONS)} or DICOM files)")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not out:
        raise DataError("no input images given")
    return out


class Predictor:
    """Probabilities from uint8 grey arrays; the same preprocessing as validation in training."""

    def __init__(self, art: Artifact, device: str = "cpu", tta: bool = False):
        import torch

        self.art, self.classes, self.size, self.tta = art, art.classes, art.size, tta
        self.device = torch.device(resolve_device(device))
        self.model = load_model(art).to(self.device)

    def preprocess(self, arrays: Sequence[np.ndarray], side: int | None = None):
        from ..data.augment import to_model_input

        side = side or self.size
        return to_model_input([squash(a, side) for a in arrays], self.art.mean, self.art.std, self.device)

    def shrink(self, arr: np.ndarray):
        """What `probs` needs of one decoded image, as small as it can be: the image squashed to the input
        size; with TTA also squashed to the run's cache side, for the crops."""
        arr = read_step(arr, self.art.contrast, self.art.crop_border)
        small = squash(arr, self.size)
        return (small, squash(arr, self.art.cache_side)) if self.tta else small

    def probs(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities for decoded grey images (any size), as read_grey returns them."""
        return self.probs_shrunk([self.shrink(a) for a in arrays])

    def probs_shrunk(self, shrunk: Sequence) -> np.ndarray:
        """Probabilities for what `shrink` made of decoded images."""
        import torch

        from ..data.augment import tta_views

        with torch.inference_mode():
            if not self.tta:
                views = [self.preprocess(shrunk)]
            else:
                views = tta_views(self.preprocess([a for a, _ in shrunk]),
                                  self.preprocess([b for _, b in shrunk], self.art.cache_side))
            p = sum(torch.softmax(self._forward(v).float(), dim=1) for v in views) / len(views)
            return p.cpu().numpy()

    def _forward(self, x):
        import torch

        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(x)
        return self.model(x)


class PicklePredictor:
    """fastai's own path: load_learner(model.pkl) + dls.test_dl + get_preds. Unpickling runs code."""

    def __init__(self, art: Artifact, device: str = "cpu"):
        self.art, self.classes, self.size = art, art.classes, art.size
        self.learn = load_pickle_learner(art)
        vocab = list(self.learn.dls.vocab)
        if vocab != self.classes:
            from ..errors import ArtifactError

            raise ArtifactError(f"{art.folder}: model.pkl classes {vocab} differ from the manifest's {self.classes}")

    def probs_paths(self, paths: Sequence[str]) -> np.ndarray:
        import pandas as pd

        dl = self.learn.dls.test_dl(pd.DataFrame({"path": [str(p) for p in paths]}), bs=len(paths))
        with self.learn.no_bar():
            p, _ = self.learn.get_preds(dl=dl)
        return p.float().numpy()


def load_predictor(artifact: str | Path, cfg: PredictConfig):
    """The predictor cfg asks for: torch (safetensors, or model.pkl with trust_pickle) or onnx (model.onnx in
    onnxruntime; imports neither torch nor fastai)."""
    if cfg.runtime == "onnx":
        from .onnx_runtime import OnnxPredictor, check_onnx_options

        check_onnx_options(cfg)
        return OnnxPredictor(read_manifest(artifact), threads=cfg.onnx_threads)
    if cfg.runtime != "torch":
        raise CxrError(f"unknown runtime {cfg.runtime!r}; use torch or onnx")
    art = read_manifest(artifact)
    if cfg.trust_pickle and cfg.tta:
        raise CxrError("--tta works with the safetensors weights only; drop --trust-pickle or --tta")
    return PicklePredictor(art, cfg.device) if cfg.trust_pickle else Predictor(art, cfg.device, tta=cfg.tta)


def iter_probs(pred, paths: Sequence[Path], cfg: PredictConfig) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """(path, probabilities or None, error) for every path, in order, cfg.bs images at a time."""
    names = [str(p) for p in paths]
    batch: list[tuple[int, np.ndarray]] = []

    def flush():
        idx = [i for i, _ in batch]
        if isinstance(pred, PicklePredictor):
            pr = pred.probs_paths([names[i] for i in idx])
        else:
            pr = pred.probs_shrunk([a for _, a in batch])
        for i, row in zip(idx, pr):
            yield paths[i], row, ""
        batch.clear()

    for i, arr, err in decode_many(names, cfg.workers):
        if arr is None:
            yield from flush() if batch else ()
            yield paths[i], None, err
            continue
        # shrink right away: a batch of full-size radiographs would cost far more memory
        batch.append((i, arr if isinstance(pred, PicklePredictor) else pred.shrink(arr)))
        if len(batch) >= cfg.bs:
            yield from flush()
    if batch:
        yield from flush()


def rows(pred, paths: Sequence[Path], cfg: PredictConfig) -> Iterator[dict]:
    classes = pred.classes
    for p, pr, err in iter_probs(pred, paths, cfg):
        row = {"path": str(p)}
        if pr is None:
            row["prediction"] = None
            row.update({f"p_{c}": None for c in classes})
            row["error"] = err
        else:
            row["prediction"] = classes[int(np.argmax(pr))]
            row.update({f"p_{c}": float(v) for c, v in zip(classes, pr)})
            row["error"] = ""
        yield row


@dataclass
class PredictionResult:
    classes: list[str]
    rows: Iterable[dict]
    n: int = 0
    n_errors: int = 0


def predict_paths(artifact: str | Path, inputs: Sequence[str | Path], cfg: PredictConfig = PredictConfig()) -> PredictionResult:
    """Lazy: rows are computed while write_predictions consumes them."""
    paths = collect_paths(inputs)
    pred = load_predictor(artifact, cfg)
    return PredictionResult(pred.classes, rows(pred, paths, cfg))


def _shown(value: str, encoding: str) -> str:
    """A path (or an error naming one) as text a stream of `encoding` can take, for stdout.

    A file name that is not valid UTF-8 reaches Python with lone surrogates (os.fsdecode), which a strict
    stdout refuses: show its bytes backslash-escaped instead (bad\\xff.png), as `ls -b` does.
    """
    try:
        value.encode(encoding)
        return value
    except UnicodeEncodeError:
        pass
    try:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        pass
    return value.encode(encoding, "backslashreplace").decode(encoding)


def write_predictions(res: PredictionResult, out: Path | None, fmt: str = "csv") -> None:
    """Stream rows to `out` (written under a temporary name, renamed at the end) or to stdout."""
    from ..io.files import atomic_save_path

    cols = ["path", "prediction", *[f"p_{c}" for c in res.classes], "error"]

    def emit(f, show=lambda v: v):
        n = n_err = 0
        first_err = ""
        if fmt == "csv":
            w = csv.writer(f, lineterminator="\n")
            w.writerow(cols)
            for r in res.rows:
                w.writerow(["" if r[c] is None else (f"{r[c]:.6f}" if isinstance(r[c], float) else show(r[c]))
                            for c in cols])
                n += 1
                n_err += bool(r["error"])
                first_err = first_err or r["error"]
        else:
            f.write("[")
            for r in res.rows:
                f.write(("," if n else "") + "\n  " + json.dumps({c: r[c] for c in cols}, allow_nan=False))
                n += 1
                n_err += bool(r["error"])
                first_err = first_err or r["error"]
            f.write("\n]\n")
        res.n, res.n_errors = n, n_err
        if n == n_err:
            # name the first offending file (its error starts with its path) and what to do
            raise DataError(f"none of the {n} input image(s) could be read (first: {first_err})"
                            + ("" if out is None else f"; nothing written to {out}")
                            + "; give readable image files (.jpg .jpeg .png .bmp .tif .tiff)")

    # JSON needs nothing: json.dumps escapes non-ASCII (and the surrogates of a non-UTF-8 name) itself
    if out is None:
        enc = getattr(sys.stdout, "encoding", None) or "utf-8"
        emit(sys.stdout, lambda v: _shown(v, enc))
        return
    with atomic_save_path(Path(out)) as tmp:
        # surrogateescape: a non-UTF-8 file name is written back as its own bytes
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            emit(f)
