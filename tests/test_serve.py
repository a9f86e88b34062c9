"""fracture.deploy.serve.app through a real HTTP client on loopback: answers, limits, bad uploads, 503s, privacy (torch blocked)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO
from test_predict import BLOCKER

from fracture.boxes import heatmap
from fracture.deploy.metadata import file_sha256
from fracture.deploy.predictor import Predictor
from fracture.imaging import preprocess

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
SERVE = BLOCKER + "from fracture.deploy.serve.app import main\nsys.exit(main(sys.argv[1:]))\n"


class Server:
    """``python -m fracture.serve`` in a subprocess with torch blocked, its own empty cwd and TMPDIR, stderr in a file."""

    def __init__(self, model: Path, work: Path, *args: str) -> None:
        self.cwd, self.tmp, self.log = work / "cwd", work / "tmp", work / "server.log"
        self.cwd.mkdir(parents=True)
        self.tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(self.tmp), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, str(model), "--port", "0", *args], cwd=self.cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else ""
        if "http://" not in line:
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.log.read_text()}")
        self.banner = line
        self.host, port = line.split("http://")[1].split("/")[0].rsplit(":", 1)
        self.port = int(port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data) if r.getheader("content-type", "").startswith("application/json") else {}

    def post(self, files: list[tuple[str, bytes]], field: str = "file", query: str = "") -> tuple[int, dict, dict]:
        body, ctype = multipart([(field, name, data) for name, data in files])
        return self.request("POST", "/predict" + query, body, {"Content-Type": ctype})


def multipart(parts: list[tuple[str, str, bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    b = boundary or uuid.uuid4().hex
    body = b"".join(f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                    + data + b"\r\n" for field, name, data in parts) + f"--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


@contextmanager
def serving(model: Path, work: Path, *args: str) -> Iterator[Server]:
    server = Server(model, work, *args)
    try:
        yield server
    finally:
        server.stop()


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def loc_server(loc_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(loc_onnx, tmp_path_factory.mktemp("serve"), "--max-upload-mb", "3", "--max-files", "4", "--max-megapixels", "1",
                 "--display-side", "200") as server:
        yield server


def test_answers_equal_the_predictor_with_boxes_and_overlays(loc_server: Server, loc_run: tuple[Path, Path], loc_onnx: Path) -> None:
    paths = sorted((loc_run[0] / "test" / "images").glob("*.png"))[:4]
    status, headers, body = loc_server.post([(p.name, p.read_bytes()) for p in paths])
    assert status == 200 and headers["cache-control"] == "no-store"
    predictor = Predictor(loc_onnx)
    expected = list(predictor.predict([str(p) for p in paths], show_progress=False, keep_maps=True))
    assert body["model_sha256"] == file_sha256(loc_onnx) and "Research use only" in body["notice"]
    for r, e, p in zip(body["results"], expected, paths):
        assert r["ok"] and r["file"] == p.name
        assert abs(r["probability"] - e.probability) < 1e-6
        assert len(r["boxes"]) == len(e.boxes) and np.allclose(np.reshape([list(b.values()) for b in r["boxes"]], (-1, 5)), np.reshape(e.boxes, (-1, 5)), atol=1e-4)
        assert r["decisions"]["default"] == {"threshold": 0.5, "fractured": r["probability"] > 0.5}
        image, overlay = decode_data_url(r["image"]), decode_data_url(r["overlay"])
        h, w = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape
        assert (r["height"], r["width"]) == (h, w) and max(image.shape[:2]) == 200 and overlay.shape[:2] == image.shape[:2]
        dh, dw = image.shape
        drawn = heatmap.panel(image, heatmap.to_original(e.raw_map, dh, dw, predictor.contract),
                              [(b[0] * dw / w, b[1] * dh / h, b[2] * dw / w, b[3] * dh / h, b[4]) for b in e.boxes], absolute=True)
        assert np.array_equal(overlay, drawn)  # the model's own map and boxes, on the probability scale
    status, _, numbers = loc_server.post([(p.name, p.read_bytes()) for p in paths[:1]], query="?images=0")
    assert status == 200 and "image" not in numbers["results"][0] and "overlay" not in numbers["results"][0]


def test_a_classifier_without_a_map_gets_a_plain_image(tiny_onnx: Path, synth_root: Path, tmp_path: Path) -> None:
    path = sorted((synth_root / "test" / "images").glob("*.png"))[0]
    with serving(tiny_onnx, tmp_path) as server:
        status, _, body = server.post([(path.name, path.read_bytes())])
        _, _, info = server.request("GET", "/model")
    r = body["results"][0]
    assert status == 200 and "boxes" not in r and "overlay" not in r
    # small: sent at its full size, decoded as files are (under this contract's reduced decoding, every container is reduced)
    contract = Predictor(tiny_onnx).contract
    reduced = preprocess.read_image(path, contract=contract)
    h, w = preprocess.read_image(path).shape
    assert contract.reduced_decode and reduced.shape != (h, w)
    assert np.array_equal(decode_data_url(r["image"]), cv2.resize(reduced, (w, h), interpolation=cv2.INTER_AREA))
    assert abs(r["probability"] - next(Predictor(tiny_onnx).predict([str(path)], show_progress=False)).probability) < 1e-6
    assert info["boxes"] is False and info["heatmap"] is False


def test_dicom_upload_is_decoded_in_memory_and_rendered_to_png(loc_server: Server, loc_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from test_dicom import variants

    picture = cv2.imread(str(_synth_png(tmp_path)), cv2.IMREAD_GRAYSCALE)
    files = variants.write_variants(picture, tmp_path / "dicom")
    data = files["mono1_8bit"].read_bytes()
    status, _, body = loc_server.post([("IM000001", data)])  # no suffix: recognised by the DICM preamble
    r = body["results"][0]
    assert status == 200 and r["ok"], r
    expected = next(Predictor(loc_onnx).predict([str(files["mono1_8bit"])], show_progress=False)).probability
    assert abs(r["probability"] - expected) < 1e-6
    assert np.array_equal(decode_data_url(r["image"]), picture)  # MONOCHROME1 shown bone-bright, as a viewer would


def _synth_png(tmp_path: Path) -> Path:
    from fracture.data.synth import radiograph

    out = tmp_path / "picture.png"
    cv2.imwrite(str(out), np.rint(radiograph(np.random.default_rng(2), True, "oblique", shape=(150, 120)) * 255).astype(np.uint8))
    return out


def test_model_and_health_endpoints(loc_server: Server, loc_onnx: Path) -> None:
    status, _, info = loc_server.request("GET", "/model")
    meta = Predictor(loc_onnx).metadata
    assert status == 200 and info["sha256"] == file_sha256(loc_onnx) and info["model"] == loc_onnx.name
    assert info["metadata"]["contract"] == meta["contract"] and info["operating_points"] == meta["thresholds"]
    assert info["metadata"]["class_names"] == ["not_fractured", "fractured"] and "auroc" in info["metadata"]["val_metrics"]
    assert info["boxes"] is True and info["limits"]["max_files"] == 4
    status, _, health = loc_server.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["in_flight"] == 0
    status, _, page = loc_server.request("GET", "/nowhere")
    assert status == 404 and page["error"]


def test_bad_uploads_are_answered_with_reasons_and_the_rest_still_predicted(loc_server: Server, loc_run: tuple[Path, Path]) -> None:
    good = sorted((loc_run[0] / "test" / "images").glob("*.png"))[0].read_bytes()
    jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_GRAYSCALE))[1].tobytes()
    huge = png(np.zeros((1100, 1000), np.uint8))  # 1.1 MP against a 1 MP limit
    cases = {"notes.txt": (b"not an image at all", "not a decodable image"), "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
             "empty.png": (b"", "empty file"), "huge.png": (huge, "over the 1 MP limit")}
    for name, (data, reason) in cases.items():
        status, _, body = loc_server.post([(name, data)])
        assert status == 422 and not body["results"][0]["ok"] and reason in body["results"][0]["error"], (name, body)
    status, _, body = loc_server.post([("a.png", good), ("notes.txt", b"nope"), ("b.jpg", jpeg)])
    assert status == 200 and [r["ok"] for r in body["results"]] == [True, False, True]
    refusals = [
        (loc_server.post([("a.png", good)], field="image"), 400, "no 'file' field in the form; got 'image'"),
        (loc_server.request("POST", "/predict", b"{}", {"Content-Type": "application/json"}), 415, "multipart/form-data"),
        (loc_server.request("POST", "/predict", b"", {"Content-Type": "multipart/form-data; boundary=x"}), 400, "empty request"),
        (loc_server.request("POST", "/predict", multipart([("file", "a.png", good)], "bnd")[0][:-40], {"Content-Type": "multipart/form-data; boundary=bnd"}), 400, "truncated upload"),
        (loc_server.post([("a.png", good)] * 5), 413, "5 files in one request; at most 4"),
        (loc_server.request("POST", "/predict", b"x" * 10, {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": "4000000"}), 413, "over the 3 MB limit"),
        (loc_server.request("GET", "/predict"), 405, "Method Not Allowed"),
    ]
    for (status, _, body), want_status, reason in refusals:
        assert status == want_status and reason in body["error"], (status, body)
    # a body over the limit without Content-Length (chunked) is cut off while it streams
    conn = http.client.HTTPConnection(loc_server.host, loc_server.port, timeout=60)
    body, ctype = multipart([("file", "big.png", os.urandom(3_500_000))])
    conn.request("POST", "/predict", body=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]), headers={"Content-Type": ctype}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "over the 3 MB limit" in json.loads(r.read())["error"]
    assert loc_server.request("GET", "/healthz")[0] == 200 and loc_server.proc.poll() is None


def test_uploads_leave_no_files_and_no_names_in_the_log(loc_server: Server, loc_run: tuple[Path, Path]) -> None:
    good = sorted((loc_run[0] / "test" / "images").glob("*.png"))[0].read_bytes()
    secret = "DOE_JANE_1961-04-02_MRN889911"
    big = png(np.random.default_rng(0).integers(0, 65535, (1000, 1000), np.uint16))  # 2 MB: a form parser would spool it to disk
    files = lambda: {(str(f), f.stat().st_size) for d in (loc_server.cwd, loc_server.tmp) for f in d.rglob("*")}  # noqa: E731
    before = files()  # onnxruntime leaves a telemetry session id (.ses) in TMPDIR at start-up
    assert loc_server.post([(f"{secret}.png", good), (f"{secret}_2.png", big), (f"{secret}.txt", b"junk")])[0] == 200
    log = loc_server.log.read_text()
    assert "POST /predict 200 files=3" in log and secret not in log
    assert files() == before and not any(loc_server.cwd.rglob("*"))


def _slow_upload(server: Server, total: int) -> socket.socket:
    """A request whose body arrives in part only: it holds a slot until it is finished or times out."""
    s = socket.create_connection((server.host, server.port))
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {total}\r\n\r\n".encode() + b"--b\r\n")
    return s


def _wait_until(predicate, seconds: float = 20) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def test_slow_uploaders_do_not_starve_others_and_time_out_and_held_bodies_are_capped(loc_onnx: Path, loc_run: tuple[Path, Path],
                                                                                     tmp_path: Path) -> None:
    good = sorted((loc_run[0] / "test" / "images").glob("*.png"))[0].read_bytes()
    with serving(loc_onnx, tmp_path, "--workers", "1", "--queue", "0", "--timeout", "3") as server:
        slow = [_slow_upload(server, 100_000) for _ in range(4)]  # four clients trickling bodies, one worker
        _wait_until(lambda: server.request("GET", "/healthz")[2]["bodies_held"] == 4)
        assert server.request("GET", "/healthz")[2]["in_flight"] == 0  # no worker slot is taken while a body arrives
        assert server.post([("a.png", good)])[0] == 200  # so a normal client is served meanwhile
        for held in slow:
            held.settimeout(20)
            reply = b""
            while not reply.endswith(b"}") and (chunk := held.recv(65536)):
                reply += chunk
            assert reply.decode().startswith("HTTP/1.1 408") and "did not arrive within the request timeout" in reply.decode()
            held.close()
        # bodies held at once are capped (12 here): the next upload is told to come back, not left hanging
        slow = [_slow_upload(server, 100_000) for _ in range(12)]
        _wait_until(lambda: server.request("GET", "/healthz")[2]["bodies_held"] == 12)
        status, headers, body = server.post([("a.png", good)])
        assert status == 503 and int(headers["retry-after"]) >= 1 and "busy" in body["error"]
        for held in slow:
            held.close()
        _wait_until(lambda: server.request("GET", "/healthz")[2]["bodies_held"] == 0)
        # a flood: every request is answered (200 or 503), none is dropped, and the server stays up
        answers: list[int] = []

        def client() -> None:
            answers.append(server.post([("a.png", good)])[0])

        threads = [threading.Thread(target=client) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 24 and set(answers) <= {200, 503} and 200 in answers
        assert server.post([("a.png", good)])[0] == 200 and server.proc.poll() is None


def test_wrong_host_and_foreign_origin_are_refused_and_answers_carry_no_paths(loc_server: Server, loc_run: tuple[Path, Path]) -> None:
    good = sorted((loc_run[0] / "test" / "images").glob("*.png"))[0].read_bytes()
    body, ctype = multipart([("file", "../../home/doe/scan.png", good), ("file", "C:\\Users\\doe\\junk.png", b"not an image")])
    # a DNS-rebinding page reaches the loopback server under its own name: refused by Host
    assert loc_server.request("GET", "/model", headers={"Host": f"attacker.example:{loc_server.port}"})[0] == 400
    assert loc_server.request("POST", "/predict", body, {"Content-Type": ctype, "Host": "attacker.example"})[0] == 400
    # another site's page posting to us: refused by Origin; "null" (sandboxed frames, files) too
    for origin in ("http://attacker.example", "null", f"http://attacker.example:{loc_server.port}"):
        status, _, answer = loc_server.request("POST", "/predict", body, {"Content-Type": ctype, "Origin": origin})
        assert status == 403 and "other sites" in answer["error"], origin
    # our own page (same origin) and scripts without an Origin are served
    status, _, answer = loc_server.request("POST", "/predict", body, {"Content-Type": ctype, "Origin": f"http://{loc_server.host}:{loc_server.port}"})
    assert status == 200 and [r["file"] for r in answer["results"]] == ["scan.png", "junk.png"]  # names, never the client's paths
    assert "/" not in answer["results"][1]["error"] and "doe" not in answer["results"][1]["error"]

    def strings(v):
        return [x for k in v for x in strings(v[k])] if isinstance(v, dict) else [x for i in v for x in strings(i)] if isinstance(v, list) else [v]

    shown = [x for x in strings(loc_server.request("GET", "/model")[2]) if isinstance(x, str)]
    assert not any(x.startswith(("/", "~")) or "/tmp/" in x or "\\" in x for x in shown)


def test_binding_beyond_loopback_needs_allowed_host_names_and_warns_loudly(tiny_onnx: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run([sys.executable, "-c", SERVE, str(tiny_onnx), "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert refused.returncode == 2 and "--allow-host" in refused.stderr
    with serving(tiny_onnx, tmp_path / "a", "--host", "0.0.0.0", "--allow-host", "0.0.0.0") as server:
        assert server.request("GET", "/healthz")[0] == 200
    assert "NO authentication" in (tmp_path / "a" / "server.log").read_text()
    with serving(tiny_onnx, tmp_path / "b") as server:
        assert server.host == "127.0.0.1" and "Research use only" in server.banner
    assert "NO authentication" not in (tmp_path / "b" / "server.log").read_text()


def test_model_metadata_shows_file_names_only_even_with_spaces_in_paths() -> None:
    from fracture.deploy.serve.app import names_only

    meta = {"ensemble_of": [{"checkpoint": "runs/my run/last.ckpt"}], "classifier": {"checkpoint": "/home/jo doe/cls run/best.ckpt"},
            "release": {"card": "C:\\Users\\jo doe\\v1.md"}, "note": "sensitivity/specificity at two points", "where": "~/a b/c.onnx"}
    shown = names_only(meta)
    assert shown == {"ensemble_of": [{"checkpoint": "last.ckpt"}], "classifier": {"checkpoint": "best.ckpt"}, "release": {"card": "v1.md"},
                     "note": "sensitivity/specificity at two points", "where": "c.onnx"}
