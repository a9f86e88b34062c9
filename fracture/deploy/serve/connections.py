"""Connections the service accepts: request headers within an absolute deadline, and a cap on connections that
slow clients cannot fill.

uvicorn has no deadline for a request's headers (its keep-alive timer stops at the first byte, so a client that
trickles one byte a second holds its connection for ever) and its ``limit_concurrency`` counts idle connections,
so 75 sockets that never finish their headers turned every real request into a 503. Here:

- a connection must deliver a request's complete headers within ``header_deadline_s`` of being opened (or of its
  previous response) — an absolute deadline that arriving bytes do not extend — or it is closed;
- at most ``max_connections`` are open; a new one beyond that first evicts the oldest connection still waiting
  for its headers (the slowest client), and only when every connection is busy with a request is it refused at
  once with a bare 503, so real clients keep getting in while a flood of slow ones churns.

Torch-free; the protocol class is built on uvicorn's own h11 protocol only when the service starts.
The DICOM node's associations have the same two weaknesses one layer down: ``fracture.deploy.pacs.pdu``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from urllib.parse import urlsplit

HEADER_DEADLINE_S = 5.0
MAX_CONNECTIONS = 1000
REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 5\r\n\r\n"
log = logging.getLogger("fracture.serve")


def protocol_class(header_deadline_s: float = HEADER_DEADLINE_S, max_connections: int = MAX_CONNECTIONS) -> type:
    """An ``asyncio.Protocol`` class for ``uvicorn.Config(http=...)`` that enforces the deadline and the cap."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: OrderedDict = OrderedDict()  # connections waiting for a request's headers, oldest first: this server's own

    class Deadlined(H11Protocol):
        _timer = None
        _refused = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                if waiting:
                    oldest, _ = waiting.popitem(last=False)
                    oldest._close("evicted: the connection cap is reached and it had not sent its headers")
                else:
                    self._refused, self.transport = True, transport
                    transport.write(REFUSAL)
                    transport.close()
                    log.info("connection refused: %d open, every one busy with a request", len(self.connections))
                    return
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            waiting[self] = None
            self._timer = self.loop.call_later(header_deadline_s, self._close, "closed: no complete request headers in time")

        def _disarm(self) -> None:
            waiting.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _close(self, why: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                log.info("connection %s", why)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # this request's headers are complete: the body has its own timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request, whose headers are then complete
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request on this connection gets a deadline of its own

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._refused:
                return
            super().connection_lost(exc)

    return Deadlined


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, default ports filled in; None when it is not one."""
    try:
        parts = urlsplit(text)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    return (scheme, host, port) if scheme in _DEFAULT_PORTS and host and port else None


def origin_allowed(origin: str | None, own: str, allowed: tuple[str, ...] = ()) -> bool:
    """A POST's Origin: none (curl, scripts), this server's own origin ``own`` (scheme, host and port all equal),
    or one named in ``allowed``. ``null``, other sites, other ports and other schemes of the same host are refused."""
    if origin is None:
        return True
    mine = _origin(origin)
    return mine is not None and any(mine == _origin(o) for o in (own, *allowed))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
