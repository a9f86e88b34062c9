"""The DICOM node's way out: its answers stored with C-STORE at the destination (a PACS), each object leaving
the spool's outbox once acknowledged, with exponential back-off while the destination is down or refuses."""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time

from fracture.deploy.pacs.spool import Spool

log = logging.getLogger("fracture.node")

# what the node sends, by the kind its outbox files are named with (NNN-kind.dcm): Comprehensive 3D SR, GSPS, SC
PRODUCED = {"sr": "1.2.840.10008.5.1.4.1.1.88.34", "gsps": "1.2.840.10008.5.1.4.1.1.11.1", "sc": "1.2.840.10008.5.1.4.1.1.7"}


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` → (AE title, host, port)."""
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        if not ae or len(ae) > 16 or not host:
            raise ValueError
        return ae, host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AE@HOST:PORT, the AE title at most 16 characters") from None


class Forwarder:
    """Delivers the outbox to ``destination`` (AE title, host, port) as ``ae_title``, on its own thread, so a slow
    or absent destination never delays an answer."""

    def __init__(self, spool: Spool, ae_title: str, destination: tuple[str, str, int], timeout: float = 30.0, retry_max: float = 300.0) -> None:
        self.spool, self.ae_title, self.forward, self.timeout, self.retry_max = spool, ae_title, destination, timeout, retry_max
        self.failures, self.next_try = 0, 0.0
        self.refused: dict[str, tuple[int, float]] = {}  # set folder -> (refusals in a row, not before)
        self.ready = threading.Event()  # set when an answer is in the outbox

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if time.monotonic() >= self.next_try and self.spool.outbox():
                    self.deliver()
            except Exception:  # noqa: BLE001 - what is not delivered stays in the outbox
                log.exception("error while delivering (the outbox keeps everything; retrying)")
                stop.wait(5.0)
            self.ready.wait(0.5)
            self.ready.clear()

    def _backoff(self, failures: int) -> float:
        return min(self.retry_max, 2.0 ** min(failures, 16)) * random.uniform(0.8, 1.2)

    def deliver(self) -> None:
        """C-STORE every waiting object to --forward; each acknowledged one leaves the outbox.

        The destination down or the association lost: everything waits, with back-off. One set refused (a status
        that is neither success nor warning): that set waits, with its own back-off, and the others go on. An
        object whose SOP class the destination will not negotiate (a PACS without presentation states, say) is
        moved to ``undeliverable/`` with a log line, and the rest of its set goes on."""
        from pynetdicom import AE

        ae_title, host, port = self.forward
        ae = AE(self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        for sop_class in PRODUCED.values():
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(host, port, ae_title=ae_title)
        try:
            if not assoc.is_established:
                raise ConnectionError("association not established")
            taken = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            for folder in self.spool.outbox():
                failures, not_before = self.refused.get(folder.name, (0, 0.0))
                if time.monotonic() < not_before:
                    continue
                stored = 0
                for path in sorted(folder.glob("[0-9]*.dcm")):
                    sop_class = PRODUCED[path.stem.split("-", 1)[1]]
                    if sop_class not in taken:
                        log.warning("%s does not take SOP class %s: %s set aside in %s", ae_title, sop_class, path.name, self.spool.undeliverable(path))
                        continue
                    if not assoc.is_established:
                        raise ConnectionError("association lost")
                    status = assoc.send_c_store(path)
                    code = int(status.Status) if status else None
                    if code is None:
                        raise ConnectionError(f"no answer to the C-STORE of {path.name}")
                    if not (code == 0 or 0xB000 <= code <= 0xBFFF):
                        wait = self._backoff(failures + 1)
                        self.refused[folder.name] = (failures + 1, time.monotonic() + wait)
                        log.warning("%s refused %s of study %s (status 0x%04X); that answer waits %.0f s, the others go on", ae_title,
                                    path.name, folder.name, code, wait)
                        break
                    self.spool.sent(path)
                    stored += 1
                else:
                    manifest = self.spool.delivered(folder)
                    self.refused.pop(folder.name, None)
                    log.info("delivered %d object(s) for study %s to %s%s", stored, manifest["study"], ae_title,
                             f" ({manifest['count'] - stored} before this attempt or set aside)" if stored < manifest["count"] else "")
            self.failures = 0
        except (ConnectionError, OSError) as exc:
            self.failures += 1
            wait = self._backoff(self.failures)
            self.next_try = time.monotonic() + wait
            log.warning("could not deliver to %s@%s:%d (%s); retrying in %.0f s", ae_title, host, port, exc, wait)
        finally:
            if assoc.is_established:
                assoc.release()
