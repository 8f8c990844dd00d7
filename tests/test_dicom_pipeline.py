"""DICOM through every command: a class-folders dataset of DICOMs with planted patient names, ids, dates
and accession numbers is split by patient, trained, audited, interpreted, exported, predicted (torch and
ONNX) and evaluated -- and no identifier reaches any file, report, CSV, JSON or console line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_WIDTHS, cli
from dicom_util import make_dicom
from cxr_fastai.synth import CLASSES, make_synthetic_image

NAMES = [f"Doe^Patient{k}" for k in range(12)]
IDS = [f"MRN-{9000 + k}-SECRET" for k in range(12)]
PLANTED = [*NAMES, *IDS, "Doe^", "MRN-", "19700101", "ACC-LEAK-1"]


def _dicom_dataset(root: Path, per_patient: int = 4) -> Path:
    """ROOT/CLASS/*.dcm (and some extension-less DICOMs): 4 patients a class, 4 films each."""
    rng = np.random.default_rng(0)
    k = 0
    for c in CLASSES:
        for _ in range(4):
            for j in range(per_patient):
                name = f"film{k:02d}_{j}" + ("" if j == 3 else ".dcm")   # PACS exports often have no extension
                make_dicom(root / c / name, make_synthetic_image(c, rng, size=32),
                           patient_name=NAMES[k], patient_id=IDS[k])
            k += 1
    return root


def _leaks(texts: dict[str, str]) -> list[str]:
    return [f"{where}: {p!r}" for where, t in texts.items() for p in PLANTED if p in t]


def _all_text(*folders: Path) -> dict[str, str]:
    out = {}
    for f in folders:
        for p in sorted(Path(f).rglob("*")):
            if p.is_file():
                out[str(p)] = p.read_bytes().decode("latin-1")   # every byte, binary files too
    return out


@pytest.mark.slow
def test_dicom_dataset_trains_predicts_and_never_leaks_identifiers(tmp_path):
    from cxr_fastai.config import TrainConfig
    from cxr_fastai.data.discover import discover
    from cxr_fastai.train.fit import train

    data = _dicom_dataset(tmp_path / "dicoms")
    ds = discover(data)
    assert len(ds.items) == 48 and ds.layout == "class-folders"
    # the split keeps each patient's films together, and the key is a salted hash, not the id
    by_patient = ds.items.groupby("patient_id").split.nunique()
    assert len(by_patient) == 12 and (by_patient == 1).all()
    assert not ds.items.patient_id.isin(IDS).any()

    run, art = tmp_path / "run", tmp_path / "art"
    train(TrainConfig(data=str(data), run=str(run), size=16, epochs=1, bs=8, widths=TINY_WIDTHS, device="cpu"))
    console = {}
    for name, args in {
        "audit": ("audit", data, "--out", tmp_path / "out" / "audit.json"),
        "interpret": ("interpret", run, "--k", 4, "--device", "cpu"),
        "export": ("export", run, "--to", art),
        "predict": ("predict", art, data, "--out", tmp_path / "out" / "p.csv", "--device", "cpu"),
        "predict-json": ("predict", art, data, "--format", "json", "--device", "cpu"),
        "predict-onnx": ("predict", art, data, "--out", tmp_path / "out" / "p_onnx.csv", "--runtime", "onnx"),
        "evaluate": ("evaluate", art, data, "--out", tmp_path / "out" / "m.json", "--device", "cpu"),
    }.items():
        r = cli(*args)
        assert r.exit_code == 0, f"{name}: {r.output}"
        console[name] = r.output
    p = pd.read_csv(tmp_path / "out" / "p.csv", keep_default_na=False)
    assert len(p) == 48 and (p.error == "").all()
    q = pd.read_csv(tmp_path / "out" / "p_onnx.csv", keep_default_na=False)
    cols = [f"p_{c}" for c in CLASSES]
    assert np.abs(p[cols].to_numpy() - q[cols].to_numpy()).max() < 1e-4
    assert json.loads((tmp_path / "out" / "m.json").read_text())["n"] == 48
    assert _leaks({**_all_text(run, art, tmp_path / "out"), **console}) == []


def test_bad_dicoms_are_error_rows_and_skipped_images(tmp_path, tiny_model):
    """predict: one error row per bad DICOM; discover/scan (train): skipped and listed, never a traceback."""
    from cxr_fastai.data.discover import discover, scan

    rng = np.random.default_rng(1)
    good = make_dicom(tmp_path / "in" / "good.dcm", make_synthetic_image("NORMAL", rng, size=32))
    raw = good.read_bytes()
    (tmp_path / "in" / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    make_dicom(tmp_path / "in" / "hsv.dcm", make_synthetic_image("NORMAL", rng, size=32), photometric="HSV")
    out = tmp_path / "p.csv"
    r = cli("predict", tiny_model.art, tmp_path / "in", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    p = pd.read_csv(out, keep_default_na=False)
    p.index = [Path(x).name for x in p.path]
    assert sorted(p.index) == ["empty.dcm", "good.dcm", "hsv.dcm", "truncated.dcm"]
    assert p.loc["good.dcm", "error"] == "" and p.loc["good.dcm", "prediction"] != ""
    errors = p.error.drop("good.dcm")
    assert (errors != "").all() and not errors.str.contains("Traceback").any()
    assert _leaks({"predict": r.output, "csv": out.read_text()}) == []

    data = tmp_path / "ds"
    for c in ("NORMAL", "PNEUMONIA"):
        for i in range(4):
            make_dicom(data / c / f"{i}.dcm", make_synthetic_image(c, rng, size=32), patient_id=f"P{c}{i}")
    (data / "NORMAL" / "bad.dcm").write_bytes(raw[:300])
    ds = discover(data)
    _, skipped, _ = scan(ds, ("train", "valid"), size=16, stats_limit=100, seed=0)
    assert [Path(s).name for s, _ in skipped.rows] == ["bad.dcm"]


def test_a_dicom_and_its_source_image_give_the_same_probabilities(tmp_path, tiny_model):
    from PIL import Image

    pngs = tiny_model.test_images()[:6]
    for p in pngs:
        make_dicom(tmp_path / "dcm" / f"{p.parent.name}_{p.stem}.dcm", np.asarray(Image.open(p).convert("L")))
    rows = {}
    for runtime in ("torch", "onnx"):
        for name, inputs in (("png", pngs), ("dcm", [tmp_path / "dcm"])):
            out = tmp_path / f"{name}-{runtime}.csv"
            r = cli("predict", tiny_model.art, *inputs, "--out", out, "--runtime", runtime, "--device", "cpu")
            assert r.exit_code == 0, r.output
            df = pd.read_csv(out)
            df.index = [Path(x).stem if name == "dcm" else f"{Path(x).parent.name}_{Path(x).stem}" for x in df.path]
            rows[name, runtime] = df.sort_index()
    cols = [f"p_{c}" for c in tiny_model.classes]
    for runtime in ("torch", "onnx"):
        png, dcm = rows["png", runtime], rows["dcm", runtime]
        assert list(png.index) == list(dcm.index) and len(png) == 6
        assert np.abs(png[cols].to_numpy() - dcm[cols].to_numpy()).max() <= 1e-6   # the CSV's 6 decimals
