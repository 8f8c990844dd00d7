"""`cxr-fastai serve`: the API in-process (FastAPI's TestClient) on the session's tiny model, plus one real
process for Ctrl-C and the access log.

Contract checked here: every endpoint; the token rule (and /health open); a public --host without a token
refused by the CLI; every bad upload answered with 400/413/415/422 (never 500) and a message naming the
uploaded file; DICOM identifiers in neither responses nor logs; order kept; probabilities equal to
`cxr-fastai predict` (both runtimes, and TTA); Grad-CAM a PNG; concurrent requests batched."""
from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cli, noise_image
from dicom_util import PLANTED_ID, PLANTED_NAME, make_dicom

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cxr_fastai.serve.app import create_app, is_loopback, worker_threads  # noqa: E402
from cxr_fastai.serve.upload import clean_name  # noqa: E402

TOKEN = "s3cret-token-for-tests"
OK_STATUSES = {200, 400, 401, 413, 415, 422}


# ------------------------------------------------------------------------------------------ helpers

def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def files_of(paths) -> list[tuple[str, bytes]]:
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]


def post(client, files: list[tuple[str, bytes]], headers=None, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return client.post("/predict" + (f"?{query}" if query else ""), headers=headers or {},
                       files=[("files", (name, data, "application/octet-stream")) for name, data in files])


def cli_probs(art: Path, paths, tmp_path: Path, *extra: str) -> list[dict]:
    """`cxr-fastai predict ART PATHS --out CSV` in-process: its rows."""
    out = tmp_path / f"pred_{len(list(tmp_path.iterdir()))}.csv"
    res = cli("predict", art, *paths, "--out", out, *extra)
    assert res.exit_code == 0, res.output
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_as_cli(entries: list[dict], rows: list[dict], classes) -> None:
    assert len(entries) == len(rows)
    for e, r in zip(entries, rows):
        assert e["filename"] == Path(r["path"]).name
        assert e["error"] is None, e
        assert e["prediction"] == r["prediction"], (e, r)
        for c in classes:
            # the CSV holds 6 decimals: equal to within its rounding (5e-7) plus float noise
            assert abs(e["probabilities"][c] - float(r[f"p_{c}"])) <= 1e-6, (c, e, r)


@pytest.fixture(scope="module")
def app(tiny_model):
    return create_app(tiny_model.art)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def onnx_client(tiny_model):
    with TestClient(create_app(tiny_model.art, runtime="onnx")) as c:
        yield c


@pytest.fixture(scope="module")
def token_client(tiny_model):
    with TestClient(create_app(tiny_model.art, token=TOKEN)) as c:
        yield c


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb by its header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ endpoints

def test_health_model_and_page(client, tiny_model):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["classes"] == list(tiny_model.classes) and h["model"] == "art"

    m = client.get("/model").json()
    assert m["classes"] == list(tiny_model.classes)
    assert m["input"]["size"] == 16
    assert m["training"]["epochs"] == 1 and m["training"]["widths"] == [8, 16, 16, 32]
    assert "counts" in m["training"]
    # no server paths in the training summary
    assert "data" not in m["training"] and "run" not in m["training"] and "cache_dir" not in m["training"]
    assert "not for diagnosis" in m["model_card"]["intended_use"].lower()
    assert m["features"] == {"gradcam": True, "tta": True}

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "Research use only — not for diagnosis" in html
    # the result elements are built by the page's script: their stable test ids and ARIA roles are in it
    assert '"data-testid": "prediction"' in html and 'role: "meter"' in html and '"aria-valuenow"' in html
    assert 'for="files"' in html and 'aria-live="polite"' in html
    # self-contained: no outside script, style, font or image
    assert "http://" not in html and "https://" not in html and "<script src" not in html
    assert "<link rel=\"stylesheet\"" not in html and "@import" not in html
    assert "default-src 'none'" in page.headers["content-security-policy"]

    assert client.get("/docs").status_code == 404   # swagger UI would pull scripts from a CDN


def test_model_threads_default_to_what_predict_uses(client, monkeypatch):
    import torch

    # one worker: the model thread runs with torch's own count (this thread's), as `predict` does
    assert client.app.state.model.model_pool.submit(torch.get_num_threads).result() == torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert worker_threads(0, 1) == 0            # 0: the library's default
    assert worker_threads(0, 2) == 4 and worker_threads(0, 3) == 2 and worker_threads(0, 16) == 1
    assert worker_threads(3, 2) == 3            # --threads wins


def test_predict_equals_cli_predict_and_keeps_order(client, onnx_client, tiny_model, tmp_path):
    paths = tiny_model.test_images()
    rows = cli_probs(tiny_model.art, paths, tmp_path)
    r = post(client, files_of(paths))
    assert r.status_code == 200
    assert_same_as_cli(r.json(), rows, tiny_model.classes)

    rows = cli_probs(tiny_model.art, paths, tmp_path, "--runtime", "onnx")
    r = post(onnx_client, files_of(paths))
    assert r.status_code == 200
    assert_same_as_cli(r.json(), rows, tiny_model.classes)

    # reversed order in, reversed order out
    r = post(client, files_of(paths[::-1]))
    assert [e["filename"] for e in r.json()] == [p.name for p in paths[::-1]]


def test_tta_equals_cli_predict_tta(client, onnx_client, tiny_model, tmp_path):
    paths = tiny_model.test_images("NORMAL")
    rows = cli_probs(tiny_model.art, paths, tmp_path, "--tta")
    r = post(client, files_of(paths), tta=1)
    assert r.status_code == 200
    assert_same_as_cli(r.json(), rows, tiny_model.classes)
    r = post(onnx_client, files_of(paths[:1]), tta=1)
    assert r.status_code == 400 and "torch runtime" in r.json()["detail"]


@pytest.mark.realdata
def test_real_jpegs_equal_cli_predict(client, tiny_model, cxr3_root, tmp_path):
    import pandas as pd

    df = pd.read_csv(cxr3_root / "labels.csv", dtype=str, keep_default_na=False)
    paths = [cxr3_root / p for p in df[df.split == "test"].groupby("label").head(2).path]
    rows = cli_probs(tiny_model.art, paths, tmp_path)
    r = post(client, files_of(paths))
    assert r.status_code == 200
    assert_same_as_cli(r.json(), rows, tiny_model.classes)


def test_gradcam_is_a_png_overlay(client, onnx_client, tiny_model):
    path = tiny_model.test_images("PNEUMONIA")[0]
    r = post(client, files_of([path]), gradcam=1)
    assert r.status_code == 200
    (e,) = r.json()
    assert e["error"] is None and e["prediction"] in tiny_model.classes
    img = Image.open(io.BytesIO(base64.b64decode(e["gradcam"], validate=True)))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (256, 256)
    img.load()
    # without the flag: no gradcam key
    assert "gradcam" not in post(client, files_of([path])).json()[0]
    r = post(onnx_client, files_of([path]), gradcam=1)
    assert r.status_code == 400 and "Grad-CAM" in r.json()["detail"] and "torch" in r.json()["detail"]


def test_gradcam_maps_match_the_reports_computation(tiny_model):
    """cxr_fastai.gradcam on a batch gives each image the map report.grad_cams's per-image loop gives."""
    import torch
    import torch.nn.functional as F

    from cxr_fastai.artifact.export import read_manifest
    from cxr_fastai.artifact.predict import Predictor
    from cxr_fastai.gradcam import grad_cam_maps
    from cxr_fastai.io.images import read_grey

    pred = Predictor(read_manifest(tiny_model.art), "cpu")
    x = pred.preprocess([pred.shrink(read_grey(p)) for p in tiny_model.test_images()[:4]])
    maps = grad_cam_maps(pred.model, x)
    for i in range(len(x)):   # the loop of evaluate.report.grad_cams, one image at a time
        feats = pred.model.forward_features(x[i:i + 1]).detach().requires_grad_(True)
        logits = pred.model.head(feats.amax((2, 3)))
        (g,) = torch.autograd.grad(logits[0, int(logits.argmax(1))], feats)
        cam = F.relu((g.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        cam = (cam / cam.max().clamp(min=1e-8)).detach().numpy()
        np.testing.assert_allclose(maps[i], cam, atol=1e-5)


# ------------------------------------------------------------------------------------------ the token rule

def test_token_guards_everything_but_health_and_page(token_client, tiny_model):
    path = tiny_model.test_images()[0]
    assert token_client.get("/health").status_code == 200
    assert token_client.get("/").status_code == 200            # the page holds no data; it sends the token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        r = token_client.get("/model", headers=headers)
        assert r.status_code == 401, headers
        assert "Bearer" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
        assert post(token_client, files_of([path]), headers=headers).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert token_client.get("/model", headers=good).status_code == 200
    assert token_client.get("/model", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    r = post(token_client, files_of([path]), headers=good)
    assert r.status_code == 200 and r.json()[0]["error"] is None


def test_public_host_without_token_is_refused_by_the_cli(tiny_model, monkeypatch):
    monkeypatch.delenv("CXR_SERVE_TOKEN", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        res = cli("serve", tiny_model.art, "--host", host)
        assert res.exit_code == 1, (host, res.output)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert host in lines[0] and "--token" in lines[0] and "loopback" in lines[0]
        assert "Traceback" not in res.output
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org", ""))


def test_busy_port_and_bad_artifact_are_one_line_errors(tiny_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = cli("serve", tiny_model.art, "--port", s.getsockname()[1])
    assert res.exit_code == 1 and "choose another --port" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cli("serve", tmp_path / "nowhere", "--port", free_port())
    assert res.exit_code == 1 and "nowhere" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ bad uploads

def test_every_bad_upload_is_a_per_file_error_never_a_500(client, tiny_model, monkeypatch):
    good = files_of(tiny_model.test_images()[:1])
    whole = png_bytes(noise_image(np.random.default_rng(0), 64))
    bad = [("notes.txt", b"just some text, not an image"),
           ("empty.png", b""),
           ("cut.png", whole[: len(whole) // 2]),
           ("bomb.png", bomb_png()),
           ("fake.dcm", b"\x00" * 128 + b"DICM" + b"\x01\x02" * 10)]
    r = post(client, bad)
    assert r.status_code == 422            # nothing could be read: the list, every entry with its error
    entries = r.json()
    assert [e["filename"] for e in entries] == [n for n, _ in bad]
    for e in entries:
        assert e["prediction"] is None and e["probabilities"] is None
        assert e["error"].startswith(e["filename"] + ": "), e
        assert "/proc/" not in e["error"] and "cxr-serve-" not in e["error"]   # never the server's temp path
    by = {e["filename"]: e["error"] for e in entries}
    assert "empty" in by["empty.png"]
    assert "truncated" in by["cut.png"] or "corrupt" in by["cut.png"]
    assert "too large" in by["bomb.png"]
    assert "DICOM" in by["fake.dcm"]

    # some read, some not: 200, per-file errors, order kept
    r = post(client, [bad[0], *good, bad[2]])
    assert r.status_code == 200
    assert [e["error"] is None for e in r.json()] == [False, True, False]

    # nothing left open behind: every upload's in-memory file is closed
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    for _ in range(5):
        post(client, [*bad, *good])
    if fds:
        assert len(os.listdir("/proc/self/fd")) <= fds + 2

    # Pillow's pixel limit, lowered: an ordinary image becomes a "bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    r = post(client, good)
    assert r.status_code == 422 and "too large" in r.json()[0]["error"]


def test_too_big_is_413_naming_the_file(tiny_model):
    with TestClient(create_app(tiny_model.art, max_mb=0.05)) as c:   # 50 kB a request
        small = png_bytes(np.zeros((16, 16), np.uint8))
        big = png_bytes(noise_image(np.random.default_rng(1), 400))    # ~160 kB of noise
        assert len(big) > 50_000
        r = post(c, [("small.png", small), ("huge scan.png", big)])
        assert r.status_code == 413
        body = r.json()
        assert body["filename"] == "huge scan.png" and "huge scan.png" in body["detail"]
        assert "--max-mb" in body["detail"]
        # together under the cap: fine
        assert post(c, [("small.png", small), ("small2.png", small)]).status_code == 200


def test_malformed_requests(client, tiny_model):
    r = client.post("/predict", content=b"hello", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/predict", data={"other": "x"}, files=[("notfiles", ("a.png", b"x", "image/png"))])
    assert r.status_code == 400 and "files" in r.json()["detail"]
    r = client.post("/predict", content=b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\nabc",
                    headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400 and "cut short" in r.json()["detail"]
    r = post(client, files_of(tiny_model.test_images()[:1]), gradcam="maybe")
    assert r.status_code == 400 and "gradcam" in r.json()["detail"]
    assert client.get("/predict").status_code == 405
    # a client path in the name is dropped, the name itself kept
    r = post(client, [("../../etc/passwd", b"x")])
    assert r.status_code == 422 and r.json()[0]["filename"] == "passwd"
    assert clean_name(b"C:\\Users\\me\\scan.png", 0) == "scan.png" and clean_name(None, 2) == "file 3"


def test_dicom_identifiers_never_leak(client, tiny_model, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    arr = np.asarray(Image.open(tiny_model.test_images("COVID19")[0]).convert("L"))
    good = make_dicom(tmp_path / "good.dcm", arr)
    bare = make_dicom(tmp_path / "1.2.840.99", arr)                       # no telling extension: the preamble says
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:400])
    odd = make_dicom(tmp_path / "odd.dcm", arr, photometric="HSV")
    r = post(client, files_of([good, bare, cut, odd]))
    assert r.status_code == 200
    entries = r.json()
    assert [e["error"] is None for e in entries] == [True, True, False, False]
    rows = cli_probs(tiny_model.art, [good, bare], tmp_path)
    assert_same_as_cli(entries[:2], rows, tiny_model.classes)
    r2 = post(client, files_of([good]), gradcam=1)
    out, err = capfd.readouterr()
    for text in (r.text, r2.text, caplog.text, out, err):
        for secret in (PLANTED_NAME, PLANTED_ID, "Leaky", "ACC-LEAK", "19700101"):
            assert secret not in text


# ------------------------------------------------------------------------------------------ batching

def test_concurrent_requests_all_succeed_and_are_batched(tiny_model):
    app = create_app(tiny_model.art, batch_wait_ms=300)     # a wide window: the 8 requests must share it
    paths = tiny_model.test_images()[:8]
    results: list = [None] * len(paths)
    with TestClient(app) as c:
        go = threading.Barrier(len(paths))

        def one(i):
            go.wait()
            results[i] = post(c, files_of([paths[i]]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(r is not None and r.status_code == 200 for r in results)
    assert [r.json()[0]["filename"] for r in results] == [p.name for p in paths]
    stats = app.state.model.batcher.stats()
    assert stats["items"] == len(paths)
    assert stats["batches"] < len(paths) and stats["largest"] >= 2, stats


def test_batcher_waits_at_most_its_window_and_reports_failures():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cxr_fastai.serve.batching import Batcher

    pool = ThreadPoolExecutor(1)

    def double(xs):
        if -1 in xs:
            raise ValueError("boom")
        return [2 * x for x in xs]

    async def main():
        b = Batcher(double, pool, max_batch=4, wait_s=0.01)
        got = await asyncio.gather(*(b.submit(i) for i in range(10)))
        assert got == [2 * i for i in range(10)]
        assert b.stats()["largest"] <= 4 and b.stats()["items"] == 10
        with pytest.raises(ValueError):
            await b.submit(-1)
        assert await b.submit(5) == 10           # the worker survived the failed batch
        await b.aclose()

    asyncio.run(main())
    pool.shutdown()


# ------------------------------------------------------------------------------------------ a real process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_logs_no_query_and_stops_on_ctrl_c(tiny_model):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cxr_fastai", "serve", str(tiny_model.art), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.3)
        with urllib.request.urlopen(base + "/model?secret=hunter2", timeout=10) as r:
            assert r.status == 200
        # a slow client (headers and half a body sent, then silence) does not hold up anyone else
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=bb\r\n"
                     b"Content-Length: 100000\r\n\r\n--bb\r\nContent-Disposition: form-data; name=\"files\"; "
                     b"filename=\"slow.png\"\r\n\r\n" + b"\x89PNG" * 100)
        image = tiny_model.test_images()[0]
        body = (b"--bb\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
                + image.read_bytes() + b"\r\n--bb--\r\n")
        t0 = time.monotonic()
        req = urllib.request.Request(base + "/predict", data=body, method="POST",
                                     headers={"Content-Type": "multipart/form-data; boundary=bb"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.load(r)[0]["error"] is None
        assert time.monotonic() - t0 < 20
        slow.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "GET /model 200" in err and "POST /predict 200" in err
    assert "hunter2" not in err and "secret" not in err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "server stopped"
    assert "research use only" in err.lower()
