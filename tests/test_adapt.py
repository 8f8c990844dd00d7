"""`cxr-fastai adapt`: BatchNorm statistics re-estimated on a new hospital's unlabelled films (AdaBN).

What it must do: give every BatchNorm layer the running mean and variance of the new images as the model
reads them (predict's preprocessing), change no learned weight, write a whole artifact (safetensors, ONNX
that agrees with it, manifest with the new hashes and an adaptation record that names no file), say when
`evaluate` scores the images it was adapted on, and refuse what it cannot do in one line.

The session's tiny model (16 px) is only read; each test writes its adapted copies under tmp_path.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli, noise_image

N_NEW = 40


@pytest.fixture
def new_hospital(tmp_path) -> Path:
    """40 films from "another hospital": brighter and with more contrast than the synthetic training set."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "hospital_b"
    (folder / "week1").mkdir(parents=True)
    for i in range(N_NEW):
        arr = np.clip(noise_image(rng, size=32, bias=60).astype(np.float32) * 1.3, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "week1" / f"patient_{i:03d}.png")
    return folder


def first_bn_input(model, x):
    """What the first BatchNorm layer of `model` sees for input batch `x` (eval mode, no grad)."""
    import torch

    from cxr_fastai.artifact.adapt import bn_layers

    seen = []
    h = bn_layers(model)[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        h.remove()
    return seen[0]


def model_input(art, paths):
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.data.augment import to_model_input
    from cxr_fastai.io.images import read_grey

    pred = Predictor(art)
    return to_model_input([pred.shrink(read_grey(str(p))) for p in paths], art.mean, art.std)


def test_adapt_gives_batchnorm_the_new_films_statistics_keeps_every_weight_and_writes_a_whole_artifact(
        tiny_model, new_hospital, tmp_path):
    import torch

    from cxr_fastai.artifact.adapt import adapt_artifact, bn_layers
    from cxr_fastai.artifact.export import load_model, read_manifest
    from cxr_fastai.artifact.onnx_runtime import OnnxPredictor
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.io.images import read_grey

    res = adapt_artifact(tiny_model.art, [new_hospital], tmp_path / "adapted", bs=256, workers=2)
    assert res.n_images == N_NEW and not res.skipped and res.seen_in_training == 0 and res.labels == {}
    old_art, new_art = read_manifest(tiny_model.art), read_manifest(tmp_path / "adapted")
    old, new = load_model(old_art), load_model(new_art)       # load_model checks the manifest's SHA-256 first
    assert res.n_bn_layers == len(bn_layers(new)) > 0

    # every learned parameter is the old one; only BatchNorm buffers changed
    for (name, p_old), (_, p_new) in zip(old.named_parameters(), new.named_parameters()):
        assert torch.equal(p_old, p_new), name
    # the first layer's statistics are exactly those of the new films (one batch here: all 40)
    paths = sorted(new_hospital.rglob("*.png"))
    feats = first_bn_input(old, model_input(old_art, paths))
    bn_new, bn_old = bn_layers(new)[0], bn_layers(old)[0]
    torch.testing.assert_close(bn_new.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn_new.running_var, feats.var(dim=(0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(bn_new.running_mean, bn_old.running_mean, atol=1e-3)
    assert res.shift > 0.1

    # ONNX agrees with the adapted safetensors, and the adapted model reads the films differently from the old
    arrays = [read_grey(str(p)) for p in paths]
    p_torch = Predictor(new_art).probs(arrays)
    np.testing.assert_allclose(OnnxPredictor(new_art).probs(arrays), p_torch, atol=1e-4)
    assert np.abs(Predictor(old_art).probs(arrays) - p_torch).max() > 1e-3

    # the manifest: new hashes, the parent's, a record of what was done, and no name of any film
    m = new_art.manifest
    assert set(m["files"]) == {"model.safetensors", "model.onnx"} and not new_art.has_pickle
    a = m["adaptation"]
    assert a["images"] == N_NEW and a["unreadable"] == 0 and a["bn_layers"] == res.n_bn_layers
    assert a["parent"]["weights_sha256"] == old_art.manifest["files"]["model.safetensors"]["sha256"]
    assert len(a["images_sha256"]) == N_NEW and a["selection"] == "files"
    assert "adaptation" in m["model_card"] and m["classes"] == old_art.manifest["classes"]
    text = (tmp_path / "adapted" / "manifest.json").read_text()
    assert "patient_" not in text and "hospital_b" not in text and "week1" not in text
    # the parent artifact is untouched (the session fixture also checks every file of it at the end)
    assert read_manifest(tiny_model.art).manifest == old_art.manifest


def test_batches_are_made_near_equal_so_the_mean_is_the_whole_sets(tiny_model, new_hospital, tmp_path):
    """update_bn weighs every batch alike: 40 images at --bs 30 must be two batches of 20, not 30 + 10."""
    import torch

    from cxr_fastai.artifact.adapt import adapt_artifact, bn_layers
    from cxr_fastai.artifact.export import load_model, read_manifest

    means = []
    for bs in (256, 30, 20):
        out = tmp_path / f"bs{bs}"
        adapt_artifact(tiny_model.art, [new_hospital], out, bs=bs, workers=1)
        means.append(bn_layers(load_model(read_manifest(out)))[0].running_mean)
        assert read_manifest(out).manifest["adaptation"]["batch_size"] == (40 if bs == 256 else 20)
    torch.testing.assert_close(means[1], means[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(means[2], means[0], atol=1e-5, rtol=1e-5)


def test_labelled_roots_by_split_and_evaluate_warns_on_the_adaptation_images(tiny_model, tmp_path):
    from cxr_fastai.artifact.adapt import adapt_artifact
    from cxr_fastai.evaluate.evaluate import evaluate

    out = tmp_path / "adapted"
    res = adapt_artifact(tiny_model.art, [tiny_model.data], out, splits=["valid"], min_images=8, workers=1)
    n_valid = sum(1 for _ in (tiny_model.data / "valid").rglob("*.png"))
    assert res.n_images == n_valid and res.labels == {c: n_valid // 3 for c in tiny_model.classes}
    assert res.seen_in_training == 0
    warned: list[str] = []
    on_valid = evaluate(out, tiny_model.data, split="valid", warn=warned.append)
    assert on_valid.seen_in_adaptation == n_valid and on_valid.to_dict()["seen_in_adaptation"] == n_valid
    assert any("gave this model's BatchNorm statistics" in w for w in warned), warned
    warned.clear()
    on_test = evaluate(out, tiny_model.data, split="test", warn=warned.append)
    assert on_test.seen_in_adaptation == 0 and not any("BatchNorm" in w for w in warned)
    # a model never adapted has no list to check against
    assert evaluate(tiny_model.art, tiny_model.data, split="test").seen_in_adaptation is None


def test_trust_pickle_carries_the_new_statistics_into_model_pkl(tiny_model, new_hospital, tmp_path):
    import torch

    from cxr_fastai.artifact.adapt import adapt_artifact
    from cxr_fastai.artifact.export import load_model, load_pickle_learner, read_manifest

    adapt_artifact(tiny_model.art, [new_hospital], tmp_path / "with_pkl", trust_pickle=True, workers=1)
    art = read_manifest(tmp_path / "with_pkl")
    assert art.has_pickle and "model.pkl" in art.manifest["files"]
    learn = load_pickle_learner(art)                                   # hash-checked against the new manifest
    want = load_model(art).state_dict()
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v.cpu(), want[k]), k


def test_cli_adapt_and_its_one_line_errors(tiny_model, new_hospital, tmp_path):
    from test_onnx import one_line_error, ok

    out = tmp_path / "adapted"
    res = ok(cli("adapt", tiny_model.art, new_hospital, "--to", out, "-q"))
    assert f"adapted on {N_NEW} images" in res.stdout and "model.pkl left out" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["adaptation"]["images"] == N_NEW

    # an adapted model predicts and evaluates like any other; asking for its absent pickle is one line
    ok(cli("predict", out, new_hospital))
    res = cli("predict", out, new_hospital, "--trust-pickle")   # the pickle warning, then one error line
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.exit_code == 1 and len(errors) == 1 and "has no model.pkl" in errors[0] and "Traceback" not in res.output

    one_line_error(cli("adapt", tiny_model.art, new_hospital, "--to", out), "already exists", "--force")
    ok(cli("adapt", tiny_model.art, new_hospital, "--to", out, "--force", "-q"))
    one_line_error(cli("adapt", tiny_model.art, new_hospital, "--to", tiny_model.art), "is the artifact being adapted")
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(new_hospital.rglob("*.png"))[:5]:
        (few / p.name).write_bytes(p.read_bytes())
    one_line_error(cli("adapt", tiny_model.art, few, "--to", tmp_path / "x"), "5 image(s) given", "at least 32")
    one_line_error(cli("adapt", tiny_model.art, tiny_model.data, "--split", "external", "--to", tmp_path / "y"),
                   "no images in split 'external'")
    one_line_error(cli("adapt", tiny_model.art, tiny_model.data, "--source", "nowhere", "--to", tmp_path / "z"),
                   "no images from source 'nowhere'")
    for i in range(30):
        (few / f"broken_{i}.png").write_bytes(b"not an image")
    one_line_error(cli("adapt", tiny_model.art, few, "--to", tmp_path / "x", "-q"), "only 5 of the 35 image(s) could be read")
    # unreadable files are left out and said, as predict does
    (new_hospital / "week1" / "broken.png").write_bytes(b"not an image")
    res = ok(cli("adapt", tiny_model.art, new_hospital, "--to", tmp_path / "w", "-q"))
    assert "1 unreadable image(s) left out" in res.stderr and f"adapted on {N_NEW} images" in res.stdout
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_serve_shows_the_adaptation_without_the_hashes(tiny_model, new_hospital, tmp_path):
    from fastapi.testclient import TestClient

    from cxr_fastai.artifact.adapt import adapt_artifact
    from cxr_fastai.serve.app import create_app

    adapt_artifact(tiny_model.art, [new_hospital], tmp_path / "adapted", workers=1)
    with TestClient(create_app(tmp_path / "adapted")) as c:
        info = c.get("/model").json()
    assert info["adaptation"]["images"] == N_NEW and "images_sha256" not in info["adaptation"]
    with TestClient(create_app(tiny_model.art)) as c:
        assert c.get("/model").json()["adaptation"] is None
