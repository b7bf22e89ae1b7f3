"""The proxied routes: one request in, at most one request upstream, the answer back.

For each request routed here, in the contract's order:

1. operator session (401 / 503 operator-keys-unavailable), then this
   operator's rate limit on this route (429 / 503 rate-limit-store-unavailable:
   a bad token never spends an operator's budget);
2. bridge secret (503 sme-jwt-bridge-unwired), then the voucher code (400);
3. request body: Content-Encoding (415), declared length (413); only now is a
   client that sent ``Expect: 100-continue`` invited to send it;
4. the upstream exchange through our own client (``upstream/``): the body is
   streamed up (413 again if an undeclared length runs over the limit: the
   upstream request is aborted), the answer is streamed back. The client's
   failures become the contract's answers in one table, ``_FAILURES``.

Nothing reaches the upstream before 1-3 passed, and nothing is ever retried:
the client writes a request on exactly one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import socket
import struct
import termios
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from . import headers as hdrs
from .answer import Answer
from .auth import Authenticator
from .bridge import BridgeSecret, map_role, mint
from .config import Settings
from .dispatch import RequestInfo
from .errors import (
    BadRequest,
    BodyTooLarge,
    BridgeUnwired,
    GatewayOverloaded,
    IdempotencyStoreUnavailable,
    MintFailed,
    MissingCode,
    ProxyError,
    UnsupportedContentEncoding,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .idempotency import (
    Attempt,
    Idempotency,
    Record,
    covered,
    fingerprinter,
    partial_fingerprint,
)
from .metrics import Metrics
from .ratelimit import RateLimiter
from .routes import Match
from .upstream import (
    BadResponse,
    Body,
    BodyBroken,
    BodyFailed,
    BreakerOpen,
    Client,
    ConnectFailed,
    PoolOverloaded,
    Progress,
    Response,
    ResponseTimeout,
    UpstreamFailure,
)

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_QUEUE = struct.pack("i", 0)  # SIOCOUTQ's answer: bytes of the socket's send queue
# s a client may go without taking any of a streamed answer while the gateway waits to write
# to it (nginx's send_timeout), looked at PATIENCE_CHECKS times per window: it is let go 1 to
# 1.25 windows after the last it took, or after the wait began (what fits in the buffers
# toward it, ~64 KiB and the kernel's, is written without waiting)
SEND_PATIENCE = 60.0
PATIENCE_CHECKS = 4
# (PATIENCE_CHECKS looks' delays, added as floats, may fall short of the patience by a hair)
PATIENCE_ALMOST = 0.999

# The client's failures, as the contract's answers (reference.md: "The upstream exchange").
_FAILURES: tuple[tuple[type[UpstreamFailure], type[ProxyError]], ...] = (
    (PoolOverloaded, GatewayOverloaded),
    (BreakerOpen, UpstreamUnreachable),
    (ConnectFailed, UpstreamUnreachable),
    (ResponseTimeout, UpstreamTimeout),
    (BadResponse, UpstreamBadResponse),
)


class _Exchange(NamedTuple):  # made per request: a tuple is the cheapest immutable record
    """The upstream request, prepared (everything but its body)."""

    method: bytes
    target: bytes
    head: bytes
    upload: _Upload


@dataclass(slots=True)
class _Upload:
    """What the request-body stream saw; read after the exchange fails."""

    limit: int
    sent: int = 0
    too_large: bool = False


class _TooLarge(Exception):
    pass


_REPLAYED = (hdrs.REPLAYED.encode(), b"true")


class Proxy:
    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        secret: BridgeSecret,
        metrics: Metrics,
        client: Client,
        limiter: RateLimiter | None = None,
        idempotency: Idempotency | None = None,
        *,
        send_patience: float = SEND_PATIENCE,
    ) -> None:
        self._settings = settings
        self._patience = send_patience  # (SEND_PATIENCE; tests shorten it)
        self._idem = idempotency if idempotency is not None and idempotency.active else None
        self._limiter = limiter if limiter is not None and limiter.active else None
        self._auth = authenticator
        self._secret = secret
        self._metrics = metrics
        self._client = client
        self._limit = settings.max_body_bytes
        self.draining = False  # shutdown has begun (Dispatcher.drain): answers close

    async def handle(
        self, request: web.BaseRequest, info: RequestInfo, match: Match, query: str
    ) -> web.StreamResponse:
        auth = self._auth
        token = auth.token(request.headers)
        operator = auth.remembered(token) or await auth.verify(token)
        role = operator.derived.get("role")
        if role is None:  # once per session: the claims do not change
            role = operator.derived["role"] = map_role(
                operator.claims, self._settings.operator_email
            )
        info.sub, info.email, info.role = operator.sub, operator.email, role
        if self._limiter is not None:
            await self._limiter.check(info.route, operator.sub)
        secret = self._secret.get()
        if secret is None:
            self._metrics.bridge_unwired.inc()
            raise BridgeUnwired(self._secret.last_error or "no bridge secret configured")
        if match.code is not None and not match.code:
            raise MissingCode()
        self.check_body(request)
        key = self._idem.key(info.route, request.headers) if self._idem is not None else None
        try:
            token = mint(secret, sub=operator.sub, email=operator.email, role=role)
        except Exception as exc:
            raise MintFailed(type(exc).__name__) from None
        route = match.route
        peer = request.remote
        if peer is None:
            _reset_already(request)
        exchange = _Exchange(
            route.upstream_method.encode(),
            (route.upstream_target(match.code) + query).encode(errors="surrogateescape"),
            hdrs.upstream_request_head(
                request.raw_headers,
                bridge_token=token,
                request_id=info.request_id,
                peer=peer,
                scheme=request.scheme,
            ),
            _Upload(self._limit),
        )
        if key is None:
            return await self._exchange(request, info, exchange, None)
        assert self._idem is not None
        iss = operator.claims.get("iss")
        try:
            attempt = await self._idem.begin(
                iss if isinstance(iss, str) else None, operator.sub, route, key
            )
        except IdempotencyStoreUnavailable:
            info.idempotency = "store-error"
            raise
        try:
            if attempt.existing is None:
                return await self._exchange(request, info, exchange, attempt)
            attempt.check_pending()  # 409 in use / unknown: whatever the body
            if request.headers.get("Expect"):
                await _invite_body(request)
            assert attempt.existing is not None  # (completed: check_pending passed)
            fingerprint = await self._fingerprint(
                request, exchange, covered(attempt.existing.fingerprint)
            )
            return self._replay(info, attempt.judge(fingerprint))
        finally:
            info.idempotency = attempt.outcome or None

    async def _exchange(
        self,
        request: web.BaseRequest,
        info: RequestInfo,
        exchange: _Exchange,
        attempt: Attempt | None,
    ) -> web.StreamResponse:
        """Step 6: the one upstream request, and its answer streamed back.

        With an ``attempt`` the body is fingerprinted as it streams, and the outcome
        settles the key: refused before anything was forwarded → released; 502/504
        after sending, or the client gone once sent → unknown; an answer → recorded.
        """
        progress = Progress()
        hasher: hashlib._Hash | None = None
        try:
            if request.headers.get("Expect"):
                try:  # an open breaker refuses now, before the client sends its body
                    self._client.breaker.check()
                except UpstreamFailure as exc:
                    raise self._translate(exc, exchange.upload) from None
                await _invite_body(request)
            body, length = self._body(request, exchange.upload)
            if attempt is not None:
                hasher = fingerprinter(exchange.method, exchange.target)
                if isinstance(body, bytes):
                    hasher.update(body)
                elif body is not None:
                    body = _hashing(body, hasher)  # fed as the body streams
                    attempt.keep()  # it streams for as long as the client takes
            started = time.perf_counter()
            try:
                upstream = await self._client.request(
                    exchange.method, exchange.target, exchange.head, body, length, progress
                )
            except UpstreamFailure as exc:
                raise self._translate(exc, exchange.upload) from None
            finally:
                if progress.connected:  # not for a breaker, an overload or a failed connect
                    info.upstream_seconds = time.perf_counter() - started
        except ProxyError as error:
            if attempt is not None:
                await (attempt.release() if error.forwarded == "no" else attempt.unknown())
            raise
        except BaseException:  # the client went away (cancelled), or worse
            if attempt is not None:
                attempt.settle_later(sent=progress.may_have_acted)
            raise
        info.upstream_status = upstream.status
        try:
            return await self._relay(request, info, exchange, upstream, attempt, hasher, progress)
        finally:
            upstream.release()
            if attempt is not None and not attempt.settled:
                # Every way out of _relay settles the attempt; one that did not (the answer's
                # head failed to go out, say) was acted on: unknown, and no more renewals.
                attempt.settle_later(sent=True)

    async def _fingerprint(
        self, request: web.BaseRequest, exchange: _Exchange, prefix: int | None = None
    ) -> bytes:
        """A repeated key's request: its fingerprint, reading (never forwarding) its body.
        Against a record of an early answer (``prefix``: the body bytes its fingerprint
        covers), the fingerprint of that much of this body: a body shorter than that is
        another request (b"", which matches nothing)."""
        hasher = fingerprinter(exchange.method, exchange.target)
        body, _ = self._body(request, exchange.upload)
        room = prefix if prefix is not None else -1  # body bytes still to hash (-1: all)

        def take(chunk: bytes) -> None:
            nonlocal room
            if room < 0:
                hasher.update(chunk)
            elif room:
                hasher.update(chunk[:room])
                room -= min(room, len(chunk))

        if isinstance(body, bytes):
            take(body)
        elif body is not None:
            # The whole body within the time budget, as a forwarded one must reach the SME
            # gateway within it: a client trickling a byte now and then must not hold the
            # connection for as long as it likes (each read alone bounded was not enough).
            budget = self._settings.upstream_timeout_seconds
            try:
                async with asyncio.timeout(budget):
                    async for chunk in body:
                        take(chunk)
            except _TooLarge:
                raise BodyTooLarge(self._limit) from None
            except (TimeoutError, HttpProcessingError) as exc:
                raise BadRequest(f"the request body: {type(exc).__name__}") from None
        if prefix is None:
            return hasher.digest()
        return partial_fingerprint(hasher, prefix) if room == 0 else b""

    def _replay(self, info: RequestInfo, record: Record) -> Answer:
        """The recorded answer again: same status, headers and body, a new X-Request-ID.

        The record holds the SME gateway's header fields as received; they cross the
        same allow-list as the first time (``X-Catalyst-Forwarded: yes``: it is the SME
        gateway's answer, from the first time)."""
        fields, _ = hdrs.answer_fields(record.headers, info.request_id, record.status)
        fields.append(_REPLAYED)
        return Answer(record.status, fields, record.body or b"")

    def check_body(self, request: web.BaseRequest) -> None:
        """415 for an encoded body (a content coding, or a transfer coding besides chunked:
        the gateway decodes neither, so it would pass on bytes that mean something else and
        measure the limit on them), 413 for a declared length over the limit."""
        for value in request.headers.getall("Content-Encoding", ()):
            for coding in value.split(","):
                if coding.strip().lower() not in ("identity", ""):
                    raise UnsupportedContentEncoding()
        length = request.content_length
        if length is not None and length > self._limit:
            raise BodyTooLarge(self._limit)
        chunked = length is None and request.body_exists  # a body framed by chunks
        if chunked and not hdrs.only_chunked(request.headers.getall("Transfer-Encoding", ())):
            raise UnsupportedContentEncoding()

    def _body(self, request: web.BaseRequest, upload: _Upload) -> tuple[Body, int | None]:
        """The body as bytes when it has all arrived already (one write upstream), else a stream."""
        if not request.body_exists:
            return None, None
        content = request.content
        if content.is_eof():
            failed = content.exception()
            if failed is not None:  # the parser gave up on it (runner.py): never forwarded
                raise BadRequest(f"the request body ended early: {type(failed).__name__}")
            data = content.read_nowait(-1)
            if len(data) > self._limit:
                raise BodyTooLarge(self._limit)
            return data, None
        return _stream_body(content, upload), request.content_length

    def _translate(self, exc: UpstreamFailure, upload: _Upload) -> ProxyError:
        """The client's failure → the contract's answer (most specific first)."""
        if isinstance(exc, BodyFailed):
            if upload.too_large:
                return BodyTooLarge(upload.limit)
            return BadRequest(f"the request body ended early: {type(exc.cause).__name__}")
        self._metrics.failures[exc.kind].inc()
        for kind, answer in _FAILURES:
            if isinstance(exc, kind):
                error = answer(exc.reason)
                break
        else:  # pragma: no cover - every failure kind is in the table
            error = UpstreamBadResponse(exc.reason)
        if isinstance(exc, BreakerOpen):
            error.headers["Retry-After"] = str(exc.retry_after)
        error.forwarded = "unknown" if exc.sent else "no"
        return error

    async def _relay(
        self,
        request: web.BaseRequest,
        info: RequestInfo,
        exchange: _Exchange,
        upstream: Response,
        attempt: Attempt | None,
        hasher: hashlib._Hash | None,
        progress: Progress,
    ) -> web.StreamResponse:
        """Stream the answer back; if the upstream breaks off, so does the client's transfer.

        With an ``attempt``, the answer is kept as it passes (up to the record's size
        limit) and recorded before the client's transfer ends.
        """
        if upstream.complete:  # the whole answer is here already: one write, at once
            fields, length = hdrs.answer_fields(upstream.headers, info.request_id, upstream.status)
            head_length = length if request.method == "HEAD" else None
            whole = Answer(upstream.status, fields, upstream.body(), head_length=head_length)
            if attempt is not None and hasher is not None:
                await self._record(request, exchange, upstream, attempt, hasher, progress,
                                   whole.body, whole)  # fmt: skip
            if self.draining:  # (checked after the record: the drain may begin during it)
                whole.force_close()
            whole.send(request)
            return whole
        headers, length = hdrs.client_response_headers(
            upstream.headers, info.request_id, upstream.status
        )
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if length is not None:
            response.content_length = length
        if self.draining or (length is None and request.version < HttpVersion11):
            # Shutdown; or an HTTP/1.0 client whose answer has no length to pass on: its
            # end is the connection's end (aiohttp would keep the connection open).
            response.force_close()
        await response.prepare(request)
        if attempt is not None:
            attempt.keep()  # the answer streams for as long as it takes
        # A HEAD request on a route whose upstream request is a GET: the body is read (the
        # connection stays usable, a record stays whole) but never written to the client.
        head_only = request.method == "HEAD"
        framed_by_close = request.version < HttpVersion11 and response.content_length is None
        if framed_by_close and not head_only:
            _framed_by_close(request, streaming=True)
        kept: bytearray | None = bytearray() if attempt is not None else None
        limit = self._idem.max_body_bytes if self._idem is not None else 0
        # With an attempt each piece goes out once the next one is here: the last waits
        # for the record, so that no client holds a whole answer not yet recorded.
        held = b""
        try:
            while chunk := await upstream.read():
                if kept is not None:
                    if len(kept) + len(chunk) <= limit:
                        kept += chunk
                    else:
                        kept = None  # too large to record: replays will say so
                if head_only:
                    continue
                if attempt is None:
                    await _send(request, response, chunk, self._patience)
                    continue
                if held:
                    await _send(request, response, held, self._patience)
                held = chunk
        except _ClientStalled:
            info.error = "client-stalled"
            _abort(request.transport, reset=framed_by_close)
            if attempt is not None:
                await attempt.unknown()  # acted on; the answer never reached its client whole
            return response
        except BodyFailed:
            # The client's body broke off or went over the limit while an early answer
            # streamed: the upstream request was aborted, and the answer with it. The
            # client's transfer is aborted too; the fault is the client's, not the SME
            # gateway's (no upstream failure is counted).
            info.error = "request-body-too-large" if exchange.upload.too_large else "bad-request"
            _abort(request.transport, reset=framed_by_close)
            if attempt is not None:
                await attempt.unknown()  # an answer had begun: the upstream may have acted
            return response
        except BodyBroken as exc:
            # The upstream stalled or broke off mid-body: close the client's connection
            # before the declared length / final chunk, so the client sees an aborted
            # transfer, never a clean short answer.
            self._metrics.failures[exc.kind].inc()
            info.error = "sme-gateway-aborted"
            # aiohttp chunks an HTTP/1.1 answer of unknown length; to HTTP/1.0 it cannot.
            _abort(request.transport, reset=framed_by_close)
            if attempt is not None:
                await attempt.unknown()  # it was acted on, but its answer is lost
            return response
        except BaseException:
            if attempt is not None:
                attempt.settle_later(sent=True)
            raise
        if attempt is not None and hasher is not None:
            body = bytes(kept) if kept is not None else None
            await self._record(request, exchange, upstream, attempt, hasher, progress,
                               body, response)  # fmt: skip
        if held:
            try:
                await _send(request, response, held, self._patience)
            except _ClientStalled:  # (recorded already: a retry gets the replay)
                info.error = "client-stalled"
                _abort(request.transport, reset=framed_by_close)
                return response
        if framed_by_close and not head_only:
            _framed_by_close(request, streaming=False)  # whole: the close that follows ends it
        return response

    async def _record(
        self,
        request: web.BaseRequest,
        exchange: _Exchange,
        upstream: Response,
        attempt: Attempt,
        hasher: hashlib._Hash,
        progress: Progress,
        body: bytes | None,
        response: web.StreamResponse,
    ) -> None:
        """The SME gateway's answer is complete: record it before the handler returns,
        that is before the client's transfer ends (aiohttp writes the rest after).

        In that order, a retry can only follow an answer its client has whole, so it
        always finds the record (the cost: one store write before the last bytes; none
        with the memory store). The upstream connection is given back first.

        An early answer (the SME gateway answered before the whole body was sent) is
        recorded the same way, at once: the client may be waiting for it before it sends
        the rest of its body, or never send it, or leave. If the body is not all in, its
        fingerprint covers the bytes that came (``partial_fingerprint``), and a retry
        whose body begins with them gets the answer replayed; what more comes is left
        to aiohttp to read and drop.
        """
        assert self._idem is not None
        if body is not None and len(body) > self._idem.max_body_bytes:
            body = None
        fingerprint = None
        if not progress.sent:
            try:
                await upstream.stop_sending()  # (the hasher has had what was read, no more)
            except BaseException:
                attempt.settle_later(sent=True)  # acted on, and not recorded
                raise
            content = request.content
            if not content.at_eof() or content.exception() is not None:
                fingerprint = partial_fingerprint(hasher, exchange.upload.sent)
        upstream.release()
        write = attempt.complete(
            fingerprint or hasher.digest(), upstream.status, upstream.headers, body
        )
        if write is not None:  # a shared store
            await write


class _ClientStalled(Exception):
    """The client took none of a streamed answer for ``SEND_PATIENCE`` seconds."""


async def _send(
    request: web.BaseRequest, response: web.StreamResponse, piece: bytes, patience: float
) -> None:
    """One piece of a streamed answer to the client. A client that takes none of the answer
    for ``patience`` seconds (``SEND_PATIENCE``: it stopped reading) would hold the SME
    gateway's connection, and its place in the pool, for ever: _ClientStalled, and the
    transfer is aborted. One that reads, however slowly, is never cut off: its patience
    starts again whenever it has taken some (a piece can take a slow client longer than
    the window)."""
    try:
        async with asyncio.timeout(None) as window:  # expired by _Progress only
            watch = _Progress(window, request.transport, len(piece), patience)
            try:
                await response.write(piece)
            finally:
                watch.stop()
    except TimeoutError:
        raise _ClientStalled() from None


class _Progress:
    """Looks at what waits for the client (``waiting_for_client``) ``PATIENCE_CHECKS`` times
    per ``SEND_PATIENCE``, and expires the send's window at the first look that finds nothing
    taken since a look ``SEND_PATIENCE`` ago or more: the client is let go between 1 and 1.25
    windows after the last it took, or after the write began to wait. (The looks alone judge:
    a deadline racing them would ignore what the client took in its window's last quarter.)"""

    __slots__ = ("_handle", "_left", "_loop", "_patience", "_since", "_transport", "_window")

    def __init__(
        self,
        window: asyncio.Timeout,
        transport: asyncio.Transport | None,
        size: int,
        patience: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._patience = patience
        self._window = window
        self._transport = transport
        self._since = self._loop.time()  # when it was last seen to take some
        # What waits for the client once this piece is written, if it takes none of it.
        self._left = (waiting_for_client(transport) if transport is not None else 0) + size
        self._handle = self._loop.call_later(self._patience / PATIENCE_CHECKS, self._look)

    def _look(self) -> None:
        # A closing transport is looked at like any other: a client that half-closed its end
        # (aiohttp then closes ours, which waits for its buffer to empty) may stop reading.
        transport = self._transport
        now = self._loop.time()
        left = waiting_for_client(transport) if transport is not None else self._left
        if left < self._left:
            self._left = left
            self._since = now
        elif now - self._since >= self._patience * PATIENCE_ALMOST:
            self._window.reschedule(now)  # expires it: the write is cancelled
            return
        self._handle = self._loop.call_later(self._patience / PATIENCE_CHECKS, self._look)

    def stop(self) -> None:
        self._handle.cancel()


def _abort(transport: asyncio.Transport | None, *, reset: bool) -> None:
    """Close the client's connection at once; with ``reset`` by a reset (RST), not a FIN.

    An answer framed by its length or by chunks is seen to be cut short whichever way
    the connection ends (and a FIN lets the client keep what it was sent). An answer
    framed by the connection's end (to an HTTP/1.0 client) would look complete after a
    FIN: it ends with a reset."""
    if transport is None:
        return
    if reset:
        close_with_reset(transport)
    transport.abort()


def waiting_for_client(transport: asyncio.WriteTransport) -> int:
    """The bytes written to ``transport`` that the client has not yet taken: those in the
    transport's buffer and those in the kernel's send queue (SIOCOUTQ: not yet
    acknowledged). The send watches judge a client by this sum. The buffer alone moves
    only when the kernel wakes the writer, once the client has taken a third of the
    kernel's queue (up to ~4 MiB on a fast path), so a client reading steadily but slowly
    (20 KB/s) looked as if it took nothing for longer than the patience, and was let go.
    (Where the socket cannot say, as after its close: the buffer alone.)"""
    waiting = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):  # (a closed socket's fd is -1)
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _QUEUE)  # (= SIOCOUTQ)
            waiting += struct.unpack("i", queued)[0]
    return waiting


def close_with_reset(transport: asyncio.BaseTransport) -> None:
    """From now on, closing ``transport`` sends a reset (RST), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _reset_already(request: web.BaseRequest) -> NoReturn:
    """The client has reset its connection, and the server has not seen it yet: the
    socket has no peer address any more (uvloop asks the kernel when it is first wanted).
    A whole request can be read, and its handler begun, before the reset is noticed, so no
    cancellation reaches it: it was forwarded all the same, a purchase for a client that
    can never learn its outcome, with no ``X-Forwarded-For``. Nothing is sent: the
    connection is closed, and the request ends as one whose client went away (499)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise ConnectionResetError("the client reset its connection")


def _framed_by_close(request: web.BaseRequest, *, streaming: bool) -> None:
    """Mark the connection's answer as framed by the connection's end: ``streaming`` (a
    close for any other reason, such as the drain's grace running out, must be a reset:
    aiohttp closes the connection before the cancelled handler runs again, and a FIN would
    complete the answer), then handed whole to the transport (a reset only if the server is
    cut off before the transport has passed it all to the kernel). The server's protocol
    (``runner``) honours the marks; another server ignores them."""
    protocol = request.protocol
    if hasattr(protocol, "close_framed"):
        protocol.close_framed = "streaming" if streaming else "handed"


async def _hashing(body: AsyncIterable[bytes], hasher: hashlib._Hash) -> AsyncIterator[bytes]:
    async for chunk in body:
        hasher.update(chunk)
        yield chunk


async def _invite_body(request: web.BaseRequest) -> None:
    """``Expect: 100-continue``: invite the body now that every check that could refuse it
    has passed (a client declaring 50 MB, a gzip body or a bad token is refused before it
    sends a byte of it). Other expectations are ignored (RFC 9110 §10.1.1 allows that)."""
    if request.version < HttpVersion11 or not request.body_exists:
        return
    if request.headers.get("Expect", "").lower() == "100-continue" and not request.content.is_eof():
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started


async def _stream_body(content: StreamReader, upload: _Upload) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk as it arrives, up to the limit. Its end is an end
    only if the body did not end with an error (runner.py ends a body the parser gave up
    on so: a reader woken by the last good chunk in that same read sees the end next)."""
    while chunk := await content.readany():
        upload.sent += len(chunk)
        if upload.sent > upload.limit:
            upload.too_large = True
            raise _TooLarge()
        yield chunk
    _raise_if_failed(content)


def _raise_if_failed(content: StreamReader) -> None:
    failed = content.exception()
    if failed is not None:
        raise failed
