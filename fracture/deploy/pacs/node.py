"""A DICOM node: receive radiographs from a modality or a PACS, answer each study in DICOM a viewer shows.

    python -m fracture.node MODEL.onnx --ae-title FRACTURE --port 11112 --forward PACS@10.0.0.5:4242

In a PACS: register this node as a DICOM modality (its AE title, host and port) and route radiographs to it
(CR, DX for presentation, Secondary Capture); register the PACS as the --forward destination. The node
stores each instance in its spool before acknowledging it; when a study has been quiet for --quiet seconds it
predicts every image and the study, and stores a Structured Report (TID 1500), a presentation state per image
(boxes in two layers, screening and balanced) and a Secondary Capture per image (boxes and notice burnt in)
in a new series of the same study at --forward, retrying with back-off until they are acknowledged. A study
that gets more images after its answer gets a new answer that supersedes the old one. Research use only:
not for diagnosis. Needs ``pip install 'fracture[pacs]'``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from pathlib import Path

from fracture.deploy.pacs import spool as spooling
from fracture.deploy.pacs.pdu import bound_pdu_reads
from fracture.deploy.pacs.results import SERIES_DESCRIPTION, ImageResult, ResultWriter
from fracture.deploy.pacs.source import header_of, set_key, set_uids
from fracture.deploy.pacs.sender import PRODUCED, Forwarder, parse_destination
from fracture.deploy.predictor import ModelError, Prediction, Predictor
from fracture.imaging import budget, dicom, preprocess
from fracture.imaging.pixels import ImageError

log = logging.getLogger("fracture.node")

# what the node accepts: single-frame radiographs the model was trained on, in the syntaxes the gate decodes
ACCEPTED = {"1.2.840.10008.5.1.4.1.1.1": "CR", "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
            "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture"}
REFUSED = {"1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing (raw detector data the model never saw)",
           "1.2.840.10008.5.1.4.1.1.1.2.1": "mammography for processing", "1.2.840.10008.5.1.4.1.1.1.3.1": "intra-oral for processing"}
# The syntaxes the gate decodes (Deflated is not among them: its size is only known after inflating it), in the
# order the node prefers when a sender offers several in one context: lossless compressed as the modality made
# them, then uncompressed, then lossy (only ever offered for files that are lossy already).
LOSSLESS = ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
SYNTAXES = [s for s in LOSSLESS if s in budget.READABLE] + sorted(budget.READABLE - set(LOSSLESS))
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


class Node:
    """The Storage SCP, the study clock, a thread that answers quiet studies and one that delivers the answers."""

    def __init__(self, predictor: Predictor, spool_dir: str | os.PathLike, forward: tuple[str, str, int], ae_title: str = "FRACTURE",
                 quiet: float = 10.0, allowed_callers: list[str] | None = None, secondary_capture: bool = True,
                 max_associations: int = 8, timeout: float = 30.0, decode_slots: int = 2, retry_max: float = 300.0,
                 keep_days: float = 30.0, min_free_mb: float = 1024.0) -> None:
        self.predictor, self.forward, self.ae_title, self.quiet = predictor, forward, ae_title, quiet
        self.writer = ResultWriter(predictor, secondary_capture)
        self.spool = spooling.Spool(spool_dir)
        self.allowed, self.max_associations, self.timeout = allowed_callers, max_associations, timeout
        self.forwarder = Forwarder(self.spool, ae_title, forward, timeout, retry_max)
        self.keep_days, self.min_free = keep_days, int(min_free_mb * 2**20)
        self.decoding = threading.Semaphore(decode_slots)  # each decode may hold --max-decode-mb: at most this many at once
        self.lock = threading.Lock()
        self.last_seen = {study: time.monotonic() for study in self.spool.pending()}  # after a restart: quiet again first
        self.stop = threading.Event()
        self.attempts: dict[str, int] = {}
        self.arriving: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # association -> bytes of the instance arriving
        self.server = None

    # --- receiving ------------------------------------------------------------------------------------------------
    def on_store(self, event) -> int | tuple:
        """One C-STORE: the gate decodes it (within the byte budget); only then is it spooled and acknowledged."""
        from pydicom.dataset import Dataset
        from pydicom.uid import UID

        caller = event.assoc.requestor.ae_title
        sop_class = str(event.request.AffectedSOPClassUID)

        def refuse(status: int, reason: str) -> Dataset:
            log.warning("refused an instance from %s (%s): %s", caller, ACCEPTED.get(sop_class, sop_class), reason)
            answer = Dataset()
            answer.Status, answer.ErrorComment = status, reason[:64]
            return answer

        self.arriving[event.assoc] = 0  # the next instance on this association counts from zero
        path = Path(event.dataset_path)
        size = path.stat().st_size
        if size > self.predictor.max_bytes:
            return refuse(OUT_OF_RESOURCES, f"{size / 2**20:.1f} MB, over the {self.predictor.max_bytes / 2**20:.0f} MB decode budget")
        with self.decoding:  # its bytes, header and decode: at most --decode-slots instances in memory at once
            data = path.read_bytes()
            try:
                header = dicom.read_header(data, "instance.dcm")
                if str(header.get("Manufacturer", "")) == "fracture" and str(header.get("SeriesDescription", "")) == SERIES_DESCRIPTION:
                    log.info("ignored an instance from %s: one of this node's own answers (a routing rule sent it back)", caller)
                    return SUCCESS  # acknowledged, so the PACS does not retry it; answering it would answer forever
                if str(header.get("PresentationIntentType", "")).upper() == "FOR PROCESSING":
                    return refuse(CANNOT_UNDERSTAND, "for-processing data: not what the model was trained on")
                preprocess.gate(data, "instance.dcm", contract=self.predictor.contract, max_bytes=self.predictor.max_bytes)
                header_of(header)  # what every answer copies from it: the UIDs it must refer to
                study, instance = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
            except ImageError as exc:
                return refuse(CANNOT_UNDERSTAND, str(exc).removeprefix("instance.dcm: "))
            except ValueError as exc:
                return refuse(CANNOT_UNDERSTAND, str(exc))
            except Exception as exc:  # noqa: BLE001 - a header value pydicom cannot convert: a reason, not a traceback
                return refuse(CANNOT_UNDERSTAND, f"a header this node cannot copy ({type(exc).__name__})")
            free = shutil.disk_usage(self.spool.root).free
            if free - len(data) < self.min_free:  # the sender keeps it and retries later; answers still need room to be written
                return refuse(OUT_OF_RESOURCES, f"spool disk nearly full ({free / 2**20:.0f} MB free)")
            try:
                self.spool.receive(study, instance, data)  # on disk before the answer below leaves
            except OSError as exc:
                return refuse(OUT_OF_RESOURCES, f"could not write the spool ({exc.strerror or type(exc).__name__})")
        with self.lock:
            self.last_seen[spooling.digest(study)] = time.monotonic()
        log.info("received instance %s of study %s from %s (%s, %s)", spooling.digest(instance), spooling.digest(study), caller,
                 ACCEPTED.get(sop_class, sop_class), UID(event.context.transfer_syntax).name)
        return SUCCESS

    def on_data(self, event) -> None:
        """Bytes arriving: an instance larger than the decode budget is cut off while it arrives (the association is
        aborted), so a sender cannot fill the spool's disk with one endless dataset."""
        arriving = self.arriving.get(event.assoc, 0) + len(event.data)
        self.arriving[event.assoc] = arriving
        if arriving > self.predictor.max_bytes + (1 << 20) and not getattr(event.assoc, "_fracture_cut", False):
            event.assoc._fracture_cut = True
            log.warning("aborted an association from %s: an instance over the %.0f MB decode budget was still arriving",
                        event.assoc.requestor.ae_title, self.predictor.max_bytes / 2**20)
            event.assoc.abort(block=False)
            partial = getattr(getattr(event.assoc.dimse, "message", None), "_data_set_path", None)  # pynetdicom's file, if it says
            if partial is not None:
                Path(partial).unlink(missing_ok=True)  # else the sweep in work() removes it

    def on_accepted(self, event) -> None:
        for context in event.assoc.rejected_contexts:
            reason = REFUSED.get(context.abstract_syntax) or ("transfer syntax not decoded here" if context.abstract_syntax in ACCEPTED
                                                              else "SOP class not a radiograph this model reads")
            log.warning("refused a presentation context from %s: %s (%s)", event.assoc.requestor.ae_title, context.abstract_syntax, reason)

    def on_rejected(self, event) -> None:
        log.warning("refused an association from %s at %s: calling AE title not allowed", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address)

    def start(self, port: int, host: str = "") -> None:
        from pynetdicom import AE, _config, evt

        _config.STORE_RECV_CHUNKED_DATASET = True  # an arriving instance goes to a file, not memory
        _config.LOG_HANDLER_LEVEL = "none"
        tempfile.tempdir = str(self.spool.root / "receiving")  # ... inside the spool, never a shared /tmp
        ae = AE(self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.timeout  # an idle association frees its slot
        ae.connection_timeout = self.timeout
        if self.allowed:
            ae.require_calling_aet = self.allowed
        for sop_class in ACCEPTED:
            ae.add_supported_context(sop_class, SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification: C-ECHO
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_ACCEPTED, self.on_accepted), (evt.EVT_REJECTED, self.on_rejected),
                    (evt.EVT_DATA_RECV, self.on_data), (evt.EVT_CONN_OPEN, lambda event: bound_pdu_reads(event.assoc, self.timeout))]
        self.server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        self.threads = [threading.Thread(target=self.work, name="answer", daemon=True),
                        threading.Thread(target=self.forwarder.run, args=(self.stop,), name="deliver", daemon=True)]
        for thread in self.threads:
            thread.start()
        log.info("listening as %s on port %d; answers go to %s@%s:%d", self.ae_title, port, *self.forward)

    def shutdown(self) -> None:
        self.stop.set()
        self.forwarder.ready.set()
        if self.server is not None:
            self.server.shutdown()
        for thread in getattr(self, "threads", []):
            thread.join(timeout=60)

    # --- answering and delivering ---------------------------------------------------------------------------------
    def work(self) -> None:
        self.spool.prune(self.keep_days)
        swept = time.monotonic()
        while not self.stop.is_set():
            try:
                now = time.monotonic()
                if now - swept > 60:  # half-received files of associations that died: older than any live one could be
                    self.spool.sweep(older_than=4 * self.timeout + 60)
                    swept = now
                with self.lock:
                    due = [s for s, t in self.last_seen.items() if now - t >= self.quiet]
                for study in due:
                    with self.lock:
                        if now - self.last_seen.get(study, now) < self.quiet:
                            continue
                        self.last_seen.pop(study, None)
                    self.answer_or_set_aside(study)
            except Exception:  # noqa: BLE001 - the thread must outlive anything; what is spooled stays spooled
                log.exception("error in the answering thread (the spool keeps everything)")
                self.stop.wait(1.0)
            self.stop.wait(0.1)

    def answer_or_set_aside(self, study: str, attempts: int = 3) -> None:
        """Answer a study; one that fails ``attempts`` times in a row is moved to ``failed/`` (kept, not lost) so
        that it cannot hold up the others."""
        try:
            self.answer(study)
            self.attempts.pop(study, None)
        except Exception as exc:  # noqa: BLE001 - a damaged ledger, a header highdicom will not copy, a full disk
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # not the study's fault: never set aside
                log.error("could not answer study %s: the spool's disk is full (%s); trying again", study, exc.strerror)
                with self.lock:
                    self.last_seen.setdefault(study, time.monotonic())
                return
            self.attempts[study] = self.attempts.get(study, 0) + 1
            frame = traceback.extract_tb(exc.__traceback__)[-1]  # the type and place, not the text: it may quote patient data
            log.error("could not answer study %s (attempt %d of %d): %s at %s:%d", study, self.attempts[study], attempts,
                      type(exc).__name__, Path(frame.filename).name, frame.lineno)
            log.debug("the exception in full", exc_info=exc)
            if self.attempts[study] >= attempts:
                where = self.spool.set_aside(study)
                log.error("study %s set aside after %d attempts: its instances are kept in %s (`python -m fracture.predict MODEL "
                          "FILES --dicom-out DIR` on them shows the reason in full)", study, attempts, where)
                self.attempts.pop(study)
            else:
                with self.lock:
                    self.last_seen.setdefault(study, time.monotonic())  # again after the quiet wait

    def answer(self, study: str) -> None:
        """Predict a quiet study's new instances; write the study's new result set to the outbox, then the ledger."""
        files = self.spool.pending().get(study, [])
        ledger = self.spool.ledger(study)
        waiting = self.spool.waiting_sources()
        repeats = [f.stem for f in files if f.stem in ledger["images"] and f.stem not in waiting]
        if repeats:  # an instance sent again after its answer was delivered: same UIDs, same answer
            self.spool.forget(study, repeats)
        new = [f for f in files if f.stem not in ledger["images"]]
        if not new:
            return
        started = time.monotonic()
        predictions = list(self.predictor.predict([str(f) for f in new], batch_size=8, threshold=self.writer.points[-1], show_progress=False))
        fresh = [ImageResult(header_of(dicom.read_header(f.read_bytes(), f.name)), p, str(f)) for f, p in zip(new, predictions)]
        reported = [ImageResult(_dataset(item["header"]), Prediction(**item["prediction"])) for item in ledger["images"].values()]
        predecessors = [_dataset(s["sr"]) for s in ledger["sets"]]
        key = set_key(self.predictor.sha256, [r.header.SOPInstanceUID for r in [*reported, *fresh]])
        if not self.spool.has_set(key):  # else: built before a crash, the same objects
            objects = [(kind, _encode(ds)) for kind, ds in self.writer.result_set(reported, fresh, predecessors, self.predictor.max_bytes)]
            self.spool.write_set(key, study, [f.stem for f in new], objects)
        for r in fresh:
            ledger["images"][spooling.digest(r.header.SOPInstanceUID)] = {"header": r.header.to_json_dict(), "prediction": _answer(r.prediction)}
        sr = _dataset(None)  # what a later answer's Predecessor Documents Sequence names
        sr.StudyInstanceUID, sr.SOPClassUID = fresh[0].header.StudyInstanceUID, PRODUCED["sr"]
        sr.SeriesInstanceUID, sr.SOPInstanceUID = set_uids(key)
        ledger["sets"].append({"key": key, "sr": sr.to_json_dict()})
        self.spool.save_ledger(study, ledger)
        self.forwarder.ready.set()
        log.info("answered study %s: %d new image(s), %d before, %d earlier answer(s) superseded, in %.2f s", study, len(fresh),
                 len(reported), len(predecessors), time.monotonic() - started)


def _encode(ds) -> bytes:
    import io

    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dataset(data: dict | None):
    from pydicom.dataset import Dataset

    return Dataset.from_json(data) if data else Dataset()


def _answer(p: Prediction) -> dict:
    return {"path": "", "probability": p.probability, "fractured": p.fractured, "threshold": p.threshold, "threshold_name": p.threshold_name,
            "error": p.error, "boxes": [list(b) for b in p.boxes] if p.boxes else p.boxes, "size": list(p.size) if p.size else None}


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.node", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file from python -m fracture.export (a release from exports/)")
    parser.add_argument("--ae-title", default="FRACTURE", help="this node's AE title (default FRACTURE)")
    parser.add_argument("--port", type=int, default=11112, help="port to listen on (default 11112)")
    parser.add_argument("--host", default="", help="address to listen on (default: all)")
    parser.add_argument("--forward", type=parse_destination, required=True, metavar="AE@HOST:PORT", help="where answers are stored (a PACS)")
    parser.add_argument("--spool", type=Path, default=Path("fracture-spool"), help="folder for received instances and undelivered answers "
                        "(created owner-only; keep it on a local disk)")
    parser.add_argument("--quiet", type=float, default=10.0, help="seconds without a new instance before a study is answered (default 10)")
    parser.add_argument("--allow", nargs="+", metavar="AE", help="calling AE titles allowed to send (default: any)")
    parser.add_argument("--no-secondary-capture", action="store_true", help="answer with the SR and presentation states only")
    parser.add_argument("--max-associations", type=int, default=8, help="associations at once; more are refused (default 8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="network, ACSE and DIMSE timeouts in seconds, and the most one PDU "
                        "may take to arrive: an idle, stalled or trickling association is closed after this and frees its slot (default 30)")
    parser.add_argument("--max-decode-mb", type=float, default=budget.DEFAULT_MAX_DECODE_MB, help="memory one instance's decode may hold")
    parser.add_argument("--decode-slots", type=int, default=2, help="instances read and decoded at once while receiving (memory: slots x budget)")
    parser.add_argument("--retry-max", type=float, default=300.0, help="longest wait between delivery attempts in seconds (default 300)")
    parser.add_argument("--keep-days", type=float, default=30.0, help="how long a study's answer is remembered, so that a late image supersedes it")
    parser.add_argument("--min-free-mb", type=float, default=1024.0, help="disk space the spool keeps free: below it an instance is refused "
                        "(status A700, the sender retries later) so answers still have room (default 1024)")
    parser.add_argument("--threads", type=int, help="CPU threads for the model (default: all cores)")
    ns = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(threadName)s] %(message)s")
    for chatty in ("pynetdicom", "highdicom"):  # their INFO lines name every association and copied module; ours say what matters
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # no patient data in the log: pydicom's and highdicom's warnings quote values ("The string "Smith John" is unlikely
    # to represent ..."; "Invalid value for VR CS: ...")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\..*)?$")
    os.umask(0o077)
    try:
        predictor = Predictor(ns.model, ns.threads, ns.max_decode_mb)
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: the DICOM node needs `pip install 'fracture[pacs]'` ({exc.name} is missing)", file=sys.stderr)
        return 2
    node = Node(predictor, ns.spool, ns.forward, ns.ae_title, ns.quiet, ns.allow, not ns.no_secondary_capture, ns.max_associations,
                ns.timeout, ns.decode_slots, ns.retry_max, ns.keep_days, ns.min_free_mb)
    try:
        node.start(ns.port, ns.host)
    except OSError as exc:
        print(f"error: cannot listen on port {ns.port} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    log.info("stopping: what is spooled is answered and delivered at the next start")
    node.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
