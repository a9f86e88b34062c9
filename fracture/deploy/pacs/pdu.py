"""The DICOM node's PDU reads, bounded in size and time.

pynetdicom reads each PDU whole, of whatever length its 4-byte field declares (up to 4 GB, into memory, before
any handler sees a byte), and waits for it as long as bytes keep trickling in (its timeout is per socket read):
the slow-client and huge-header weaknesses the service's ``serve.connections`` closes for HTTP, one layer down.
``bound_pdu_reads`` caps both.
"""

from __future__ import annotations

import logging
import time

MAX_PDU_READ = 1 << 20  # the node offers 16 KB PDUs; an association request with hundreds of contexts stays well under this
log = logging.getLogger("fracture.node")


def bound_pdu_reads(assoc: object, deadline_s: float, max_pdu: int = MAX_PDU_READ) -> None:
    """Cap one pynetdicom association's PDU reads: a PDU declaring more than ``max_pdu`` bytes, or not complete
    within ``deadline_s`` of its first byte being asked for, reads short, which pynetdicom treats as a closed
    connection (the association ends and frees its slot). Called when the connection opens, before any PDU."""
    sock = assoc.dul.socket  # pynetdicom's AssociationSocket; .socket is the TCP socket under it
    raw, caller = sock.socket, getattr(assoc.requestor, "address", "?")

    def recv(nr_bytes: int) -> bytearray:
        data = bytearray()
        if nr_bytes > max_pdu:
            log.warning("closed a connection from %s: a PDU of %d bytes, over the %d this node reads", caller, nr_bytes, max_pdu)
            return data
        end = time.monotonic() + deadline_s
        try:
            while len(data) < nr_bytes:
                raw.settimeout(max(end - time.monotonic(), 1e-3))
                chunk = raw.recv(min(1 << 16, nr_bytes - len(data)))
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            log.warning("closed a connection from %s: a PDU still arriving after %.0f s", caller, deadline_s)
        except OSError:  # a reset: short data, the same as pynetdicom's own reading gives
            pass
        finally:
            try:
                raw.settimeout(getattr(assoc, "network_timeout", None))
            except OSError:
                pass
        return data

    sock.recv = recv
