"""Helpers for the DICOM node's tests and benchmark: free ports, a counting Storage SCP (the destination), a
sender, the node as a child process, DICOM radiographs of the synthetic pictures, and Orthanc on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CR, DX, SC = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
RLE, J2K, JLS = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def radiograph(picture: np.ndarray, study: str, sop_class: str = DX, photometric: str = "MONOCHROME2", bits: int = 12, syntax: str = EXPLICIT,
               **tags: object) -> bytes:
    """A picture as a single-frame DICOM radiograph of ``study``: 12 bits stored in 16 with a window, or 8-bit;
    compressed by pydicom's encoders when ``syntax`` says (RLE, JPEG 2000 or JPEG-LS lossless)."""
    from fracture.data.synth import dicom_bytes

    stored = 255.0 - picture if photometric == "MONOCHROME1" else picture.astype(np.float64)
    if bits > 8:
        pixels = np.rint(stored * ((2**bits - 1) / 255)).astype(np.uint16)
        tags = {"WindowCenter": (2**bits - 1) / 2, "WindowWidth": 2**bits, **tags}
    else:
        pixels = stored.astype(np.uint8)
    tags = {"Modality": {CR: "CR", SC: "OT"}.get(sop_class, "DX"), **tags}
    data = dicom_bytes(*picture.shape, pixels.tobytes(), EXPLICIT, bits=16 if bits > 8 else 8, photometric=photometric, sop_class=sop_class,
                       bits_stored=bits, StudyInstanceUID=study, **tags)
    if syntax == EXPLICIT:
        return data
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.compress(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Destination:
    """A Storage SCP that keeps what it receives and counts each SOP Instance UID: the PACS in the tests."""

    def __init__(self, port: int | None = None, ae_title: str = "DEST", refuse=None, without: tuple[str, ...] = ()) -> None:
        """``refuse(dataset)``: a failure status to answer instead of storing, or None; ``without``: SOP classes
        it does not negotiate."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port, self.ae_title, self.refuse = port or free_port(), ae_title, refuse
        self.received: list = []
        self.counts: Counter = Counter()
        self.first_seen: dict[str, float] = {}  # SOP Instance UID -> when it first arrived (time.monotonic)
        self.lock = threading.Lock()
        ae = AE(ae_title)
        ae.supported_contexts = [cx for cx in AllStoragePresentationContexts if cx.abstract_syntax not in without]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        status = self.refuse(ds) if self.refuse else None
        if status:
            return status
        with self.lock:
            self.received.append(ds)
            self.counts[str(ds.SOPInstanceUID)] += 1
            self.first_seen.setdefault(str(ds.SOPInstanceUID), time.monotonic())
        return 0x0000

    def wait(self, n: int, timeout: float = 60.0) -> list:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.counts) >= n:
                    return list(self.received)
            time.sleep(0.1)
        raise AssertionError(f"{len(self.counts)} distinct objects arrived in {timeout:.0f} s, expected {n}")

    def stop(self) -> None:
        self.server.shutdown()


def send(files: list[bytes] | list[Path], port: int, ae_title: str = "NODE", calling: str = "MODALITY",
         syntaxes: tuple[str, ...] | None = None) -> list[int | None]:
    """C-STORE each file to a node, as a modality does: one presentation context per SOP class and transfer
    syntax, each file's own syntax (or only ``syntaxes``) plus the uncompressed ones; returns each status
    (None: no answer, or no accepted context for it)."""
    import io

    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(io.BytesIO(f) if isinstance(f, bytes) else f) for f in files]
    ae = AE(calling)
    pairs = {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets} if syntaxes is None else set()
    pairs |= {(str(d.SOPClassUID), ts) for d in datasets for ts in (syntaxes or (EXPLICIT, IMPLICIT))}
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return [None] * len(datasets)
    statuses = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
                statuses.append(int(status.Status) if status else None)
            except ValueError:  # no accepted presentation context for it
                statuses.append(None)
    finally:
        assoc.release()
    return statuses


def echo(port: int, ae_title: str = "NODE") -> bool:
    """Whether a C-ECHO to the node succeeds."""
    from pynetdicom import AE

    ae = AE("PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def start_node(model: Path, spool: Path, forward: str, port: int, *extra: str, log: Path | None = None) -> subprocess.Popen:
    """``python -m fracture.node`` as a child on loopback; returns once it answers a C-ECHO."""
    out = open(log or spool.parent / "node.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "fracture.node", str(model), "--port", str(port), "--host", "127.0.0.1", "--forward", forward,
                             "--spool", str(spool), *extra], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})

    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the node exited with {proc.returncode}")
        if echo(port):
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the node did not answer C-ECHO within 60 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")  # Debian installs it in sbin


class Orthanc:
    """Orthanc with a temporary configuration on free loopback ports (not the system service the package installs)."""

    def __init__(self, root: Path, modalities: dict[str, list] | None = None) -> None:
        self.http, self.dicom = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {"Name": "fracture-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"), "HttpPort": self.http,
                  "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomModalities": modalities or {}, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
                  "HttpBindAddress": "127.0.0.1", "DicomServerEnabled": True, "Plugins": [], "StableAge": 1}
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=open(root / "orthanc.log", "ab"), stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                self.get("/system")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
        raise AssertionError("Orthanc did not start within 60 s")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body) -> object:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def put(self, path: str, body) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=json.dumps(body).encode(), method="PUT")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        stop(self.proc)


def require(*tools: str) -> None:
    """Skip without the Debian tools a test needs (orthanc, dcmtk, dicom3tools) or the pacs extra; in CI
    (``FRACTURE_REQUIRE_PACS=1``, set by ``.ci/run``, which installs them) fail instead."""
    import importlib.util

    import pytest

    missing = [t for t in tools if not (ORTHANC if t == "Orthanc" else shutil.which(t))] + [m for m in ("pynetdicom", "highdicom") if importlib.util.find_spec(m) is None]
    if missing:
        message = f"needs {', '.join(missing)} (Debian packages orthanc, dcmtk, dicom3tools; pip install '.[pacs]')"
        if os.environ.get("FRACTURE_REQUIRE_PACS"):
            pytest.fail(f"FRACTURE_REQUIRE_PACS is set: {message}")
        pytest.skip(f"PACS TEST NOT RUN: {message}")
