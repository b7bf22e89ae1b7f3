"""Byte-level HTTP/1.1 on both sides of the gateway, for the exchange suites.

- ``HTTPUpstream``: a ``RawUpstream`` that parses every request it is sent and
  records it in ``requests`` as it arrives (head first, then body bytes), so a
  test sees exactly what reached the upstream: nothing, a partial request, or a
  complete one. ``respond(seen, reader, writer)`` writes whatever answer the
  test scripts (good, broken, slow or none) and returns whether to keep the
  connection for another request. ``cut`` makes it hang up partway through a
  request instead (after its head, or after some of its body);
  ``open_connections``/``peak_connections`` count connections open at once.
- ``raw_client()``/``read_response()``: a client that writes exact bytes to the
  gateway and reads answers without forgiving anything (a short body is
  reported as incomplete, never as a clean answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from multidict import CIMultiDict

from .support import RawUpstream, read_chunked


def parse_head(head: bytes) -> tuple[str, CIMultiDict[str]]:
    """(start line, headers) of a message head, keeping duplicates."""
    lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    return lines[0], headers


@dataclass
class Seen:
    """One request as the upstream saw it; ``complete`` once its whole body arrived."""

    connection: int
    head: bytes
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    @property
    def start_line(self) -> str:
        return parse_head(self.head)[0]

    @property
    def method(self) -> str:
        return self.start_line.split(" ")[0]

    @property
    def target(self) -> str:
        return self.start_line.split(" ")[1]

    @property
    def headers(self) -> CIMultiDict[str]:
        return parse_head(self.head)[1]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


Respond = Callable[[Seen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
# Given a request whose head just arrived: None to read it whole and respond, or a number of
# body bytes to read (0: none) before closing the connection without a word.
Cut = Callable[[Seen], int | None]


def answer(
    status: int = 200,
    body: bytes = b'{"ok": true}',
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    keep_alive: bool = True,
    content_type: str | None = "application/json",
) -> Respond:
    """A ``respond`` that writes one well-formed answer with a Content-Length."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if content_type is not None:
        pairs.append(("Content-Type", content_type))
    pairs.append(("Content-Length", str(len(body))))
    if not keep_alive:
        pairs.append(("Connection", "close"))
    head = f"HTTP/1.1 {status} Status\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs)
    message = head.encode("latin-1") + b"\r\n" + body

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(message)
        await writer.drain()
        return keep_alive

    return respond


def write_then_close(data: bytes, *, pause: float = 0.0) -> Respond:
    """A ``respond`` that writes raw bytes (anything at all), optionally waits, then closes."""

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if data:
            writer.write(data)
            await writer.drain()
        if pause:
            await asyncio.sleep(pause)  # a slow server, not synchronisation
        return False

    return respond


async def never_answer(
    seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A ``respond`` that reads the whole request and then says nothing until the peer leaves."""
    await reader.read()
    return False


class HTTPUpstream:
    """A scripted HTTP/1.1 upstream that records every request byte it receives."""

    def __init__(
        self,
        respond: Respond,
        *,
        cut: Cut | None = None,
        backlog: int = 100,
        sock: socket.socket | None = None,
    ) -> None:
        self.respond = respond
        self.cut = cut
        self.requests: list[Seen] = []
        self.closed: list[asyncio.Event] = []  # one per connection, set when it ends
        self.head_arrived = asyncio.Event()  # set whenever a request head arrives
        self.open_connections = 0  # connections open right now
        self.peak_connections = 0  # the most ever open at once
        self.raw = RawUpstream(self._script, backlog=backlog, sock=sock)
        self._changed = asyncio.Event()

    def _touch(self) -> None:
        """Wake every ``until()`` waiter: a head, body bytes, an end or a close arrived."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (without polling) until ``predicate()`` holds about what the upstream saw."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    @property
    def url(self) -> str:
        return self.raw.url

    @property
    def connections(self) -> int:
        return self.raw.connections

    @property
    def complete(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.complete]

    async def start(self) -> HTTPUpstream:
        await self.raw.start()
        return self

    async def close(self) -> None:
        await self.raw.close()

    async def all_closed(self, timeout: float = 5.0) -> None:
        """Wait until every connection made so far has ended (the gateway or script closed it)."""
        async with asyncio.timeout(timeout):
            for event in list(self.closed):
                await event.wait()

    async def _script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(self.closed)
        closed = asyncio.Event()
        self.closed.append(closed)
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self.requests.append(Seen(number, exc.partial))
                    return
                seen = Seen(number, head)
                self.requests.append(seen)
                self.head_arrived.set()
                self._touch()
                limit = self.cut(seen) if self.cut is not None else None
                if limit is not None:
                    await _read_at_most(reader, seen, limit, self._touch)
                    return  # hang up, the request unanswered and (maybe) part-read
                await _read_body(reader, seen, self._touch)
                seen.complete = True
                self._touch()
                if not await self.respond(seen, reader, writer):
                    return
        finally:
            self.open_connections -= 1
            closed.set()
            self._touch()


async def _read_body(
    reader: asyncio.StreamReader, seen: Seen, progress: Callable[[], None]
) -> None:
    """Read the body into ``seen.body`` as it arrives; IncompleteReadError if cut short."""
    _, headers = parse_head(seen.head)
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            while size:
                piece = await reader.read(size)
                if not piece:
                    raise asyncio.IncompleteReadError(b"", size)
                seen.body += piece
                progress()
                size -= len(piece)
            await reader.readexactly(2)
    remaining = int(headers.get("Content-Length", "0"))
    while remaining:
        piece = await reader.read(min(remaining, 65536))
        if not piece:
            raise asyncio.IncompleteReadError(b"", remaining)
        seen.body += piece
        progress()
        remaining -= len(piece)


async def _read_at_most(
    reader: asyncio.StreamReader, seen: Seen, limit: int, progress: Callable[[], None]
) -> None:
    """Read up to ``limit`` body bytes into ``seen.body`` (fewer if the peer stops sending)."""
    while len(seen.body) < limit:
        piece = await reader.read(limit - len(seen.body))
        if not piece:
            return
        seen.body += piece
        progress()


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    complete: bool  # the declared length or the final chunk arrived

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


async def raw_client(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)


async def read_response(reader: asyncio.StreamReader) -> RawResponse | None:
    """One answer off the wire, or None if the connection ended before a head."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    start, headers = parse_head(head)
    status = int(start.split(" ")[1])
    body = bytearray()
    try:
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            await read_chunked(reader, body)
        elif "Content-Length" in headers:
            body += await reader.readexactly(int(headers["Content-Length"]))
        elif status not in (204, 304) and status >= 200:
            body += await reader.read()  # delimited by the connection's end
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        if isinstance(exc, asyncio.IncompleteReadError):
            body += exc.partial
        return RawResponse(status, headers, bytes(body), complete=False)
    return RawResponse(status, headers, bytes(body), complete=True)


async def exchange(
    url: str, data: bytes, *, at_most: int = 1, timeout: float = 10.0
) -> list[RawResponse]:
    """Write ``data`` on one connection, then read up to ``at_most`` answers or until it closes."""
    reader, writer = await raw_client(url)
    responses: list[RawResponse] = []
    try:
        async with asyncio.timeout(timeout):
            writer.write(data)
            await writer.drain()
            while len(responses) < at_most:
                response = await read_response(reader)
                if response is None:
                    break
                responses.append(response)
                if not response.complete:
                    break
    finally:
        writer.close()
    return responses


def request_bytes(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    host: str = "gateway.test",
) -> bytes:
    """A request as exact bytes; ``headers`` are written as given (nothing is added but Host)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def echo(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A ``respond`` that answers 200 with exactly the body it received."""
    body = bytes(seen.body)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    return True


def partial_answer(declared: bytes, sent: bytes, *, chunked: bool, then: str = "close") -> Respond:
    """A ``respond`` that starts a 200 whose body should be ``declared`` but sends only ``sent``.

    ``then`` is ``close`` (the upstream breaks off) or ``stall`` (it keeps the
    connection open and sends nothing more until the peer leaves).
    """
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(declared)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n"
    payload = b"%x\r\n%s\r\n" % (len(sent), sent) if chunked else sent

    async def respond(
        seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(head + payload)
        await writer.drain()
        if then == "stall":
            await reader.read()
        return False

    return respond
