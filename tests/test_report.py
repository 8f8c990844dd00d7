"""interpret's self-contained HTML report: metrics with intervals, confusion matrix, ROC, top losses and
Grad-CAM overlays, rendered by a real headless browser."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory) -> Path:
    """`interpret` (in-process) on the session's tiny run: its 12 validation images, top 4 losses."""
    out = tmp_path_factory.mktemp("report") / "rep"
    r = cli("interpret", tiny_model.run, "--k", 4, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, (r.output, r.exception)
    assert str(out) in r.stdout
    return out


def test_report_folder_holds_figures_tables_and_metrics_with_intervals(report):
    for f in ("report.html", "roc.png", "gradcam_top_losses.png", "gradcam_correct.png", "confusion_matrix.png",
              "top_losses.png", "top_losses.csv", "most_confused.csv", "summary.json"):
        assert (report / f).is_file(), f
    m = json.loads((report / "summary.json").read_text())["metrics"]
    lo, hi = m["ci95"]["accuracy"]
    assert lo <= m["accuracy"] <= hi
    assert set(m["per_class"]) == {"COVID19", "NORMAL", "PNEUMONIA"}


def test_html_report_is_self_contained(report):
    html = (report / "report.html").read_text()
    srcs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "Grad-CAM" in html and "ROC" in html and "not for diagnosis" in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium not installed")
    shot = tmp_path / "shot.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1800",
           (report / "report.html").resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert px.shape[0] > 500 and px.std() > 20, "screenshot is blank"
    # the embedded figures are drawn: a good share of the page is neither white nor one flat colour
    assert (px < 200).mean() > 0.05
