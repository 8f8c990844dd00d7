"""Valid-but-unusual inputs are handled end to end, not rejected.

Unusual pixel formats (16-bit, alpha, palette, CMYK, EXIF rotation, 1x1, very wide), unusual file names
(spaces, unicode, a leading dash, bytes that are not UTF-8), one bad file among many, and batch/worker
settings that must not change the numbers.

One tiny model (16 px, 1 epoch, a narrow ResNet9) is trained once for the module, on a labels.csv dataset
whose file names hold spaces and unicode: that training run is itself one of the checks. Every command runs
in-process (CliRunner, whose stdout is strict UTF-8 like a real one under a UTF-8 locale).
"""
from __future__ import annotations

import csv
import io
import json
import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import TINY_WIDTHS, cli, noise_image, write_image
from cxr_fastai import cli as cli_module
from cxr_fastai.config import TrainConfig

pytestmark = pytest.mark.slow

CLASSES = ["A", "B"]
PROBS = [f"p_{c}" for c in CLASSES]
COLUMNS = ["path", "prediction", *PROBS, "error"]
UNICODE_NAME = "çöß 画像.png"
NARROW = TINY_WIDTHS                        # ResNet9 widths of the module's one tiny model
BAD_BYTES_NAME = b"bad\xff name.png"        # not valid UTF-8: Python sees it as 'bad\udcff name.png'

def ok(res) -> None:
    """A CliRunner result that succeeded without any `error:` line."""
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)
    assert not any(ln.startswith("error:") for ln in res.stderr.splitlines()), res.stderr


def csv_rows(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and list(rows[0]) == COLUMNS, rows[:1]
    return rows


def probs_of(rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[p]) for p in PROBS] for r in rows])


def assert_all_predicted(rows: list[dict]) -> None:
    for r in rows:
        assert r["error"] in ("", None), r
        assert r["prediction"] in CLASSES, r
        assert r["prediction"] == max(CLASSES, key=lambda c: float(r[f"p_{c}"])), r
    np.testing.assert_allclose(probs_of(rows).sum(1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------- a real run, once

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """labels.csv dataset whose names hold spaces and unicode; train (16 px, 1 epoch) and export it."""
    base = tmp_path_factory.mktemp("unusual")
    ds = base / "data set"
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 4), ("valid", 2), ("test", 3)):
        for ci, c in enumerate(CLASSES):
            for i in range(n):
                name = f"{split} {c} {i}.png" if i % 2 == 0 else f"çöß 画像 {split}{c}{i}.png"
                rel = f"{split}/{c} ü/{name}"
                write_image(ds / rel, noise_image(rng, 24, bias=40 * ci))
                rows.append({"path": rel, "label": c, "split": split})
    pd.DataFrame(rows).to_csv(ds / "labels.csv", index=False, encoding="utf-8")
    run, art = base / "run", base / "art"
    # a narrow ResNet9 (the CLI has no option for it): every later forward pass is ~50x cheaper, which keeps
    # this module fast on a shared CPU; the artifact records its widths, so predict/evaluate need nothing else
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_module, "TrainConfig", functools.partial(TrainConfig, widths=NARROW))
        res = cli("train", ds, "--run", run, "--size", 16, "--epochs", 1, "--bs", 4, "--device", "cpu", "-q")
    assert res.exit_code == 0, (res.output, res.exception)
    res = cli("export", run, "--to", art)
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads((art / "manifest.json").read_text())["architecture"]["widths"] == list(NARROW)
    return {"ds": ds, "run": run, "art": art, "rows": rows}


# --------------------------------------------------------------------- 1. unusual pixel formats

def _unusual_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    grey = noise_image(rng, 32)
    rgb = np.stack([grey, np.roll(grey, 3, 0), 255 - grey], -1)
    g16 = (rng.integers(0, 65536, (40, 30))).astype(np.uint16)
    Image.fromarray(g16).save(folder / "grey16.png")                          # mode I;16
    Image.fromarray(g16).save(folder / "grey16.tif")
    rgba = np.dstack([rgb, np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    la = Image.fromarray(grey).convert("LA")
    la.putalpha(Image.fromarray(255 - grey))
    la.save(folder / "la.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(folder / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6                                                          # rotate 90 degrees on read
    Image.fromarray(noise_image(rng, 32)[:, :20]).save(folder / "exif6.jpg", exif=exif)
    Image.fromarray(np.array([[200]], np.uint8)).save(folder / "one_pixel.png")
    Image.fromarray(rgb).save(folder / "rgb.bmp")
    Image.fromarray(np.tile(noise_image(rng, 200), (1, 15))).save(folder / "wide 3000x200.png")
    names = sorted(p.name for p in folder.iterdir())
    # the files really are what their names say
    with Image.open(folder / "grey16.png") as im:
        assert im.mode.startswith("I")
    with Image.open(folder / "palette.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    with Image.open(folder / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(folder / "exif6.jpg") as im:
        assert im.getexif().get(0x0112) == 6
    with Image.open(folder / "wide 3000x200.png") as im:
        assert im.size == (3000, 200)
    return names


def test_unusual_but_valid_images_are_predicted_not_rejected_by_safetensors_and_pickle_paths(tmp_path, trained):
    folder = tmp_path / "unusual"
    names = _unusual_images(folder)
    safe = cli("predict", trained["art"], folder, "--device", "cpu")
    pick = cli("predict", trained["art"], folder, "--device", "cpu", "--trust-pickle")
    for r in (safe, pick):
        ok(r)
        assert "Traceback" not in r.output and "unreadable" not in r.stderr, r.stderr
    a, b = csv_rows(safe.stdout), csv_rows(pick.stdout)
    assert sorted(Path(r["path"]).name for r in a) == names
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert_all_predicted(a)
    assert_all_predicted(b)
    assert np.abs(probs_of(a) - probs_of(b)).max() <= 1e-4


# ---------------------------------------------------------------------------------- 2. file names

@pytest.fixture
def odd_names(tmp_path, trained) -> Path:
    folder = tmp_path / "odd names"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in ("with space.png", UNICODE_NAME, "-x.png"):
        write_image(folder / name, noise_image(rng))
    buf = io.BytesIO()
    Image.fromarray(noise_image(rng)).save(buf, format="PNG")
    with open(os.path.join(os.fsencode(folder), BAD_BYTES_NAME), "wb") as f:
        f.write(buf.getvalue())
    return folder


def _check_odd_rows(rows: list[dict], folder: Path, bad_shown_as: str) -> None:
    assert len(rows) == 4, rows
    assert_all_predicted(rows)
    shown = sorted(Path(r["path"]).name for r in rows)
    assert shown == sorted(["with space.png", UNICODE_NAME, "-x.png", bad_shown_as]), shown
    assert all(r["path"].startswith(str(folder)) for r in rows)


def test_odd_file_names_predict_to_stdout_as_csv_and_json(odd_names, trained):
    # a normal UTF-8 locale (not C/POSIX) gives Python a *strict* UTF-8 stdout; CliRunner's captured stdout
    # is strict UTF-8 as well
    r_csv = cli("predict", trained["art"], odd_names, "--device", "cpu")
    ok(r_csv)
    assert "Traceback" not in r_csv.output
    # the name that is not UTF-8 is shown backslash-escaped, so stdout stays valid UTF-8
    _check_odd_rows(csv_rows(r_csv.stdout), odd_names, "bad\\xff name.png")

    r_json = cli("predict", trained["art"], odd_names, "--device", "cpu", "--format", "json")
    ok(r_json)
    rows = json.loads(r_json.stdout)
    assert [list(r) for r in rows] == [COLUMNS] * 4
    # JSON escapes the undecodable byte (\udcff): the path round-trips to the real file
    _check_odd_rows(rows, odd_names, os.fsdecode(BAD_BYTES_NAME))
    assert all(Path(r["path"]).is_file() for r in rows)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_odd_file_names_predict_to_an_out_file(odd_names, trained, tmp_path, fmt):
    out = tmp_path / f"prédictions {fmt}.{fmt}"
    res = cli("predict", trained["art"], odd_names, "--device", "cpu", "--format", fmt, "--out", out)
    ok(res)
    assert "4 image(s) predicted, 0 unreadable" in res.stderr
    assert res.stdout == ""
    if fmt == "csv":
        # the file keeps the name's own bytes, as the file system has them
        assert os.path.basename(os.fsencode(odd_names)) + b"/" + BAD_BYTES_NAME in out.read_bytes()
        with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = csv_rows(f.read())
    else:
        rows = json.loads(out.read_text(encoding="utf-8"))
    _check_odd_rows(rows, odd_names, os.fsdecode(BAD_BYTES_NAME))
    assert all(Path(r["path"]).is_file() for r in rows)    # every path names the real file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["odd names", out.name])


def test_train_and_evaluate_on_names_with_spaces_and_unicode(trained, tmp_path):
    # the module fixture trained on this dataset; every image was used, none skipped
    items = pd.read_csv(trained["run"] / "items.csv", dtype=str)
    assert len(items) == sum(r["split"] != "test" for r in trained["rows"])
    assert any(" " in Path(p).name for p in items.path)
    assert any("画像" in p and "ü" in p for p in items.path)
    assert all(Path(p).is_file() for p in items.path)
    skipped = pd.read_csv(trained["run"] / "skipped.csv", dtype=str)
    assert len(skipped) == 0

    out = tmp_path / "métriques.json"
    res = cli("evaluate", trained["art"], trained["ds"], "--split", "test", "--device", "cpu", "--out", out)
    ok(res)
    assert "warning" not in res.stderr, res.stderr
    m = json.loads(out.read_text(encoding="utf-8"))
    assert m["n"] == 6 and m["skipped"] == []
    assert sum(map(sum, m["confusion_matrix"])) == 6


# ------------------------------------------------------------------- 3. one bad image among many

def _truncated_jpeg(path: Path, rng) -> Path:
    buf = io.BytesIO()
    Image.fromarray(noise_image(rng, 64)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def many_with_one_bad(tmp_path_factory) -> tuple[Path, Path]:
    """ROOT/A, ROOT/B: 150 valid 16 px images each, plus one truncated JPEG in A."""
    root = tmp_path_factory.mktemp("many") / "data"
    rng = np.random.default_rng(3)
    for ci, c in enumerate(CLASSES):
        for i in range(150):
            write_image(root / c / f"{c}_{i:03d}.png", noise_image(rng, 16, bias=40 * ci))
    bad = _truncated_jpeg(root / "A" / "A_truncated.jpg", rng)
    with pytest.raises(OSError):
        with Image.open(bad) as im:
            im.load()
    return root, bad


def test_one_truncated_jpeg_among_300_images_is_one_error_row(many_with_one_bad, trained):
    root, bad = many_with_one_bad
    res = cli("predict", trained["art"], root, "--device", "cpu")
    ok(res)
    assert "1 unreadable image(s) skipped" in res.stderr
    rows = csv_rows(res.stdout)
    assert len(rows) == 301
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 1 and errors[0]["path"] == str(bad)
    assert str(bad) in errors[0]["error"] and "truncated" in errors[0]["error"]
    assert errors[0]["prediction"] == "" and all(errors[0][p] == "" for p in PROBS)
    assert_all_predicted([r for r in rows if not r["error"]])


def test_evaluate_leaves_the_truncated_jpeg_out_with_a_warning_and_counts_the_rest(many_with_one_bad, trained):
    root, bad = many_with_one_bad
    res = cli("evaluate", trained["art"], root, "--device", "cpu")
    ok(res)
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert any("1 unreadable image(s) left out" in w and str(bad) in w for w in warnings), res.stderr
    m = json.loads(res.stdout)
    assert m["n"] == 300
    assert sum(map(sum, m["confusion_matrix"])) == 300
    assert [s["path"] for s in m["skipped"]] == [str(bad)]


def test_folder_of_only_bad_images_fails_with_one_error_line_and_no_out_file(tmp_path, trained):
    rng = np.random.default_rng(4)
    folder = tmp_path / "all bad"
    bad = [_truncated_jpeg(folder / f"t{i}.jpg", rng) for i in range(2)]
    png = folder / "t2.png"
    write_image(png, noise_image(rng, 32))
    png.write_bytes(png.read_bytes()[:60])
    bad.append(png)
    out = tmp_path / "pred.csv"
    res = cli("predict", trained["art"], folder, "--device", "cpu", "--out", out)
    assert res.exit_code == 1, (res.output, res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert any(str(p) in errors[0] for p in bad), errors[0]
    assert "none of the 3" in errors[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all bad"]      # no temporary file left either


# ------------------------------------------------------------- 4. batch and worker independence

def test_probabilities_do_not_depend_on_batch_size_or_workers(tmp_path, trained):
    folder = tmp_path / "forty"
    rng = np.random.default_rng(5)
    for i in range(40):
        h, w = int(rng.integers(12, 60)), int(rng.integers(12, 60))      # squashed: sizes differ per image
        write_image(folder / f"img_{i:02d}.png", np.clip(rng.normal(120, 40, (h, w)), 0, 255).astype(np.uint8))
    runs = {}
    for bs, workers in ((1, 1), (64, 4)):
        res = cli("predict", trained["art"], folder, "--device", "cpu", "--format", "json",
                  "--bs", bs, "--workers", workers)
        ok(res)
        runs[bs, workers] = json.loads(res.stdout)
    ref = runs[1, 1]
    assert len(ref) == 40
    assert_all_predicted(ref)
    for key, rows in runs.items():
        assert [r["path"] for r in rows] == [r["path"] for r in ref], key
        assert np.abs(probs_of(rows) - probs_of(ref)).max() <= 1e-5, key
