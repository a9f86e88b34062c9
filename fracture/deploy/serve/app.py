"""A torch-free HTTP service and web page for one exported model.

    python -m fracture.serve MODEL.onnx [--host 127.0.0.1] [--port 8000]

    GET  /         a page: drop radiographs (DICOM too), see probability, decisions, heatmap and boxes
    POST /predict  multipart/form-data, one or more ``file`` fields → JSON, one result per file
                   (``?images=0``: numbers only, no PNGs)
    GET  /model    the model's metadata: contract, thresholds, class names, validation metrics, sha256
    GET  /healthz  liveness and load

Uploads are decoded in memory through ``fracture.imaging.preprocess`` (the path files take), never written
to disk, and never logged: the log has sizes, timings and outcomes, not names or pixels. Requests
over capacity get 503 with ``Retry-After``; a bad file is an error entry beside the good ones.
There is no authentication: the default is loopback only. Research use only.

Stack: Starlette on uvicorn (ASGI; both BSD, pure Python, widely used and maintained). The event
loop keeps answering health checks and 503s while inference runs in a bounded thread pool. The
multipart body is parsed with python-multipart into memory here, because Starlette's own form parser
spools files over 1 MB to a temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import logging
import math
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from fracture.boxes import heatmap
from fracture.boxes.detection import BOX_KEYS
from fracture.deploy.serve.connections import HEADER_DEADLINE_S, LOOPBACK_NAMES, MAX_CONNECTIONS, is_loopback, origin_allowed, protocol_class
from fracture.deploy.predictor import ModelError, Predictor
from fracture.deploy.serve.uploads import Limits, RequestError, Upload, receive_uploads
from fracture.imaging import preprocess

NOTICE = "Research use only: not a medical device; not for diagnosis or treatment decisions."
log = logging.getLogger("fracture.serve")


def png_data_url(image: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", image)
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


PATH_KEYS = ("checkpoint", "card", "path", "root", "file", "source", "init_from", "ckpt", "dir")


def names_only(value, key: str = ""):
    """Metadata with every path cut to its file name: /model shows no directories of the exporting machine.

    A path is a value under a path-like key (``checkpoint``, ``card``, ``…_path``), an absolute path (``/``, ``~``,
    ``\\``, ``C:``), spaces or not, or any other text with a separator and no spaces."""
    if isinstance(value, dict):
        return {k: names_only(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [names_only(v, key) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        absolute = value.startswith(("/", "~", "\\")) or (len(value) > 2 and value[1] == ":" and value[2] in "/\\")
        if absolute or key.lower().endswith(PATH_KEYS) or " " not in value:
            return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


class Service:
    """The model and what to do with a list of uploads; HTTP-free so its answers can be tested directly."""

    def __init__(self, predictor: Predictor, limits: Limits, model_name: str = "model.onnx") -> None:
        self.predictor, self.limits, self.model_name = predictor, limits, model_name

    def model_info(self) -> dict:
        p = self.predictor
        return {"model": self.model_name, "sha256": p.sha256, "notice": NOTICE, "boxes": p.has_map, "heatmap": p.has_heatmap,
                "operating_points": p.thresholds, "metadata": names_only(p.metadata),
                "limits": {"max_upload_mb": self.limits.max_upload_mb, "max_files": self.limits.max_files,
                           "max_megapixels": self.limits.max_megapixels, "max_decode_mb": self.limits.max_decode_mb, "timeout_s": self.limits.timeout_s}}

    def _decode(self, upload: Upload, images: bool) -> tuple[np.ndarray, tuple[int, int], np.ndarray | None] | str:
        """(model input, original size, the picture at display size) or the reason the upload cannot be read.

        Only the display-size picture is kept: a request's 16 files never hold 16 full-size decodes at once."""
        name = Path(upload.filename).name or "upload"
        try:
            x, (h, w), image = preprocess.load_bytes(upload.data, name, self.predictor.contract, int(self.limits.max_megapixels * 1e6),
                                                     int(self.limits.max_decode_mb * 2**20))
        except preprocess.ImageError as exc:
            return str(exc).removeprefix(f"{name}: ")
        except Exception:  # noqa: BLE001 - a decoder crash on one upload must not fail the others; its text stays here
            return "cannot read this file"
        if not images:
            return x, (h, w), None
        scale = min(1.0, self.limits.display_side / max(h, w))
        dh, dw = max(1, round(h * scale)), max(1, round(w * scale))
        return x, (h, w), cv2.resize(image, (dw, dh), interpolation=cv2.INTER_AREA) if image.shape[:2] != (dh, dw) else image

    def predict(self, uploads: list[Upload], images: bool = True) -> list[dict]:
        """One result per upload, in order: probability and decisions, boxes, PNGs, or the error."""
        decoded = [self._decode(u, images) for u in uploads]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        probs, maps = self.predictor.run([decoded[i][0] for i in good], maps=images) if good else ([], None)
        row = {i: j for j, i in enumerate(good)}
        results = []
        for i, upload in enumerate(uploads):
            rec: dict = {"file": upload.filename, "bytes": len(upload.data)}
            if i not in row:
                results.append({**rec, "ok": False, "error": decoded[i]})
                continue
            _, (h, w), shown = decoded[i]
            p = float(probs[row[i]])
            raw = maps[row[i]] if maps is not None else None
            rec.update(ok=True, width=w, height=h, probability=p,
                       decisions={k: {"threshold": t, "fractured": p > t} for k, t in self.predictor.thresholds.items()})
            boxes = None
            if self.predictor.has_map:
                _, boxes = self.predictor.boxes(raw, h, w)
                rec["boxes"] = [dict(zip(BOX_KEYS, map(float, b))) for b in boxes]
            if images:
                rec.update(self._pictures(shown, (h, w), raw, boxes))
            results.append(rec)
        return results

    def _pictures(self, shown: np.ndarray, size: tuple[int, int], raw: np.ndarray | None, boxes: list | None) -> dict[str, str]:
        """The radiograph as PNG (already at display size), and an overlay (heatmap and boxes) when the model gives either."""
        h, w = size
        dh, dw = shown.shape[:2]
        out = {"image": png_data_url(shown)}
        if raw is not None:
            cam = heatmap.to_original(raw, dh, dw, self.predictor.contract)
            scaled = [(b[0] * dw / w, b[1] * dh / h, b[2] * dw / w, b[3] * dh / h, b[4]) for b in boxes or []]
            out["overlay"] = png_data_url(heatmap.panel(shown, cam, scaled, absolute=self.predictor.has_map))
        return out


class Gate:
    """Admission for requests: ``limit`` at once (working or waiting); the event loop alone touches it."""

    def __init__(self, workers: int, queue: int) -> None:
        self.workers, self.limit, self.active = workers, workers + queue, 0
        self.seconds = 1.0  # running mean of a request's work, for Retry-After

    def enter(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self, seconds: float | None = None) -> None:
        self.active -= 1
        if seconds is not None:
            self.seconds = 0.8 * self.seconds + 0.2 * seconds

    def retry_after(self) -> str:
        return str(max(1, min(60, math.ceil(self.seconds * self.limit / self.workers))))


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status, headers={"Cache-Control": "no-store", **(headers or {})})


def create_app(service: Service, allowed_hosts: list[str] | tuple[str, ...] = LOOPBACK_NAMES, allowed_origins: tuple[str, ...] = ()):
    """The ASGI app: routes, Host and Origin checks, admission and the worker pool around one :class:`Service`.

    ``allowed_hosts``: the names clients reach the server by (the Host header; anything else, as a DNS-rebinding
    page would send, gets 400). A POST from a page of another origin (scheme, host and port: not this server's,
    nor one of ``allowed_origins``) gets 403."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    limits = service.limits
    hosts = list(allowed_hosts)
    gate = Gate(limits.workers, limits.queue)
    bodies = Gate(limits.max_bodies, 0)  # bodies held: arriving, waiting or predicting
    pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="fracture-predict")
    page = resources.files("fracture.deploy.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'",
                    "X-Content-Type-Options": "nosniff"}

    async def predict(request):
        start = time.monotonic()
        deadline = start + limits.timeout_s
        status, files, size, outcome = 500, 0, 0, ""
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if not origin_allowed(request.headers.get("origin"), own, allowed_origins):
            log.info("POST /predict 403 foreign origin")
            return _json({"error": "requests from pages of other sites are refused"}, 403)
        if not bodies.enter():
            log.info("POST /predict 503 over capacity (%d bodies held)", bodies.active)
            return _json({"error": f"busy: {bodies.active} uploads held; retry later"}, 503, {"Retry-After": gate.retry_after()})
        admitted = handed = False
        try:
            uploads, size = await receive_uploads(request, limits, deadline)  # no worker slot is taken while a body arrives
            files = len(uploads)
            if not gate.enter():
                raise RequestError(503, f"busy: {gate.active} requests in flight; retry later", {"Retry-After": gate.retry_after()})
            admitted = True
            images = request.query_params.get("images", "1").lower() not in ("0", "false", "no")
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(pool, service.predict, uploads, images)
            began = time.monotonic()
            work.add_done_callback(lambda _: (gate.leave(time.monotonic() - began), bodies.leave()))  # held until the work really ends
            handed = True
            try:
                results = await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestError(503, f"not answered within {limits.timeout_s:g} s; the server is busy", {"Retry-After": gate.retry_after()}) from None
            ok = sum(r["ok"] for r in results)
            status, outcome = (200 if ok else 422), f"ok={ok} failed={len(results) - ok}"
            return _json({"model_sha256": service.predictor.sha256, "notice": NOTICE, "results": results}, status)
        except RequestError as exc:
            status, outcome = exc.status, "refused"
            return _json({"error": exc.reason}, exc.status, exc.headers)
        finally:
            if not handed:
                bodies.leave()
                if admitted:
                    gate.leave()
            log.info("POST /predict %d files=%d bytes=%d %s %.0f ms", status, files, size, outcome, 1000 * (time.monotonic() - start))

    async def model(request):
        return _json(service.model_info())

    async def healthz(request):
        return _json({"status": "ok", "model_sha256": service.predictor.sha256, "in_flight": gate.active, "capacity": gate.limit,
                      "bodies_held": bodies.active})

    async def index(request):
        return HTMLResponse(page, headers=page_headers)

    async def http_error(request, exc: HTTPException):
        return _json({"error": exc.detail}, exc.status_code, dict(exc.headers or {}))

    async def crash(request, exc: Exception):
        log.error("internal error %s", type(exc).__name__)
        return _json({"error": f"internal error ({type(exc).__name__})"}, 500)

    routes = [Route("/", index), Route("/predict", predict, methods=["POST"]), Route("/model", model), Route("/healthz", healthz)]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash},
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])


EXPOSED = """
################################################################################
#  WARNING: fracture.serve is listening on {host}, not only on this machine.
#  It has NO authentication: anyone who can reach port {port} can upload
#  radiographs and read the answers. Put it behind an authenticating reverse
#  proxy (TLS + login) or bind to 127.0.0.1.
################################################################################
"""


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file from python -m fracture.export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; anything else is reachable by others, unauthenticated)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name clients reach the server by, besides the loopback names (repeat; '*.example.org' "
                             "matches subdomains); needed to bind beyond loopback, behind a proxy or in a container")
    defaults = Limits()
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web page origin (scheme://host:port) besides the server's own whose pages may POST (repeat)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="requests predicted at once")
    parser.add_argument("--queue", type=int, default=defaults.queue, help="requests that may wait; more are answered 503 with Retry-After")
    parser.add_argument("--threads", type=int, help="onnxruntime threads per prediction (default: cores / workers)")
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_mb, help="largest request body")
    parser.add_argument("--max-files", type=int, default=defaults.max_files, help="most files in one request")
    parser.add_argument("--max-megapixels", type=float, default=defaults.max_megapixels, help="largest image")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds to receive and answer one request")
    parser.add_argument("--display-side", type=int, default=defaults.display_side, help="longest side of the PNGs sent back")
    parser.add_argument("--max-decode-mb", type=float, default=defaults.max_decode_mb,
                        help="memory one image's decode may hold, worked out from its header before decoding (fracture.imaging.budget)")
    parser.add_argument("--header-timeout", type=float, default=HEADER_DEADLINE_S,
                        help="seconds a connection has to send a request's complete headers, however it trickles them")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help="connections open at once; beyond it the oldest one still sending headers is closed, or, "
                             "when all are busy with requests, the new one gets an immediate 503")
    ns = parser.parse_args(args)
    missing = [name for name in ("uvicorn", "starlette", "python_multipart") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: serving needs the serve extra (missing {', '.join(missing)}): pip install 'fracture[serve]'", file=sys.stderr)
        return 2
    import uvicorn

    limits = Limits(ns.max_upload_mb, ns.max_files, ns.max_megapixels, ns.timeout, min(10.0, ns.timeout), ns.workers, ns.queue,
                    max(12, 2 * (ns.workers + ns.queue)), ns.display_side, ns.max_decode_mb)
    if not is_loopback(ns.host) and not ns.allow_host:
        print(f"error: --host {ns.host} serves other machines: name the host names they use with --allow-host NAME (requests "
              "with any other Host header are refused, which is what stops DNS rebinding)", file=sys.stderr)
        return 2
    if (min(limits.workers, limits.max_files, ns.max_connections) < 1 or limits.queue < 0
            or min(limits.timeout_s, limits.max_upload_mb, limits.max_megapixels, limits.max_decode_mb, ns.header_timeout) <= 0):
        print("error: --workers and --max-files must be at least 1, --queue at least 0, limits positive", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(ns.model, ns.threads or max(1, (os.cpu_count() or 1) // limits.workers))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    app = create_app(Service(predictor, limits, Path(ns.model).name), [*LOOPBACK_NAMES, *ns.allow_host], tuple(ns.allow_origin))
    try:
        family = socket.getaddrinfo(ns.host, ns.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((ns.host, ns.port), family=family)
    except OSError as exc:
        print(f"error: cannot listen on {ns.host}:{ns.port} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    if not is_loopback(ns.host):
        print(EXPOSED.format(host=ns.host, port=port), file=sys.stderr, flush=True)
    shown = f"[{ns.host}]" if ":" in ns.host else ns.host
    print(f"fracture.serve: {ns.model} (sha256 {predictor.sha256[:12]}) on http://{shown}:{port}/ — {NOTICE}", flush=True)
    # admission is the app's own (bodies held, requests in flight); connections are capped and deadlined by the protocol
    config = uvicorn.Config(app, http=protocol_class(ns.header_timeout, ns.max_connections), log_config=None, access_log=False,
                            timeout_keep_alive=5, limit_concurrency=None, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
