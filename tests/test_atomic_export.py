"""A process killed at any point of an export leaves the artifact folder wholly old or wholly new.

`export_run` builds the artifact in a sibling temporary folder (`.NAME.new-*`) and swaps it in with two
renames (old -> `.NAME.old`, new -> NAME). Each case below runs a real export in a process that SIGKILLs
itself right after one file-system step, over an existing older artifact, then checks what a reader sees,
that a re-export without --force refuses and touches nothing, and that a forced re-export succeeds and
leaves no stray temporary or aside folders. The processes: one fresh Python imports the exporter once and
forks one child per case (each child its own destination), so the import is paid once.

The "old" run is the session's tiny model; the "new" run is a copy of it with perturbed best-checkpoint
weights, so old and new artifacts differ in every file but the pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli

pytestmark = pytest.mark.slow

MANIFEST, WEIGHTS, PICKLE = "manifest.json", "model.safetensors", "model.pkl"

# For each (POINT, DEST) given as JSON: a forked child runs export_run(RUN, DEST, force=True) and SIGKILLs
# itself right after the step named by POINT. Only steps on the export's own paths (its files in DEST's
# temporary folder or DEST, the swap renames) trigger. Prints {DEST: the child's wait status}.
KILL_SCRIPT = r'''
import json, os, pathlib, shutil, signal, sys

import safetensors.torch
import torch  # noqa: F401  (imported once, before forking)

from cxr_fastai.artifact import export
from cxr_fastai.io import files as fsutil
from cxr_fastai.train import runs  # noqa: F401  (export_run imports it)

run, cases, onnx_ref = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]


def export_onnx(state, classes, widths, size, path):
    """The run's model.onnx as the reference export made it (the same bytes: the exporter is deterministic),
    without the exporter's seconds of tracing in every case."""
    real_copyfile(onnx_ref, path)
    return export.onnx_section(size, len(classes), export._onnx_opset(path))


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def in_tmp(p, name):
    """A file `name` of this export: in its temporary folder (or written straight into DEST)."""
    p = pathlib.Path(p)
    return p.name == name and (p.parent == dest or (p.parent.parent == dest.parent
                                                    and p.parent.name.startswith(tmp_prefix)))


real_copyfile, real_save_file = shutil.copyfile, safetensors.torch.save_file
real_write_text, real_replace = pathlib.Path.write_text, os.replace


def copyfile(src, dst, *a, **k):
    if point == "mid-pickle" and in_tmp(dst, "model.pkl"):  # half the bytes on disk, then dead
        data = pathlib.Path(src).read_bytes()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        die()
    out = real_copyfile(src, dst, *a, **k)
    if point == "pickle" and in_tmp(dst, "model.pkl"):
        die()
    return out


def save_file(tensors, filename, *a, **k):
    out = real_save_file(tensors, filename, *a, **k)
    if point == "weights" and in_tmp(filename, "model.safetensors"):
        die()
    return out


def write_text(self, *a, **k):
    out = real_write_text(self, *a, **k)
    if point == "manifest" and in_tmp(self, "manifest.json"):
        die()
    return out


def replace(src, dst, *a, **k):
    out = real_replace(src, dst, *a, **k)
    s, d = pathlib.Path(src), pathlib.Path(dst)
    if point == "aside" and s == dest and d == dest.with_name(aside_name):
        die()  # old renamed aside, new not yet in place: DEST is absent on disk
    if point == "swapped" and d == dest and s.name.startswith(tmp_prefix):
        die()  # new in place, old aside folder not yet deleted
    return out


status = {}
for point, dest in cases:
    dest = pathlib.Path(dest)
    tmp_prefix, aside_name = f".{dest.name}.new-", f".{dest.name}.old"
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        shutil.copyfile = copyfile                   # export.py calls shutil.copyfile(...)
        safetensors.torch.save_file = save_file      # export_run imports it at call time, after this
        pathlib.Path.write_text = write_text         # (tmp / MANIFEST).write_text(...)
        fsutil.os.replace = replace                  # the swap renames in io.files.atomic_folder
        export.export_onnx = export_onnx
        try:
            export.export_run(run, dest, force=True)
            print("export finished: the kill point was never reached", file=sys.stderr)
        finally:
            os._exit(3)
    status[str(dest)] = os.waitpid(pid, 0)[1]
print(json.dumps(status))
'''

# point -> (what the folder must hold right after the kill, before any reader or exporter recovers it)
POINTS = {
    "mid-pickle": "old",   # model.pkl half copied into the temporary folder
    "pickle": "old",       # after model.pkl is copied
    "weights": "old",      # after model.safetensors is written
    "manifest": "old",     # after manifest.json is written (the temporary folder is complete)
    "aside": "absent",     # after the old folder is renamed aside, before the new one is renamed in
    "swapped": "new",      # after the swap, before the aside folder is deleted
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def fingerprint(folder: Path) -> dict:
    """What tells one export from another: file hashes, and the manifest minus its timestamp."""
    m = json.loads((folder / MANIFEST).read_text())
    m.pop("created")
    return {WEIGHTS: sha(folder / WEIGHTS), PICKLE: sha(folder / PICKLE), MANIFEST: m}


def strays(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    import torch

    from cxr_fastai.artifact.export import export_run

    base = tmp_path_factory.mktemp("atomic_export")
    run_a, run_b = tiny_model.run, base / "run_b"
    # the "new" run: the same run with different best weights
    shutil.copytree(run_a, run_b)
    best = run_b / "checkpoints" / "best.pth"
    state = torch.load(best, map_location="cpu", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1.0
    torch.save(state, best)

    old, new = base / "old_ref", base / "new_ref"
    export_run(run_a, old)
    export_run(run_b, new)
    fp_old, fp_new = fingerprint(old), fingerprint(new)
    assert fp_old[WEIGHTS] != fp_new[WEIGHTS] and fp_old[MANIFEST] != fp_new[MANIFEST]
    return {"a": run_a, "b": run_b, "old": old, "new": new, "old_bytes": snapshot(old), "fp_old": fp_old, "fp_new": fp_new,
            "image": tiny_model.test_images()[0]}


def existing_old(runs, folder: Path) -> Path:
    """An older artifact already at the destination (a byte copy of the run-A export)."""
    dest = folder / "out" / "art"
    dest.parent.mkdir(parents=True)
    shutil.copytree(runs["old"], dest)
    return dest


@pytest.fixture(scope="module")
def killed(runs, tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Every case's export, killed: case -> (its destination, the killed process's wait status). The cases
    are the POINTS, and "cli-aside" (an "aside" kill for the `predict` test)."""
    base = tmp_path_factory.mktemp("killed")
    cases = {name: existing_old(runs, base / name) for name in [*POINTS, "cli-aside"]}
    point = {name: "aside" if name == "cli-aside" else name for name in cases}
    res = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(runs["b"]),
                          json.dumps([(point[n], str(d)) for n, d in cases.items()]), str(runs["new"] / "model.onnx")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout.strip().splitlines()[-1])
    return {name: (dest, status[str(dest)]) for name, dest in cases.items()}


def whole(runs, dest: Path) -> str:
    """'old' or 'new', after checking the folder is a complete, self-consistent, loadable artifact."""
    from cxr_fastai.artifact.export import load_model, read_manifest, verify_file

    art = read_manifest(dest)                     # readers recover an interrupted swap
    assert sorted(p.name for p in dest.iterdir()) == sorted([MANIFEST, WEIGHTS, PICKLE, "model.onnx"])
    for name in (WEIGHTS, PICKLE):
        verify_file(art, name)                    # manifest hashes match the files
    load_model(art)
    fp = fingerprint(dest)
    if fp == runs["fp_old"]:
        assert snapshot(dest) == runs["old_bytes"], "old artifact changed"
        return "old"
    if fp == runs["fp_new"]:
        return "new"
    pytest.fail(f"{dest} is a mix of the old and new artifacts: {fp}")


def killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_export_leaves_old_or_new(runs, killed, point):
    from cxr_fastai.errors import ArtifactError
    from cxr_fastai.artifact.export import export_run

    dest, status = killed[point]
    assert killed_by_sigkill(status), status

    # on disk, before anyone recovers anything
    expect = POINTS[point]
    aside = dest.with_name(f".{dest.name}.old")
    if expect == "absent":
        assert not dest.exists() and aside.is_dir()
        assert snapshot(aside) == runs["old_bytes"]
        expect = "old"                            # what a reader must see once it has recovered the swap
    else:
        assert dest.is_dir()
    left = strays(dest)
    assert whole(runs, dest) == expect
    assert left, "the kill left no temporary or aside folder: did the hook fire at the right step?"

    # without --force an export refuses and leaves the folder byte-identical
    before = snapshot(dest)
    with pytest.raises(ArtifactError, match="--force"):
        export_run(runs["b"], dest)
    assert snapshot(dest) == before and whole(runs, dest) == expect

    # a forced export after the crash succeeds and cleans up
    export_run(runs["b"], dest, force=True)
    assert whole(runs, dest) == "new"
    assert strays(dest) == []


def test_cli_export_without_force_keeps_old_files(runs, tmp_path):
    dest = existing_old(runs, tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    res = cli("export", runs["b"], "--to", dest)
    assert res.exit_code == 1, (res.output, res.exception)
    assert "--force" in res.stderr and "Traceback" not in res.output
    assert snapshot(dest) == runs["old_bytes"]
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes
    assert strays(dest) == []


def test_cli_predict_recovers_a_swap_cut_between_its_renames(runs, killed, tmp_path):
    """The reader path end to end: `predict` on an artifact whose swap was killed mid-way."""
    dest, status = killed["cli-aside"]
    assert killed_by_sigkill(status), status
    assert not dest.exists()
    out = tmp_path / "pred.csv"
    res = cli("predict", dest, runs["image"], "--out", out, "--device", "cpu")
    assert res.exit_code == 0, (res.output, res.exception)
    assert out.read_text().count("\n") == 2
    assert whole(runs, dest) == "old"
    assert not dest.with_name(f".{dest.name}.old").exists()  # the unfinished new folder waits for the next export
