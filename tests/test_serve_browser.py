"""The `serve` page in a real browser: Debian's chromium + chromedriver driven by Selenium, against uvicorn
running the tiny model in a background thread on a free loopback port.

A real cxr3 image is chosen through the file input (as a user does, send_keys on it); the predicted class
the page shows must be the one `cxr-fastai predict` gives for the same file. A screenshot goes to tmp_path,
and is kept in $CXR_SCREENSHOTS when that names a folder. Under CI=true a missing chromium, chromedriver or
selenium is a failure; elsewhere a skip."""
from __future__ import annotations

import csv
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import cli

CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-token"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1200,1600")


def _missing(msg: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = CHROMEDRIVER if os.access(CHROMEDRIVER, os.X_OK) else shutil.which("chromedriver")
    if not chromium or not driver:
        _missing("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("selenium is needed (pip install -e '.[dev]')")
    return chromium, driver


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    chromium, chromedriver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    d = webdriver.Chrome(service=Service(chromedriver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


class _Server:
    """uvicorn in a background thread (it installs no signal handlers there)."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def servers(tiny_model):
    from cxr_fastai.serve.app import create_app

    open_, guarded = _Server(create_app(tiny_model.art)), _Server(create_app(tiny_model.art, token=TOKEN))
    yield open_, guarded
    open_.stop()
    guarded.stop()


@pytest.fixture(scope="module")
def real_image(cxr3_root) -> Path:
    with open(cxr3_root / "labels.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "test" and r["label"] == "PNEUMONIA")
    return (cxr3_root / row["path"]).resolve()


def cli_prediction(art: Path, image: Path, tmp_path: Path) -> str:
    out = tmp_path / "pred.csv"
    res = cli("predict", art, image, "--out", out)
    assert res.exit_code == 0, res.output
    with open(out, newline="") as f:
        (row,) = list(csv.DictReader(f))
    return row["prediction"]


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    keep = os.environ.get("CXR_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / name)
    return shot


def upload_and_wait(driver, image: Path, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model-line"), "classes"))   # /model answered
    driver.find_element(By.ID, "files").send_keys(str(image))
    pred = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, '[data-testid="prediction"]')))
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Done"))
    return pred


@pytest.mark.realdata
def test_page_classifies_a_real_image_like_cli_predict(driver, servers, tiny_model, real_image, tmp_path):
    from selenium.webdriver.common.by import By

    server = servers[0]
    driver.get(server.url)
    banner = driver.find_element(By.CSS_SELECTOR, '[data-testid="banner"]')
    assert banner.is_displayed() and "Research use only — not for diagnosis" in banner.text

    pred = upload_and_wait(driver, real_image)
    shot = screenshot(driver, tmp_path, "serve_page.png")
    assert shot.stat().st_size > 10_000

    assert pred.text == cli_prediction(tiny_model.art, real_image, tmp_path)
    (result,) = driver.find_elements(By.CSS_SELECTOR, '[data-testid="result"]')
    assert real_image.name in result.text
    meters = result.find_elements(By.CSS_SELECTOR, '[role="meter"]')
    assert len(meters) == len(tiny_model.classes)
    shown = [float(m.get_attribute("aria-valuenow")) for m in meters]
    assert abs(sum(shown) - 100) < 0.5 and all(m.get_attribute("aria-valuetext").endswith("%") for m in meters)
    texts = [e.text for e in result.find_elements(By.CSS_SELECTOR, '[data-testid="probability"]')]
    assert all(t.endswith("%") for t in texts) and len(texts) == len(meters)
    cam = result.find_element(By.CSS_SELECTOR, '[data-testid="gradcam"]')
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", cam) == 256
    assert "Grad-CAM" in cam.get_attribute("alt")
    card = driver.find_element(By.CSS_SELECTOR, '[data-testid="model-card"]').text
    assert "Intended use" in card and "not for diagnosis" in card.lower()
    # screen readers: the file input has its label, the status is a live region
    assert driver.find_element(By.CSS_SELECTOR, 'label[for="files"]').is_displayed()
    assert driver.find_element(By.ID, "status").get_attribute("aria-live") == "polite"


@pytest.mark.realdata
def test_page_sends_the_token_given_in_the_address(driver, servers, tiny_model, real_image, tmp_path):
    from selenium.webdriver.common.by import By

    server = servers[1]
    driver.get(server.url + "?token=" + TOKEN)
    pred = upload_and_wait(driver, real_image)
    assert pred.text == cli_prediction(tiny_model.art, real_image, tmp_path)
    assert TOKEN not in driver.current_url                       # taken out of the address bar and history
    assert driver.execute_script("return sessionStorage.getItem('cxr-fastai-token')") == TOKEN
    screenshot(driver, tmp_path, "serve_page_token.png")

    # a fresh tab session without it: the page asks for the token instead of failing silently
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.url)
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(EC.text_to_be_present_in_element((By.ID, "status"), "access token"))
    assert driver.switch_to.active_element.get_attribute("id") == "token"
