"""Bounded load test of fracture.serve on loopback, beside fracture.predict on the same files (torch-free).

    python scripts/benchmark_serve.py MODEL.onnx [--images DIR] [--clients 8] [--requests 200]
    python scripts/benchmark_serve.py MODEL.onnx --hostile [--repeats 3] [--slow 4]   # normal load beside a hostile mix

Starts ``python -m fracture.serve MODEL`` on a free loopback port, warms it up, then
``--clients`` threads each send ``--requests`` single-image POSTs over a kept-alive
connection, once with the PNGs the web page shows (``images=1``) and once for numbers only
(``images=0``). Prints throughput, p50/p95/p99 latency, errors, the server's resident
memory after warm-up and after the load, the predictor's images/s on the same files in
this process, and whether batching would pay (ONNX Runtime at batch 1 vs 8). The load
generator shares the CPU with the server: the figures are a floor, and name the CPU.
Without ``--images``, synthetic 454x373 JPEGs (FracAtlas's common size) are written.

``--hostile``: the normal load is run ``--repeats`` times alone and as often beside a hostile mix: ``--slow``
clients trickling bodies (reconnecting after each 408), ``--slow-headers`` connections that never finish
their headers (reopened as the server closes them), and one client posting the bombs of
``scripts/hostile_inputs.py`` (pixel and byte bombs) in turn, while ``/healthz`` is asked twice a second.
Prints each bomb's answer, the normal clients' p95 and errors alone and beside the mix (median and range
over the repeats: two shared cores are noisy), ``/healthz`` latency, then the server's peak memory while
four clients upload the largest real radiograph (a 4,300 x 4,300 16-bit DX) at once, and four byte bombs.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fracture.data.synth import write_jpegs
from fracture.deploy.predictor import Predictor
from fracture.imaging import preprocess
from fracture.machine import cpu_name


def rss_mb(pid: int) -> float:
    """Resident memory of a process from /proc (Linux); NaN elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def form(name: str, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + data + f"\r\n--{b}--\r\n".encode())
    return body, f"multipart/form-data; boundary={b}"


def load(host: str, port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int, query: str) -> dict[str, float]:
    """``clients`` threads × ``requests`` POSTs each; latencies of every answer, errors = anything but 200."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        mine, bad = [], 0
        for i in range(requests):
            body, ctype = bodies[(k * requests + i) % len(bodies)]
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict" + query, body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                r.read()
                bad += r.status != 200
            except OSError:
                bad += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
            mine.append(time.perf_counter() - start)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = 1000 * np.array(latencies)
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "errors": errors[0]}


def rss_peak_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) from /proc (Linux); NaN elsewhere."""
    try:
        return next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return float("nan")


def hostile_mix(host: str, port: int, bombs: dict[str, Path], slow: int, stop: threading.Event, answers: dict[str, str],
                slow_headers: int = 0, health: list[float] | None = None) -> list[threading.Thread]:
    """Start ``slow`` trickling uploaders, ``slow_headers`` half-open connections, one bomb poster and a /healthz
    prober (latencies into ``health``); they run until ``stop`` is set."""
    import json
    import select
    import socket

    def half_open() -> None:
        half = f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        socks: list[socket.socket] = []
        while not stop.is_set():
            while len(socks) < slow_headers:
                try:
                    s = socket.create_connection((host, port), timeout=5)
                    s.sendall(half)
                    socks.append(s)
                except OSError:
                    break
            readable, _, _ = select.select(socks, [], [], 0.5) if socks else ([], [], [])
            for s in readable:  # the server closed it (deadline, eviction): open another
                s.close()
                socks.remove(s)
        for s in socks:
            s.close()

    def probe() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(host, port, timeout=30)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                conn.close()
                health.append(time.perf_counter() - start)
            except OSError:
                health.append(float("inf"))
            stop.wait(0.5)

    def trickle() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((host, port), timeout=30) as s:
                    s.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                              f"Content-Length: 1000000\r\n\r\n--b\r\n".encode())
                    while not stop.is_set():
                        s.sendall(b"x")
                        s.settimeout(1.0)
                        try:
                            if s.recv(1024):
                                break  # answered (408): come back
                        except socket.timeout:
                            pass
            except OSError:
                time.sleep(0.2)

    def poster() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while not stop.is_set():
            for name, path in bombs.items():
                body, ctype = form(path.name, path.read_bytes())
                try:
                    conn.request("POST", "/predict?images=0", body=body, headers={"Content-Type": ctype})
                    r = conn.getresponse()
                    reply = json.loads(r.read() or b"{}")
                    why = reply.get("results", [{}])[0].get("error") or reply.get("error", "")
                    answers[name] = f"{r.status}: {why}"
                except (OSError, ValueError):
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=60)
                if stop.is_set():
                    break

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(slow)] + [threading.Thread(target=poster, daemon=True)]
    threads += [threading.Thread(target=half_open, daemon=True)] if slow_headers else []
    threads += [threading.Thread(target=probe, daemon=True)] if health is not None else []
    for t in threads:
        t.start()
    return threads


def batching(model: str, paths: list[str], threads: int) -> dict[int, float]:
    """ONNX Runtime images/s at batch 1 and 8 on real inputs: does batching concurrent requests pay?"""
    predictor = Predictor(model, threads)
    x = [preprocess.load(p, predictor.contract) for p in paths[:8]]
    out = {}
    for size in (1, 8):
        predictor.run(x[:size])
        times = []
        for _ in range(max(3, 24 // size)):
            start = time.perf_counter()
            predictor.run(x[:size])
            times.append(time.perf_counter() - start)
        out[size] = size / statistics.median(times)
    return out


def burst(host: str, port: int, server: int, files: list[Path]) -> tuple[float, list[str]]:
    """Every file posted at once, one client each: the server's peak memory meanwhile (its peak reset first, Linux) and the answers."""
    import json

    Path(f"/proc/{server}/clear_refs").write_text("5")
    answers: list[str] = [""] * len(files)

    def one(i: int) -> None:
        body, ctype = form(files[i].name, files[i].read_bytes())
        conn = http.client.HTTPConnection(host, port, timeout=120)
        conn.request("POST", "/predict?images=0", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        reply = json.loads(r.read() or b"{}")
        answers[i] = f"{r.status}: " + (reply.get("results", [{}])[0].get("error") or f"p = {reply.get('results', [{}])[0].get('probability', float('nan')):.3f}"
                                        if "results" in reply else reply.get("error", ""))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return rss_peak_mb(server), answers


def hostile_report(ns: argparse.Namespace, host: str, port: int, bodies: list, server: subprocess.Popen, work: Path) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hostile_inputs", Path(__file__).with_name("hostile_inputs.py"))
    hostile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hostile)
    bombs = {name: path for name, (path, _) in {**hostile.write_bombs(work / "bombs"), **hostile.write_byte_bombs(work / "bytes")}.items()}
    alone, beside, answers, health = [], [], {}, []
    for _ in range(ns.repeats):
        alone.append(load(host, port, bodies, ns.clients, ns.requests, "?images=0"))
        stop = threading.Event()
        threads = hostile_mix(host, port, bombs, ns.slow, stop, answers, ns.slow_headers, health)
        time.sleep(1.0)  # the half-open connections are open before the load starts
        beside.append(load(host, port, bodies, ns.clients, ns.requests, "?images=0"))
        stop.set()
        for t in threads:
            t.join(40)
    peak = rss_peak_mb(server.pid)
    print(f"{ns.clients} normal clients x {ns.requests} single-image requests (?images=0), {ns.repeats} runs each; hostile mix: "
          f"{ns.slow} trickling uploaders, {ns.slow_headers} connections that never finish their headers, one client posting "
          f"{len(bombs)} bombs in turn, /healthz twice a second; load generator on the same cores\n")
    print("| bomb | bytes | answer |\n|---|---|---|")
    for name, path in bombs.items():
        print(f"| {name} | {path.stat().st_size:,} | {answers.get(name, 'not sent')[:120]} |")
    print("\n| normal clients | p95 ms, median (range) | requests/s, median | errors |\n|---|---|---|---|")
    for label, runs in (("alone", alone), ("beside the hostile mix", beside)):
        p95 = [r["p95"] for r in runs]
        print(f"| {label} | {np.median(p95):.0f} ({min(p95):.0f}-{max(p95):.0f}) | {np.median([r['rps'] for r in runs]):.1f} | "
              f"{sum(r['errors'] for r in runs)} of {sum(r['requests'] for r in runs)} |")
    h = np.array(health) * 1000
    print(f"\n/healthz during the mix: {len(h)} probes, p50 {np.median(h):.0f} ms, p95 {np.percentile(h, 95):.0f} ms, max {h.max():.0f} ms, "
          f"over 2 s: {int((h > 2000).sum())}")
    print(f"server peak resident memory (VmHWM) over all of that: {peak:.0f} MB")
    sizes = hostile.write_radiograph_sizes(work / "sizes")
    for label, files in (("four 4,300 x 4,300 16-bit DX uploads (37 MB each)", [sizes["dx-4300-16bit"]] * 4),
                         ("four byte bombs", [bombs[k] for k in ("png-16bit-rgba", "tiff-float32", "dicom-16bit-windowed-rle", "dicom-rle-rgb-16bit")])):
        top, said = burst(host, port, server.pid, files)
        print(f"{label} at once: server peak {top:.0f} MB; answers: {'; '.join(a[:60] for a in said)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file from python -m fracture.export")
    parser.add_argument("--images", type=Path, help="folder of images to send (default: synthetic 454x373 JPEGs)")
    parser.add_argument("--n-images", type=int, default=64, help="how many images to cycle through")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--workers", type=int, default=2, help="the server's --workers")
    parser.add_argument("--warmup", type=int, default=16, help="requests per client before the first memory reading")
    parser.add_argument("--hostile", action="store_true", help="also run the normal load beside slow uploaders and bombs")
    parser.add_argument("--repeats", type=int, default=3, help="with --hostile: runs of each kind (median and range are printed)")
    parser.add_argument("--slow", type=int, default=4, help="with --hostile: trickling uploaders")
    parser.add_argument("--slow-headers", type=int, default=200, help="with --hostile: connections that never finish their headers")
    ns = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="fracture-serve-bench-"))
    if ns.images:
        paths = [str(p) for p in sorted(ns.images.rglob("*")) if p.is_file() and preprocess.is_image_file(p)][: ns.n_images]
    else:
        paths = write_jpegs(work / "jpegs", ns.n_images, shape=(454, 373))
    bodies = [form(Path(p).name, Path(p).read_bytes()) for p in paths]
    total = ns.clients * ns.requests

    server = subprocess.Popen([sys.executable, "-m", "fracture.serve", ns.model, "--port", "0", "--workers", str(ns.workers),
                               "--queue", str(2 * ns.clients)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if "http://" not in line:
            print(f"error: the server did not start ({line.strip()})", file=sys.stderr)
            return 2
        host, port = line.split("http://")[1].split("/")[0].rsplit(":", 1)
        warm = load(host, int(port), bodies, ns.clients, ns.warmup, "")  # at full concurrency: onnxruntime grows its arenas once
        assert warm["errors"] == 0, "warm-up requests failed"
        rss = {"after warm-up": rss_mb(server.pid)}
        if ns.hostile:
            return hostile_report(ns, host, int(port), bodies, server, work)
        runs = {}
        for label, query in (("with PNGs (the page)", ""), ("numbers only (?images=0)", "?images=0")):
            runs[label] = load(host, int(port), bodies, ns.clients, ns.requests, query)
            rss[f"after {label}"] = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    predictor = Predictor(ns.model, cores)
    list(predictor.predict(paths[:8], show_progress=False))
    every = [paths[i % len(paths)] for i in range(total)]
    start = time.perf_counter()
    rows = list(predictor.predict(every, show_progress=False))
    predict_ips = len(rows) / (time.perf_counter() - start)
    assert not any(r.error for r in rows)
    batch = batching(ns.model, paths, cores)

    cpu = cpu_name()
    meta = predictor.metadata
    print(f"CPU: {cpu}, {cores} cores; onnxruntime {ort.__version__}; model {Path(ns.model).name} ({meta.get('head', 'classify')}, "
          f"{predictor.contract.image_size} px); {len(paths)} distinct images; server --workers {ns.workers}; load generator on the same cores")
    print(f"\n{ns.clients} clients x {ns.requests} requests, one image each:\n")
    print("| | requests/s | p50 ms | p95 ms | p99 ms | errors | × fracture.predict |")
    print("|---|---|---|---|---|---|---|")
    for label, r in runs.items():
        print(f"| serve, {label} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['errors']} of {r['requests']} | {r['rps'] / predict_ips:.2f} |")
    print(f"| fracture.predict, same files, batch 32 | {predict_ips:.1f} | | | | 0 of {len(rows)} | 1.00 |")
    base = rss["after warm-up"]
    print("\nserver resident memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())
          + f"; growth {100 * (max(rss.values()) / base - 1):+.1f} % over {2 * total} requests")
    print(f"batching: ONNX Runtime {batch[1]:.1f} images/s at batch 1, {batch[8]:.1f} at batch 8 ({batch[8] / batch[1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
