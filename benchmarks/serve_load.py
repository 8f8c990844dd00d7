"""Load test of `cxr-fastai serve`: throughput and latency under concurrent clients, the server's memory over
the run, and `cxr-fastai predict`'s throughput on the same images for comparison.

    .venv/bin/python benchmarks/serve_load.py ART [--data ../shared/data/cxr3] [--clients 16]
        [--requests 5000] [--images 256] [--runtime torch|onnx] [--predict-n 2048] [--json]

1. `predict` in this process, before and after the server runs (the ratio uses the mean: on a shared
   machine the load drifts): the library's path (`load_predictor` + `rows`: decoding in its thread pool,
   batches of 128), on --predict-n images cycled from the chosen ones; img/s in steady state (model
   already loaded, a short warm-up before the clock starts).
2. Then the server, `python -m cxr_fastai serve ART --port P` in a subprocess on a free loopback port, and
   --clients concurrent clients each posting one real image per request (multipart field `files`) over a
   keep-alive connection, --requests in all. The client is a minimal HTTP/1.1 one on asyncio streams, so
   that the load generator's own CPU use stays small on a small machine (it shares the cores with the
   server). Every response is checked: status 200 and no per-file error, else it counts as an error.
3. Printed: server img/s, p50/p95/p99 latency, errors, the server's RSS at request 500 and at the end (psutil,
   else /proc/PID/status VmRSS; worker processes included), predict img/s and the ratio server/predict, plus the machine's load
   average before and after (other work on the machine shares the cores).

Images: the first --images test-split images of labels.csv in path order (all splits if there are too few).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RSS_AT = 500


def pick_images(data: Path, n: int) -> list[Path]:
    with open(data / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: (r.get("split") != "test", r["path"]))
    return [data / r["path"] for r in rows[:n]]


def rss_mb(pid: int) -> float:
    """The server's resident memory in MB, its worker processes (--workers > 1) included."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except ImportError:
        pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict_rate(art: Path, images: list[Path], n: int, runtime: str) -> float:
    """img/s of the predict path (decoding included) on n images cycled from `images`."""
    from cxr_fastai.artifact.predict import load_predictor, rows
    from cxr_fastai.config import PredictConfig

    cfg = PredictConfig(device="cpu", runtime=runtime)
    pred = load_predictor(art, cfg)
    paths = [images[i % len(images)] for i in range(n)]
    for _ in rows(pred, paths[: min(256, n)], cfg):   # warm-up: thread pool, allocator, kernels
        pass
    t0 = time.perf_counter()
    done = errors = 0
    for r in rows(pred, paths, cfg):
        done += 1
        errors += bool(r["error"])
    dt = time.perf_counter() - t0
    if errors:
        print(f"warning: predict could not read {errors} image(s)", file=sys.stderr)
    return done / dt


def multipart(name: str, data: bytes, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(payload)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            if k.lower() == "content-length":
                length = int(v)
            elif k.lower() == "connection" and v.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def load(port: int, payloads: list[bytes], clients: int, total: int, warmup: int, server_pid: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    rss: dict[str, float] = {}
    next_i = 0
    done = 0

    async def worker(c: Client, count: int | None, record: bool):
        nonlocal next_i, done
        while True:
            if count is not None:
                if count <= 0:
                    return
                count -= 1
                i = 0
            else:
                if next_i >= total:
                    return
                i, next_i = next_i, next_i + 1
            t0 = time.perf_counter()
            try:
                status, body = await c.request(payloads[i % len(payloads)])
                ok = status == 200 and json.loads(body)[0]["error"] is None
                why = "" if ok else f"status {status}: {body[:200]!r}"
            except Exception as e:  # a dropped connection, a timeout
                ok, why = False, f"{type(e).__name__}: {e}"
                await c.close()
            if not record:
                continue
            latencies.append(time.perf_counter() - t0)
            if not ok:
                errors.append(why)
            done += 1
            if done == RSS_AT:
                rss["at_500"] = rss_mb(server_pid)

    conns = [Client(port) for _ in range(clients)]
    await asyncio.gather(*(worker(c, max(1, warmup // clients), False) for c in conns))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c, None, True) for c in conns))
    wall = time.perf_counter() - t0
    rss["end"] = rss_mb(server_pid)
    for c in conns:
        await c.close()
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "images": len(latencies), "wall_s": wall, "img_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": len(errors), "first_error": errors[0] if errors else "",
            "rss_mb_at_500": rss.get("at_500", float("nan")), "rss_mb_end": rss["end"]}


def start_server(art: Path, port: int, runtime: str, log: Path, extra: list[str], env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cxr_fastai", "serve", str(art), "--port", str(port),
                             "--runtime", runtime, *extra], stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the server did not start; its log: {log}\n{log.read_text()[-2000:]}")
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr3")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--images", type=int, default=256, help="distinct images, cycled")
    ap.add_argument("--predict-n", type=int, default=2048, help="images for the predict figure")
    ap.add_argument("--warmup", type=int, default=64, help="requests sent before the clock starts")
    ap.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    ap.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server's environment")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    images = pick_images(args.data, args.images)
    load_before = os.getloadavg()
    predict_before = predict_rate(args.artifact, images, args.predict_n, args.runtime)

    boundary = "cxrbench7MA4YWxkTrZu0gW"
    head = lambda n: (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                      f"boundary={boundary}\r\nContent-Length: {n}\r\n\r\n").encode()
    payloads = []
    for p in images:
        body = multipart(p.name, p.read_bytes(), boundary)
        payloads.append(head(len(body)) + body)

    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{port}.log"
    env = dict(kv.split("=", 1) for kv in args.server_env)
    proc = start_server(args.artifact, port, args.runtime, log, args.server_arg, env)
    try:
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        res = runner(load(port, payloads, args.clients, args.requests, args.warmup, proc.pid))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # predict again after the server: on a shared machine the load drifts; the ratio uses the mean of both
    predict_after = predict_rate(args.artifact, images, args.predict_n, args.runtime)
    predict = (predict_before + predict_after) / 2
    load_after = os.getloadavg()
    said = [ln for ln in log.read_text().splitlines() if "batch" in ln]
    res["server_batches"] = said[-1].split("INFO:", 1)[-1].strip() if said else ""
    res.update({"clients": args.clients, "runtime": args.runtime, "distinct_images": len(images),
                "predict_img_per_s": predict, "predict_img_per_s_before": predict_before,
                "predict_img_per_s_after": predict_after, "ratio_serve_to_predict": res["img_per_s"] / predict,
                "rss_growth_pct": 100 * (res["rss_mb_end"] / res["rss_mb_at_500"] - 1),
                "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in load_after]})
    if args.json:
        print(json.dumps(res))
        return
    print(f"artifact {args.artifact} ({args.runtime}), {len(images)} distinct images from {args.data}, "
          f"{os.cpu_count()} CPUs, load average before {load_before[0]:.2f} / after {load_after[0]:.2f}")
    print(f"serve:   {res['requests']} requests x 1 image, {args.clients} clients: {res['img_per_s']:.1f} img/s; "
          f"latency p50 {res['p50_ms']:.1f} ms, p95 {res['p95_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms; "
          f"errors {res['errors']}" + (f" (first: {res['first_error']})" if res["errors"] else ""))
    print(f"memory:  server RSS {res['rss_mb_at_500']:.1f} MB at request {RSS_AT}, {res['rss_mb_end']:.1f} MB at the end "
          f"({res['rss_growth_pct']:+.1f}%)")
    if res["server_batches"]:
        print(f"batches: {res['server_batches']}")
    print(f"predict: {predict:.1f} img/s (library path, decoding included, {args.predict_n} images; "
          f"{predict_before:.1f} before the server, {predict_after:.1f} after)")
    print(f"ratio serve/predict: {res['ratio_serve_to_predict']:.2f}")


if __name__ == "__main__":
    main()
