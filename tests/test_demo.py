"""`cxr-fastai demo`: the whole path on synthetic data it makes itself."""
import functools
import json
import re
from pathlib import Path

import pytest

from conftest import cli


@pytest.mark.slow
def test_demo_reaches_high_accuracy_on_held_out_synthetic_data_and_lists_real_files(tmp_path, monkeypatch):
    out = tmp_path / "demo-out"
    r = cli("demo", "--out", out, "--quiet")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "synthetic" in r.stdout
    listed = re.findall(r"^  [^:]+: (/.*)$", r.stdout, flags=re.M)
    assert len(listed) >= 8
    for p in listed:
        assert Path(p).exists(), p
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["n"] >= 150
    assert m["accuracy"] >= 0.9, m["accuracy"]
    # run again: replaces its previous output instead of refusing or mixing (a tiny demo this time: what is
    # checked is the folder, not the accuracy)
    from cxr_fastai import cli as cli_module
    from cxr_fastai.config import DemoConfig

    monkeypatch.setattr(cli_module, "DemoConfig", functools.partial(DemoConfig, n_train=6, image_size=32, size=16,
                                                                    epochs=1))
    (out / "stray.txt").write_text("x")
    r2 = cli("demo", "--out", out, "--quiet")
    assert r2.exit_code == 0, (r2.output, r2.exception)
    assert not (out / "stray.txt").exists()
    assert json.loads((out / "metrics.json").read_text())["n"] == 3 * 2  # the new run's output, none of the old
    assert len(list((out / "data" / "train").rglob("*.png"))) == 3 * 6


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = cli("demo", "--out", out)
    assert r.exit_code == 1 and r.stderr.startswith("error:")
    assert (out / "precious.txt").read_text() == "keep me"
