"""The SME gateway client: one request, at most once, streamed both ways.

Written for exactly one job: HTTP/1.1 to one SME gateway, keep-alive, no
cookies, no redirects, no decompression, never a retry. ``request()``:

1. takes a connection from the pool (the wait counts against the budget);
2. writes the head and the body on that one connection: a body that is
   already here goes out with the head in one write; a streamed one is pumped
   by a task, chunk by chunk, pausing whenever the upstream is slow to read;
3. waits, within the budget, for the final response head and returns it as a
   ``Response`` whose body is read piece by piece (each wait within the
   budget again) and which gives the connection back exactly once.

Any failure after the first byte was written ends the request and closes the
connection; nothing is ever written a second time. If the caller is
cancelled (the client went away), the upstream connection is aborted at
once, so a request cut short never completes upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterable
from urllib.parse import urlsplit

from .breaker import Breaker
from .connection import Connection
from .pool import Pool

Body = bytes | AsyncIterable[bytes] | None
_METHODS_WITH_CONTENT = frozenset({b"POST", b"PUT", b"PATCH"})


class Progress:
    """How far one request got: set by ``request()``, read by a caller being cancelled."""

    __slots__ = ("_conn",)

    def __init__(self) -> None:
        self._conn: Connection | None = None

    @property
    def connected(self) -> bool:
        """A connection was had for the request: there was an exchange to time."""
        return self._conn is not None

    @property
    def sent(self) -> bool:
        """The whole request was handed to the connection."""
        return self._conn is not None and self._conn.request_complete

    @property
    def may_have_acted(self) -> bool:
        """The upstream may have acted on the request: it was sent, or an answer began."""
        return self._conn is not None and self._conn.may_have_acted


class Response:
    """The upstream's final answer: status and headers now, the body as it comes."""

    __slots__ = ("_budget", "_conn", "_pool", "_pump", "headers", "status")

    def __init__(
        self, conn: Connection, pool: Pool, pump: asyncio.Task[None] | None, budget: float
    ) -> None:
        self.status = conn.status
        self.headers = conn.headers  # [(name, value)] as sent, bytes
        self._conn: Connection | None = conn
        self._pool = pool
        self._pump = pump
        self._budget = budget

    @property
    def complete(self) -> bool:
        """The whole body has already arrived (``body()`` returns it without waiting)."""
        return self._conn is not None and self._conn.body_complete

    def body(self) -> bytes:
        assert self._conn is not None
        return self._conn.take_body()

    async def read(self) -> bytes:
        """The next piece of the body, b"" at its end; raises BodyBroken."""
        assert self._conn is not None
        return await self._conn.read(self._budget)

    async def stop_sending(self) -> None:
        """An early answer: stop streaming the request body (the connection will not be
        reused) and wait until the pump has let go of the body's source."""
        pump = self._pump
        if pump is not None and not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    def release(self) -> None:
        """Give the connection back (reused only if everything ended cleanly); idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()  # an early answer: the rest of the request is never sent
        self._pool.release(conn)


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        max_connections: int,
        max_pending: int,
        idle_seconds: float,
        breaker: Breaker,
    ) -> None:
        parts = urlsplit(base_url)
        assert parts.hostname is not None
        secure = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port if parts.port is not None else (443 if secure else 80)
        self._tls = ssl.create_default_context() if secure else None
        self._host_header = _host_field(self._host, parts.port)
        # A base URL's path (an SME gateway behind a path-routed ingress) comes before every
        # request's target; the settings trimmed its trailing '/'.
        self._prefix = parts.path.rstrip("/").encode()
        self._timeout = timeout
        self._options = (max_connections, max_pending, idle_seconds)
        self.breaker = breaker
        self._pool: Pool | None = None

    @property
    def pool(self) -> Pool:
        assert self._pool is not None, "Client.start() first"
        return self._pool

    async def start(self) -> None:
        max_connections, max_pending, idle_seconds = self._options
        self._pool = Pool(
            self._host,
            self._port,
            tls=self._tls,
            max_connections=max_connections,
            max_pending=max_pending,
            idle_seconds=idle_seconds,
            breaker=self.breaker,
            budget=self._timeout,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: bytes,
        body: Body,
        length: int | None,
        progress: Progress | None = None,
    ) -> Response:
        """Send one request (``headers``: complete ``Name: value\\r\\n`` lines, no framing).

        ``body`` is bytes already here, an async iterable streamed as it comes, or None.
        ``length`` is the declared length of a streamed body (None: sent chunked).
        """
        pool = self.pool
        loop = pool.loop  # not get_running_loop(): that is a getpid() system call each time
        deadline = loop.time() + self._timeout
        conn = pool.acquire_idle() or await pool.acquire(deadline)
        if progress is not None:
            progress._conn = conn
        head = b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s" % (
            method,
            self._prefix,
            target,
            self._host_header,
            headers,
        )
        pump: asyncio.Task[None] | None = None
        try:
            if body is None or isinstance(body, bytes):
                if body or method in _METHODS_WITH_CONTENT:
                    head += b"Content-Length: %d\r\n" % len(body or b"")
                conn.send(head + b"\r\n" + (body or b""), skip_body=method == b"HEAD")
                conn.request_sent()
            else:
                chunked = length is None
                framing = (
                    b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n"
                )
                conn.send(head + (framing if chunked else framing % length) + b"\r\n")
                pump = loop.create_task(_pump(conn, body, length))
            await conn.response_head(deadline)
        except BaseException:
            if pump is not None:
                pump.cancel()
            conn.abort()  # half-written or unanswered: never reused, never resent
            pool.release(conn)
            raise
        return Response(conn, pool, pump, self._timeout)


async def _pump(conn: Connection, body: AsyncIterable[bytes], length: int | None) -> None:
    """Stream the request body (``length``: its declared length; None: sent chunked); the
    upstream's pace sets ours (drain after every write).

    The request counts as sent as soon as its last byte is handed to the connection (the
    declared length reached, or the final chunk written), not once the source says it has
    ended: a client that leaves in between must find its request sent (its outcome
    unknown), never merely started (its key released).

    A failure of the body's source (over the limit, the client gone) aborts the
    upstream request and is reported through ``conn``; an upstream that goes away
    is on record in ``conn`` already.
    """
    chunked = length is None
    left = length
    pieces = aiter(body)
    while True:
        try:
            piece = await anext(pieces)
        except StopAsyncIteration:
            break
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            conn.body_failed(exc)
            return
        if piece:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if left is not None:
                left -= len(piece)
                if left <= 0:
                    break  # the declared length is all there: nothing more is read
            try:
                await conn.drain()
            except ConnectionError:
                return
    if chunked:
        conn.send(b"0\r\n\r\n")
    conn.request_sent()


def _host_field(host: str, port: int | None) -> bytes:
    """The Host field for the base URL's host (IDNA, an IPv6 address in brackets) and port
    (only if the URL names one): the port is not IDNA-encoded with the last label."""
    field = b"[%s]" % host.encode() if ":" in host else host.encode("idna")
    return field if port is None else b"%s:%d" % (field, port)
