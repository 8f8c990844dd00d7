"""`cxr-fastai demo`: the whole path on synthetic data it makes itself."""
import json
import re
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_reaches_high_accuracy_on_held_out_synthetic_data_and_lists_real_files(tmp_path):
    out = tmp_path / "demo-out"
    r = run_cli("demo", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "synthetic" in r.stdout
    listed = re.findall(r"^  [^:]+: (/.*)$", r.stdout, flags=re.M)
    assert len(listed) >= 8
    for p in listed:
        assert Path(p).exists(), p
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["n"] >= 150
    assert m["accuracy"] >= 0.9, m["accuracy"]
    # run again: replaces its previous output instead of refusing or mixing
    (out / "stray.txt").write_text("x")
    r2 = run_cli("demo", "--out", out, "--quiet")
    assert r2.returncode == 0, r2.stderr
    assert not (out / "stray.txt").exists()


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run_cli("demo", "--out", out)
    assert r.returncode == 1 and r.stderr.startswith("error:")
    assert (out / "precious.txt").read_text() == "keep me"
