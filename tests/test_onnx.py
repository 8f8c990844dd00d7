"""ONNX out, `--runtime onnx` in.

`export` writes model.onnx (softmax probabilities, dynamic batch) beside the safetensors and lists it in the
manifest; `predict`/`evaluate --runtime onnx` run it in onnxruntime and must give the torch runtime's
numbers (within 1e-4) without importing torch or fastai. A model.onnx that does not match the manifest
(changed bytes, another model) is refused like a tampered safetensors file.

Everything uses the session's tiny model (16 px); tests that change an artifact copy it first.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, cli, noise_image

ATOL = 1e-4


def ok(res):
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def one_line_error(res, *hints: str) -> str:
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "this is a bug" not in lines[0], lines[0]
    for h in hints:
        assert h in lines[0], (h, lines[0])
    return lines[0]


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture
def art_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model.art, tmp_path / "art"))


def predictors(art_dir: Path):
    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.onnx_runtime import OnnxPredictor
    from cxr_fastai.artifact.predict import Predictor

    art = read_manifest(art_dir)
    return Predictor(art, "cpu"), OnnxPredictor(art)


def replace_onnx(art: Path, data: bytes) -> None:
    """Put other bytes in model.onnx and make the manifest's hash and size agree with them."""
    (art / "model.onnx").write_bytes(data)
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (art / "manifest.json").write_text(json.dumps(m))


def other_onnx(side: int, n_classes: int) -> bytes:
    """A valid ONNX model with the same input and output names: flatten, one matrix, softmax."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(side * side, n_classes)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")]
    nodes = [helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "other", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, side, side])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


# ------------------------------------------------------------------------------------------ export

def test_export_writes_one_self_contained_onnx_file_listed_in_the_manifest(tiny_model):
    import onnx

    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.io.files import sha256_file

    art = tiny_model.art
    m = json.loads((art / "manifest.json").read_text())
    f = art / "model.onnx"
    assert m["files"]["model.onnx"] == {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    assert sorted(p.name for p in art.iterdir()) == sorted(["manifest.json", "model.safetensors", "model.pkl",
                                                            "model.onnx"])  # no external-data file beside it
    assert "model.onnx" in read_manifest(art).files
    s, n = m["input"]["size"], len(m["classes"])
    sec = m["onnx"]
    assert sec["file"] == "model.onnx" and sec["opset"] >= 17
    assert sec["input"] == {"name": "image", "shape": ["batch", 1, s, s], "dtype": "float32",
                            "preprocessing": sec["input"]["preprocessing"]}
    assert "255" in sec["input"]["preprocessing"] and "normalization.mean" in sec["input"]["preprocessing"]
    assert sec["output"]["name"] == "probabilities" and sec["output"]["shape"] == ["batch", n]
    assert "softmax" in sec["output"]["meaning"]

    model = onnx.load(str(f))
    onnx.checker.check_model(model)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["probabilities"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == sec["opset"]


def test_the_graph_gives_probabilities_for_any_batch_size(tiny_model):
    import onnxruntime as ort

    s, n = 16, len(tiny_model.classes)
    sess = ort.InferenceSession(str(tiny_model.art / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b in (1, 7):
        p = sess.run(["probabilities"], {"image": rng.normal(size=(b, 1, s, s)).astype(np.float32)})[0]
        assert p.shape == (b, n) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        assert (p >= 0).all()


# ------------------------------------------------------------------------------------------ parity

def test_onnx_probabilities_match_torch_on_synthetic_images(tiny_model):
    from cxr_fastai.io.images import read_grey

    torch_pred, onnx_pred = predictors(tiny_model.art)
    rng = np.random.default_rng(1)
    arrays = [read_grey(p) for p in tiny_model.test_images()]
    arrays += [noise_image(rng, size) for size in (16, 17, 40, 97)]
    arrays += [np.zeros((30, 50), np.uint8), np.full((64, 20), 255, np.uint8),
               np.tile(np.arange(256, dtype=np.uint8), (8, 1))]
    want, got = torch_pred.probs(arrays), onnx_pred.probs(arrays)
    assert got.shape == want.shape == (len(arrays), len(tiny_model.classes))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert (got.argmax(1) == want.argmax(1)).all()
    # one image at a time (batch 1) gives the batch's numbers
    np.testing.assert_allclose(onnx_pred.probs(arrays[:1]), got[:1], atol=1e-6, rtol=0)


@pytest.mark.realdata
def test_onnx_probabilities_match_torch_on_real_radiographs(tiny_model, cxr3_root):
    from cxr_fastai.io.images import decode_many

    df = pd.read_csv(cxr3_root / "labels.csv", dtype=str, keep_default_na=False)
    test = df[df.split == "test"].sample(40, random_state=0)
    arrays = [a for _, a, err in decode_many([str(cxr3_root / p) for p in test.path], workers=2) if a is not None]
    assert len(arrays) == 40
    torch_pred, onnx_pred = predictors(tiny_model.art)
    want, got = torch_pred.probs(arrays), onnx_pred.probs(arrays)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ CLI

def test_predict_runtime_onnx_writes_the_torch_runtimes_csv(tiny_model):
    files = tiny_model.test_images()
    want = read_csv(ok(cli("predict", tiny_model.art, *files)).stdout)
    got = read_csv(ok(cli("predict", tiny_model.art, *files, "--runtime", "onnx")).stdout)
    assert len(got) == len(want) == len(files)
    assert list(got[0]) == list(want[0])  # same columns in the same order
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
    cols = [f"p_{c}" for c in tiny_model.classes]
    np.testing.assert_allclose([[float(r[c]) for c in cols] for r in got],
                               [[float(r[c]) for c in cols] for r in want], atol=ATOL, rtol=0)
    as_json = json.loads(ok(cli("predict", tiny_model.art, *files[:2], "--runtime", "onnx", "--format", "json")).stdout)
    assert [r["prediction"] for r in as_json] == [r["prediction"] for r in want[:2]]


def test_evaluate_runtime_onnx_gives_the_same_metrics(tiny_model):
    want = json.loads(ok(cli("evaluate", tiny_model.art, tiny_model.data)).stdout)
    got = json.loads(ok(cli("evaluate", tiny_model.art, tiny_model.data, "--runtime", "onnx")).stdout)
    assert got["n"] == want["n"] == 4 * len(tiny_model.classes)
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["accuracy"] == want["accuracy"] and got["balanced_accuracy"] == want["balanced_accuracy"]


NO_TORCH = r'''
import json, sys


class Refuse:
    """Fail any import of torch or fastai (as on a machine without them), and note the attempt."""
    tried = []

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("torch", "torchvision", "fastai", "fastcore"):
            Refuse.tried.append(name)
            raise ImportError(f"blocked by the test: {name}")
        return None


sys.meta_path.insert(0, Refuse())
from cxr_fastai.cli import main

codes = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["cxr-fastai", *argv]
    try:
        main()
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code or 0)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "fastai", "fastcore"})
print(json.dumps({"codes": codes, "tried": Refuse.tried, "loaded": loaded}))
'''


def test_runtime_onnx_never_imports_torch_or_fastai(tiny_model, tmp_path):
    out, metrics = tmp_path / "pred.csv", tmp_path / "metrics.json"
    argvs = [["predict", str(tiny_model.art), str(tiny_model.data / "test"), "--runtime", "onnx", "--out", str(out)],
             ["evaluate", str(tiny_model.art), str(tiny_model.data), "--runtime", "onnx", "--out", str(metrics)]]
    res = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(argvs)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout.strip().splitlines()[-1])
    assert status == {"codes": [0, 0], "tried": [], "loaded": []}, (status, res.stderr)
    rows = read_csv(out.read_text())
    assert len(rows) == len(tiny_model.test_images()) and all(r["prediction"] in tiny_model.classes for r in rows)
    assert json.loads(metrics.read_text())["n"] == len(rows)


# ------------------------------------------------------------------------------------------ refusals

def test_a_changed_model_onnx_is_refused(art_copy, tiny_model):
    b = bytearray((art_copy / "model.onnx").read_bytes())
    b[len(b) // 2] ^= 0xFF
    (art_copy / "model.onnx").write_bytes(bytes(b))
    line = one_line_error(cli("predict", art_copy, *tiny_model.test_images(), "--runtime", "onnx"),
                          "SHA-256", "model.onnx", "re-export")
    assert str(art_copy) in line
    ok(cli("predict", art_copy, *tiny_model.test_images()))  # the torch runtime does not read it


@pytest.mark.parametrize("side,n_classes,refused", [(16, 2, "output"), (24, 3, "input side 16"), (16, 3, None)],
                         ids=["other-class-count", "other-input-size", "same-shapes"])
def test_another_onnx_model_with_a_matching_hash_is_checked_against_the_manifest(art_copy, tiny_model, side,
                                                                                  n_classes, refused):
    replace_onnx(art_copy, other_onnx(side, n_classes))
    res = cli("predict", art_copy, *tiny_model.test_images(), "--runtime", "onnx")
    if refused is None:  # shapes agree with the manifest: nothing to tell it apart (the hash is the check)
        ok(res)
        return
    line = one_line_error(res, refused, "not the one this manifest was exported with", "re-export")
    assert f"[batch, {len(tiny_model.classes)}]" in line or "[batch, 1, 16, 16]" in line


def test_a_model_onnx_that_onnxruntime_cannot_read_is_refused(art_copy, tiny_model):
    replace_onnx(art_copy, b"not an onnx model at all")
    one_line_error(cli("predict", art_copy, *tiny_model.test_images(), "--runtime", "onnx"),
                   "onnxruntime cannot load it", "re-export")


def test_an_artifact_from_before_onnx_still_predicts_with_torch(art_copy, tiny_model):
    (art_copy / "model.onnx").unlink()
    m = json.loads((art_copy / "manifest.json").read_text())
    del m["files"]["model.onnx"], m["onnx"]
    (art_copy / "manifest.json").write_text(json.dumps(m))
    one_line_error(cli("predict", art_copy, *tiny_model.test_images(), "--runtime", "onnx"),
                   "no model.onnx", "re-export", "--runtime torch")
    one_line_error(cli("evaluate", art_copy, tiny_model.data, "--runtime", "onnx"), "no model.onnx")
    rows = read_csv(ok(cli("predict", art_copy, *tiny_model.test_images())).stdout)
    assert len(rows) == len(tiny_model.test_images()) and not any(r["error"] for r in rows)


@pytest.mark.parametrize("flag,hint", [("--tta", "--tta needs the torch runtime"),
                                       ("--trust-pickle", "--trust-pickle"),
                                       ("--device=cuda", "runs on the CPU")])
def test_torch_only_options_are_refused_with_runtime_onnx(tiny_model, flag, hint):
    one_line_error(cli("predict", tiny_model.art, *tiny_model.test_images(), "--runtime", "onnx", flag), hint)
    if flag != "--trust-pickle":
        one_line_error(cli("evaluate", tiny_model.art, tiny_model.data, "--runtime", "onnx", flag), hint)
