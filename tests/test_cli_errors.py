"""The CLI's error contract.

Every user error: ONE line on stderr that starts with `error: `, names the offending file or folder and
says what to do; exit code 1; no traceback; nothing half-written at the --out / --run / --to path.
Bad option values are usage errors (exit 2). `--debug` (before the command) shows the traceback instead.

The cases that need a real run folder or artifact use the session's tiny model (conftest.tiny_model).
Everything runs in-process (CliRunner) but for the few `real process` checks at the end.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, noise_image, run_cli, write_image
from cxr_fastai.errors import DataError

COMMANDS = ("train", "interpret", "export", "predict", "evaluate", "demo")


def _names(line: str, path: Path | str) -> bool:
    return str(path) in line or str(Path(path).resolve()) in line


def one_line_error(res, *paths, hints: tuple[str, ...] = ()) -> str:
    """Assert the contract on a CliRunner result; return the error line."""
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    # a handled error ends in SystemExit(1); anything else escaped _errors()
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert not line.startswith("error: unexpected ") and "this is a bug" not in line, line
    for p in paths:
        assert _names(line, p), (p, line)
    for h in hints:
        assert h in line, (h, line)
    return line


def usage_error(res, option: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    assert option in res.stderr, res.stderr


def no_leftovers(path: Path) -> None:
    """Neither the output nor a temporary sibling of it (.NAME.*) exists."""
    assert not path.exists(), path
    if path.parent.exists():
        stray = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
        assert not stray, stray


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_dataset(root: Path, classes=("A", "B"), n=4, splits=("train", "valid", "test"), size=24) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for ci, c in enumerate(classes):
            for i in range(n):
                write_image(root / split / c / f"{c}_{i}.png", noise_image(rng, size, bias=40 * ci))
    return root


# --------------------------------------------------------------- a real run: the session's tiny model

@pytest.fixture
def trained(tiny_model):
    return {"ds": tiny_model.data, "run": tiny_model.run, "art": tiny_model.art, "classes": list(tiny_model.classes),
            "images": tiny_model.test_images()}


def copy_artifact(art: Path, dest: Path) -> Path:
    """manifest + safetensors only (the pickle is not read without --trust-pickle)."""
    dest.mkdir(parents=True)
    for name in ("manifest.json", "model.safetensors"):
        shutil.copyfile(art / name, dest / name)
    return dest


def unreadable(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "garbage.png").write_bytes(b"not a png at all")
    (folder / "empty.jpg").write_bytes(b"")
    return [folder / "empty.jpg", folder / "garbage.png"]


# ----------------------------------------------------------------------------------------- help

def test_no_arguments_prints_help():
    res = cli()
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output
    for c in COMMANDS:
        assert c in res.output


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_works_on_every_command(command):
    res = cli(*([command] if command else []), "--help")
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and "--help" in res.output


# ---------------------------------------------------------------------------------------- train

def test_train_missing_data_path(tmp_path):
    data, run = tmp_path / "nope", tmp_path / "run"
    one_line_error(cli("train", data, "--run", run), data, hints=("no such folder", "give the dataset root"))
    no_leftovers(run)


def test_train_data_path_is_a_file(tmp_path):
    data, run = tmp_path / "data.zip", tmp_path / "run"
    data.write_bytes(b"PK")
    one_line_error(cli("train", data, "--run", run), data, hints=("is a file", "folder"))
    no_leftovers(run)


def test_train_empty_folder(tmp_path):
    data, run = tmp_path / "empty", tmp_path / "run"
    data.mkdir()
    one_line_error(cli("train", data, "--run", run), data, hints=("no images found",))
    no_leftovers(run)


def test_train_one_class_only(tmp_path, make_folder_dataset):
    data, run = make_folder_dataset(classes=("NORMAL",), splits=None), tmp_path / "run"
    one_line_error(cli("train", data, "--run", run), data, hints=("only one class", "at least 2 classes"))
    no_leftovers(run)


@pytest.mark.parametrize("opts, hint", [
    (("--mixup", "0.4", "--bs", "1"), "give --bs 2 or more"),
    (("--mixup-pairs", "lisa"), "give --mixup ALPHA too"),
    (("--mixup", "0.4", "--data-path", "pil"), None),
    (("--mixup", "0.4", "--mixup-pairs", "lisa", "--data-path", "pil"), "drop --data-path pil"),
    (("--group-dro", "0.01", "--data-path", "pil"), "drop --data-path pil"),
    (("--group-dro", "0.01", "--mixup", "0.4"), "give one of them"),
    (("--balance-power", "0.5"), "give --balance class, class-source or class-then-source too"),
    (("--source-adversary", "1", "--data-path", "pil"), "drop --data-path pil"),
    (("--source-adversary", "1", "--mixup", "0.4"), "give one of them"),
])
def test_train_refuses_recipe_options_that_do_not_go_together(tmp_path, opts, hint):
    """Checked before any image is read: one line, nothing written. (Plain --mixup on the pil path is fastai's
    own callback, which works there: that case must get past the check, so it is run to its first error-free
    step by asking for a run folder that exists.)"""
    data, run = tiny_dataset(tmp_path / "d"), tmp_path / "run"
    if hint is None:
        run.mkdir()
        (run / "x").write_text("")
        one_line_error(cli("train", data, "--run", run, *opts), run, hints=("already exists",))
        return
    one_line_error(cli("train", data, "--run", run, *opts), hints=(hint,))
    no_leftovers(run)


def _labels_dataset(tmp_path: Path, text: str) -> Path:
    root = tiny_dataset(tmp_path / "lab", n=2, splits=("train",))
    (root / "labels.csv").write_text(text)
    return root


def test_train_labels_csv_missing_columns(tmp_path):
    data, run = _labels_dataset(tmp_path, "file,class\ntrain/A/A_0.png,A\ntrain/B/B_0.png,B\n"), tmp_path / "run"
    one_line_error(cli("train", data, "--run", run), data / "labels.csv", hints=("missing column", "path,label"))
    no_leftovers(run)


def test_train_labels_csv_duplicate_rows(tmp_path):
    text = "path,label\ntrain/A/A_0.png,A\ntrain/B/B_0.png,B\ntrain/A/A_0.png,A\n"
    data, run = _labels_dataset(tmp_path, text), tmp_path / "run"
    line = one_line_error(cli("train", data, "--run", run), data / "labels.csv", hints=("one row per image",))
    assert "train/A/A_0.png" in line and "2, 4" in line
    no_leftovers(run)


def test_train_labels_csv_path_escaping_root(tmp_path):
    outside = write_image(tmp_path / "elsewhere" / "x.png", 100)
    text = "path,label\ntrain/A/A_0.png,A\n../elsewhere/x.png,B\n"
    data, run = _labels_dataset(tmp_path, text), tmp_path / "run"
    line = one_line_error(cli("train", data, "--run", run), data / "labels.csv", hints=("outside",))
    assert "line 3" in line and "../elsewhere/x.png" in line
    assert outside.is_file()
    no_leftovers(run)


def test_train_labels_csv_unparseable_is_still_one_line(tmp_path):
    # pandas' tokenizer message ends in a newline: the CLI must still print a single line
    text = "path,label\ntrain/A/A_0.png,A\ntrain/B/B_0.png,B,x,y,z\n"
    data, run = _labels_dataset(tmp_path, text), tmp_path / "run"
    one_line_error(cli("train", data, "--run", run), data / "labels.csv", hints=("cannot be parsed",))
    no_leftovers(run)


def test_train_existing_run_without_force_leaves_it_untouched(tmp_path, make_folder_dataset):
    data, run = make_folder_dataset(), tmp_path / "old_run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    before = snapshot(run)
    one_line_error(cli("train", data, "--run", run), run, hints=("--force", "--resume"))
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["old_run", "ds"])


def test_train_run_that_is_a_file(tmp_path, make_folder_dataset):
    data, run = make_folder_dataset(), tmp_path / "run.txt"
    run.write_text("mine")
    one_line_error(cli("train", data, "--run", run), run, hints=("is a file", "--run"))
    assert run.read_text() == "mine"


@pytest.mark.parametrize("option,value", [("--size", "8"), ("--bs", "0")])
def test_train_bad_option_values_are_usage_errors(tmp_path, make_folder_dataset, option, value):
    run = tmp_path / "run"
    usage_error(cli("train", make_folder_dataset(), "--run", run, option, value), option)
    no_leftovers(run)


def test_train_resume_and_force_exclude_each_other(tmp_path):
    usage_error(cli("train", "--run", tmp_path / "run", "--resume", "--force"), "--resume")


def test_train_data_omitted_without_resume(tmp_path):
    run = tmp_path / "run"
    res = cli("train", "--run", run)
    usage_error(res, "DATA")
    assert "--resume" in res.stderr
    no_leftovers(run)


def test_train_resume_on_a_folder_that_is_not_a_run(tmp_path):
    run = tmp_path / "notarun"
    run.mkdir()
    (run / "x.txt").write_text("x")
    one_line_error(cli("train", "--resume", "--run", run), run, hints=("not a cxr-fastai run folder",))
    assert snapshot(run) == {"x.txt": b"x"}


def test_debug_flag_shows_the_exception(tmp_path):
    res = cli("--debug", "train", tmp_path / "nope", "--run", tmp_path / "run")
    assert res.exit_code == 1
    assert isinstance(res.exception, DataError), repr(res.exception)
    assert "error: " not in res.stderr
    # the flag does not stick: the next call is back to one line
    one_line_error(cli("train", tmp_path / "nope", "--run", tmp_path / "run"), tmp_path / "nope")


# ------------------------------------------------------------------------------------ interpret

def test_interpret_folder_that_is_not_a_run(tmp_path):
    run, out = tmp_path / "notarun", tmp_path / "report"
    run.mkdir()
    one_line_error(cli("interpret", run, "--out", out), run, hints=("not a cxr-fastai run folder", "--run"))
    no_leftovers(out)


def test_interpret_run_without_best_checkpoint(tmp_path, trained):
    run, out = tmp_path / "broken_run", tmp_path / "report"
    run.mkdir()
    for name in ("config.json", "run.json", "items.csv"):
        shutil.copyfile(trained["run"] / name, run / name)
    one_line_error(cli("interpret", run, "--out", out), run, run / "checkpoints" / "best.pth",
                   hints=("--resume",))
    no_leftovers(out)


def test_interpret_out_that_is_a_file_is_not_replaced(tmp_path, trained):
    out = tmp_path / "report.txt"
    out.write_text("mine")
    one_line_error(cli("interpret", trained["run"], "--out", out), out, hints=("is a file",))
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


# --------------------------------------------------------------------------------------- export

def test_export_not_a_run(tmp_path):
    run, to = tmp_path / "notarun", tmp_path / "art"
    run.mkdir()
    one_line_error(cli("export", run, "--to", to), run, hints=("not a cxr-fastai run folder",))
    no_leftovers(to)


def test_export_existing_destination_without_force_is_left_untouched(tmp_path, trained):
    to = tmp_path / "art"
    to.mkdir()
    (to / "manifest.json").write_text("{}")
    (to / "notes.txt").write_text("mine")
    before = snapshot(to)
    one_line_error(cli("export", trained["run"], "--to", to), to, hints=("--force",))
    assert snapshot(to) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# -------------------------------------------------------------------------------------- predict

def _predict_error(tmp_path, artifact, inputs, *names, hints=()):
    out = tmp_path / "pred.csv"
    line = one_line_error(cli("predict", artifact, *inputs, "--out", out), *names, hints=hints)
    no_leftovers(out)
    return line


def test_predict_artifact_folder_missing(tmp_path, trained):
    art = tmp_path / "no_art"
    _predict_error(tmp_path, art, [trained["ds"] / "test"], art, hints=("cxr-fastai export",))


def test_predict_manifest_missing(tmp_path, trained):
    art = copy_artifact(trained["art"], tmp_path / "a")
    (art / "manifest.json").unlink()
    _predict_error(tmp_path, art, [trained["ds"] / "test"], art / "manifest.json", hints=("re-export",))


def test_predict_manifest_malformed_json(tmp_path, trained):
    art = copy_artifact(trained["art"], tmp_path / "a")
    (art / "manifest.json").write_text('{"format_version": 1, "classes": [')
    _predict_error(tmp_path, art, [trained["ds"] / "test"], art / "manifest.json",
                   hints=("not valid JSON", "re-export"))


def test_predict_manifest_from_a_newer_format(tmp_path, trained):
    art = copy_artifact(trained["art"], tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    _predict_error(tmp_path, art, [trained["ds"] / "test"], art / "manifest.json",
                   hints=("format_version 99", "newer", "upgrade cxr-fastai"))


def test_predict_edited_weights_fail_the_hash_check(tmp_path, trained):
    art = copy_artifact(trained["art"], tmp_path / "a")
    b = bytearray((art / "model.safetensors").read_bytes())
    b[len(b) // 2] ^= 0xFF
    (art / "model.safetensors").write_bytes(bytes(b))
    _predict_error(tmp_path, art, [trained["ds"] / "test"], art / "model.safetensors",
                   hints=("SHA-256", "re-export"))


def _replace_weights(art: Path, data: bytes) -> None:
    (art / "model.safetensors").write_bytes(data)
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["model.safetensors"]["sha256"] = hashlib.sha256(data).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m))


def test_predict_refuses_a_safetensors_file_that_is_not_ours(tmp_path, trained):
    import torch
    from safetensors.torch import save

    art = copy_artifact(trained["art"], tmp_path / "a")
    _replace_weights(art, save({"encoder.weight": torch.zeros(3, 3), "encoder.bias": torch.zeros(3)}))
    line = _predict_error(tmp_path, art, [trained["ds"] / "test"], art / "model.safetensors",
                          hints=("not a cxr-fastai model file", "re-export"))
    assert "prep.0.weight" in line and "encoder." in line  # says what is missing and what is foreign


def test_predict_refuses_weights_of_the_wrong_shape(tmp_path, trained):
    import torch
    from safetensors.torch import load_file, save

    art = copy_artifact(trained["art"], tmp_path / "a")
    state = load_file(str(art / "model.safetensors"))
    state["head.weight"] = torch.zeros(5, state["head.weight"].shape[1])  # a 5-class head
    _replace_weights(art, save(state))
    line = _predict_error(tmp_path, art, [trained["ds"] / "test"], art / "model.safetensors",
                          hints=("not a cxr-fastai model file",))
    assert "head.weight" in line and "shape" in line


def test_predict_refuses_a_file_that_is_not_safetensors(tmp_path, trained):
    art = copy_artifact(trained["art"], tmp_path / "a")
    _replace_weights(art, b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    _predict_error(tmp_path, art, [trained["ds"] / "test"], art / "model.safetensors",
                   hints=("not a readable safetensors file", "re-export"))


def test_predict_input_path_missing(tmp_path, trained):
    missing = tmp_path / "scans" / "nope.png"
    _predict_error(tmp_path, trained["art"], [trained["images"][0], missing], missing,
                   hints=("no such file or folder",))


def test_predict_folder_with_no_images(tmp_path, trained):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    _predict_error(tmp_path, trained["art"], [folder], folder, hints=("holds no images",))


def test_predict_all_inputs_unreadable(tmp_path, trained):
    bad = unreadable(tmp_path / "bad")
    out = tmp_path / "pred.csv"
    line = one_line_error(cli("predict", trained["art"], *bad, "--out", out), out, bad[0],
                          hints=("could be read", "nothing written"))
    no_leftovers(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    assert line.count("\n") == 0


def test_predict_out_that_is_a_folder(tmp_path, trained):
    out = tmp_path / "results"
    out.mkdir()
    one_line_error(cli("predict", trained["art"], trained["ds"] / "test", "--out", out), out,
                   hints=("is a folder", "file path"))
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_predict_one_unreadable_image_among_readable_ones(tmp_path, trained):
    bad = unreadable(tmp_path / "in")[1]                    # garbage.png
    (tmp_path / "in" / "empty.jpg").unlink()
    good = [trained["images"][0], trained["images"][-1]]
    out = tmp_path / "pred.csv"
    res = cli("predict", trained["art"], good[0], bad, good[1], "--out", out)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "Traceback" not in res.output
    assert not any(ln.startswith("error:") for ln in res.stderr.splitlines())
    assert "1 unreadable" in res.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(good[0]), str(bad), str(good[1])]
    probs = [f"p_{c}" for c in trained["classes"]]
    bad_row = rows[1]
    assert bad_row["prediction"] == "" and all(bad_row[p] == "" for p in probs)
    assert bad_row["error"] and str(bad) in bad_row["error"]
    for r in (rows[0], rows[2]):
        assert r["error"] == ""
        assert r["prediction"] in trained["classes"]
        assert sum(float(r[p]) for p in probs) == pytest.approx(1.0, abs=1e-5)
        assert r["prediction"] == max(trained["classes"], key=lambda c: float(r[f"p_{c}"]))


def test_predict_json_has_the_same_keys_as_the_csv_columns(tmp_path, trained):
    bad = unreadable(tmp_path / "in")[1]
    good = trained["images"][1]
    res_csv = cli("predict", trained["art"], good, bad)
    res_json = cli("predict", trained["art"], good, bad, "--format", "json")
    assert res_csv.exit_code == 0 and res_json.exit_code == 0, (res_csv.output, res_json.output)
    header = next(csv.reader(io.StringIO(res_csv.stdout)))
    rows = json.loads(res_json.stdout)
    probs = [f"p_{c}" for c in trained["classes"]]
    assert header == ["path", "prediction", *probs, "error"]
    assert [list(r) for r in rows] == [header, header]
    assert rows[1]["prediction"] is None and all(rows[1][p] is None for p in probs) and rows[1]["error"]
    assert sum(rows[0][p] for p in probs) == pytest.approx(1.0, abs=1e-5)


def test_predict_bad_format_is_a_usage_error(tmp_path, trained):
    usage_error(cli("predict", trained["art"], trained["ds"] / "test", "--format", "xml"), "--format")


# ------------------------------------------------------------------------------------- evaluate

def test_evaluate_label_the_model_does_not_know(tmp_path, trained):
    data, out = tmp_path / "eval", tmp_path / "metrics.json"
    write_image(data / "NORMAL" / "a.png", 90)
    write_image(data / "ZEBRA" / "c.png", 160)
    one_line_error(cli("evaluate", trained["art"], data, "--out", out), data,
                   hints=("'ZEBRA'", "not a class of this model"))
    no_leftovers(out)


def test_evaluate_split_missing_from_the_layout_lists_present_splits(tmp_path, trained):
    data, out = tmp_path / "eval", tmp_path / "metrics.json"
    write_image(data / "a.png", 90)
    write_image(data / "b.png", 160)
    (data / "labels.csv").write_text("path,label,split\na.png,NORMAL,train\nb.png,PNEUMONIA,test\n")
    line = one_line_error(cli("evaluate", trained["art"], data, "--split", "valid", "--out", out), data,
                          hints=("'valid'", "--split"))
    assert "splits present: test, train" in line
    no_leftovers(out)


def test_evaluate_malformed_split_is_a_usage_error_and_an_absent_one_lists_the_splits(tmp_path, trained):
    out = tmp_path / "metrics.json"
    res = cli("evaluate", trained["art"], trained["ds"], "--split", "no such/split", "--out", out)
    usage_error(res, "--split")
    assert "train, valid, test" in res.stderr
    no_leftovers(out)
    line = one_line_error(cli("evaluate", trained["art"], trained["ds"], "--split", "bogus", "--out", out),
                          trained["ds"], hints=("'bogus'", "--split"))
    assert "splits present: test, train, valid" in line
    no_leftovers(out)


def test_evaluate_out_that_is_a_folder(tmp_path, trained):
    out = tmp_path / "metrics"
    out.mkdir()
    one_line_error(cli("evaluate", trained["art"], trained["ds"], "--out", out), out, hints=("is a folder",))
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ in a real process, as users run it

def test_real_process_user_error_is_one_line_without_traceback(tmp_path):
    data = tmp_path / "nope"
    p = run_cli("train", data, "--run", tmp_path / "run", cwd=tmp_path, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(data) in lines[0], p.stderr
    assert p.stdout == ""
    assert not (tmp_path / "run").exists()


def test_real_process_debug_prints_the_traceback(tmp_path):
    p = run_cli("--debug", "train", tmp_path / "nope", "--run", tmp_path / "run", cwd=tmp_path, timeout=120)
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "DataError" in p.stderr
    assert str(tmp_path / "nope") in p.stderr


def test_real_process_artifact_error_and_usage_error(tmp_path, trained):
    art = copy_artifact(trained["art"], tmp_path / "a")
    (art / "manifest.json").write_text("{oops")
    out = tmp_path / "pred.csv"
    p = run_cli("predict", art, trained["ds"] / "test", "--out", out, cwd=tmp_path, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(art / "manifest.json") in lines[0], p.stderr
    no_leftovers(out)

    p = run_cli("train", tmp_path, "--run", tmp_path / "run", "--size", "8", cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "--size" in p.stderr and "Traceback" not in p.stderr


def test_real_process_no_arguments_prints_help(tmp_path):
    p = run_cli(cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Usage" in p.stdout and "train" in p.stdout and "Traceback" not in p.stderr


# ------------------------------------------------------------------------- relative run folders

def test_learner_export_with_a_relative_run_folder(trained, monkeypatch):
    from cxr_fastai.train.fit import export_learner, learner_from_run
    from cxr_fastai.train.runs import load_run

    monkeypatch.chdir(trained["run"].parent)
    info = load_run(Path(trained["run"].name))             # relative, as `--run run` gives it
    learn = learner_from_run(info, "cpu")
    dest = info.path / "relative_export.pkl"
    try:
        export_learner(learn, dest)
        assert dest.is_file()
    finally:
        dest.unlink(missing_ok=True)
