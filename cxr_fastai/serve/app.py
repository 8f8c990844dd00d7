"""`cxr-fastai serve`: an HTTP API and a one-page UI over an exported model (FastAPI + uvicorn).

    GET  /          the page (no data in it; open even with a token, it sends the token itself)
    GET  /health    {"status": "ok", "model", "runtime", "classes"}; never needs the token
    GET  /model     classes, input size, training summary, validation figures, model card
    POST /predict   multipart field `files` (one or more; JPEG, PNG, BMP, TIFF, DICOM);
                    ?gradcam=1 adds a base64 PNG overlay per file, ?tta=1 averages 6 views (torch runtime)

Status codes of POST /predict:
    200  at least one file was predicted: a JSON list, one entry per file in the order sent:
         {"filename", "prediction", "probabilities": {class: p}, "error": null} (plus "gradcam"); a file that
         cannot be read has prediction/probabilities null and "error" naming the file and the reason
    422  no file could be read: the same list, every entry with its error
    400  bad query flags, gradcam/tta under the onnx runtime, a malformed body, no `files`, too many files
    401  a token is set and the request lacks `Authorization: Bearer TOKEN` (JSON, WWW-Authenticate: Bearer)
    413  the files of the request pass --max-mb: {"detail", "filename"} naming the file being received
    415  the body is not multipart/form-data
Every refusal is JSON {"detail": ...}. A bad upload never gives a 500: decoding errors of every kind are
the file's `error`.

Safety: the model comes from model.safetensors (or model.onnx), checked against the manifest's SHA-256;
model.pkl is never unpickled. Uploads stay in memory (upload.py). Logs hold method, path (no query
string) and status only; DICOM header values never reach a response or a log (io.dicom's messages quote
technical elements only).

Speed: the handlers are async; reading the body is async, decoding runs in a thread pool, and images of
concurrent requests are batched through the model (batching.Batcher), one forward pass at a time in a
single model thread.

`create_app` builds everything (loads the model); importing this module does no work (fastapi is imported
inside it). No `from __future__ import annotations` here: FastAPI reads the handlers' annotations, and
`Request` is a local name of create_app.
"""

import asyncio
import base64
import copy
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PredictConfig, ServeConfig
from ..errors import CxrError, ImageReadError

log = logging.getLogger("cxr_fastai.serve")
access_log = logging.getLogger("cxr_fastai.serve.access")

TRAINING_KEYS = ("size", "epochs", "bs", "lr", "wd", "widths", "min_scale", "augment", "balance", "balance_power",
                 "contrast", "crop_border", "label_smoothing", "class_weights", "mixup", "mixup_pairs", "group_dro",
                 "source_adversary", "weight_average", "mix_style", "exclude_sources", "layout", "counts", "skipped")
OPEN_PATHS = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/"), ("HEAD", "/")}
_ENV = "CXR_FASTAI_SERVE"   # create_app's arguments for worker processes (--workers > 1)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
PAGE_HEADERS = {
    # the page is self-contained: nothing may come from anywhere else
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ------------------------------------------------------------------------------------------ the bind rule

def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost` are loopback; every other address or name is not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """The safe-by-default rule: a non-loopback --host needs --token."""
    if not is_loopback(host) and not token:
        raise CxrError(f"--host {host} is not a loopback address: serving beyond this machine needs --token "
                       "(rule: a non-loopback --host requires a bearer token); add --token SECRET "
                       "(or set CXR_SERVE_TOKEN), or keep the default --host 127.0.0.1")


def check_port_free(host: str, port: int) -> None:
    """Refuse early, with a one-line error, when the address cannot be bound (before the model loads)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CxrError(f"--host {host}: cannot resolve it ({e.strerror}); give an IP address or hostname") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise CxrError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                           "or stop the program using it") from e


# ------------------------------------------------------------------------------------------ the app

def _flag(request, name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"?{name}={raw[:20]!r}: use {name}=1 or {name}=0")


class _Model:
    """What the handlers call: decoding (thread pool), batched probabilities and Grad-CAM (model thread)."""

    def __init__(self, artifact: str | Path, runtime: str, device: str, cfg: ServeConfig):
        from ..artifact.predict import load_predictor
        from .batching import Batcher

        # trust_pickle is never set: safetensors (torch) or model.onnx, both checked against the manifest
        self.pred = load_predictor(artifact, PredictConfig(runtime=runtime, device=device,
                                                           onnx_threads=cfg.threads if runtime == "onnx" else 0))
        self.runtime, self.art, self.classes = runtime, self.pred.art, list(self.pred.classes)
        self.torch = runtime == "torch"
        self.tta_pred = None
        if self.torch:
            self.tta_pred = copy.copy(self.pred)   # shares the model; only shrink/probs_shrunk read .tta
            self.tta_pred.tta = True
        self.decode_pool = ThreadPoolExecutor(max(1, cfg.decode_threads), thread_name_prefix="cxr-decode")
        # one forward pass at a time, in one thread; torch's thread count is set in it (OpenMP keeps it per
        # thread): --threads, else this (main) thread's count, torch's default, which `predict` runs with
        threads = (cfg.threads or _torch_threads()) if self.torch else 0
        init = (lambda: _torch_threads(threads)) if threads else None
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="cxr-model", initializer=init)
        wait = cfg.batch_wait_ms / 1000
        self.batcher = Batcher(lambda xs: list(self.pred.probs_shrunk(xs)), self.model_pool, cfg.max_batch, wait,
                               name="predict")
        self.tta_batcher = (Batcher(lambda xs: list(self.tta_pred.probs_shrunk(xs)), self.model_pool,
                                    cfg.max_batch, wait, name="predict-tta") if self.torch else None)

    def prepare(self, data: bytes, name: str, tta: bool, gradcam: bool):
        """Decode + shrink (decoding thread): (what the batcher takes, model-size image for Grad-CAM, display
        image for the overlay). The full-size array is dropped here."""
        from ..io.images import crop_border, squash
        from .upload import decode_upload

        arr = decode_upload(data, name)
        pred = self.tta_pred if tta else self.pred
        try:
            shrunk = pred.shrink(arr)
            if not gradcam:
                return shrunk, None, None
            small = shrunk[0] if tta else shrunk
            # the overlay is drawn on what the model saw: the film less its cut border
            return shrunk, small, squash(crop_border(arr, self.pred.art.crop_border), min(512, max(256, self.pred.size)))
        except Exception as e:  # decoded, yet the contrast step or resize failed: still this file's error
            raise ImageReadError(f"{name}: cannot prepare the decoded image ({type(e).__name__})") from None

    def cam_png(self, small: np.ndarray, display: np.ndarray, target: int) -> bytes:
        """Grad-CAM of class `target` (model thread)."""
        from ..gradcam import grad_cam_maps, overlay_png

        cam = grad_cam_maps(self.pred.model, self.pred.preprocess([small]), [target])[0]
        return overlay_png(display, cam)

    async def close(self) -> None:
        await self.batcher.aclose()
        if self.tta_batcher is not None:
            await self.tta_batcher.aclose()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.model_pool.shutdown(wait=False, cancel_futures=True)


def _torch_threads(n: int = 0) -> int:
    """Set torch's intra-op threads of the calling thread to n (0: leave them); the count now."""
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def create_app(artifact: str | Path, token: str | None = None, max_mb: float = ServeConfig.max_mb,
               runtime: str = "torch", device: str = "auto", max_files: int = ServeConfig.max_files,
               max_batch: int = ServeConfig.max_batch, batch_wait_ms: float = ServeConfig.batch_wait_ms,
               decode_threads: int = ServeConfig.decode_threads, threads: int = 0):
    """The ASGI app over ARTIFACT; loads the model now (errors are CxrError, before anything listens).

    threads: the model's intra-op threads, set in the model thread (torch) or the onnxruntime session;
    0: the library's default, as `predict` runs (torch: one per physical core; onnxruntime: the same).
    app.state.model.batcher.batches (and .items) count the forward passes run and the images in them."""
    import contextlib
    from importlib.resources import files

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.requests import ClientDisconnect

    from .upload import UploadError, read_uploads

    if max_mb <= 0:
        raise CxrError(f"--max-mb must be above 0, got {max_mb}")
    if token is not None and not token.strip():
        raise CxrError("--token is empty; give a secret string or leave --token out")
    cfg = ServeConfig(max_mb=max_mb, max_files=max_files, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                      decode_threads=decode_threads, threads=threads)
    model = _Model(artifact, runtime, device, cfg)
    art = model.art
    page = files("cxr_fastai.serve").joinpath("index.html").read_text(encoding="utf-8")
    name = Path(art.folder).resolve().name

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for b in (model.batcher, model.tta_batcher):
            if b is not None and b.batches:
                log.info("%s: %d image(s) in %d batch(es), largest %d; %.1f s in the model", b.name, b.items,
                         b.batches, b.largest, b.busy_s)
        await model.close()

    app = FastAPI(title="cxr-fastai", description="Research use only; not for diagnosis.", lifespan=lifespan,
                  docs_url=None, redoc_url=None)   # the docs pages load scripts from a CDN
    app.state.model = model
    app.state.config = cfg

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # a bug of ours: the type only (a message could quote an upload's bytes)
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "runtime": runtime, "classes": model.classes}

    @app.get("/model")
    async def model_info():
        m = art.manifest
        training = m.get("training") or {}
        return {
            "model": name, "runtime": runtime, "classes": model.classes,
            "input": {"size": art.size, "channels": 1, "contrast": art.contrast,
                      "crop_border": art.crop_border, "resize": m["input"].get("resize")},
            "created": m.get("created"),
            "training": {k: training[k] for k in TRAINING_KEYS if k in training},
            "validation": m.get("validation") or {},
            "model_card": m.get("model_card") or {},
            # `cxr-fastai adapt`: what was re-estimated and on how many images (not their hashes)
            "adaptation": {k: v for k, v in m["adaptation"].items() if k != "images_sha256"}
                          if isinstance(m.get("adaptation"), dict) else None,
            # `cxr-fastai refit`: how the head was refitted and the validation figures it was chosen on
            "refit": {k: v for k, v in m["refit"].items() if k != "images_sha256"}
                     if isinstance(m.get("refit"), dict) else None,
            "versions": m.get("versions") or {},
            "features": {"gradcam": model.torch, "tta": model.torch},
            "limits": {"max_mb": max_mb, "max_files": max_files},
        }

    @app.post("/predict")
    async def predict(request: Request):
        try:
            return await _predict(request)
        except ClientDisconnect:
            # the client went away mid-upload: nobody to answer; 499 (nginx's "client closed request") in the log
            return Response(status_code=499)
        except Exception as e:
            # a bug of ours, answered here: the server-error middleware would re-raise it into uvicorn's log
            log.error("unexpected %s on POST /predict", type(e).__name__)
            return JSONResponse({"detail": f"internal error ({type(e).__name__})"}, status_code=500)

    async def _predict(request):
        try:
            gradcam, tta = _flag(request, "gradcam"), _flag(request, "tta")
        except ValueError as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        if not model.torch and (gradcam or tta):
            what = "Grad-CAM (gradcam=1)" if gradcam else "test-time augmentation (tta=1)"
            return JSONResponse({"detail": f"{what} needs the torch runtime; this server runs --runtime onnx "
                                           "(restart it with --runtime torch, or leave the flag out)"},
                                status_code=400)
        try:
            uploads = await read_uploads(request.headers.get("content-type"), request.stream(), max_mb, max_files)
        except UploadError as e:
            return JSONResponse(e.body(), status_code=e.status)
        results = await asyncio.gather(*(_one(u, gradcam, tta) for u in uploads))
        uploads.clear()
        status = 422 if all(r["error"] for r in results) else 200
        return JSONResponse(results, status_code=status)

    async def _one(upload, gradcam: bool, tta: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        entry: dict[str, Any] = {"filename": upload.filename, "prediction": None, "probabilities": None,
                                 "error": None}
        if gradcam:
            entry["gradcam"] = None
        batcher = model.tta_batcher if tta else model.batcher
        batcher.announce()
        try:
            shrunk, small, display = await loop.run_in_executor(
                model.decode_pool, model.prepare, upload.data, upload.filename, tta, gradcam)
        except BaseException as e:   # unreadable, or the request cancelled (client gone)
            batcher.withdraw()
            if not isinstance(e, ImageReadError):
                raise
            entry["error"] = str(e)
            return entry
        finally:
            upload.data = b""
        try:
            p = await batcher.submit(shrunk, announced=True)
        except Exception as e:
            log.error("model failed on a batch (%s)", type(e).__name__)
            entry["error"] = f"{upload.filename}: the model failed on this image ({type(e).__name__}); try again"
            return entry
        k = int(np.argmax(p))
        entry["prediction"] = model.classes[k]
        entry["probabilities"] = {c: float(v) for c, v in zip(model.classes, p)}
        if gradcam:
            try:
                png = await loop.run_in_executor(model.model_pool, model.cam_png, small, display, k)
                entry["gradcam"] = base64.b64encode(png).decode("ascii")
            except Exception as e:
                log.error("Grad-CAM failed (%s)", type(e).__name__)
        return entry

    app.add_middleware(_Guard, token=token)
    return app


class _Guard:
    """Outermost ASGI layer: the bearer token (every path but OPEN_PATHS) and the access log (method, path
    without query string, status). Added with app.add_middleware: it runs before routing."""

    def __init__(self, app, token: str | None):
        self.app = app
        self._digest = hashlib.sha256(token.encode("utf-8")).digest() if token else None

    def _authorised(self, scope) -> bool:
        given = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, cred = v.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = cred.strip()
                break
        # compare digests: constant time whatever the lengths
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method, path = scope.get("method", ""), scope.get("path", "")
        try:
            if self._digest is not None and (method, path) not in OPEN_PATHS and not self._authorised(scope):
                from fastapi.responses import JSONResponse

                resp = JSONResponse({"detail": "missing or wrong token: send the header "
                                               "'Authorization: Bearer TOKEN' (the server's --token)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            shown = "".join(c if c.isprintable() else "?" for c in path[:200])
            # no status yet: an exception on its way to the server-error handler, which answers 500
            access_log.info("%s %s %d", method[:16], shown, status or 500)


# ------------------------------------------------------------------------------------------ running it

def _log_config() -> dict:
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["cxr_fastai.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return cfg


def app_from_env():
    """The app for a worker process (--workers > 1): create_app's arguments come in the environment."""
    return create_app(**json.loads(os.environ[_ENV]))


def worker_threads(threads: int, workers: int) -> int:
    """The model's threads in each worker: --threads when given; else 0 (the library's default, as `predict`
    runs) for one worker, and the CPU cores shared out between several (each taking all would oversubscribe)."""
    if threads or workers <= 1:
        return threads
    return max(1, (os.cpu_count() or 1) // workers)


def run(artifact: str | Path, host: str = ServeConfig.host, port: int = ServeConfig.port, token: str | None = None,
        max_mb: float = ServeConfig.max_mb, workers: int = ServeConfig.workers, runtime: str = "torch",
        device: str = "auto", threads: int = ServeConfig.threads, decode_threads: int = ServeConfig.decode_threads,
        log_fn=print) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn shuts down gracefully, then returns)."""
    import uvicorn

    check_bind(host, token)
    check_port_free(host, port)
    kw = dict(artifact=str(artifact), token=token, max_mb=max_mb, runtime=runtime, device=device,
              threads=worker_threads(threads, workers), decode_threads=decode_threads)
    app = create_app(**kw)   # loads and checks the model before anything listens
    opts = dict(host=host, port=port, access_log=False, server_header=False, proxy_headers=False,
                log_config=_log_config(), timeout_graceful_shutdown=10)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    log_fn(f"serving {Path(artifact)} ({runtime}, {len(app.state.model.classes)} classes) on {where}"
           + (" with a bearer token" if token else "") + "; research use only, not for diagnosis")
    if workers <= 1:
        uvicorn.run(app, **opts)
        return
    del app
    os.environ[_ENV] = json.dumps(kw)
    try:
        uvicorn.run("cxr_fastai.serve.app:app_from_env", factory=True, workers=workers, **opts)
    finally:
        os.environ.pop(_ENV, None)
