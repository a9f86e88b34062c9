"""Slow and hostile clients cannot stop the service: headers have an absolute deadline, the connection cap evicts
the slowest first and refuses fast only when every connection is busy, Origin is scheme + host + port, and a
huge multipart part header is refused at once. Raw sockets against a real server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_serve import multipart, serving

from fracture.deploy.serve.connections import origin_allowed

pytest.importorskip("uvicorn")
HALF = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # headers begun, never ended


def _good_png() -> bytes:
    from fracture.data.synth import radiograph

    return cv2.imencode(".png", np.rint(radiograph(np.random.default_rng(0), True, "oblique", shape=(96, 80)) * 255).astype(np.uint8))[1].tobytes()


def _open(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        out.append(s)
    return out


def _closed_by_server(s: socket.socket, wait: float) -> bool:
    s.settimeout(wait)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False


def _timed(fn) -> tuple[float, object]:
    start = time.monotonic()
    out = fn()
    return time.monotonic() - start, out


def test_two_hundred_half_open_and_trickling_connections_leave_the_service_answering(tiny_onnx: Path, tmp_path: Path) -> None:
    with serving(tiny_onnx, tmp_path, "--header-timeout", "3") as server:
        half = _open(server.port, 100)
        trickle = _open(server.port, 100)
        for s in half:
            s.sendall(HALF)
        stop = threading.Event()

        def drip() -> None:  # one byte a second per connection: never completes its headers within the deadline
            text, i = HALF + b"X-Slow: " + b"a" * 64, 0
            while not stop.is_set() and i < len(text):
                for s in trickle:
                    try:
                        s.send(text[i : i + 1])
                    except OSError:
                        pass
                i += 1
                stop.wait(1.0)

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            time.sleep(0.5)
            seconds, answer = _timed(lambda: server.request("GET", "/healthz"))
            assert answer[0] == 200 and seconds < 2.0, (seconds, answer)
            seconds, answer = _timed(lambda: server.post([("a.png", _good_png())], query="?images=0"))
            assert answer[0] == 200 and seconds < 2.0, (seconds, answer[0])
            # every one of the 200 is closed by the server by its deadline (3 s), trickling or not
            deadline = time.monotonic() + 6.0
            assert all(_closed_by_server(s, max(0.1, deadline - time.monotonic())) for s in half + trickle)
        finally:
            stop.set()
            dripper.join(5)
            for s in half + trickle:
                s.close()
        assert server.request("GET", "/healthz")[0] == 200 and server.proc.poll() is None
    assert "no complete request headers in time" in (tmp_path / "server.log").read_text()


def test_beyond_the_connection_cap_slow_headers_are_evicted_and_busy_connections_refuse_fast(tiny_onnx: Path, tmp_path: Path) -> None:
    with serving(tiny_onnx, tmp_path, "--max-connections", "8", "--header-timeout", "20") as server:
        slow = _open(server.port, 8)
        for s in slow:
            s.sendall(HALF)
        time.sleep(0.3)
        seconds, answer = _timed(lambda: server.request("GET", "/healthz"))  # a slot is made by evicting the oldest slow one
        assert answer[0] == 200 and seconds < 2.0
        assert _closed_by_server(slow[0], 2.0)
        for s in slow:
            s.close()
        time.sleep(0.3)
        # eight connections busy with requests (headers done, bodies trickling): a ninth is refused at once
        body, ctype = multipart([("file", "a.png", _good_png())])
        busy = _open(server.port, 8)
        for s in busy:
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        start = time.monotonic()
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = extra.recv(200)
        assert reply.startswith(b"HTTP/1.1 503") and time.monotonic() - start < 1.0, reply
        for s in [extra, *busy]:
            s.close()
        time.sleep(0.5)
        assert server.request("GET", "/healthz")[0] == 200


def test_origin_is_scheme_host_and_port(tiny_onnx: Path, tmp_path: Path) -> None:
    own = "http://127.0.0.1:8000"
    assert origin_allowed(None, own) and origin_allowed("http://127.0.0.1:8000", own) and origin_allowed("HTTP://127.0.0.1:8000", own)
    for other in ("http://localhost:8888", "https://127.0.0.1:1", "https://127.0.0.1:8000", "http://127.0.0.1", "null", "http://127.0.0.1:8001",
                  "file://", "http://[::1]:8000", "http://127.0.0.1:99999"):
        assert not origin_allowed(other, own), other
    assert origin_allowed("https://viewer.example.org", own, ("https://viewer.example.org:443",))
    assert origin_allowed("http://localhost", "http://localhost:80")
    with serving(tiny_onnx, tmp_path, "--allow-origin", "https://viewer.example.org") as server:
        body, ctype = multipart([("file", "a.png", _good_png())])
        for origin in (f"http://localhost:{server.port + 1}", f"https://127.0.0.1:{server.port}", "http://localhost:8888", "https://127.0.0.1:1"):
            assert server.request("POST", "/predict?images=0", body, {"Content-Type": ctype, "Origin": origin})[0] == 403, origin
        for origin in (f"http://127.0.0.1:{server.port}", "https://viewer.example.org"):
            assert server.request("POST", "/predict?images=0", body, {"Content-Type": ctype, "Origin": origin})[0] == 200, origin
        ok = server.request("POST", "/predict?images=0", body, {"Content-Type": ctype, "Origin": f"http://localhost:{server.port}",
                                                                 "Host": f"localhost:{server.port}"})
        assert ok[0] == 200


def test_an_eight_megabyte_part_header_is_refused_at_once(tiny_onnx: Path, tmp_path: Path) -> None:
    with serving(tiny_onnx, tmp_path, "--max-upload-mb", "20") as server:
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nX-Junk: ".encode()
                + b"a" * (8 << 20) + b"\r\n\r\n" + _good_png() + f"\r\n--{boundary}--\r\n".encode())
        seconds, answer = _timed(lambda: server.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        assert 400 <= answer[0] < 500 and seconds < 1.0, (answer, seconds)
        assert server.request("GET", "/healthz")[0] == 200
