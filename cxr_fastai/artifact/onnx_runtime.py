"""`--runtime onnx`: predict with the artifact's model.onnx in onnxruntime, on the CPU, without torch or fastai.

Preprocessing is numpy only and does the arithmetic of `data.augment.normalise` step for step (float32
x / 255, minus the mean, divided by the std), so the probabilities match the torch Predictor's to float
rounding inside the network. The file is checked against the manifest's SHA-256 before onnxruntime reads
it, and the session's input and output against the manifest (name, input side, class count).

Nothing here may import torch or fastai (a test runs `predict --runtime onnx` with both blocked).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..config import PredictConfig
from ..errors import ArtifactError, CxrError
from ..io.images import read_step, squash
from .export import MODEL_ONNX, ONNX_INPUT, ONNX_OUTPUT, Artifact, verify_file


def check_onnx_options(cfg: PredictConfig) -> None:
    """The options the onnx runtime cannot honour, refused before anything is loaded."""
    if cfg.tta:
        raise CxrError("--tta needs the torch runtime; drop --tta or use --runtime torch")
    if cfg.trust_pickle:
        raise CxrError("--trust-pickle loads model.pkl with fastai (the torch runtime); drop it with --runtime onnx")
    if cfg.device == "cuda":
        raise CxrError("--runtime onnx runs on the CPU; use --device auto or cpu, or --runtime torch for CUDA")


class OnnxPredictor:
    """Probabilities from uint8 grey arrays with model.onnx: the interface iter_probs and rows use
    (`classes`, `art`, `shrink`, `probs_shrunk`, `probs`)."""

    def __init__(self, art: Artifact, threads: int = 0):
        """threads: onnxruntime intra-op threads (0: its default, one per physical core)."""
        self.art, self.classes, self.size, self.tta = art, art.classes, art.size, False
        self.mean, self.std = np.float32(art.mean), np.float32(art.std)
        section = art.manifest.get("onnx")
        if not art.has_onnx:
            raise ArtifactError(f"{art.folder}: this artifact has no {MODEL_ONNX} (exported before ONNX output "
                                f"existed); re-export it with `cxr-fastai export RUN --to {art.folder} --force`, "
                                "or use --runtime torch")
        path = verify_file(art, MODEL_ONNX)  # before onnxruntime parses a byte of it
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise CxrError(f"--runtime onnx needs onnxruntime ({e}); pip install onnxruntime") from e
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: no per-session warnings on stderr
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
            first = " ".join(str(e).split())[:300]
            raise ArtifactError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {first}); "
                                "re-export the model") from e
        self.input_name, self.output_name = self._check_session(section, path)

    def _check_session(self, section: Any, path) -> tuple[str, str]:
        """The session's one input and its output must be the ones the manifest describes: (batch, 1, S, S)
        float32 in, (batch, n classes) out. Returns their names."""
        try:
            want_in = str(section["input"]["name"])
            want_out = str(section["output"]["name"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{self.art.folder}: the manifest's onnx section is malformed ({e}); "
                                "re-export the model") from e
        if (want_in, want_out) != (ONNX_INPUT, ONNX_OUTPUT):
            raise ArtifactError(f"{self.art.folder}: the manifest's onnx section names input {want_in!r} and output "
                                f"{want_out!r}, not {ONNX_INPUT!r} and {ONNX_OUTPUT!r}; re-export the model")
        s, n = self.size, len(self.classes)
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        fix = "this model.onnx is not the one this manifest was exported with; re-export the model"
        if list(ins) != [want_in]:
            raise ArtifactError(f"{path}: inputs {list(ins)} do not match the manifest's {[want_in]}; {fix}")
        if want_out not in outs:
            raise ArtifactError(f"{path}: no output {want_out!r} (outputs: {list(outs)}); {fix}")
        i, o = ins[want_in], outs[want_out]
        if i.type != "tensor(float)" or len(i.shape) != 4 or list(i.shape[1:]) != [1, s, s] \
                or isinstance(i.shape[0], int):
            raise ArtifactError(f"{path}: input {want_in!r} is {i.type} of shape {i.shape}, the manifest says float32 "
                                f"[batch, 1, {s}, {s}] (input side {s} px); {fix}")
        if len(o.shape) != 2 or (isinstance(o.shape[1], int) and o.shape[1] != n):
            raise ArtifactError(f"{path}: output {want_out!r} has shape {o.shape}, the manifest says [batch, {n}] "
                                f"({n} classes); {fix}")
        return want_in, want_out

    def shrink(self, arr: np.ndarray) -> np.ndarray:
        """The image as the model needs it, as small as it can be: the read step (border crop, contrast), then
        squashed to S x S."""
        return squash(read_step(arr, self.art.contrast, self.art.crop_border), self.size)

    def preprocess(self, shrunk: Sequence[np.ndarray]) -> np.ndarray:
        """(S, S) uint8 arrays -> (B, 1, S, S) float32: the arithmetic of data.augment.normalise, in numpy."""
        x = np.stack(shrunk)[:, None].astype(np.float32)
        return (x / np.float32(255.0) - self.mean) / self.std

    def probs(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities for decoded grey images (any size), as read_grey returns them."""
        return self.probs_shrunk([self.shrink(a) for a in arrays])

    def probs_shrunk(self, shrunk: Sequence[np.ndarray]) -> np.ndarray:
        return self.run(self.preprocess(shrunk))

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model on a preprocessed batch (B, 1, S, S) float32: (B, n classes) probabilities."""
        p = self.session.run([self.output_name], {self.input_name: x})[0]
        if p.shape != (x.shape[0], len(self.classes)):
            raise ArtifactError(f"{self.art.folder / MODEL_ONNX}: gave output of shape {p.shape} for {x.shape[0]} "
                                f"image(s), not ({x.shape[0]}, {len(self.classes)}); re-export the model")
        return p.astype(np.float32, copy=False)
