"""The DICOM node's way out: its answers stored with C-STORE at the destination (a PACS), each object leaving
the spool's outbox once acknowledged, with exponential back-off while the destination is down or refuses."""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time

from fracture.deploy.spool import Spool

log = logging.getLogger("fracture.node")

PRODUCED = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7")  # 3D SR, GSPS, SC


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

    def deliver(self) -> None:
        """C-STORE every waiting object to --forward; each acknowledged one leaves the outbox. Failure: back off."""
        from pynetdicom import AE

        ae_title, host, port = self.forward
        ae = AE(self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        for sop_class in PRODUCED:
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(host, port, ae_title=ae_title)
        try:
            if not assoc.is_established:
                raise ConnectionError("association not established")
            for folder in self.spool.outbox():
                for path in sorted(folder.glob("[0-9]*.dcm")):
                    status = assoc.send_c_store(path)
                    code = int(status.Status) if status else None
                    if code is None or not (code == 0 or 0xB000 <= code <= 0xBFFF):
                        raise ConnectionError(f"C-STORE of {path.name} answered {code if code is None else hex(code)}")
                    self.spool.sent(path)
                manifest = self.spool.delivered(folder)
                log.info("delivered %d object(s) for study %s to %s", manifest["count"], manifest["study"], ae_title)
            self.failures = 0
        except (ConnectionError, OSError) as exc:
            self.failures += 1
            wait = min(self.retry_max, 2.0 ** min(self.failures, 16)) * random.uniform(0.8, 1.2)
            self.next_try = time.monotonic() + wait
            log.warning("could not deliver to %s@%s:%d (%s); retrying in %.0f s", ae_title, host, port, exc, wait)
        finally:
            if assoc.is_established:
                assoc.release()
