"""Uploads as the service receives them: a multipart body parsed as it streams, within size and time limits, held once; errors that are answers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from fracture.imaging.budget import DEFAULT_MAX_DECODE_MB

FIELD = "file"
MAX_PART_HEADERS = 16 * 1024  # a part's header lines together (Content-Disposition, Content-Type)


@dataclass(frozen=True)
class Limits:
    """What one server accepts; over these a request gets a 4xx or 503 answer, never a crash."""

    max_upload_mb: float = 64.0  # the whole request body
    max_files: int = 16  # per request
    max_megapixels: float = 50.0  # per image, checked from the header before decoding where the format allows
    timeout_s: float = 30.0  # receiving, waiting and predicting, together
    receive_timeout_s: float = 10.0  # the whole body must arrive within this (uvicorn has no body timeout)
    workers: int = 2  # requests predicted at once
    queue: int = 8  # requests whose body has arrived that may wait for a worker; more get 503
    max_bodies: int = 12  # request bodies held at once (arriving, waiting or predicting); more get 503
    display_side: int = 1024  # longest side of the PNGs sent back
    max_decode_mb: float = DEFAULT_MAX_DECODE_MB  # what one image's decode may hold (fracture.imaging.budget)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)


class RequestError(Exception):
    """A request answered with ``status`` and a JSON ``{"error": reason}``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


@dataclass
class Upload:
    filename: str
    data: bytes


class MultipartReader:
    """A multipart/form-data body parsed as its chunks arrive: the request is held once, as its parts."""

    def __init__(self, content_type: str, max_files: int) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        kind, params = parse_options_header(content_type or "")
        if kind != b"multipart/form-data":
            raise RequestError(415, f"send multipart/form-data with one or more '{FIELD}' fields (got {kind.decode(errors='replace') or 'no Content-Type'})")
        boundary = params.get(b"boundary")
        if not boundary:
            raise RequestError(400, "multipart/form-data without a boundary")
        self.max_files = max_files
        self.parts: list[tuple[dict, bytes]] = []
        self.part: dict | None = None
        self.field, self.value, self.ended = b"", b"", False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._header_bytes("field", d[s:e]),
            "on_header_value": lambda d, s, e: self._header_bytes("value", d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": lambda d, s, e: self.part["data"].extend(d[s:e]),
            "on_part_end": self._part_end,
            "on_end": lambda: setattr(self, "ended", True),
        })

    def _begin(self) -> None:
        self.part = {"headers": {}, "data": bytearray()}
        self.header_size = 0

    def _header_bytes(self, which: str, data: bytes) -> None:
        """A part header's name or value, as it arrives; a part's headers over ``MAX_PART_HEADERS`` end the request
        (python-multipart >= 0.0.27 limits each line too: this guard holds whatever parser is installed)."""
        self.header_size += len(data)
        if self.header_size > MAX_PART_HEADERS:
            raise RequestError(431, f"a part's headers are over {MAX_PART_HEADERS // 1024} KB")
        setattr(self, which, getattr(self, which) + data)

    def _header_end(self) -> None:
        self.part["headers"][self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def _part_end(self) -> None:
        if len(self.parts) >= self.max_files + 8:  # a flood of tiny parts
            raise RequestError(413, f"too many parts in one request; at most {self.max_files} files")
        data = bytes(self.part["data"])  # one copy, then the growing buffer goes
        self.part["data"] = None
        self.parts.append((self.part["headers"], data))
        self.part = None

    def feed(self, chunk: bytes) -> None:
        from python_multipart.multipart import MultipartParseError

        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise RequestError(400, f"malformed multipart body ({type(exc).__name__})") from None

    def uploads(self) -> list[Upload]:
        """The ``file`` parts, once the body has ended; errors say what was wrong with the request."""
        from python_multipart.multipart import parse_options_header

        self.parser.finalize()
        if self.part is not None or not self.ended:
            raise RequestError(400, "the multipart body ends before its closing boundary (truncated upload?)")
        uploads, other = [], []
        for headers, data in self.parts:
            _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
            name = disposition.get(b"name", b"").decode(errors="replace")
            if name == FIELD:
                filename = disposition.get(b"filename", b"").decode(errors="replace").replace("\\", "/")
                uploads.append(Upload(Path(filename).name or "upload", data))  # a name, never a client's path
            else:
                other.append(name)
        if not uploads:
            got = f"; got {', '.join(repr(n) for n in other)}" if other else ""
            raise RequestError(400, f"no '{FIELD}' field in the form{got}")
        if len(uploads) > self.max_files:
            raise RequestError(413, f"{len(uploads)} files in one request; at most {self.max_files}")
        return uploads


def parse_multipart(body: bytes, content_type: str, max_files: int) -> list[Upload]:
    """A whole multipart/form-data body → its ``file`` parts (``MultipartReader`` fed once)."""
    reader = MultipartReader(content_type, max_files)
    reader.feed(body)
    return reader.uploads()


async def receive_uploads(request, limits: Limits, deadline: float) -> tuple[list[Upload], int]:
    """The body, parsed as it arrives, within the size limit and the receive timeout: (uploads, bytes)."""
    from starlette.requests import ClientDisconnect

    limit = limits.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, f"bad Content-Length {length!r}")
        if int(length) > limit:
            raise RequestError(413, f"upload of {int(length) / 1e6:.1f} MB is over the {limit / 1e6:.0f} MB limit")
    reader = MultipartReader(request.headers.get("content-type", ""), limits.max_files)
    size = 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"upload is over the {limit / 1e6:.0f} MB limit")
            reader.feed(chunk)

    try:
        await asyncio.wait_for(receive(), max(0.0, min(deadline, time.monotonic() + limits.receive_timeout_s) - time.monotonic()))
    except asyncio.TimeoutError:
        raise RequestError(408, "the upload did not arrive within the request timeout") from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected during the upload") from None
    if not size:
        raise RequestError(400, f"empty request; send multipart/form-data with one or more '{FIELD}' fields")
    return reader.uploads(), size
